"""The `edges` pipeline end to end: edge runs, their faithfulness curves and circuits, export."""

import json

import networkx as nx
import pytest

from tests.store.test_store import counts
from workbench import circuits
from workbench.attribution import edges
from workbench.attribution.batches import make_batches
from workbench.cli import cli
from workbench.jobs import RunOptions
from workbench.runner import run
from workbench.store import Store


@pytest.fixture(scope="module")
def edges_db(tmp_path_factory, induction_dir):
    db = tmp_path_factory.mktemp("edges") / "w.duckdb"
    argv = ["run", "edges", "--model", str(induction_dir), "--task", "induction", "--db", str(db)]
    assert cli([*argv, "--method", "eap", "--method", "exact_edge"]) == 0
    return db


def test_edge_runs_store_edges_curves_and_a_faithful_circuit(
    edges_db, induction_final, induction_task, measured
):
    graph = edges.model_graph(induction_final.model)
    with Store(edges_db, read_only=True) as store:
        runs = store.query("SELECT run_id, method FROM runs ORDER BY method").to_pylist()
        assert [r["method"] for r in runs] == ["eap", "exact_edge"]
        for run in runs:
            n = store.query("SELECT count(*) AS n FROM edges WHERE run_id = ?", [run["run_id"]])
            assert n["n"][0].as_py() == graph.n_edges
            curve = store.query(
                "SELECT * FROM faithfulness_curves WHERE run_id = ? ORDER BY requested_edges",
                [run["run_id"]],
            ).to_pylist()
            assert curve[-1]["faithfulness"] == pytest.approx(1.0, abs=1e-4)  # the full graph
            (circuit,) = store.query(
                "SELECT * FROM circuits WHERE run_id = ?", [run["run_id"]]
            ).to_pylist()
            stored = store.query(
                "SELECT src, dst, score FROM circuit_edges WHERE circuit_id = ?",
                [circuit["circuit_id"]],
            ).to_pylist()
            measured(f"circuit_edges_{run['method']}", circuit["n_edges"])
            assert circuit["faithfulness"] >= 0.8 and circuit["n_edges"] == len(stored)
            recomputed = circuits.faithfulness(
                induction_final.model,
                make_batches(induction_task),
                graph,
                [(e["src"], e["dst"], e["score"]) for e in stored],
            )
            assert recomputed == pytest.approx(circuit["faithfulness"], abs=1e-5)
            # the induction mechanism is in it: layer-1 heads write to the logits
            assert any(e["src"].startswith("a1.") and e["dst"] == "logits" for e in stored)


def test_force_replaces_circuits_without_duplicates(edges_db, induction_dir):
    before = counts(edges_db)
    cfg = RunOptions(model=str(induction_dir), task="induction", db=str(edges_db), force=True)
    assert [o.status for o in run("edges", cfg, ["eap"])] == ["done"]
    assert counts(edges_db) == before


def test_export_circuit_as_graphml_and_json(edges_db, capsys, tmp_path):
    with Store(edges_db, read_only=True) as store:
        circuit = store.query("SELECT circuit_id, n_edges FROM circuits LIMIT 1").to_pylist()[0]
    assert cli(["export", "circuit", circuit["circuit_id"], "--db", str(edges_db)]) == 0
    path = tmp_path / "c.graphml"
    path.write_text(capsys.readouterr().out)
    graph = nx.read_graphml(path)
    assert graph.number_of_edges() == circuit["n_edges"]
    assert "input" in graph and "logits" in graph
    argv = ["export", "circuit", circuit["circuit_id"], "--format", "json", "--db", str(edges_db)]
    assert cli(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["edges"]) == circuit["n_edges"] and data["circuit"]["rule"].startswith("top:")
    assert cli(["export", "circuit", "missing", "--db", str(edges_db)]) == 2


def test_edge_runs_on_the_induction_zoo_store_roc_auc_against_the_known_circuit(
    edges_db, induction_final, measured
):
    from workbench.zoo.ground_truth import known_induction_edges, roc_auc

    known = known_induction_edges(induction_final)
    assert any(src.startswith("a1.") and dst == "logits" for src, dst in known)
    assert any(src.startswith("a0.") and dst.endswith("<k>") for src, dst in known)
    with Store(edges_db, read_only=True) as store:
        rows = store.query(
            """SELECT r.run_id, r.method, m.value FROM run_metrics m JOIN runs r USING (run_id)
               WHERE m.metric = 'roc_auc_known_circuit'"""
        ).to_pylist()
        assert {r["method"] for r in rows} == {"eap", "exact_edge"}
        for row in rows:
            stored = store.query(
                "SELECT src, dst, score FROM edges WHERE run_id = ?", [row["run_id"]]
            )
            edges_ = [(e["src"], e["dst"], e["score"]) for e in stored.to_pylist()]
            assert row["value"] == pytest.approx(roc_auc(edges_, known))
            # the methods rank the known circuit's edges high (the bound of test_ground_truth)
            assert measured(f"roc_auc_{row['method']}", row["value"]) >= 0.75


def test_roc_auc_counts_pairs():
    from workbench.zoo.ground_truth import roc_auc

    edges_ = [("a", "b", 0.9), ("c", "d", -0.8), ("e", "f", 0.1), ("g", "h", 0.1)]
    assert roc_auc(edges_, {("a", "b"), ("c", "d")}) == 1.0
    assert roc_auc(edges_, {("e", "f")}) == pytest.approx((0 + 0 + 0.5) / 3)
    assert roc_auc(edges_, set()) is None
