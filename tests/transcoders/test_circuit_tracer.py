"""Attribution graphs against circuit-tracer 0.5's own: on a tiny random Llama (one with its
RMSNorm weights at 1, one with them spread around 1) and three transcoder sets in circuit-tracer's
format, the graphs circuit-tracer computed and the Neuronpedia JSON its `create_graph_files`
wrote are kept in `tests/transcoders/data/circuit_tracer/` (made by
`tools/circuit_tracer_fixture.py` in an environment of their own; its README lists how). The
workbench loads the same model and set and must find the same graph: the same active features
and logits, the same adjacency to float32 precision, the same pruning and scores; and it must
import the JSON as circuit-tracer wrote it."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.transcoders import circuit_tracer_weights
from workbench.cli import cli
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.store import Store
from workbench.transcoders import pruning
from workbench.transcoders.graph import attribute
from workbench.transcoders.sets import load_transcoder_set

pytestmark = pytest.mark.numerics  # float32 sums compared across machines' kernels

DATA = Path(__file__).parent / "data" / "circuit_tracer"
# variant: (model directory, transcoder set, raw graph, graph JSON)
VARIANTS = {
    "plain": ("model", "transcoders", "raw_graph.npz", "graph.json"),
    "skip": ("model", "transcoders_skip", "raw_graph_skip.npz", "graph_skip.json"),
    "norm_weights": (
        "model_norm_weights",
        "transcoders_norm_weights",
        "raw_graph_norm_weights.npz",
        "graph_norm_weights.json",
    ),
}
# float32 sums in another order. Activations, probabilities and scores: within ATOL. The
# adjacency: within REL times its largest |weight|; the largest seen was 8.1e-7 times it
# (1.2e-5 where |weights| reach 22.6), under the avx2 and default kernels alike.
ATOL = 1e-5
REL = 1e-5


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kept files with the weights written beside them (the same bytes on every machine)."""
    root = tmp_path_factory.mktemp("circuit_tracer") / "data"
    shutil.copytree(DATA, root)
    circuit_tracer_weights.write_all(root)
    return root


def _theirs(variant: str) -> dict:
    raw = np.load(DATA / VARIANTS[variant][2])
    out = {k: raw[k] for k in raw.files}
    out["params"] = json.loads(str(raw["params_json"]))
    return out


def _ours(variant: str, inputs: Path):
    model_dir, set_dir, _, _ = VARIANTS[variant]
    theirs = _theirs(variant)
    loaded = load_checkpoint(resolve_checkpoints(str(inputs / model_dir))[-1])
    tset = load_transcoder_set(inputs / set_dir).fitted_to(loaded.model, set_dir)
    ids = loaded.encode(theirs["params"]["prompt"])
    assert ids == theirs["input_tokens"].tolist()
    p = theirs["params"]
    graph = attribute(
        loaded.model,
        torch.tensor(ids),
        tset,
        zero_first_position=True,
        max_n_logits=p["max_n_logits"],
        desired_logit_prob=p["desired_logit_prob"],
        max_feature_nodes=p["max_feature_nodes"],
        batch_size=p["batch_size"],
        update_interval=p["update_interval"],
    )
    return graph, theirs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_graph_is_circuit_tracers_graph(variant, inputs):
    graph, theirs = _ours(variant, inputs)
    assert graph.active.tolist() == theirs["active_features"].tolist()
    assert graph.activations.numpy() == pytest.approx(theirs["activation_values"], abs=ATOL)
    assert graph.selected.tolist() == theirs["selected_features"].tolist()
    assert graph.logit_tokens == theirs["logit_token_ids"].tolist()
    assert graph.logit_probabilities.numpy() == pytest.approx(
        theirs["logit_probabilities"], abs=ATOL
    )
    off = graph.offsets()
    assert [off["feature"], off["error"], off["token"], off["logit"]] == theirs["offsets"].tolist()
    ours = graph.adjacency.double().numpy()
    assert ours.shape == theirs["adjacency_matrix"].shape
    scale = np.abs(theirs["adjacency_matrix"]).max()
    assert np.abs(ours - theirs["adjacency_matrix"]).max() <= REL * scale
    kept = pruning.prune(
        ours,
        graph.logit_weights().double().numpy(),
        pruning.Offsets(off["error"], off["token"], off["logit"]),
        theirs["params"]["node_threshold"],
        theirs["params"]["edge_threshold"],
    )
    assert kept.node_mask.tolist() == theirs["node_mask"].tolist()
    assert kept.edge_mask.tolist() == theirs["edge_mask"].tolist()
    not_logits = slice(0, off["logit"])  # (circuit-tracer gives logits 1, the workbench 0)
    assert kept.cumulative[not_logits] == pytest.approx(
        theirs["cumulative_scores"][not_logits], abs=ATOL
    )
    replacement, completeness = pruning.scores(
        ours, graph.logit_weights().double().numpy(),
        pruning.Offsets(off["error"], off["token"], off["logit"]),
    )  # fmt: skip
    assert replacement == pytest.approx(float(theirs["replacement_score"]), abs=ATOL)
    assert completeness == pytest.approx(float(theirs["completeness_score"]), abs=ATOL)


