"""The `heads` pipeline: per-head attribution of a task's metric (see
`workbench.attribution.heads` for the methods).

    workbench run heads --model data/zoo/induction --task induction --checkpoint all
"""

from dataclasses import dataclass, field
from functools import partial
from typing import Any

from pipelines.common import (
    MethodResult,
    PipelineConfig,
    RunOutcome,
    RunSpec,
    pipeline_main,
    run_configured,
)
from workbench import records
from workbench.core import Node
from workbench.errors import BadInput
from workbench.models import LoadedModel
from workbench.tasks import Task

METHODS = ("dla", "act_patch_denoise", "act_patch_noise", "attr_patch", "head_importance")


@dataclass
class HeadsConfig(PipelineConfig):
    methods: list[str] = field(default_factory=lambda: list(METHODS))


def method_params(method: str) -> dict[str, Any]:
    if method.startswith("act_patch"):
        return {"component": "head_out", "positions": "all", "ablation": "resample"}
    return {}


def compute(method: str, loaded: LoadedModel, task: Task, *, max_batch: int) -> MethodResult:
    from workbench.attribution import heads as head_methods
    from workbench.attribution.batches import make_batches, model_device

    model = loaded.model
    batches = make_batches(task, max_batch=max_batch, device=model_device(loaded.model))
    if method == "dla":
        result = head_methods.direct_logit_attribution(model, batches)
    elif method == "act_patch_denoise":
        result = head_methods.head_out_patching(model, batches, direction="denoise")
    elif method == "act_patch_noise":
        result = head_methods.head_out_patching(model, batches, direction="noise")
    elif method == "attr_patch":
        result = head_methods.attribution_patching(model, batches)
    elif method == "head_importance":
        result = head_methods.head_importance(model, batches)
    else:
        raise BadInput(f"unknown method {method!r} for the heads pipeline")
    n_layers, n_heads = result.scores.shape
    node_ids = [Node.head_of(layer, h).id for layer in range(n_layers) for h in range(n_heads)]
    rows = {
        "node_scores": records.node_score_rows(node_ids, result.scores.flatten().tolist()),
        "edges": records.edge_rows(result.edges),
    }
    return MethodResult(result.metric_clean, result.metric_corrupt, rows)


def run(cfg: HeadsConfig) -> list[RunOutcome]:
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise BadInput(
            f"--method {unknown[0]}: not a heads method (choose from {', '.join(METHODS)})"
        )
    specs = [
        RunSpec(m, method_params(m), partial(compute, m, max_batch=cfg.max_batch))
        for m in cfg.methods
    ]
    return run_configured("heads", cfg, lambda loaded, task: specs)


def main(argv: list[str] | None = None) -> None:
    pipeline_main("heads", argv)


if __name__ == "__main__":
    main()
