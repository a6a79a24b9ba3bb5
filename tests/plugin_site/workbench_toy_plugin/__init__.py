"""A method from outside the workbench: how far the clean and corrupt residual streams are apart
before each layer, at the last position. Registered only through this directory's
`entry_points.txt`; nothing in the workbench names it. A negative `--scale` makes it raise while
computing, as a method with a bug does (the run is stored as failed)."""

from dataclasses import dataclass

from workbench.core import Hook, Node
from workbench.registry import Method, RunInputs, option
from workbench.results import RunResult


@dataclass(frozen=True)
class GapParams:
    scale: float = option(1.0, "Multiply every distance by this.")


def resid_gap(inputs: RunInputs, params: GapParams) -> RunResult:
    import torch

    if params.scale < 0:
        raise ValueError(f"scale {params.scale} is negative")
    model, n_layers = inputs.model, inputs.model.cfg.n_layers
    hooks = [Hook.resid_pre(layer) for layer in range(n_layers)]
    totals = torch.zeros(n_layers)
    n = 0
    for batch in inputs.batches:
        _, clean = model.run_with_cache(batch.clean, names_filter=hooks)
        _, corrupt = model.run_with_cache(batch.corrupt, names_filter=hooks)
        for layer, hook in enumerate(hooks):
            gap = clean[hook][:, -1] - corrupt[hook][:, -1]
            totals[layer] += gap.norm(dim=-1).sum().cpu()
        n += batch.size
    scores = (totals / n * params.scale).tolist()
    nodes = [Node.resid(layer).id for layer in range(n_layers)]
    return RunResult(node_scores=[(node, None, s) for node, s in zip(nodes, scores, strict=True)])


METHODS = [
    Method(
        "resid_gap",
        "toy",
        GapParams,
        resid_gap,
        key=lambda p: {"scale": p.scale},
        demo=None,
        summary="distance between the clean and corrupt residual streams",
    )
]
