"""Attribution graphs as Neuronpedia's graph JSON, the layout circuit-tracer's
`create_graph_files` writes: `metadata`, `qParams`, `nodes` and `links`.

Export (`export_graph`) writes a stored graph's kept nodes and edges: node ids in
circuit-tracer's convention (`{layer}_{feature}_{pos}`, `{layer}_-1_{pos}` for an error,
`E_{token}_{pos}`, `{n_layers + 1}_{token}_{pos}` for a logit), `feature_type` `cross layer
transcoder` (circuit-tracer's name for per-layer transcoder features too), `mlp reconstruction
error`, `embedding` or `logit`, `influence` the node's cumulative influence share, and each link
`{source, target, weight}`; nodes in no link are left out but for embeddings and logits, as
circuit-tracer does. circuit-tracer 0.5 writes an error node's id as `0_{layer}_{pos}` instead;
import reads both and stores `{layer}_-1_{pos}`. Import (`import_graph`) stores such a file as
a graph of its own (graph_id `g-` + 16 hex of the file's sha256), with the nodes and links it
has (all kept) and no full adjacency.

Token strings: the file shows each token's text with a newline, tab and carriage return as
`⏎`, `→` and `↵` (circuit-tracer's `process_token`); import turns them back.
"""

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa

from workbench.core import Node
from workbench.errors import BadInput
from workbench.store import Store

FEATURE_TYPES = {
    "feature": "cross layer transcoder",
    "error": "mlp reconstruction error",
    "token": "embedding",
    "logit": "logit",
}
KINDS = {v: k for k, v in FEATURE_TYPES.items()}
Q_PARAMS = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}


# how circuit-tracer's files show a newline, tab and carriage return in token strings, and back
SHOWN = str.maketrans({"\n": "⏎", "\t": "→", "\r": "↵"})
UNSHOWN = str.maketrans({"⏎": "\n", "→": "\t", "↵": "\r"})


def _shown(token: str) -> str:
    return token.translate(SHOWN)


def _unshown(token: str) -> str:
    return token.translate(UNSHOWN)


def cantor(a: int, b: int) -> int:
    """The Cantor pairing circuit-tracer uses for a feature node's `feature` field."""
    return (a + b) * (a + b + 1) // 2 + b


