"""The `heads` pipeline: per-head attribution of a task's metric (see
`workbench.attribution.heads` for the methods).

    workbench run heads --model data/zoo/induction --task induction --checkpoint all
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workbench.core import Node
from workbench.registry import Method, RunInputs
from workbench.results import RunResult
from workbench.spotcheck import SpotParams, check_spot_params, spot_key, spot_size

if TYPE_CHECKING:
    from workbench.attribution.heads import HeadScores


@dataclass(frozen=True)
class HeadsParams:
    """The heads methods score every head once; only `attr_patch` takes an option."""


@dataclass(frozen=True)
class AttrPatchParams(SpotParams, HeadsParams):
    pass


# how the two patching methods patch (recorded in the run key since the first release)
HEAD_PATCHING = {"component": "head_out", "positions": "all", "ablation": "resample"}


def _result(result: "HeadScores", spot_check: Any = None) -> RunResult:
    n_layers, n_heads = result.scores.shape
    nodes = [Node.head_of(layer, h).id for layer in range(n_layers) for h in range(n_heads)]
    scores = result.scores.flatten().tolist()
    stderr = result.stderr
    return RunResult(
        result.metric_clean,
        result.metric_corrupt,
        node_scores=[(n, None, s) for n, s in zip(nodes, scores, strict=True)],
        node_stderr=stderr.flatten().tolist() if stderr is not None else None,
        edges=result.edges,
        edge_stderr=getattr(result, "edge_stderr", None),
        spot_check=spot_check,
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


def attr_patch(inputs: RunInputs, params: AttrPatchParams) -> RunResult:
    from workbench.attribution import heads

    result = heads.attribution_patching(inputs.model, inputs.batches)
    spot = None
    size = spot_size(params, "attr_patch")
    if size:
        from workbench.attribution.spotcheck import check_heads

        n_layers, n_heads = result.scores.shape
        scored = [
            (Node.head_of(layer, h).id, float(result.scores[layer, h]))
            for layer in range(n_layers)
            for h in range(n_heads)
        ]
        spot = check_heads(inputs.model, inputs.batches, scored, size)
    return _result(result, spot)


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
    Method(
        "attr_patch",
        "heads",
        AttrPatchParams,
        attr_patch,
        key=lambda p: spot_key(spot_size(p, "attr_patch")),
        check=check_spot_params,
        summary="attribution patching (gradient) of each head",
    ),
    _method("head_importance", head_importance, {}, "head importance scores (Michel et al. 2019)"),
)


if __name__ == "__main__":
    from workbench.pipelines import main

    main("heads")
