"""Computing the planned SAE runs (`workbench.sae.plan`) into run results.

`sae_features`: train the SAE if the run trains one, then one pass over the corpus for its
feature statistics and top examples (`workbench.sae.features`), its quality and its features'
logit effects; the result holds the rows of `saes`, `features` and `feature_examples` and the
SAE's feature nodes. `sae_attr`: splice the run's SAEs into the model and attribute the task's
metric to their features and errors (`workbench.sae.attribution`), with the smallest faithful
feature circuit.

A trained SAE is written into a staging directory of its own, `<sae root>/.<sae_id>.partial-<8
random hex digits>`, created by the run that trains into it (never one that existed), and the
store renames it to `<sae root>/<sae_id>` when the run commits (a rename on one file system,
so the final directory appears whole or not at all). Runners that train the same SAE at once
each have their own staging directory. A run removes its own staging directory when training
fails; it never removes another's, since it cannot tell whether that runner is still alive, so
the staging directory of a runner that died stays behind (any `.sae-*.partial*` directory in
the SAE root is such a leftover once no run is going on, and can be deleted then).
"""

import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa

from workbench import circuits, profiling, rows
from workbench.attribution.batches import PromptBatch
from workbench.core import Hook, Node
from workbench.models.base import LoadedModel
from workbench.results import CircuitResult, RunResult
from workbench.sae import attribution, features
from workbench.sae.corpus import Corpus
from workbench.sae.plan import AttrRun, FeaturesRun
from workbench.sae.saes import LoadedSae, load_sae
from workbench.spotcheck import node_check, sample_items

logger = logging.getLogger(__name__)

STAGING_ATTEMPTS = 8


def staging_dir(final: Path) -> Path:
    """A new, empty directory `.<name>.partial-<random>` beside `final`, made by this call."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(STAGING_ATTEMPTS):
        staging = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}")
        try:
            staging.mkdir()
        except FileExistsError:
            continue
        return staging
    raise FileExistsError(f"{final.parent}: no free name for a staging directory of {final.name}")


def train_staged(loaded: LoadedModel, run: FeaturesRun) -> tuple[LoadedSae, Path]:
    """Train the run's SAE into a staging directory of its own; the SAE (recorded at its final
    directory) and the staging directory, which the store moves there when the run commits."""
    from workbench.sae.train import train_sae

    assert run.training is not None
    staging = staging_dir(run.final_dir)
    try:
        train_sae(loaded, run.corpus, run.training, staging)
        sae = load_sae(str(staging), loaded)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    sae.source, sae.path = "trained", str(run.final_dir)
    return sae, staging


def compute_features(loaded: LoadedModel, run: FeaturesRun, *, batch_size: int) -> RunResult:
    """The SAE's quality, its features' statistics, logit effects and top examples, and its
    feature nodes (training it first if the run trains one)."""
    corpus, sae_id = run.corpus, run.sae_id
    files: dict[str, str] = {}
    sae = run.checked
    if sae is None:
        with profiling.stage("sae: training"):
            sae, staging = train_staged(loaded, run)
        files[str(staging)] = str(run.final_dir)
    with profiling.stage("sae: scan"):
        stats = features.scan(loaded, sae, corpus, top_k=run.top_k_examples, batch_size=batch_size)
    with profiling.stage("sae: quality"):
        quality = features.quality(loaded, sae, corpus, stats)
    with profiling.stage("sae: logit effects"):
        effects = features.logit_effects(loaded, sae)
    dead = (stats.counts == 0).tolist()
    sae_row = {
        "sae_id": sae_id,
        "checkpoint_id": loaded.checkpoint.checkpoint_id,
        "hook": sae.hook,
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "path": sae.path,
        "source": sae.source,
        "corpus": corpus.name,
        "n_tokens": stats.n_tokens,
        "l0": quality.l0,
        "explained_variance": quality.explained_variance,
        "mse": quality.mse,
        "ce_loss_recovered": quality.ce_loss_recovered,
        "ce_loss_clean": quality.ce_loss_clean,
        "ce_loss_sae": quality.ce_loss_sae,
        "ce_loss_zero": quality.ce_loss_zero,
        "dead_fraction": sum(dead) / len(dead),
        "histogram_edges": features.HISTOGRAM_EDGES,
    }
    tables = {"saes": rows.sae_rows(sae_row)} | feature_tables(
        loaded, sae_id, stats, corpus, effects
    )
    metrics = {"l0": quality.l0, "explained_variance": quality.explained_variance}
    if quality.ce_loss_recovered is not None:
        metrics["ce_loss_recovered"] = quality.ce_loss_recovered
    logger.info(
        "SAE %s at %s: L0 %.2f, explained variance %.3f, CE recovered %s, %d dead",
        sae_id,
        sae.hook,
        quality.l0,
        quality.explained_variance,
        quality.ce_loss_recovered,
        sum(dead),
    )
    return RunResult(
        metrics=metrics,
        tables=tables,
        nodes=feature_nodes(loaded, sae, sae_id),
        files=files,
    )


def feature_tables(
    loaded: LoadedModel,
    sae_id: str,
    stats: features.FeatureStats,
    corpus: Corpus,
    effects: list[tuple[list[tuple[int, float]], list[tuple[int, float]]]] | None,
) -> dict[str, pa.Table]:
    """The `features` and `feature_examples` rows of one dictionary's statistics."""
    density = stats.density
    n_bins = len(features.HISTOGRAM_EDGES) - 1
    logits = None
    if effects is not None:
        logits = [
            ([_logit(loaded, t, v) for t, v in top], [_logit(loaded, t, v) for t, v in bottom])
            for top, bottom in effects
        ]
    examples = stats.examples()
    windows = [corpus.windows[e[2]].tolist() for e in examples]
    return {
        "features": rows.feature_rows(
            sae_id,
            density.tolist(),
            stats.maxima.tolist(),
            stats.mean_when_active.tolist(),
            (stats.counts == 0).tolist(),
            (density > features.DENSE_DENSITY).tolist(),
            stats.histogram.reshape(stats.d_sae, n_bins).tolist(),
            logits,
        ),
        "feature_examples": rows.feature_example_rows(
            sae_id,
            [(e[0], e[1], e[3], e[4]) for e in examples],
            windows,
            [loaded.token_strs(w) for w in windows],
            corpus.name,
        ),
    }


