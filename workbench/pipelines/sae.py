"""The `sae` pipeline: train or load sparse autoencoders, store their quality, features and top
examples (`sae_features`), and attribute a task to their features (`sae_attr`, feature circuits).

    workbench run sae --model data/zoo/induction --task induction --hook blocks.0.hook_resid_post
    workbench run sae --model gpt2 --task ioi.jsonl \\
        --sae pretrained:gpt2-small-res-jb/blocks.8.hook_resid_pre
    workbench run sae --model my-model --task t.jsonl --sae path/to/sae_dir --corpus corpus.jsonl

`sae_features` makes one run per SAE (one per `--hook` trained, one per `--sae` loaded); its
SAE is stored under the id `sae-<first 10 hex digits of the run key>`, and a trained SAE is
written in SAELens's format to `<db directory>/saes/<sae_id>/` when its run commits. `sae_attr`
makes one run over all the SAEs of the invocation (or, without `--hook`/`--sae`, every SAE
stored for the checkpoint) and stores node scores, edges, a faithfulness curve and the smallest
faithful feature circuit.
"""

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.attribution.ig import IgParams, check_ig_params
from workbench.core import Hook, Node
from workbench.errors import BadInput
from workbench.hashing import sha256_files
from workbench.jobs import run_key
from workbench.registry import Method, PlanContext, Planned, RunInputs, option
from workbench.results import CircuitResult, RunResult
from workbench.sae.options import PRETRAINED_PREFIX, SaeTrainOptions
from workbench.store.db import default_db_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaeSourceParams:
    hooks: list[str] = option([], "Train an SAE at this hook (repeatable).", flag="hook")
    saes: list[str] = option(
        [],
        "Load a SAELens SAE directory or pretrained:<release>/<sae_id> (repeatable).",
        flag="sae",
    )
    corpus: str = option("task", "'task' (the task's distribution), a .txt or .jsonl file.")
    corpus_tokens: int = option(100_000, "Tokens of the extraction corpus.")
    context_size: int | None = option(None, "Tokens per corpus window (default min(n_ctx, 128)).")
    top_k_examples: int = option(10, "Top activating examples stored per feature.")
    sae_dir: str | None = option(None, "Where trained SAEs go (default: <db dir>/saes).")


@dataclass(frozen=True)
class SaeFeaturesParams(SaeTrainOptions, SaeSourceParams):
    pass


@dataclass(frozen=True)
class SaeAttrParams(IgParams, SaeFeaturesParams):
    n_nodes: int = option(16, "Nodes per SAE kept for the feature graph's edges.")
    faithful_target: float = option(
        0.8, "The stored circuit is the smallest top-n whose faithfulness reaches this."
    )


@dataclass(frozen=True)
class SaeSource:
    """Where an SAE of this invocation comes from: trained at a hook, or loaded from `spec`."""

    kind: str  # "train" | "load"
    spec: str

    def params(self, options: SaeTrainOptions) -> dict[str, Any]:
        if self.kind == "train":
            return {"train": options.training(self.spec).params()}
        if self.spec.startswith(PRETRAINED_PREFIX):
            return {"load": self.spec}
        path = Path(self.spec).expanduser()
        files = [path / "cfg.json", path / "sae_weights.safetensors"]
        return {"load": str(path.resolve()), "sha256": sha256_files(files)}


@dataclass
class FeaturesRun:
    """One planned sae_features run: what `compute_features` needs besides the model."""

    params: SaeFeaturesParams
    source: SaeSource
    sae_id: str
    sae_root: Path
    corpus: Any
    checked: Any  # the SAE as loaded and checked while planning (None: to train)


def sae_root(params: SaeSourceParams, db: str | None) -> Path:
    return Path(params.sae_dir) if params.sae_dir else default_db_path(db).parent / "saes"


