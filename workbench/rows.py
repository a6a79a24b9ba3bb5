"""The rows the store writes, as plain values: a run's `runs` row (`RunRow`), and Arrow rows
for the other tables, built from loaded models, tasks and method results (`RunResult`).

The bridge between compute and store: it knows both vocabularies but imports neither torch
model code nor duckdb, so a worker that computes away from the store builds its rows too.
`workbench.store` inserts them.
"""

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa

from workbench import __version__
from workbench.core import PORTS, Node
from workbench.models.base import CheckpointInfo, LoadedModel, ModelInfo
from workbench.results import CircuitResult, RunResult
from workbench.tasks.spec import Task


@dataclass
class RunRow:
    """One row of the `runs` table: a run's identity, params and outcome. The executor makes it
    before the run computes (`workbench.compute.run_row_for`) and sets `error` if the method
    raises; the store sets the metrics from the `RunResult`, `status` (`failed` for a failed
    run) and `finished_at` as it writes the run. The run's other rows travel beside it as Arrow
    tables."""

    run_key: str
    pipeline: str
    method: str
    checkpoint_id: str
    task_id: str
    params: dict[str, Any]
    started_at: datetime
    status: str = "done"
    error: str | None = None
    metric_clean: float | None = None
    metric_corrupt: float | None = None
    finished_at: datetime | None = None
    run_id: str = field(default_factory=lambda: "r" + uuid.uuid4().hex[:12])


def run_rows(run: RunRow) -> pa.Table:
    """The `runs` row of a run, with the workbench version that made it."""
    row = {
        "run_id": run.run_id,
        "run_key": run.run_key,
        "pipeline": run.pipeline,
        "method": run.method,
        "checkpoint_id": run.checkpoint_id,
        "task_id": run.task_id,
        "params": json.dumps(run.params, sort_keys=True),
        "status": run.status,
        "error": run.error,
        "metric_clean": run.metric_clean,
        "metric_corrupt": run.metric_corrupt,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "code_version": __version__,
    }
    return pa.Table.from_pylist([row])


def loaded_rows(loaded: LoadedModel) -> dict[str, pa.Table]:
    """The rows a loaded checkpoint brings, by table: its `models`, `checkpoints` and `nodes`."""
    cfg = loaded.model.cfg
    return {
        "models": model_rows(loaded.info),
        "checkpoints": checkpoint_rows(loaded.checkpoint),
        "nodes": model_graph_nodes(
            loaded.info.model_id, cfg.n_layers, cfg.n_heads, not cfg.attn_only
        ),
    }


def model_rows(info: ModelInfo) -> pa.Table:
    row = {
        "model_id": info.model_id,
        "source": info.source,
        "architecture": info.architecture,
        "n_layers": info.n_layers,
        "n_heads": info.n_heads,
        "d_model": info.d_model,
        "d_vocab": info.d_vocab,
        "config": json.dumps(info.config, sort_keys=True, default=str),
    }
    return pa.Table.from_pylist([row])


def checkpoint_rows(ckpt: CheckpointInfo) -> pa.Table:
    row = {
        "checkpoint_id": ckpt.checkpoint_id,
        "model_id": ckpt.model_id,
        "step": ckpt.step,
        "path": ckpt.path,
        "sha256": ckpt.sha256,
        "train_loss": ckpt.train_loss,
    }
    return pa.Table.from_pylist([row])


def task_rows(task: Task) -> pa.Table:
    row = {
        "task_id": task.task_id,
        "name": task.name,
        "source": task.source,
        "metric": task.metric,
        "n_prompts": len(task.pairs),
        "sha256": task.sha256,
        "spec": json.dumps(task.spec, sort_keys=True),
    }
    return pa.Table.from_pylist([row])


def prompt_rows(task: Task) -> pa.Table:
    ints = pa.list_(pa.int32())
    return pa.table(
        {
            "task_id": pa.array([task.task_id] * len(task.pairs), pa.string()),
            "idx": pa.array(range(len(task.pairs)), pa.int32()),
            "clean_tokens": pa.array([p.clean_tokens for p in task.pairs], ints),
            "corrupt_tokens": pa.array([p.corrupt_tokens for p in task.pairs], ints),
            "answer": pa.array([p.answer for p in task.pairs], pa.int32()),
            "wrong": pa.array([p.wrong for p in task.pairs], pa.int32()),
            "clean_text": pa.array([p.clean_text for p in task.pairs], pa.string()),
            "corrupt_text": pa.array([p.corrupt_text for p in task.pairs], pa.string()),
        }
    )


