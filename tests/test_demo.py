"""What `workbench demo` stores beyond the pipelines' runs (`workbench.demo.prompt_extras`), on
the IOI zoo model: the first IOI prompt's views, a transcoder set on the final checkpoint and
that prompt's attribution graph; found stored the second time."""

from tests.sae.conftest import query
from workbench.demo import prompt_extras
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.tasks import load_task


def test_the_demo_stores_a_prompt_its_transcoders_and_its_graph(ioi_dir, tmp_path):
    db = str(tmp_path / "w.duckdb")
    lines = prompt_extras(str(ioi_dir), "ioi", db, has_mlps=True)
    assert [line.split()[:2] for line in lines] == [
        ["done", "prompt"], ["done", "transcoders"], ["done", "graph"],
    ]  # fmt: skip
    loaded = load_checkpoint(resolve_checkpoints(str(ioi_dir))[-1])
    first = list(load_task("ioi", loaded).pairs[0].clean_tokens)
    (prompt,) = query(db, "SELECT tokens FROM prompt_views")
    (graph,) = query(db, "SELECT token_ids, checkpoint_id, set_id FROM graphs")
    (tc,) = query(db, "SELECT set_id, checkpoint_id FROM transcoder_sets")
    assert graph["token_ids"] == first and len(prompt["tokens"]) == len(first)
    assert graph["set_id"] == tc["set_id"]
    assert graph["checkpoint_id"] == tc["checkpoint_id"] == loaded.checkpoint.checkpoint_id
    again = prompt_extras(str(ioi_dir), "ioi", db, has_mlps=True)
    assert [line.split()[0] for line in again] == ["cached", "skipped", "cached"]