def _features_plan(params: SaeFeaturesParams, inputs: RunInputs, ctx: PlanContext) -> list[Planned]:
    """One run per SAE source; bad hooks and SAEs fail here, before anything is written."""
    from workbench.sae.corpus import load_corpus
    from workbench.sae.saes import activation_size, load_sae

    loaded, task = inputs.loaded, inputs.task
    sources = [SaeSource("train", h) for h in params.hooks]
    sources += [SaeSource("load", s) for s in params.saes]
    cached = ("sae_features plan", repr(params))
    if cached in inputs.cache:
        return list(inputs.cache[cached])
    planned: list[Planned] = []
    if sources:
        corpus = load_corpus(
            params.corpus,
            loaded,
            task,
            n_tokens=params.corpus_tokens,
            context_size=params.context_size,
        )
        dtype = str(loaded.model.cfg.dtype).removeprefix("torch.")
        for source in sources:
            checked = None
            if source.kind == "train":
                activation_size(loaded, source.spec)
                params.check()
            else:
                checked = load_sae(source.spec, loaded)
            key = {
                "sae": source.params(params),
                "corpus": corpus.name,
                "corpus_sha256": corpus.sha256,
                "context_size": corpus.context_size,
                "top_k_examples": params.top_k_examples,
                "dtype": dtype,  # the run key (and so the SAE id) of another dtype differs
            }
            full_key = run_key("sae", "sae_features", loaded.checkpoint.sha256, task.sha256, key)
            sae_id = f"sae-{full_key[:10]}"
            run = FeaturesRun(params, source, sae_id, sae_root(params, ctx.db), corpus, checked)
            planned.append(Planned(run, key))
    inputs.cache[cached] = planned
    return planned


def _check_features(params: SaeFeaturesParams) -> None:
    if not (params.hooks or params.saes):
        raise BadInput("the sae pipeline needs --hook (train an SAE there) or --sae (load one)")
    params.check()


def compute_features(inputs: RunInputs, run: FeaturesRun) -> RunResult:
    from workbench import records
    from workbench.sae import features
    from workbench.sae.saes import load_sae

    loaded, corpus, sae_id = inputs.loaded, run.corpus, run.sae_id
    files: dict[str, str] = {}
    sae = run.checked
    if sae is None:  # train it into a staging directory, moved into place when the run commits
        from workbench.sae.train import train_sae

        staging = run.sae_root / f".{sae_id}.partial"
        final = run.sae_root / sae_id
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            train_sae(loaded, corpus, run.params.training(run.source.spec), staging)
            sae = load_sae(str(staging), loaded)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        sae.source, sae.path = "trained", str(final)
        files[str(staging)] = str(final)
    params = run.params
    stats = features.scan(
        loaded, sae, corpus, top_k=params.top_k_examples, batch_size=inputs.max_batch
    )
    quality = features.quality(loaded, sae, corpus, stats)
    effects = features.logit_effects(loaded, sae)
    density = stats.density
    dead = (stats.counts == 0).tolist()
    dense = (density > features.DENSE_DENSITY).tolist()
    n_bins = len(features.HISTOGRAM_EDGES) - 1
    histograms = stats.histogram.reshape(sae.d_sae, n_bins).tolist()
    logits = None
    if effects is not None:
        logits = [
            ([_logit(loaded, t, v) for t, v in top], [_logit(loaded, t, v) for t, v in bottom])
            for top, bottom in effects
        ]
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
    examples = stats.examples()
    windows = [corpus.windows[e[2]].tolist() for e in examples]
    tables = {
        "saes": records.sae_rows(sae_row),
        "features": records.feature_rows(
            sae_id,
            density.tolist(),
            stats.maxima.tolist(),
            stats.mean_when_active.tolist(),
            dead,
            dense,
            histograms,
            logits,
        ),
        "feature_examples": records.feature_example_rows(
            sae_id,
            [(e[0], e[1], e[3], e[4]) for e in examples],
            windows,
            [loaded.token_strs(w) for w in windows],
            corpus.name,
        ),
    }
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


