"""`workbench run transcoders` and `workbench run graph` end to end on the IOI zoo model: what
they store, that a stored graph is its computation's graph, re-runs, and bad input (exit 2, one
sentence, nothing stored)."""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from tests.sae.conftest import query
from workbench.cli import cli


@pytest.fixture(scope="module")
def stored(graph_store):
    return graph_store


def test_a_set_is_stored_with_its_quality_and_features(stored, ioi_dir):
    from sae_lens import SAE

    (row,) = query(stored.db, "SELECT * FROM transcoder_sets")
    assert row["n_layers"] == 2 and row["d_transcoder"] == 4 * 64
    assert row["architecture"] == "skip_transcoder"
    assert row["ce_loss_clean"] <= row["ce_loss_replaced"] <= row["ce_loss_zero"]
    layers = query(
        stored.db, "SELECT * FROM saes WHERE set_id = ? ORDER BY sae_id", [row["set_id"]]
    )
    assert [r["sae_id"] for r in layers] == [f"{row['set_id']}-L0", f"{row['set_id']}-L1"]
    for layer, r in enumerate(layers):
        assert r["hook"] == f"blocks.{layer}.ln2.hook_normalized"
        assert r["hook_out"] == f"blocks.{layer}.hook_mlp_out"
        assert 0 < r["l0"] < r["d_sae"] and 0 <= r["dead_fraction"] < 1
        sae = SAE.load_from_disk(str(Path(row["path"]) / f"layer_{layer}"))
        assert sae.cfg.architecture() == "skip_transcoder"
    n = query(stored.db, "SELECT count(*) AS n FROM features WHERE sae_id LIKE 'tc-%'")[0]["n"]
    assert n == 2 * row["d_transcoder"]
    examples = query(
        stored.db, "SELECT count(*) AS n FROM feature_examples WHERE sae_id LIKE 'tc-%'"
    )
    assert examples[0]["n"] > 0
    nodes = query(stored.db, "SELECT count(*) AS n FROM nodes WHERE sae_id LIKE 'tc-%'")
    assert nodes[0]["n"] == 2 * (row["d_transcoder"] + 1)


def test_the_stored_graph_is_the_graph_of_the_prompt(stored, ioi_dir):
    """Recomputed from the stored set and prompt, the graph has the stored nodes, and the
    stored edges and full adjacency are its entries."""
    from workbench.models import load_checkpoint, resolve_checkpoints
    from workbench.transcoders.graph import attribute, prune
    from workbench.transcoders.sets import load_transcoder_set

    (g,) = query(stored.db, "SELECT * FROM graphs")
    params = json.loads(g["params"])
    loaded = load_checkpoint(resolve_checkpoints(str(ioi_dir))[-1])
    (set_row,) = query(stored.db, "SELECT path FROM transcoder_sets")
    tset = load_transcoder_set(set_row["path"])
    graph = attribute(loaded.model, torch.tensor(g["token_ids"]), tset,
                      zero_first_position=params["zero_first_position"],
                      max_feature_nodes=params["max_feature_nodes"])  # fmt: skip
    pruned = prune(graph, params["node_threshold"], params["edge_threshold"])
    nodes = query(stored.db, "SELECT * FROM graph_nodes WHERE graph_id = ? ORDER BY node",
                  [g["graph_id"]])  # fmt: skip
    assert len(nodes) == graph.n_nodes == g["n_nodes"]
    assert [n["kept"] for n in nodes] == pruned.node_mask.tolist()
    kinds = [n["kind"] for n in nodes]
    assert kinds.count("token") == len(g["token_ids"]) and "logit" in kinds
    assert sum(1 for n in nodes if n["kind"] == "feature" and n["position"] == 0) == 0
    logits = [n for n in nodes if n["kind"] == "logit"]
    assert logits[0]["node_id"] == f"3_{logits[0]['token_id']}_{len(g['token_ids']) - 1}"
    assert all(n["sae_id"].startswith(stored.set_id) for n in nodes if n["kind"] == "feature")
    edges = query(stored.db, "SELECT * FROM graph_edges WHERE graph_id = ?", [g["graph_id"]])
    assert len(edges) == int(pruned.edge_mask.sum()) == g["n_edges_kept"] > 0
    for e in edges[:50]:
        assert e["weight"] == pytest.approx(float(graph.adjacency[e["dst"], e["src"]]), abs=1e-5)
    full = pq.read_table(g["adjacency_path"]).to_pylist()
    assert len(full) == int((graph.adjacency != 0).sum())
    assert 0 < g["replacement_score"] <= 1 and 0 < g["completeness_score"] <= 1
    by_component = query(
        stored.db,
        "SELECT src, dst FROM graph_component_edges WHERE graph_id = ?",
        [g["graph_id"]],
    )
    assert {(r["src"], r["dst"]) for r in by_component} <= {
        (a, b) for a in ("input", "m0", "m1") for b in ("m0", "m1", "logits")
    }


