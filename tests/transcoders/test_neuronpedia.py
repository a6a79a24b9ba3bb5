"""Neuronpedia graph JSON as circuit-tracer 0.5 writes its nodes (field for field as its
`frontend/graph_models.py` builds them) imports with the right layers and positions."""

import json

from tests.sae.conftest import query
from workbench.cli import cli


def test_circuit_tracer_0_5_node_ids_import(tmp_path, capsys):
    nodes = [
        {"node_id": "E_5_0", "feature": 0, "layer": "E", "ctx_idx": 0,
         "feature_type": "embedding", "jsNodeId": "E_5-0", "influence": 0.2},
        {"node_id": "0_3_1", "feature": 6, "layer": "0", "ctx_idx": 1,
         "feature_type": "cross layer transcoder", "jsNodeId": "0_3-0", "influence": 0.4,
         "activation": 1.5},
        {"node_id": "0_1_1", "feature": -1, "layer": "1", "ctx_idx": 1,
         "feature_type": "mlp reconstruction error", "jsNodeId": "1_1-0", "influence": 0.5},
        {"node_id": "3_7_1", "feature": 7, "layer": "3", "ctx_idx": 1, "feature_type": "logit",
         "jsNodeId": "L_7-1", "token_prob": 0.9, "is_target_logit": True,
         "clerp": 'Output " x" (p=0.900)'},
    ]  # fmt: skip
    links = [
        {"source": "E_5_0", "target": "0_3_1", "weight": 0.5},
        {"source": "0_3_1", "target": "3_7_1", "weight": 1.0},
        {"source": "0_1_1", "target": "3_7_1", "weight": -0.25},
    ]
    document = {
        "metadata": {"slug": "s", "scan": "m", "transcoder_list": [],
                     "prompt_tokens": ["<bos>", " a"], "prompt": "<bos> a"},
        "qParams": {}, "nodes": nodes, "links": links,
    }  # fmt: skip
    path = tmp_path / "g.json"
    path.write_text(json.dumps(document))
    db = tmp_path / "w.duckdb"
    assert cli(["import", "graph", str(path), "--db", str(db)]) == 0
    rows = query(db, "SELECT node_id, kind, layer, position, feature, token_id, token, "
                     "component FROM graph_nodes ORDER BY node")  # fmt: skip
    assert [(r["kind"], r["layer"], r["position"]) for r in rows] == [
        ("token", None, 0), ("feature", 0, 1), ("error", 1, 1), ("logit", 2, 1)
    ]  # fmt: skip
    assert rows[1]["feature"] == 3 and rows[0]["token"] == "<bos>"
    assert rows[3]["token_id"] == 7 and rows[3]["token"] == " x"
    assert [r["component"] for r in rows] == ["input", "m0", "m1", "logits"]
    edges = query(db, "SELECT src, dst, weight FROM graph_edges ORDER BY weight")
    assert [(e["src"], e["dst"], e["weight"]) for e in edges] == [(2, 3, -0.25), (0, 1, 0.5),
                                                                  (1, 3, 1.0)]  # fmt: skip