def _logit(loaded: Any, token: int, value: float) -> dict[str, Any]:
    return {"token": loaded.token_strs([token])[0], "id": token, "value": round(value, 5)}


def feature_nodes(loaded: Any, sae: Any, sae_id: str) -> Any:
    from workbench import records

    return records.feature_node_rows(
        loaded.info.model_id, sae_id, sae.hook, Hook.layer(sae.hook), sae.d_sae
    )


@dataclass
class AttrRun:
    params: SaeAttrParams
    saes: list[tuple[str, str]]  # (sae_id, directory or pretrained spec)


def _attr_plan(params: SaeAttrParams, inputs: RunInputs, ctx: PlanContext) -> list[Planned]:
    planned = _features_plan(params, inputs, ctx)
    chosen = [
        (
            run.sae_id,
            str(run.sae_root / run.sae_id) if run.source.kind == "train" else run.source.spec,
        )
        for run in (p.params for p in planned)
    ]
    if not planned:
        checkpoint_id = inputs.loaded.checkpoint.checkpoint_id
        chosen = ctx.store.latest_saes(checkpoint_id)
        if not chosen:
            raise BadInput(f"sae_attr: no SAEs stored for {checkpoint_id}; give --hook or --sae")
    key = {
        "saes": [sae_id for sae_id, _ in chosen],
        "n_nodes": params.n_nodes,
        "ig_steps": params.ig_steps,
        "ig_rule": params.ig_rule,
        "circuit": f"smallest top-n nodes with faithfulness >= {params.faithful_target}",
    }
    return [Planned(AttrRun(params, chosen), key)]


def compute_attr(inputs: RunInputs, run: AttrRun) -> RunResult:
    import pyarrow as pa

    from workbench import circuits
    from workbench.sae import attribution
    from workbench.sae.saes import load_sae

    loaded, params = inputs.loaded, run.params
    saes = [load_sae(spec, loaded) for _, spec in run.saes]
    sae_ids = [sae_id for sae_id, _ in run.saes]
    spliced = attribution.SplicedModel(loaded.model, saes, sae_ids, inputs.batches)
    attr, curve, kept, faith = attribution.feature_circuit(
        spliced,
        ig_steps=params.ig_steps,
        ig_rule=params.ig_rule,
        n_nodes=params.n_nodes,
        target=params.faithful_target,
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
    return RunResult(
        attr.metric_clean,
        attr.metric_corrupt,
        node_scores=[(n, None, s) for n, s in attr.node_scores.items()],
        edges=attr.edges + attr.head_edges,
        curve=curve,
        metrics={"circuit_nodes": float(size), "error_nodes_in_circuit": float(errors)}
        | {f"ig_completeness:{sid}": value for sid, value in attr.completeness.items()},
        circuit=CircuitResult(
            f"sae_attr: smallest top-n nodes with faithfulness >= {params.faithful_target}",
            f"nodes:{size}",
            circuit,
            len(circuits.Circuit(f"nodes:{size}", circuit).nodes),
            faith,
        ),
        nodes=nodes,
    )


# the demo trains an SAE on the residual stream after each layer of the 2-layer zoo models
DEMO = {"hooks": [Hook.resid_post(0), Hook.resid_post(1)]}

METHODS = (
    Method(
        "sae_features",
        "sae",
        SaeFeaturesParams,
        compute_features,
        key=lambda p: {},
        plan=_features_plan,
        check=_check_features,
        summary="train or load SAEs; store their quality, features and top examples",
        demo="latest",
        demo_params=DEMO,
    ),
    Method(
        "sae_attr",
        "sae",
        SaeAttrParams,
        compute_attr,
        key=lambda p: {},
        plan=_attr_plan,
        check=lambda p: check_ig_params(p, min_steps=0),
        summary="attribute the task to SAE features: feature circuits (Marks et al. 2024)",
        after=("sae_features",),
        demo="latest",
        demo_params=DEMO,
    ),
)


if __name__ == "__main__":
    from pipelines import main

    main("sae")
