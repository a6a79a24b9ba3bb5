"""The `patching` pipeline: node-level activation patching of every component (see
`workbench.attribution.patching` for the method and the components).

    workbench run patching --model data/zoo/induction --task induction --checkpoint all
    workbench run patching --model my-gpt2 --task ioi.jsonl --component head_out --by-position
    workbench run patching --model my-gpt2 --task ioi.jsonl --method act_patch_noise --ablation mean

Each method makes one run per component.
"""

from dataclasses import dataclass, replace

from workbench.errors import BadInput
from workbench.registry import Method, PlanContext, Planned, RunInputs, option
from workbench.results import RunResult

ABLATIONS = ("resample", "zero", "mean")
COMPONENT_NAMES = (
    "resid", "attn_out", "mlp_out", "head_out", "head_q", "head_k", "head_v", "head_pattern"
)  # fmt: skip


@dataclass(frozen=True)
class DenoiseParams:
    components: list[str] | None = option(
        None,
        "What to patch (repeatable; default: every component the model has).",
        flag="component",
        choices=COMPONENT_NAMES,
    )
    by_position: bool = option(False, "Patch each position separately.")
    max_rows: int = option(512, "Rows per patched forward pass (memory bound).")


@dataclass(frozen=True)
class NoiseParams(DenoiseParams):
    ablation: str = option(
        "resample",
        "What replaces a clean activation when noising: the corrupt run's (resample), zero, "
        "or its mean over the task's prompts.",
        choices=ABLATIONS,
    )


def _check(params: DenoiseParams) -> None:
    ablation = getattr(params, "ablation", "resample")
    if ablation not in ABLATIONS:
        raise BadInput(f"--ablation {ablation}: choose from {', '.join(ABLATIONS)}")


def _plan(params: DenoiseParams, inputs: RunInputs, ctx: PlanContext) -> list[Planned]:
    """One run per component; every component is checked before any run is made."""
    from workbench.attribution.patching import COMPONENTS, check_component

    model, task = inputs.model, inputs.task
    if params.components is None:
        names = [
            c for c, comp in COMPONENTS.items() if not (comp.needs_mlp and model.cfg.attn_only)
        ]
    else:
        names = list(params.components)
    planned = []
    for name in names:
        comp = COMPONENTS.get(name)
        by_position = params.by_position and comp is not None and comp.by_position != "never"
        try:
            check_component(model, name, by_position)
        except ValueError as err:
            raise BadInput(f"--component {err}") from err
        by_position = by_position or (comp is not None and comp.by_position == "always")
        lengths = {len(p.clean_tokens) for p in task.pairs}
        if by_position and len(lengths) > 1:
            raise BadInput(
                f"--component {name}: patching by position needs prompts of one length, "
                f"and task {task.name} has lengths {sorted(lengths)}"
            )
        one = replace(params, components=[name], by_position=by_position)
        key = {
            "component": name,
            "positions": "each" if by_position else "all",
            "ablation": getattr(params, "ablation", "resample"),
        }
        planned.append(Planned(one, key))
    return planned


def _compute(direction: str):  # type: ignore[no-untyped-def]
    def compute(inputs: RunInputs, params: DenoiseParams) -> RunResult:
        from workbench.attribution.patching import patch_sweep

        assert params.components is not None and len(params.components) == 1
        result = patch_sweep(
            inputs.model,
            inputs.batches,
            component=params.components[0],
            direction=direction,  # type: ignore[arg-type]
            ablation=getattr(params, "ablation", "resample"),
            by_position=params.by_position,
            max_rows=params.max_rows,
        )
        nodes, positions, scores = result.rows()
        return RunResult(
            result.metric_clean,
            result.metric_corrupt,
            node_scores=list(zip(nodes, positions, scores, strict=True)),
            node_stderr=result.stderr_rows(),
        )

    return compute


METHODS = (
    Method(
        "act_patch_denoise",
        "patching",
        DenoiseParams,
        _compute("denoise"),
        key=lambda p: {},
        plan=_plan,
        check=_check,
        summary="patch each component's clean activation into the corrupt run",
    ),
    Method(
        "act_patch_noise",
        "patching",
        NoiseParams,
        _compute("noise"),
        key=lambda p: {},
        plan=_plan,
        check=_check,
        summary="replace each component's clean activation (resample, zero or mean ablation)",
    ),
)


if __name__ == "__main__":
    from workbench.pipelines import main

    main("patching")
