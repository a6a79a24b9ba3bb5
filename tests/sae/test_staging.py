"""Trained SAEs are staged in a directory of the run's own, never one another runner may use."""

from pathlib import Path

import pytest

from workbench.sae import compute
from workbench.sae.options import SaeTrainOptions
from workbench.sae.plan import FeaturesRun, SaeSource


def test_each_staging_dir_is_new_and_beside_the_final_one(tmp_path):
    final = tmp_path / "saes" / "sae-0123456789"
    made = {compute.staging_dir(final) for _ in range(20)}
    assert len(made) == 20
    for staging in made:
        assert staging.parent == final.parent and staging.is_dir()
        assert staging.name.startswith(".sae-0123456789.partial-")
        assert not any(staging.iterdir())


def test_a_failed_training_removes_its_own_staging_dir_only(tmp_path, monkeypatch):
    root = tmp_path / "saes"
    others = [root / ".sae-0123456789.partial", root / ".sae-0123456789.partial-deadbeef"]
    for other in others:
        other.mkdir(parents=True)
        (other / "cfg.json").write_text("{}")

    def fail(loaded, corpus, cfg, output_dir: Path):
        assert output_dir.is_dir() and output_dir not in others
        (output_dir / "cfg.json").write_text("{}")
        raise RuntimeError("out of memory")

    monkeypatch.setattr("workbench.sae.train.train_sae", fail)
    source = SaeSource("train", "blocks.0.hook_resid_post")
    training = SaeTrainOptions().training(source.spec)
    run = FeaturesRun(source, "sae-0123456789", root, None, 10, {}, training)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="out of memory"):
        compute.train_staged(None, run)  # type: ignore[arg-type]
    assert sorted(root.iterdir()) == sorted(others)