def test_a_graph_stored_is_not_computed_again_and_force_replaces_it(stored, ioi_dir, capsys):
    argv = ["run", "graph", "--model", str(ioi_dir), "--transcoders", stored.set_id]
    argv += ["--task", "ioi", "--index", "0", "--db", str(stored.db)]
    capsys.readouterr()
    assert cli(argv) == 0
    assert f"cached   graph {stored.graph_id}" in capsys.readouterr().out
    before = query(stored.db, "SELECT count(*) AS n FROM graph_nodes")[0]["n"]
    assert cli([*argv, "--force"]) == 0
    assert query(stored.db, "SELECT count(*) AS n FROM graph_nodes")[0]["n"] == before
    assert len(query(stored.db, "SELECT * FROM graphs")) == 1


def test_the_update_interval_is_in_the_graph_id_except_at_its_default(stored, ioi_dir, tmp_path,
                                                                       capsys):  # fmt: skip
    db = tmp_path / "w.duckdb"
    shutil.copy(stored.db, db)
    argv = ["run", "graph", "--model", str(ioi_dir), "--transcoders", stored.set_id]
    argv += ["--task", "ioi", "--index", "0", "--db", str(db)]
    capsys.readouterr()
    assert cli([*argv, "--update-interval", "4"]) == 0  # the default: the graph stored before
    assert f"cached   graph {stored.graph_id}" in capsys.readouterr().out
    assert cli([*argv, "--update-interval", "1", "--max-feature-nodes", "8"]) == 0
    (new,) = query(db, "SELECT * FROM graphs WHERE graph_id <> ?", [stored.graph_id])
    assert json.loads(new["params"])["update_interval"] == 1
    features = query(db, "SELECT count(*) AS n FROM graph_nodes WHERE graph_id = ? AND "
                     "kind = 'feature'", [new["graph_id"]])  # fmt: skip
    assert 0 < features[0]["n"] <= 8


def _tables(db):
    names = ("graphs", "graph_nodes", "graph_edges", "transcoder_sets", "saes", "runs")
    return {t: query(db, f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in names}


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--text", "   "], "--text: empty"),
        (["--text", "a " * 300], "more than the model's context"),
        (["--task", "ioi", "--index", "100000"], "--index 100000: task ioi has"),
        (["--text", "x", "--transcoders", "tc-0000000000"], "no such set"),
        (["--text", "x", "--node-threshold", "0"], "--node-threshold 0.0: must be in (0, 1]"),
        (["--text", "x", "--update-interval", "0"], "--update-interval 0: must be >= 1"),
    ],
)
def test_bad_graph_input_is_one_sentence_and_stores_nothing(stored, ioi_dir, capsys, extra,
                                                            says):  # fmt: skip
    before = _tables(stored.db)
    argv = ["run", "graph", "--model", str(ioi_dir), "--db", str(stored.db)]
    if "--transcoders" not in extra:
        argv += ["--transcoders", stored.set_id]
    capsys.readouterr()
    assert cli(argv + extra) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1
    assert _tables(stored.db) == before


