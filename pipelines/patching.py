"""The `patching` pipeline: node-level activation patching of every component (see
`workbench.attribution.patching` for the method and the components).

    workbench run patching --model data/zoo/induction --task induction --checkpoint all
    workbench run patching --model my-gpt2 --task ioi.jsonl --component head_out --by-position
    workbench run patching --model my-gpt2 --task ioi.jsonl --method act_patch_noise --ablation mean
"""

from dataclasses import dataclass, field
from functools import partial

from pipelines.common import (
    MethodResult,
    PipelineConfig,
    RunOutcome,
    RunSpec,
    pipeline_main,
    run_configured,
)
from workbench import records
from workbench.errors import BadInput
from workbench.models import LoadedModel
from workbench.tasks import Task

METHODS = ("act_patch_denoise", "act_patch_noise")
ABLATIONS = ("resample", "zero", "mean")


@dataclass
class PatchingConfig(PipelineConfig):
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    components: list[str] | None = None  # None: every component the model has
    by_position: bool = False
    ablation: str = "resample"  # for noising; denoising always patches in clean activations
    max_rows: int = 512


def compute(
    loaded: LoadedModel,
    task: Task,
    *,
    direction: str,
    component: str,
    by_position: bool,
    ablation: str,
    max_batch: int,
    max_rows: int,
) -> MethodResult:
    from workbench.attribution.batches import make_batches, model_device
    from workbench.attribution.patching import patch_sweep

    result = patch_sweep(
        loaded.model,
        make_batches(task, max_batch=max_batch, device=model_device(loaded.model)),
        component=component,
        direction=direction,  # type: ignore[arg-type]
        ablation=ablation,  # type: ignore[arg-type]
        by_position=by_position,
        max_rows=max_rows,
    )
    nodes, positions, scores = result.rows()
    rows = {"node_scores": records.node_score_rows(nodes, scores, positions)}
    return MethodResult(result.metric_clean, result.metric_corrupt, rows)


def plan(cfg: PatchingConfig, loaded: LoadedModel, task: Task) -> list[RunSpec]:
    from workbench.attribution.patching import COMPONENTS, check_component

    model = loaded.model
    if cfg.components is None:
        names = [
            c for c, comp in COMPONENTS.items() if not (comp.needs_mlp and model.cfg.attn_only)
        ]
    else:
        names = cfg.components
    specs = []
    for name in names:
        comp = COMPONENTS.get(name)
        by_position = cfg.by_position and comp is not None and comp.by_position != "never"
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
        for method in cfg.methods:
            direction = method.removeprefix("act_patch_")
            ablation = cfg.ablation if direction == "noise" else "resample"
            params = {
                "component": name,
                "positions": "each" if by_position else "all",
                "ablation": ablation,
            }
            fn = partial(
                compute,
                direction=direction,
                component=name,
                by_position=by_position,
                ablation=ablation,
                max_batch=cfg.max_batch,
                max_rows=cfg.max_rows,
            )
            specs.append(RunSpec(method, params, fn))
    return specs


def run(cfg: PatchingConfig) -> list[RunOutcome]:
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise BadInput(f"--method {unknown[0]}: not a patching method ({', '.join(METHODS)})")
    if cfg.ablation not in ABLATIONS:
        raise BadInput(f"--ablation {cfg.ablation}: choose from {', '.join(ABLATIONS)}")
    return run_configured("patching", cfg, partial(plan, cfg))


def main(argv: list[str] | None = None) -> None:
    pipeline_main("patching", argv)


if __name__ == "__main__":
    main()