def _records(store: Store, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    return store.query(sql, params).to_pylist()


def export_graph(graph_id: str, db: str | None = None) -> str:
    """The stored graph `graph_id` (its kept nodes and edges) as Neuronpedia graph JSON."""
    with Store(db, read_only=True) as store:
        heads = _records(store, "SELECT * FROM graphs WHERE graph_id = ?", [graph_id])
        if not heads:
            raise BadInput(f"graph {graph_id}: not in {store.path}")
        nodes = _records(
            store,
            "SELECT * FROM graph_nodes WHERE graph_id = ? AND kept ORDER BY node",
            [graph_id],
        )
        edges = _records(
            store, "SELECT * FROM graph_edges WHERE graph_id = ? ORDER BY dst, src", [graph_id]
        )
    head = heads[0]
    params = json.loads(head["params"]) if head["params"] else {}
    ids = {n["node"]: n["node_id"] for n in nodes}
    links = [
        {"source": ids[e["src"]], "target": ids[e["dst"]], "weight": e["weight"]}
        for e in edges
        if e["src"] in ids and e["dst"] in ids
    ]
    linked = {x for link in links for x in (link["source"], link["target"])}
    first_logit = min((n["node"] for n in nodes if n["kind"] == "logit"), default=None)
    out_nodes = []
    for n in nodes:
        if n["node_id"] not in linked and n["kind"] not in ("token", "logit"):
            continue
        out_nodes.append(_node_json(n, is_target=n["node"] == first_logit))
    document = {
        "metadata": {
            "slug": graph_id,
            "scan": head["set_id"] or head["set_path"] or "",
            "transcoder_list": [],
            "prompt_tokens": [_shown(t) for t in head["tokens"] or []],
            "prompt": head["text"],
            "node_threshold": params.get("node_threshold"),
            "schema_version": 1,
            "info": {"generator": {"name": "circuit-workbench"}},
            "generation_settings": {
                k: params.get(k)
                for k in ("max_n_logits", "desired_logit_prob", "batch_size", "max_feature_nodes")
            },
            "pruning_settings": {
                "node_threshold": params.get("node_threshold"),
                "edge_threshold": params.get("edge_threshold"),
            },
        },
        "qParams": Q_PARAMS,
        "nodes": out_nodes,
        "links": links,
    }
    return json.dumps(document, indent=2) + "\n"


def _node_json(n: dict[str, Any], *, is_target: bool) -> dict[str, Any]:
    kind, layer, pos = n["kind"], n["layer"], n["position"]
    out: dict[str, Any] = {
        "node_id": n["node_id"],
        "feature": 0,
        "layer": "E" if kind == "token" else str(layer + 1 if kind == "logit" else layer),
        "ctx_idx": pos,
        "feature_type": FEATURE_TYPES[kind],
        "token_prob": 0.0,
        "is_target_logit": False,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "jsNodeId": "",
        "clerp": "",
        "influence": n["cumulative_influence"],
        "activation": None,
    }
    if kind == "feature":
        out.update(
            feature=cantor(layer, n["feature"]),
            jsNodeId=f"{layer}_{n['feature']}-0",
            activation=n["activation"],
        )
    elif kind == "error":
        out.update(feature=-1, jsNodeId=f"{layer}_-1-{pos}")
    elif kind == "token":
        out.update(feature=pos, jsNodeId=f"E_{n['token_id']}-{pos}")
    else:
        p = n["probability"] or 0.0
        out.update(
            feature=n["token_id"],
            jsNodeId=f"L_{n['token_id']}-{pos}",
            token_prob=p,
            is_target_logit=is_target,
            clerp=f'Output "{_shown(n["token"] or "")}" (p={p:.3f})',
            influence=None,
        )
    return out


def import_graph(path: Path, db: str | None = None, *, checkpoint_id: str | None = None) -> str:
    """Store a Neuronpedia graph JSON file as a graph; returns its graph_id."""
    try:
        data = path.read_bytes()
        document = json.loads(data)
    except OSError as err:
        raise BadInput(f"{path}: cannot read the file ({err.strerror})") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInput(f"{path}: not valid JSON ({err})") from err
    if not isinstance(document, dict):
        raise BadInput(f"{path}: expected a JSON object with metadata, nodes and links")
    for key in ("metadata", "nodes", "links"):
        if not isinstance(document.get(key), dict if key == "metadata" else list):
            raise BadInput(f"{path}: field {key!r} is missing or of the wrong type")
    graph_id = "g-" + hashlib.sha256(data).hexdigest()[:16]
    meta = document["metadata"]
    nodes = []
    index: dict[str, int] = {}
    logit_layers = set()
    for i, raw in enumerate(document["nodes"]):
        node = _node_from_json(raw, f"{path}: nodes[{i}]", meta)
        if raw["node_id"] in index:  # (the links name nodes by the file's ids)
            raise BadInput(f"{path}: nodes[{i}]: node_id {raw['node_id']!r} appears twice")
        index[raw["node_id"]] = i
        if node["kind"] == "logit":
            logit_layers.add(node["layer"])
        nodes.append(node | {"graph_id": graph_id, "node": i})
    edges = []
    for i, link in enumerate(document["links"]):
        where = f"{path}: links[{i}]"
        if not isinstance(link, dict):
            raise BadInput(f"{where}: expected an object with source, target and weight")
        for end in ("source", "target"):
            if link.get(end) not in index:
                raise BadInput(f"{where}: field {end!r} names no node ({link.get(end)!r})")
        weight = link.get("weight")
        if not isinstance(weight, int | float) or isinstance(weight, bool):
            raise BadInput(f"{where}: field 'weight' must be a number")
        edges.append((index[link["source"]], index[link["target"]], float(weight)))
    tokens = {n["position"]: n["token_id"] for n in nodes if n["kind"] == "token"}
    head = {
        "graph_id": graph_id,
        "checkpoint_id": checkpoint_id,
        "set_id": None,
        "set_path": str(meta.get("scan") or ""),
        "text": str(meta.get("prompt") or ""),
        "token_ids": [tokens[p] for p in sorted(tokens)],
        "tokens": [_unshown(str(t)) for t in meta.get("prompt_tokens") or []],
        "params": {
            "imported_from": path.name,
            "slug": meta.get("slug"),
            "node_threshold": meta.get("node_threshold"),
        },
        "n_active_features": None,
        "n_features": sum(1 for n in nodes if n["kind"] == "feature"),
        "n_nodes": len(nodes),
        "n_edges": len(edges),
        "n_nodes_kept": len(nodes),
        "n_edges_kept": len(edges),
        "replacement_score": None,
        "completeness_score": None,
        "seconds": None,
    }
    edge_table = pa.table(
        {
            "graph_id": pa.array([graph_id] * len(edges), pa.string()),
            "src": pa.array([e[0] for e in edges], pa.int32()),
            "dst": pa.array([e[1] for e in edges], pa.int32()),
            "weight": pa.array([e[2] for e in edges], pa.float64()),
        }
    )
    with Store(db) as store:
        store.save_graph(head, pa.Table.from_pylist(nodes), edge_table, None, {})
    return graph_id


ID = re.compile(r"^(E|-?\d+)_(-?\d+)_(\d+)$")


def _node_from_json(raw: Any, where: str, meta: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise BadInput(f"{where}: expected an object")
    for key in ("node_id", "feature_type", "ctx_idx", "layer"):
        if key not in raw:
            raise BadInput(f"{where}: field {key!r} is missing")
    kind = KINDS.get(raw["feature_type"])
    if kind is None:
        raise BadInput(f"{where}: feature_type {raw['feature_type']!r} is not one of "
                       f"{', '.join(repr(k) for k in KINDS)}")  # fmt: skip
    match = ID.match(str(raw["node_id"]))
    if match is None:
        raise BadInput(f"{where}: node_id {raw['node_id']!r} is not LAYER_FEATURE_POSITION")
    first, middle = match.group(1), int(match.group(2))
    pos = int(raw["ctx_idx"])
    layer = None if first == "E" else int(first)
    token_id = feature = None
    token = None
    if kind == "feature":
        feature = middle
    elif kind == "error":
        # `{layer}_-1_{pos}` (current circuit-tracer), or `0_{layer}_{pos}` (0.5): the layer
        # field says which layer either way
        try:
            layer = int(raw["layer"])
        except (TypeError, ValueError) as err:
            raise BadInput(f"{where}: field 'layer' {raw['layer']!r} is not a layer") from err
    elif kind == "token":
        token_id = middle
        prompt_tokens = meta.get("prompt_tokens") or []
        token = _unshown(str(prompt_tokens[pos])) if 0 <= pos < len(prompt_tokens) else None
    elif kind == "logit":
        token_id = middle
        assert layer is not None
        layer -= 1
        said = re.match(r'^Output "(.*)" \(p=', str(raw.get("clerp") or ""), re.S)
        token = _unshown(said.group(1)) if said else None
    if kind in ("feature", "error"):
        component = Node.mlp(layer).id if layer is not None else None
    else:
        component = Node.input().id if kind == "token" else Node.logits().id
    influence = raw.get("influence")
    return {
        # an error's id in the workbench's convention, whichever the file used
        "node_id": f"{layer}_-1_{pos}" if kind == "error" else str(raw["node_id"]),
        "kind": kind,
        "layer": layer,
        "position": pos,
        "feature": feature,
        "sae_id": None,
        "component": component,
        "token_id": token_id,
        "token": token,
        "activation": raw.get("activation"),
        "probability": raw.get("token_prob") if kind == "logit" else None,
        "influence": None,
        "cumulative_influence": influence,
        "kept": True,
    }