def test_a_set_for_another_model_is_refused(stored, norm_dirs, tmp_path, capsys):
    from tests.transcoders.test_sets import make_set
    from workbench.transcoders.sets import save_saelens

    save_saelens(make_set(d=16), tmp_path / "small")  # d_model 16; the model's is 32
    before = _tables(stored.db)
    argv = ["run", "graph", "--model", str(norm_dirs["LN"]), "--transcoders",
            str(tmp_path / "small"), "--text", "x", "--db", str(stored.db)]  # fmt: skip
    capsys.readouterr()
    assert cli(argv) == 2
    assert "16-dimensional inputs, the model's d_model is 32" in capsys.readouterr().err
    assert _tables(stored.db) == before


def test_transcoders_on_an_attention_only_model_is_one_sentence(induction_dir, tmp_path, capsys):
    argv = ["run", "transcoders", "--model", str(induction_dir), "--task", "induction"]
    argv += ["--db", str(tmp_path / "w.duckdb"), "--checkpoint", "latest"]
    assert cli(argv) == 2
    assert "attention-only" in capsys.readouterr().err


def test_intervene_moves_the_prediction_and_names_bad_input(stored, ioi_dir, capsys):
    (g,) = query(stored.db, "SELECT text, token_ids FROM graphs")
    feats = query(
        stored.db,
        "SELECT layer, position, feature, activation FROM graph_nodes WHERE kind = 'feature' "
        "AND kept ORDER BY influence DESC LIMIT 1",
    )
    (top,) = feats
    where = f"{top['layer']}:{top['position']}:{top['feature']}"
    argv = ["intervene", "--model", str(ioi_dir), "--transcoders", stored.set_id,
            "--text", g["text"], "--db", str(stored.db)]  # fmt: skip
    capsys.readouterr()
    assert cli([*argv, "--set", f"{where}=0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["token", "before", "after"]
    rows = [line.rsplit(maxsplit=2) for line in lines[1:]]
    before = [float(r[1]) for r in rows]
    after = [float(r[2]) for r in rows]
    assert before != after and abs(sum(after) - 1) <= 1 and max(before) > 0
    # with the features as they are, the spliced model is the model
    from workbench.models import load_checkpoint, resolve_checkpoints

    loaded = load_checkpoint(resolve_checkpoints(str(ioi_dir))[-1])
    with torch.no_grad():
        probs = torch.softmax(loaded.model(torch.tensor([loaded.encode(g["text"])]))[0, -1], -1)
    assert max(before) == pytest.approx(float(probs.max()), abs=1e-4)
    for bad, says in (("1:2", "expected LAYER:POSITION:FEATURE=VALUE"),
                      ("0:0:99999=1", "layer 0 has features 0 to 255"),
                      ("0:500:1=1", "outside the prompt's")):  # fmt: skip
        assert cli([*argv, "--set", bad]) == 2
        assert says in capsys.readouterr().err


def test_intervene_on_a_stored_graph_takes_its_model_set_and_prompt(stored, ioi_dir, capsys):
    """`--graph G` is the same intervention as naming G's model, set and prompt; JSON out."""
    (g,) = query(stored.db, "SELECT text FROM graphs")
    (top,) = query(
        stored.db,
        "SELECT layer, position, feature FROM graph_nodes WHERE kind = 'feature' AND kept "
        "ORDER BY influence DESC LIMIT 1",
    )
    change = ["--set", f"{top['layer']}:{top['position']}:{top['feature']}=0"]
    db = ["--db", str(stored.db), "--format", "json"]
    capsys.readouterr()
    assert cli(["intervene", "--graph", stored.graph_id, *change, *db]) == 0
    by_graph = json.loads(capsys.readouterr().out)
    named = ["--model", str(ioi_dir), "--transcoders", stored.set_id, "--text", g["text"]]
    assert cli(["intervene", *named, *change, *db]) == 0
    assert json.loads(capsys.readouterr().out) == by_graph
    assert {"token", "id", "before", "after"} == set(by_graph[0])
    for argv, says in (
        (["--graph", stored.graph_id, "--model", str(ioi_dir)], "leave out --model"),
        (["--graph", "g-0000000000000000"], "no such graph"),
        (["--model", str(ioi_dir)], "give --graph G, or all of"),
    ):
        assert cli(["intervene", *argv, *change, *db]) == 2
        assert says in capsys.readouterr().err


def _kept(db, graph_id):
    nodes = query(
        db,
        "SELECT node, node_id, kind, layer, position, feature, token_id, activation, "
        "probability, cumulative_influence FROM graph_nodes WHERE graph_id = ? AND kept",
        [graph_id],
    )
    ids = {n.pop("node"): n["node_id"] for n in nodes}
    edges = query(db, "SELECT src, dst, weight FROM graph_edges WHERE graph_id = ?", [graph_id])
    linked = {ids[e[k]] for e in edges for k in ("src", "dst")}
    nodes = [n for n in nodes if n["node_id"] in linked or n["kind"] in ("token", "logit")]
    return (
        sorted(nodes, key=lambda n: n["node_id"]),
        sorted((ids[e["src"]], ids[e["dst"]], e["weight"]) for e in edges),
    )


def test_neuronpedia_json_round_trip(stored, tmp_path, capsys):
    capsys.readouterr()
    assert cli(["export", "graph", stored.graph_id, "--db", str(stored.db)]) == 0
    text = capsys.readouterr().out
    document = json.loads(text)
    assert set(document) == {"metadata", "qParams", "nodes", "links"}
    by_type = {n["feature_type"] for n in document["nodes"]}
    assert by_type <= {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    assert {"embedding", "logit"} <= by_type
    logit = next(n for n in document["nodes"] if n["feature_type"] == "logit")
    assert logit["is_target_logit"] and logit["layer"] == "3"
    assert logit["clerp"].startswith("Output ")
    feature = next(n for n in document["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, feat, pos = (int(x) for x in feature["node_id"].split("_"))
    assert feature["feature"] == (layer + feat) * (layer + feat + 1) // 2 + feat
    assert feature["jsNodeId"] == f"{layer}_{feat}-0" and feature["ctx_idx"] == pos
    path = tmp_path / "graph.json"
    path.write_text(text)
    assert cli(["import", "graph", str(path), "--db", str(stored.db)]) == 0
    imported = capsys.readouterr().out.split()[-1]
    assert imported != stored.graph_id
    (nodes_in, edges_in), (nodes_out, edges_out) = (
        _kept(stored.db, g) for g in (imported, stored.graph_id)
    )
    assert [n for n in nodes_in if n not in nodes_out] == []
    assert nodes_in == nodes_out and edges_in == edges_out
    assert cli(["export", "graph", imported, "--db", str(stored.db)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["nodes"] == document["nodes"] and again["links"] == document["links"]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("{", "not valid JSON"),
        ('{"metadata": {}, "nodes": []}', "field 'links' is missing"),
        (
            '{"metadata": {}, "nodes": [{"node_id": "0_1_1", "feature_type": "x", "ctx_idx": 1, '
            '"layer": "0"}], "links": []}',
            "feature_type 'x' is not one of",
        ),
        (
            '{"metadata": {}, "nodes": [], "links": [{"source": "a", "target": "b", "weight": 1}]}',
            "links[0]: field 'source' names no node",
        ),
    ],
)
def test_a_bad_graph_file_is_one_sentence_and_stores_nothing(stored, tmp_path, capsys, content,
                                                             says):  # fmt: skip
    path = tmp_path / "bad.json"
    path.write_text(content)
    before = _tables(stored.db)
    capsys.readouterr()
    assert cli(["import", "graph", str(path), "--db", str(stored.db)]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1
    assert _tables(stored.db) == before