def model_graph_nodes(model_id: str, n_layers: int, n_heads: int, has_mlp: bool) -> pa.Table:
    """Every node of a model's graph: `input`, residual streams `r{L}`, attention layers `a{L}`,
    heads `a{L}.h{H}` with their `<q>`, `<k>`, `<v>`, `<pattern>` ports, MLPs `m{L}`, `logits`."""
    nodes = [Node.input()]
    for layer in range(n_layers + 1):
        nodes.append(Node.resid(layer))
    for layer in range(n_layers):
        nodes.append(Node.attn(layer))
        for head in range(n_heads):
            nodes += [Node.head_of(layer, head, port) for port in (None, *PORTS)]
        if has_mlp:
            nodes.append(Node.mlp(layer))
    rows = [_node(model_id, node) for node in nodes]
    rows[n_layers + 1]["label"] = "final residual"  # r{n_layers}
    rows.append(_node(model_id, Node.logits()) | {"layer": n_layers})
    return pa.Table.from_pylist(rows, schema=NODE_SCHEMA)


NODE_SCHEMA = pa.schema(
    [
        ("model_id", pa.string()),
        ("node_id", pa.string()),
        ("kind", pa.string()),
        ("layer", pa.int32()),
        ("head", pa.int32()),
        ("port", pa.string()),
        ("sae_id", pa.string()),
        ("feature", pa.int32()),
        ("label", pa.string()),
    ]
)


def _node(model_id: str, node: Node, hook: str | None = None) -> dict[str, Any]:
    return {
        "model_id": model_id,
        "node_id": node.id,
        "kind": node.kind,
        "layer": node.layer,
        "head": node.head,
        "port": node.port,
        "sae_id": node.sae_id,
        "feature": node.feature,
        "label": node.label(hook),
    }


def node_score_rows(
    node_ids: list[str],
    scores: list[float],
    positions: list[int | None] | None = None,
    stderr: list[float] | None = None,
) -> pa.Table:
    columns = {
        "node_id": pa.array(node_ids, pa.string()),
        "position": pa.array(positions or [None] * len(node_ids), pa.int32()),
        "score": pa.array(scores, pa.float64()),
    }
    if stderr is not None:
        columns["stderr"] = pa.array(stderr, pa.float64())
    return pa.table(columns)


def edge_rows(edges: list[tuple[str, str, float]], stderr: list[float] | None = None) -> pa.Table:
    columns = {
        "src": pa.array([e[0] for e in edges], pa.string()),
        "dst": pa.array([e[1] for e in edges], pa.string()),
        "score": pa.array([e[2] for e in edges], pa.float64()),
    }
    if stderr is not None:
        columns["stderr"] = pa.array(stderr, pa.float64())
    return pa.table(columns)


def circuit_rows(run_id: str, circuit: CircuitResult) -> dict[str, pa.Table]:
    """A circuit of a run: one `circuits` row and its `circuit_edges`."""
    circuit_id = f"{run_id}-{circuit.rule.replace(':', '')}"
    row = {
        "circuit_id": circuit_id,
        "run_id": run_id,
        "name": circuit.name,
        "rule": circuit.rule,
        "n_nodes": circuit.n_nodes,
        "n_edges": len(circuit.edges),
        "faithfulness": circuit.faithfulness,
    }
    circuit_edges = edge_rows(circuit.edges).add_column(
        0, "circuit_id", pa.array([circuit_id] * len(circuit.edges), pa.string())
    )
    return {"circuits": pa.Table.from_pylist([row]), "circuit_edges": circuit_edges}