def test_a_set_that_reads_the_normed_input_is_folded_into_the_model(inputs):
    """Unfitted, the norm-weights set reads the wrong activations: its active features differ
    from circuit-tracer's (the fitting is what makes the test above pass)."""
    model_dir, set_dir, _, _ = VARIANTS["norm_weights"]
    loaded = load_checkpoint(resolve_checkpoints(str(inputs / model_dir))[-1])
    tset = load_transcoder_set(inputs / set_dir)
    assert tset.norm_applied
    theirs = _theirs("norm_weights")
    graph = attribute(loaded.model, torch.tensor(theirs["input_tokens"].tolist()), tset,
                      zero_first_position=True)  # fmt: skip
    assert graph.active.tolist() != theirs["active_features"].tolist()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_circuit_tracers_json_imports_as_it_was_written(variant, tmp_path):
    """Every node and link of the file, stored: the links are circuit-tracer's adjacency at its
    edge mask, the nodes those its node mask kept (that have a link, and every embedding and
    logit), error nodes named in the workbench's convention."""
    db = tmp_path / "w.duckdb"
    assert cli(["import", "graph", str(DATA / VARIANTS[variant][3]), "--db", str(db)]) == 0
    theirs = _theirs(variant)
    graph = json.loads((DATA / VARIANTS[variant][3]).read_text())
    with Store(db, read_only=True) as store:
        nodes = store.query("SELECT node, node_id, kind FROM graph_nodes").to_pylist()
        edges = store.query("SELECT src, dst, weight FROM graph_edges").to_pylist()
    assert len(nodes) == len(graph["nodes"]) and len(edges) == len(graph["links"])
    kinds = {n["node_id"]: n["kind"] for n in nodes}
    assert set(kinds.values()) == {"feature", "error", "token", "logit"}
    assert all(i.split("_")[1] == "-1" for i, k in kinds.items() if k == "error")
    n_kept = int(theirs["edge_mask"].sum())
    assert len(edges) == n_kept
    stored = sorted(abs(e["weight"]) for e in edges)
    mask = theirs["edge_mask"].astype(bool)
    expected = sorted(np.abs(theirs["adjacency_matrix"][mask]).tolist())
    assert stored == pytest.approx(expected, abs=1e-6)


def test_a_graph_made_here_exports_as_circuit_tracer_wrote_it(inputs, tmp_path, capsys):
    """`workbench run graph` on the model and set, exported: circuit-tracer's nodes and links
    (its error ids `0_{layer}_{pos}` are the workbench's `{layer}_-1_{pos}`)."""
    db = tmp_path / "w.duckdb"
    theirs = json.loads((DATA / "graph.json").read_text())
    argv = ["run", "graph", "--model", str(inputs / "model"), "--transcoders",
            str(inputs / "transcoders"), "--text", "the cat sat on the", "--db", str(db),
            "--batch-size", "16"]  # fmt: skip
    assert cli(argv) == 0
    (gid,) = (line.split()[-1] for line in capsys.readouterr().out.splitlines() if "graph" in line)
    assert cli(["export", "graph", gid, "--db", str(db)]) == 0
    ours = json.loads(capsys.readouterr().out)

    def ids(graph: dict) -> dict[str, dict]:
        out = {}
        for n in graph["nodes"]:
            node_id = n["node_id"]
            if n["feature_type"] == "mlp reconstruction error":
                node_id = f"{n['layer']}_-1_{n['ctx_idx']}"
            out[node_id] = n
        return out

    mine, yours = ids(ours), ids(theirs)
    assert set(mine) == set(yours)
    link = {}
    for graph, table in ((ours, mine), (theirs, yours)):
        back = {n["node_id"]: key for key, n in table.items()}
        link[id(graph)] = {
            (back[e["source"]], back[e["target"]]): e["weight"] for e in graph["links"]
        }
    a, b = link[id(ours)], link[id(theirs)]
    assert set(a) == set(b)
    assert max(abs(a[k] - b[k]) for k in a) <= ATOL
