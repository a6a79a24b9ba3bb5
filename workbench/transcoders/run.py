"""`workbench run graph`: the attribution graph of one prompt (`workbench.transcoders.graph`) at
each chosen checkpoint, pruned, scored and stored in one short transaction, like
`workbench run prompt`. Cached by graph_id (a hash of the checkpoint, the transcoder set, the
prompt's tokens and every parameter): a graph already stored is not computed again unless
`force`.

The transcoders are a stored set (its id, `tc-…`, from `workbench run transcoders`) or a
directory (SAELens's or circuit-tracer's format). Bad input (a set for another model, hooks the
model lacks, sizes that do not fit, a prompt longer than the model's context, an empty prompt)
is BadInput before the graph is computed, and nothing is stored.
"""

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from workbench.core import Node
from workbench.errors import BadInput
from workbench.hashing import sha256_files, sha256_json
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.models.sources import select_checkpoints
from workbench.prompt.run import prompt_ids
from workbench.rows import loaded_rows
from workbench.store import Store
from workbench.store.db import default_db_path
from workbench.transcoders.graph import (
    AttributionGraph,
    Intervention,
    attribute,
    graph_scores,
    prune,
)
from workbench.transcoders.plan import layer_sae_id, set_files
from workbench.transcoders.sets import load_transcoder_set

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphParams:
    """How a graph is built and pruned (all of it in the graph_id: `key`)."""

    max_n_logits: int = 10
    desired_logit_prob: float = 0.95
    max_feature_nodes: int | None = 4096
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    batch_size: int = 32
    update_interval: int = 4

    def key(self) -> dict[str, Any]:
        """The parameters as the graph_id hashes them. `update_interval`, added later, is left
        out at its default, which every graph stored before it was built with, so their ids
        stay."""
        key = dict(self.__dict__)
        if self.update_interval == GraphParams.update_interval:
            del key["update_interval"]
        return key

    def check(self) -> None:
        if self.max_n_logits < 1:
            raise BadInput(f"--max-n-logits {self.max_n_logits}: must be >= 1")
        if not 0 < self.desired_logit_prob <= 1:
            raise BadInput(f"--desired-logit-prob {self.desired_logit_prob}: must be in (0, 1]")
        if self.max_feature_nodes is not None and self.max_feature_nodes < 0:
            raise BadInput(f"--max-feature-nodes {self.max_feature_nodes}: must be >= 0")
        for name in ("node_threshold", "edge_threshold"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise BadInput(f"--{name.replace('_', '-')} {value}: must be in (0, 1]")
        if self.batch_size < 1:
            raise BadInput(f"--batch-size {self.batch_size}: must be >= 1")
        if self.update_interval < 1:
            raise BadInput(f"--update-interval {self.update_interval}: must be >= 1")


def _resolve_set(spec: str, db: str | None) -> tuple[str | None, Path]:
    """(stored set id or None, directory) of `--transcoders`."""
    if spec.startswith("tc-") and not Path(spec).expanduser().exists():
        with Store(db) as store:
            found = store.transcoder_set(spec)
        if found is None:
            raise BadInput(f"--transcoders {spec}: no such set in {default_db_path(db)}")
        return spec, Path(found["path"])
    return None, Path(spec).expanduser()


def run_graph(
    model: str,
    transcoders: str,
    *,
    text: str | None = None,
    task: str | None = None,
    index: int = 0,
    checkpoint: str = "latest",
    params: GraphParams | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    db: str | None = None,
    force: bool = False,
) -> list[tuple[str, str]]:
    """[(graph_id, 'done' or 'cached')] per checkpoint."""
    params = params or GraphParams()
    params.check()
    if (text is None) == (task is None):
        raise BadInput("give the prompt as --text TEXT, or as --task NAME_OR_JSONL --index I")
    if index < 0:
        raise BadInput(f"--index {index}: must be 0 or more")
    set_id, set_dir = _resolve_set(transcoders, db)
    tset = load_transcoder_set(set_dir)
    set_key = set_id or sha256_files(set_files(set_dir))
    refs = select_checkpoints(resolve_checkpoints(model), checkpoint)
    done: list[tuple[str, str]] = []
    for ref in tqdm(refs, desc="graph checkpoints", disable=len(refs) < 2):
        loaded = load_checkpoint(ref, device=device, dtype=dtype)
        fitted = tset.fitted_to(loaded.model, str(set_dir))
        ids, shown = prompt_ids(loaded, text=text, task=task, index=index)
        checkpoint_id = loaded.checkpoint.checkpoint_id
        graph_id = (
            "g-"
            + sha256_json(
                {
                    "checkpoint": loaded.checkpoint.sha256,
                    "set": set_key,
                    "tokens": ids,
                    "params": params.key(),
                    "dtype": dtype,
                }  # fmt: skip
            )[:16]
        )
        if not force:
            with Store(db) as store:
                if store.has_graph(graph_id):
                    logger.info("graph %s at %s: stored already", graph_id, checkpoint_id)
                    done.append((graph_id, "cached"))
                    continue
        bos = loaded.bos_token_id
        zero_first = bool(loaded.prepend_bos and bos is not None and ids[0] == int(bos))
        tokens = torch.tensor(ids, device=loaded.model.W_U.device)
        started = time.perf_counter()
        graph = attribute(
            loaded.model,
            tokens,
            fitted,
            zero_first_position=zero_first,
            max_n_logits=params.max_n_logits,
            desired_logit_prob=params.desired_logit_prob,
            max_feature_nodes=params.max_feature_nodes,
            batch_size=params.batch_size,
            update_interval=params.update_interval,
        )
        pruned = prune(graph, params.node_threshold, params.edge_threshold)
        replacement, completeness = graph_scores(graph)
        seconds = time.perf_counter() - started
        strs = loaded.token_strs(ids)
        head = {
            "graph_id": graph_id,
            "checkpoint_id": checkpoint_id,
            "set_id": set_id,
            "set_path": str(set_dir.resolve()),
            "text": shown,
            "token_ids": ids,
            "tokens": strs,
            "params": params.__dict__ | {"dtype": dtype, "zero_first_position": zero_first},
            "n_active_features": len(graph.active),
            "n_features": graph.n_features,
            "n_nodes": graph.n_nodes,
            "n_edges": int((graph.adjacency != 0).sum()),
            "n_nodes_kept": int(pruned.node_mask.sum()),
            "n_edges_kept": int(pruned.edge_mask.sum()),
            "replacement_score": replacement,
            "completeness_score": completeness,
            "seconds": seconds,
        }
        nodes = node_rows(graph, pruned, graph_id, set_id, strs, loaded.token_strs)
        edges = np.argwhere(pruned.edge_mask)
        edge_rows = pa.table(
            {
                "graph_id": pa.array([graph_id] * len(edges), pa.string()),
                "src": pa.array(edges[:, 1].tolist(), pa.int32()),
                "dst": pa.array(edges[:, 0].tolist(), pa.int32()),
                "weight": pa.array(graph.adjacency.numpy()[edges[:, 0], edges[:, 1]].tolist()),
            }
        )
        registry = loaded_rows(loaded)
        with Store(db) as store:
            store.save_graph(head, nodes, edge_rows, adjacency_table(graph), registry)
        logger.info(
            "graph %s at %s: %d of %d nodes, %d edges kept; replacement %.3f, completeness "
            "%.3f; %.1f s",
            graph_id, checkpoint_id, head["n_nodes_kept"], graph.n_nodes, head["n_edges_kept"],
            replacement, completeness, seconds,
        )  # fmt: skip
        done.append((graph_id, "done"))
    return done


def node_id(kind: str, layer: int | None, position: int, feature: int | None, token: int | None,
            n_layers: int) -> str:  # fmt: skip
    """A node's id in circuit-tracer's and Neuronpedia's convention."""
    if kind == "feature":
        return f"{layer}_{feature}_{position}"
    if kind == "error":
        return f"{layer}_-1_{position}"
    if kind == "token":
        return f"E_{token}_{position}"
    return f"{n_layers + 1}_{token}_{position}"


def node_rows(
    graph: AttributionGraph,
    pruned: Any,
    graph_id: str,
    set_id: str | None,
    token_strs: list[str],
    decode: Any,
) -> pa.Table:
    records = graph.nodes()
    logit_strs = decode(graph.logit_tokens) if graph.logit_tokens else []
    out = []
    for i, r in enumerate(records):
        kind, layer = r["kind"], r["layer"]
        if kind in ("feature", "error"):
            component = Node.mlp(layer).id
        else:
            component = Node.input().id if kind == "token" else Node.logits().id
        token = None
        if kind == "token":
            token = token_strs[r["position"]]
        elif kind == "logit":
            token = logit_strs[i - graph.offsets()["logit"]]
        out.append(
            {
                "graph_id": graph_id,
                "node": i,
                "node_id": node_id(
                    kind, layer, r["position"], r["feature"], r["token_id"], graph.n_layers
                ),  # fmt: skip
                "kind": kind,
                "layer": layer,
                "position": r["position"],
                "feature": r["feature"],
                "sae_id": layer_sae_id(set_id, layer) if set_id and kind == "feature" else None,
                "component": component,
                "token_id": r["token_id"],
                "token": token,
                "activation": r["activation"],
                "probability": r["probability"],
                "influence": float(pruned.influence[i]),
                # logits are where influence is measured from: none of their own
                "cumulative_influence": None if kind == "logit" else float(pruned.cumulative[i]),
                "kept": bool(pruned.node_mask[i]),
            }
        )
    return pa.Table.from_pylist(out)


def adjacency_table(graph: AttributionGraph) -> pa.Table:
    """Every non-zero entry of the full adjacency: (src, dst, weight)."""
    nonzero = graph.adjacency.nonzero()
    return pa.table(
        {
            "src": pa.array(nonzero[:, 1].tolist(), pa.int32()),
            "dst": pa.array(nonzero[:, 0].tolist(), pa.int32()),
            "weight": pa.array(graph.adjacency[nonzero[:, 0], nonzero[:, 1]].tolist()),
        }
    )


def parse_intervention(spec: str, n_pos: int) -> Intervention:
    """`LAYER:POSITION:FEATURE=VALUE` (a negative position counts from the end)."""
    try:
        where, value = spec.split("=")
        layer, pos, feature = (int(x) for x in where.split(":"))
        number = float(value)
    except ValueError as err:
        raise BadInput(f"--set {spec}: expected LAYER:POSITION:FEATURE=VALUE") from err
    if not -n_pos <= pos < n_pos:
        raise BadInput(f"--set {spec}: position {pos} is outside the prompt's {n_pos} tokens")
    return Intervention(layer, pos % n_pos, feature, number)


def graph_prompt(graph_id: str, db: str | None) -> dict[str, Any]:
    """What a stored graph was made of: its model's source, checkpoint step, transcoder set (its
    id, or its directory) and token ids."""
    with Store(db, read_only=True) as store:
        rows = store.query(
            """SELECT g.set_id, g.set_path, g.token_ids, c.step, m.source FROM graphs g
               LEFT JOIN checkpoints c USING (checkpoint_id) LEFT JOIN models m USING (model_id)
               WHERE g.graph_id = ?""",
            [graph_id],
        ).to_pylist()
        where = store.path
    if not rows:
        raise BadInput(f"--graph {graph_id}: no such graph in {where}")
    row = rows[0]
    if row["source"] is None or not (row["set_id"] or row["set_path"]):
        raise BadInput(
            f"--graph {graph_id}: imported without its model or transcoders; give --model, "
            "--transcoders and --text instead"
        )
    return {
        "model": row["source"],
        "checkpoint": str(row["step"]),
        "transcoders": row["set_id"] or row["set_path"],
        "token_ids": list(row["token_ids"]),
    }


def run_intervention(
    model: str | None,
    transcoders: str | None,
    text: str | None,
    sets: list[str],
    *,
    checkpoint: str = "latest",
    top: int = 10,
    device: str = "cpu",
    dtype: str = "float32",
    db: str | None = None,
    graph: str | None = None,
) -> list[dict[str, Any]]:
    """The next-token distribution at the prompt's last position with the transcoders spliced
    in, before and after setting the features `sets`: the `top` tokens of either, with their
    probabilities before and after (one checkpoint). With `graph`, the model, checkpoint,
    transcoders and prompt are the stored graph's."""
    from workbench.transcoders.graph import spliced_logits

    if not sets:
        raise BadInput("give at least one --set LAYER:POSITION:FEATURE=VALUE")
    ids: list[int] | None = None
    if graph is not None:
        if model or transcoders or text:
            raise BadInput(
                "--graph takes the model, transcoders and prompt from the stored graph: leave "
                "out --model, --transcoders and --text"
            )
        made = graph_prompt(graph, db)
        model, transcoders, checkpoint = made["model"], made["transcoders"], made["checkpoint"]
        ids = made["token_ids"]
    elif not (model and transcoders and text is not None):
        raise BadInput("give --graph G, or all of --model, --transcoders and --text")
    _, set_dir = _resolve_set(transcoders, db)
    tset = load_transcoder_set(set_dir)
    refs = select_checkpoints(resolve_checkpoints(model), checkpoint)
    if len(refs) != 1:
        raise BadInput(f"--checkpoint {checkpoint}: choose one checkpoint (latest or a step)")
    loaded = load_checkpoint(refs[0], device=device, dtype=dtype)
    tset = tset.fitted_to(loaded.model, str(set_dir))
    if ids is None:
        ids, _ = prompt_ids(loaded, text=text, task=None, index=0)
    chosen = [parse_intervention(s, len(ids)) for s in sets]
    for iv, spec in zip(chosen, sets, strict=True):
        if not 0 <= iv.layer < len(tset):
            raise BadInput(f"--set {spec}: the set has layers 0 to {len(tset) - 1}")
        if not 0 <= iv.feature < tset[iv.layer].d_transcoder:
            raise BadInput(
                f"--set {spec}: layer {iv.layer} has features 0 to "
                f"{tset[iv.layer].d_transcoder - 1}"
            )
    tokens = torch.tensor(ids, device=loaded.model.W_U.device)
    before = torch.softmax(spliced_logits(loaded.model, tokens, tset)[-1].double(), -1)
    after = torch.softmax(spliced_logits(loaded.model, tokens, tset, chosen)[-1].double(), -1)
    k = min(top, len(before))
    shown = dict.fromkeys(before.topk(k).indices.tolist() + after.topk(k).indices.tolist())
    order = sorted(shown, key=lambda t: -float(after[t]))
    names = loaded.token_strs(order)
    return [
        {"token": name, "id": t, "before": float(before[t]), "after": float(after[t])}
        for t, name in zip(order, names, strict=True)
    ]