def result_rows(run_id: str, result: RunResult) -> tuple[dict[str, pa.Table], dict[str, pa.Table]]:
    """A run's result as (rows keyed by the run, filled with `run_id` by the store; rows that
    carry their own keys)."""
    rows: dict[str, pa.Table] = {}
    if result.node_scores:
        scores = result.node_scores
        rows["node_scores"] = node_score_rows(
            [s[0] for s in scores],
            [s[2] for s in scores],
            [s[1] for s in scores],
            result.node_stderr,
        )
    if result.edges:
        rows["edges"] = edge_rows(result.edges, result.edge_stderr)
    if result.curve:
        rows["faithfulness_curves"] = curve_rows(result.curve)
    if result.spot_check is not None:
        rows["spot_checks"] = result.spot_check.rows()
    rows |= result.tables
    metrics = dict(result.metrics)
    if result.circuit is not None:
        metrics |= result.circuit.spread
    if result.spot_check is not None:
        metrics |= result.spot_check.summary()
    if metrics:
        rows["run_metrics"] = metric_rows(metrics)
    linked = circuit_rows(run_id, result.circuit) if result.circuit else {}
    return rows, linked


def metric_rows(metrics: dict[str, float]) -> pa.Table:
    return pa.table(
        {
            "metric": pa.array(list(metrics), pa.string()),
            "value": pa.array(list(metrics.values()), pa.float64()),
        }
    )


def curve_rows(curve: list[tuple[int, int, float]]) -> pa.Table:
    return pa.table(
        {
            "requested_edges": pa.array([c[0] for c in curve], pa.int32()),
            "n_edges": pa.array([c[1] for c in curve], pa.int32()),
            "faithfulness": pa.array([c[2] for c in curve], pa.float64()),
        }
    )


def feature_node_rows(
    model_id: str, sae_id: str, hook: str, layer: int | None, d_sae: int
) -> pa.Table:
    """An SAE's features `f:{sae_id}:{i}` and its error node `f:{sae_id}:err`."""
    nodes = [Node.sae_feature(sae_id, i) for i in range(d_sae)] + [Node.sae_error(sae_id)]
    rows = [_node(model_id, node, hook) | {"layer": layer} for node in nodes]
    return pa.Table.from_pylist(rows, schema=NODE_SCHEMA)


def sae_rows(row: dict[str, Any]) -> pa.Table:
    histogram_edges = row.pop("histogram_edges")
    table = pa.Table.from_pylist([row])
    return table.append_column(
        "histogram_edges", pa.array([histogram_edges], pa.list_(pa.float64()))
    )


def feature_rows(
    sae_id: str,
    density: list[float],
    max_activation: list[float],
    mean_activation: list[float],
    dead: list[bool],
    dense: list[bool],
    histograms: list[list[int]],
    logits: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]] | None,
) -> pa.Table:
    n = len(density)
    top = [json.dumps(lg[0]) for lg in logits] if logits else [None] * n
    bottom = [json.dumps(lg[1]) for lg in logits] if logits else [None] * n
    return pa.table(
        {
            "sae_id": pa.array([sae_id] * n, pa.string()),
            "feature": pa.array(range(n), pa.int32()),
            "density": pa.array(density, pa.float64()),
            "max_activation": pa.array(max_activation, pa.float64()),
            "mean_activation": pa.array(mean_activation, pa.float64()),
            "top_logits": pa.array(top, pa.string()),
            "bottom_logits": pa.array(bottom, pa.string()),
            "dead": pa.array(dead, pa.bool_()),
            "dense": pa.array(dense, pa.bool_()),
            "histogram": pa.array(histograms, pa.list_(pa.int32())),
        }
    )


def feature_example_rows(
    sae_id: str,
    examples: list[tuple[int, int, int, float]],
    windows: list[list[int]],
    tokens: list[list[str]],
    source: str,
) -> pa.Table:
    """`examples`: (feature, rank, position, activation), each with its window's ids/tokens."""
    n = len(examples)
    return pa.table(
        {
            "sae_id": pa.array([sae_id] * n, pa.string()),
            "feature": pa.array([e[0] for e in examples], pa.int32()),
            "rank": pa.array([e[1] for e in examples], pa.int32()),
            "source": pa.array([source] * n, pa.string()),
            "token_ids": pa.array(windows, pa.list_(pa.int32())),
            "tokens": pa.array(tokens, pa.list_(pa.string())),
            "position": pa.array([e[2] for e in examples], pa.int32()),
            "activation": pa.array([e[3] for e in examples], pa.float64()),
        }
    )
