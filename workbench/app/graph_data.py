"""What the Graph page draws of a stored attribution graph: its nodes and edges at the pruning
thresholds asked for, and where each node goes.

At the thresholds the graph was stored with, the stored pruning (`graph_nodes.kept`,
`graph_edges`) is drawn as it is. At other thresholds the graph is pruned again from its full
adjacency (`<db directory>/graphs/<graph_id>.parquet`) by `workbench.transcoders.pruning`, the
pruning `workbench run graph` stores. A graph imported from Neuronpedia JSON has no full
adjacency: its stored nodes are filtered by their cumulative influence and its stored edges by
their share of |weight|, which can only narrow what was imported.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from workbench.app import data, queries
from workbench.transcoders import pruning

ADJACENCY_CACHE = 2  # full adjacencies held by the server at once


@dataclass
class Pruning:
    """The nodes (`graph_nodes` rows, with their place `x`, `y`) and edges (`src`, `dst` node
    ids, `weight`) drawn, and how they were chosen."""

    nodes: pd.DataFrame
    edges: pd.DataFrame
    how: str  # "stored", "pruned again" or "filtered"


def stored_thresholds(graph: pd.Series) -> tuple[float, float]:
    params = json.loads(graph["params"]) if isinstance(graph["params"], str) else {}
    return float(params.get("node_threshold", 0.8)), float(params.get("edge_threshold", 0.98))


def adjacency_file(graph: pd.Series) -> Path | None:
    """The graph's full adjacency Parquet, where it still is (beside the database, or where it
    was written)."""
    gid = str(graph["graph_id"])
    beside = Path(data.db_path()).parent / "graphs" / f"{gid}.parquet"
    for path in (beside, graph["adjacency_path"]):
        if path is not None and not pd.isna(path) and Path(path).is_file():
            return Path(path)
    return None


@st.cache_resource(max_entries=ADJACENCY_CACHE, show_spinner="Reading the graph's adjacency")
def _dense(path: str, n_nodes: int, mtime: float) -> np.ndarray:
    """The adjacency `[target, source]` as a dense float64 matrix (`mtime`: a changed file is
    read again)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["src", "dst", "weight"])
    a = np.zeros((n_nodes, n_nodes))
    a[table["dst"].to_numpy(), table["src"].to_numpy()] = table["weight"].to_numpy()
    return a


def dense_adjacency(graph: pd.Series, n_nodes: int) -> np.ndarray | None:
    path = adjacency_file(graph)
    if path is None:
        return None
    return _dense(str(path), n_nodes, os.path.getmtime(path))


@st.cache_data(max_entries=16, show_spinner="Pruning the graph")
def _prune_again(
    path: str, mtime: float, kinds: tuple[str, ...], probabilities: tuple[float, ...],
    node_threshold: float, edge_threshold: float,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(kept node mask, kept edges as [target, source] rows) of the full adjacency."""
    a = _dense(path, len(kinds), mtime)
    kept = pruning.prune(
        a, np.array(probabilities), pruning.Offsets.of_kinds(list(kinds)),
        node_threshold, edge_threshold,
    )  # fmt: skip
    return kept.node_mask, np.argwhere(kept.edge_mask)


def pruned(
    graph: pd.Series, nodes: pd.DataFrame, node_threshold: float, edge_threshold: float
) -> Pruning:
    """The nodes and edges of `graph` (with all its `nodes`) kept at these thresholds."""
    gid = str(graph["graph_id"])
    ids = nodes["node_id"].to_numpy()
    stored = stored_thresholds(graph)
    path = adjacency_file(graph)
    if np.allclose((node_threshold, edge_threshold), stored):
        mask = nodes["kept"].to_numpy(dtype=bool)
        rows = queries.graph_edges(gid)
        edges = pd.DataFrame(
            {"src": ids[rows["src"]], "dst": ids[rows["dst"]], "weight": rows["weight"]}
        )
        how = "stored"
    elif path is not None:
        probabilities = tuple(float(p) if pd.notna(p) else 0.0 for p in nodes["probability"])
        mask, kept = _prune_again(
            str(path), os.path.getmtime(path), tuple(nodes["kind"]), probabilities,
            node_threshold, edge_threshold,
        )  # fmt: skip
        a = _dense(str(path), len(nodes), os.path.getmtime(path))
        weights = a[kept[:, 0], kept[:, 1]]
        edges = pd.DataFrame({"src": ids[kept[:, 1]], "dst": ids[kept[:, 0]], "weight": weights})
        edges = edges.reindex(edges["weight"].abs().sort_values(ascending=False).index)
        how = "pruned again"
    else:
        mask, edges = _filtered(gid, nodes, node_threshold, edge_threshold)
        how = "filtered"
    shown = nodes[mask].copy()
    placed = place(shown, int(nodes["layer"].max()))
    return Pruning(placed, edges.reset_index(drop=True), how)


def _filtered(
    gid: str, nodes: pd.DataFrame, node_threshold: float, edge_threshold: float
) -> tuple[np.ndarray, pd.DataFrame]:
    """A graph without its full adjacency: stored nodes within `node_threshold` of cumulative
    influence (tokens and logits always), and the strongest stored edges among them holding
    `edge_threshold` of their |weight|."""
    ids = nodes["node_id"].to_numpy()
    cumulative = nodes["cumulative_influence"].fillna(0.0).to_numpy()
    always = nodes["kind"].isin(["token", "logit"]).to_numpy()
    mask = nodes["kept"].to_numpy(dtype=bool) & (always | (cumulative <= node_threshold))
    rows = queries.graph_edges(gid)
    rows = rows[mask[rows["src"]] & mask[rows["dst"]]]
    weight = rows["weight"].abs().to_numpy()
    if len(weight) and weight.sum() > 0:
        share = np.cumsum(weight) / weight.sum()  # (rows come strongest first)
        rows = rows.iloc[: int(np.searchsorted(share, edge_threshold)) + 1]
    edges = pd.DataFrame(
        {"src": ids[rows["src"]], "dst": ids[rows["dst"]], "weight": rows["weight"]}
    )
    return mask, edges


def place(nodes: pd.DataFrame, logit_layer: int) -> pd.DataFrame:
    """Positions along x, layers along y (embeddings below layer 0, logits at the top); the
    nodes of one (layer, position) side by side within the position's column, most
    influential in the middle."""
    out = nodes.copy()
    kind = out["kind"]
    out["y"] = np.where(kind == "token", -1.0, out["layer"].fillna(-1).astype(float))
    out.loc[kind == "logit", "y"] = float(logit_layer)
    out["x"] = out["position"].astype(float)
    for _, cell in out.groupby(["y", "position"]):
        if len(cell) < 2:
            continue
        order = cell["influence"].fillna(0.0).sort_values(ascending=False).index
        step = min(0.8 / len(cell), 0.2)
        offsets = np.array([(i + 1) // 2 * (1 if i % 2 else -1) for i in range(len(cell))])
        out.loc[order, "x"] = out.loc[order, "position"] + offsets * step
    return out
