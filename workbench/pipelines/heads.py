"""The `heads` pipeline: per-head attribution of a task's metric (see
`workbench.attribution.heads` for the methods).

    workbench run heads --model data/zoo/induction --task induction --checkpoint all
"""

from dataclasses import dataclass
from typing import Any

from workbench.core import Node
from workbench.registry import Method, RunInputs
from workbench.results import RunResult


@dataclass(frozen=True)
class HeadsParams:
    """The heads methods take no options: each scores every head once."""


# how the two patching methods patch (recorded in the run key since the first release)
HEAD_PATCHING = {"component": "head_out", "positions": "all", "ablation": "resample"}


def _result(result: Any) -> RunResult:
    n_layers, n_heads = result.scores.shape
    nodes = [Node.head_of(layer, h).id for layer in range(n_layers) for h in range(n_heads)]
    scores = result.scores.flatten().tolist()
    return RunResult(
        result.metric_clean,
        result.metric_corrupt,
        node_scores=[(n, None, s) for n, s in zip(nodes, scores, strict=True)],
        edges=result.edges,
    )


def dla(inputs: RunInputs, params: HeadsParams) -> RunResult:
    from workbench.attribution import heads

    return _result(heads.direct_logit_attribution(inputs.model, inputs.batches, inputs.baseline))


def act_patch_denoise(inputs: RunInputs, params: HeadsParams) -> RunResult:
    from workbench.attribution import heads

    return _result(heads.head_out_patching(inputs.model, inputs.batches, direction="denoise"))


def act_patch_noise(inputs: RunInputs, params: HeadsParams) -> RunResult:
    from workbench.attribution import heads

    return _result(heads.head_out_patching(inputs.model, inputs.batches, direction="noise"))


def attr_patch(inputs: RunInputs, params: HeadsParams) -> RunResult:
    from workbench.attribution import heads

    return _result(heads.attribution_patching(inputs.model, inputs.batches))


def head_importance(inputs: RunInputs, params: HeadsParams) -> RunResult:
    from workbench.attribution import heads

    return _result(heads.head_importance(inputs.model, inputs.batches, inputs.baseline))


def _method(name: str, compute: Any, key: dict[str, Any], summary: str) -> Method:
    return Method(name, "heads", HeadsParams, compute, key=lambda p: dict(key), summary=summary)


METHODS = (
    _method("dla", dla, {}, "direct logit attribution of each head at the last position"),
    _method(
        "act_patch_denoise",
        act_patch_denoise,
        HEAD_PATCHING,
        "exact patching of each head's output, clean into corrupt",
    ),
    _method(
        "act_patch_noise",
        act_patch_noise,
        HEAD_PATCHING,
        "exact patching of each head's output, corrupt into clean",
    ),
    _method("attr_patch", attr_patch, {}, "attribution patching (gradient) of each head"),
    _method("head_importance", head_importance, {}, "head importance scores (Michel et al. 2019)"),
)


if __name__ == "__main__":
    from workbench.pipelines import main

    main("heads")