def _logit(loaded: LoadedModel, token: int, value: float) -> dict[str, Any]:
    return {"token": loaded.token_strs([token])[0], "id": token, "value": round(value, 5)}


def feature_nodes(loaded: LoadedModel, sae: LoadedSae, sae_id: str) -> pa.Table:
    """The graph nodes of the SAE's features (`nodes` rows)."""
    return rows.feature_node_rows(
        loaded.info.model_id, sae_id, sae.hook, Hook.layer(sae.hook), sae.d_sae
    )


def compute_attr(loaded: LoadedModel, batches: list[PromptBatch], run: AttrRun) -> RunResult:
    """Node and edge scores of the run's SAEs' features and errors on the task, the
    faithfulness curve, and the smallest feature circuit reaching the target."""
    saes = [load_sae(spec, loaded) for _, spec in run.saes]
    sae_ids = [sae_id for sae_id, _ in run.saes]
    spliced = attribution.SplicedModel(loaded.model, saes, sae_ids, batches)
    attr, curve, kept, faith = attribution.feature_circuit(
        spliced,
        ig_steps=run.ig_steps,
        ig_rule=run.ig_rule,
        n_nodes=run.n_nodes,
        target=run.faithful_target,
    )
    size = len(kept)
    circuit = circuits.on_input_to_logits_paths(attribution.circuit_edges(attr, kept))
    errors = sum(1 for n in kept if Node.parse(n).kind == "sae_error")
    nodes = pa.concat_tables(
        [
            feature_nodes(loaded, s, sid)
            for s, sid in zip(spliced.saes, spliced.sae_ids, strict=True)
        ]
    )
    spot = None
    if run.spot_checks:
        scored = list(attr.node_scores.items())
        chosen = sample_items([s for _, s in scored], run.spot_checks)
        if chosen:
            nodes = [scored[i][0] for i, _ in chosen]
            spot = node_check(
                nodes,
                [draw for _, draw in chosen],
                [scored[i][1] for i, _ in chosen],
                [spliced.patch_nodes({node}) for node in nodes],
            )
    return RunResult(
        attr.metric_clean,
        attr.metric_corrupt,
        spot_check=spot,
        node_scores=[(n, None, s) for n, s in attr.node_scores.items()],
        node_stderr=([attr.node_stderr[n] for n in attr.node_scores] if attr.node_stderr else None),
        edges=attr.edges + attr.head_edges,
        curve=curve,
        metrics={"circuit_nodes": float(size), "error_nodes_in_circuit": float(errors)}
        | {f"ig_completeness:{sid}": value for sid, value in attr.completeness.items()},
        circuit=CircuitResult(
            f"sae_attr: {run.circuit_rule}",
            f"nodes:{size}",
            circuit,
            len(circuits.Circuit(f"nodes:{size}", circuit).nodes),
            faith,
        ),
        nodes=nodes,
    )
