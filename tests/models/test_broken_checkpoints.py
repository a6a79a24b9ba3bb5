"""A broken checkpoint is bad input: exit status 2, one sentence naming the broken file, and
nothing written to the database. One case per way a zoo or Hugging Face checkpoint breaks."""

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.store.test_store import counts
from workbench.cli import cli


def _edit_config(change: Callable[[dict], object]) -> Callable[[Path], str]:
    def breaks(d: Path) -> str:
        config = json.loads((d / "config.json").read_text())
        change(config)
        (d / "config.json").write_text(json.dumps(config))
        return "config.json"

    return breaks


def _edit_weights(change: Callable[[dict], dict], name: str = "model.safetensors"):
    def breaks(d: Path) -> str:
        save_file(change(load_file(d / name)), d / name)
        return name

    return breaks


def _mismatch(breaks: Callable[[Path], str]) -> Callable[[Path], str]:
    """A config that no longer matches the weights: the error names the weights file (whose
    tensors then have the wrong shapes) and says which config they do not fit."""

    def mismatched(d: Path) -> str:
        assert breaks(d) == "config.json"
        return "model.safetensors"

    return mismatched


def _write(name: str, data: bytes | str) -> Callable[[Path], str]:
    def breaks(d: Path) -> str:
        if isinstance(data, bytes):
            (d / name).write_bytes(data)
        else:
            (d / name).write_text(data)
        return name

    return breaks


def _truncate(name: str) -> Callable[[Path], str]:
    def breaks(d: Path) -> str:
        (d / name).write_bytes((d / name).read_bytes()[:4000])
        return name

    return breaks


def _remove(name: str) -> Callable[[Path], str]:
    def breaks(d: Path) -> str:
        (d / name).unlink()
        return name

    return breaks


def _empty(d: Path) -> str:
    for path in d.iterdir():
        path.unlink()
    return ""


ZOO_CASES = {
    "config not JSON": _write("config.json", "{not json"),
    "config not an object": _write("config.json", "[1, 2]"),
    "config field missing": _edit_config(lambda c: c.pop("d_model")),
    "config field mistyped": _edit_config(lambda c: c.update(n_layers="two")),
    "config field fractional": _edit_config(lambda c: c.update(n_heads=2.5)),
    "config field unknown": _edit_config(lambda c: c.update(n_fancy=3)),
    "unknown architecture": _edit_config(lambda c: c.update(positional_embedding_type="wobbly")),
    "config shape": _mismatch(_edit_config(lambda c: c.update(d_model=32))),
    "weight shape": _edit_weights(
        lambda w: w | {"blocks.0.attn.W_Q": w["blocks.0.attn.W_Q"][..., :-1].contiguous()}
    ),
    "weight missing": _edit_weights(lambda w: {k: v for k, v in w.items() if k != "embed.W_E"}),
    "weight unexpected": _edit_weights(lambda w: w | {"blocks.9.mystery": torch.zeros(3)}),
    "weights NaN": _edit_weights(
        lambda w: w | {"embed.W_E": torch.full_like(w["embed.W_E"], float("inf"))}
    ),
    "weights one NaN": _edit_weights(
        lambda w: w | {"blocks.0.attn.W_Q": _one_value(w["blocks.0.attn.W_Q"], float("nan"))}
    ),
    "weights one -inf": _edit_weights(
        lambda w: w | {"unembed.W_U": _one_value(w["unembed.W_U"], float("-inf"))}
    ),
    "weights truncated": _truncate("model.safetensors"),
    "weights random bytes": _write("model.safetensors", os.urandom(20_000)),
    "weights missing": _remove("model.safetensors"),
    "empty folder": _empty,
    "meta not JSON": _write("meta.json", "[1, 2"),
    "meta step mistyped": _write("meta.json", '{"task": "induction", "step": "x"}'),
    "tokenizer not JSON": _write("tokenizer.json", "not a tokenizer"),
    "tokenizer not a tokenizer": _write("tokenizer.json", '{"a": 1}'),
    "tokenizer config not JSON": _write("tokenizer_config.json", "{{"),
}


def _one_value(tensor, value):
    """`tensor` with one entry, away from its ends, set to `value`."""
    out = tensor.clone()
    out.view(-1)[out.numel() // 2 + 1] = value
    return out


HF_CASES = {
    "config not JSON": _write("config.json", "{not json"),
    "config field mistyped": _edit_config(lambda c: c.update(n_layer="two")),
    "unknown architecture": _edit_config(
        lambda c: c.update(architectures=["FooForCausalLM"], model_type="foo")
    ),
    "config shape": _mismatch(_edit_config(lambda c: c.update(n_embd=64))),
    "weights truncated": _truncate("model.safetensors"),
    "weights random bytes": _write("model.safetensors", os.urandom(20_000)),
    "weights NaN": _edit_weights(
        lambda w: (
            w
            | {"transformer.wte.weight": torch.full_like(w["transformer.wte.weight"], float("inf"))}
        )
    ),
    "weights one NaN": _edit_weights(
        lambda w: (
            w
            | {
                "transformer.h.1.mlp.c_fc.weight": _one_value(
                    w["transformer.h.1.mlp.c_fc.weight"], float("nan")
                )
            }
        )
    ),  # fmt: skip
    "trainer state mistyped": _write("trainer_state.json", '{"global_step": "ten"}'),
}


def _run_broken(tmp_path, source: Path, breaks, task: str, capsys) -> None:
    broken = tmp_path / "checkpoint"
    shutil.copytree(source, broken)
    name = breaks(broken)
    db = tmp_path / "w.duckdb"
    argv = ["run", "heads", "--model", str(broken), "--task", task, "--db", str(db)]
    assert cli([*argv, "--method", "dla"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{broken / name}".rstrip("/") in err, err
    assert not db.exists() or not any(counts(db).values())  # nothing was written


@pytest.mark.parametrize("case", ZOO_CASES)
def test_broken_zoo_checkpoint_is_bad_input_naming_the_file(tmp_path, induction_dir, capsys, case):
    _run_broken(tmp_path, induction_dir / "step_100", ZOO_CASES[case], "induction", capsys)


@pytest.fixture(scope="module")
def token_task(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("task") / "ids.jsonl"
    line = {"clean_ids": [5, 6, 7, 5, 6], "corrupt_ids": [8, 9, 7, 5, 6], "answer_id": 7}
    path.write_text(json.dumps(line | {"wrong_id": 9}) + "\n")
    return path


@pytest.mark.parametrize("case", HF_CASES)
def test_broken_hf_checkpoint_is_bad_input_naming_the_file(
    tmp_path, tiny_hf_dirs, token_task, capsys, case
):
    _run_broken(tmp_path, tiny_hf_dirs["gpt2"], HF_CASES[case], str(token_task), capsys)


def test_intact_copies_load(tmp_path, induction_dir, tiny_hf_dirs, token_task):
    """The cases above break an otherwise loadable checkpoint."""
    for source, task in (
        (induction_dir / "step_100", "induction"),
        (tiny_hf_dirs["gpt2"], str(token_task)),
    ):
        copy = tmp_path / source.name
        shutil.copytree(source, copy)
        argv = ["run", "heads", "--model", str(copy), "--task", task, "--method", "dla"]
        assert cli([*argv, "--db", str(tmp_path / "w.duckdb")]) == 0
