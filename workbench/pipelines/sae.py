"""The `sae` pipeline: train or load sparse autoencoders, store their quality, features and top
examples (`sae_features`), and attribute a task to their features (`sae_attr`, feature circuits).
Planning is `workbench.sae.plan`, computing `workbench.sae.compute`.

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

from dataclasses import dataclass
from pathlib import Path

from workbench.attribution.ig import IgParams, check_ig_params
from workbench.core import Hook
from workbench.errors import BadInput
from workbench.registry import Method, PlanContext, Planned, RunInputs, option
from workbench.results import RunResult
from workbench.sae.options import SaeTrainOptions
from workbench.sae.plan import AttrRun, FeaturesRun, plan_features, sources
from workbench.spotcheck import SpotParams, check_spot_params, spot_size
from workbench.store.db import default_db_path


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
class SaeAttrParams(SpotParams, IgParams, SaeFeaturesParams):
    n_nodes: int = option(16, "Nodes per SAE kept for the feature graph's edges.")
    faithful_target: float = option(
        0.8, "The stored circuit is the smallest top-n whose faithfulness reaches this."
    )


def sae_root(params: SaeSourceParams, db: str | None) -> Path:
    return Path(params.sae_dir) if params.sae_dir else default_db_path(db).parent / "saes"


def _features_plan(params: SaeFeaturesParams, inputs: RunInputs, ctx: PlanContext) -> list[Planned]:
    """One run per SAE source (planned once per checkpoint x task and params)."""
    cached = ("sae_features plan", repr(params))
    if cached not in inputs.cache:
        runs = plan_features(
            inputs.loaded,
            inputs.task,
            sources(params.hooks, params.saes),
            params,
            corpus=params.corpus,
            corpus_tokens=params.corpus_tokens,
            context_size=params.context_size,
            top_k_examples=params.top_k_examples,
            sae_root=sae_root(params, ctx.db),
        )
        inputs.cache[cached] = [Planned(run, run.key) for run in runs]
    return list(inputs.cache[cached])


def _check_features(params: SaeFeaturesParams) -> None:
    if not (params.hooks or params.saes):
        raise BadInput("the sae pipeline needs --hook (train an SAE there) or --sae (load one)")
    params.check()


def _check_attr(params: SaeAttrParams) -> None:
    check_ig_params(params, min_steps=0)
    check_spot_params(params)


def features(inputs: RunInputs, run: FeaturesRun) -> RunResult:
    from workbench.sae.compute import compute_features

    return compute_features(inputs.loaded, run, batch_size=inputs.max_batch)


def _attr_plan(params: SaeAttrParams, inputs: RunInputs, ctx: PlanContext) -> list[Planned]:
    """One run over the SAEs of the invocation, else over those stored for the checkpoint."""
    chosen = [(p.params.sae_id, p.params.location) for p in _features_plan(params, inputs, ctx)]
    if not chosen:
        checkpoint_id = inputs.loaded.checkpoint.checkpoint_id
        chosen = ctx.store.latest_saes(checkpoint_id)
        if not chosen:
            raise BadInput(f"sae_attr: no SAEs stored for {checkpoint_id}; give --hook or --sae")
    run = AttrRun(
        chosen,
        params.n_nodes,
        params.ig_steps,
        params.ig_rule,
        params.faithful_target,
        spot_size(params, "sae_attr"),
    )
    return [Planned(run, run.key)]


def attr(inputs: RunInputs, run: AttrRun) -> RunResult:
    from workbench.sae.compute import compute_attr

    return compute_attr(inputs.loaded, inputs.batches, run)


# the demo trains an SAE on the residual stream after each layer of the 2-layer zoo models
DEMO = {"hooks": [Hook.resid_post(0), Hook.resid_post(1)]}

METHODS = (
    Method(
        "sae_features",
        "sae",
        SaeFeaturesParams,
        features,
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
        attr,
        key=lambda p: {},
        plan=_attr_plan,
        check=_check_attr,
        summary="attribute the task to SAE features: feature circuits (Marks et al. 2024)",
        after=("sae_features",),
        demo="latest",
        demo_params=DEMO,
    ),
)


if __name__ == "__main__":
    from workbench.pipelines import main

    main("sae")
