"""The `edges` pipeline: every edge of the model's graph scored by EAP, EAP-IG or exact edge
patching, or pruned by ACDC (see `workbench.attribution.edges` and `workbench.circuits`).

    workbench run edges --model data/zoo/induction --task induction --checkpoint all
    workbench run edges --model my-gpt2 --task ioi.jsonl --method eap_ig --ig-steps 10
    workbench run edges --model my-gpt2 --task ioi.jsonl --method eap_ig --ig-rule left
"""

from dataclasses import dataclass
from typing import Any

from workbench.attribution.ig import IgParams, check_ig_params
from workbench.registry import Method, RunInputs, option
from workbench.results import CircuitResult, RunResult

GRAPH = "input+heads(qkv)+mlps+logits"


@dataclass(frozen=True)
class EapParams:
    faithful_target: float = option(
        0.8, "The stored circuit is the smallest top-n whose faithfulness reaches this."
    )


@dataclass(frozen=True)
class EapIgParams(IgParams, EapParams):
    pass


@dataclass(frozen=True)
class ExactEdgeParams(EapParams):
    max_rows: int = option(512, "Rows per patched forward pass (memory bound).")


@dataclass(frozen=True)
class AcdcParams:
    acdc_threshold: float = option(
        0.02, "ACDC keeps an edge whose removal changes the normalised metric by more than this."
    )


def _key(params: Any) -> dict[str, Any]:
    key: dict[str, Any] = {"graph": GRAPH}
    key["circuit"] = f"smallest top-n with faithfulness >= {params.faithful_target}"
    if isinstance(params, IgParams):
        key["ig_steps"] = params.ig_steps
        key["ig_rule"] = params.ig_rule
    return key


def _acdc_key(params: AcdcParams) -> dict[str, Any]:
    return {
        "graph": GRAPH,
        "circuit": "edges kept by greedy pruning",
        "threshold": params.acdc_threshold,
    }


def _scored(method: str, inputs: RunInputs, result: Any, params: Any) -> RunResult:
    from workbench import circuits

    edge_list = result.edges()
    curve = circuits.faithfulness_curve(inputs.model, inputs.batches, result.graph, edge_list)
    size = circuits.smallest_faithful(curve, params.faithful_target)
    circuit = circuits.select(edge_list, f"top:{size}")
    faith = next(f for n, _, f in curve if n == size)
    metrics = known_circuit_metrics(inputs, edge_list)
    if method == "eap_ig":
        metrics["ig_completeness"] = result.completeness
    return RunResult(
        result.metric_clean,
        result.metric_corrupt,
        edges=edge_list,
        curve=curve,
        metrics=metrics,
        circuit=CircuitResult(
            f"{method}: smallest top-n with faithfulness >= {params.faithful_target}",
            circuit.rule,
            circuit.edges,
            len(circuit.nodes),
            faith,
        ),
    )


def eap(inputs: RunInputs, params: EapParams) -> RunResult:
    from workbench.attribution import edges

    result = edges.edge_attribution(inputs.model, inputs.batches, ig_steps=0)
    return _scored("eap", inputs, result, params)


def eap_ig(inputs: RunInputs, params: EapIgParams) -> RunResult:
    from workbench.attribution import edges

    result = edges.edge_attribution(
        inputs.model, inputs.batches, ig_steps=params.ig_steps, ig_rule=params.ig_rule
    )
    return _scored("eap_ig", inputs, result, params)


def exact_edge(inputs: RunInputs, params: ExactEdgeParams) -> RunResult:
    from workbench.attribution import edges

    result = edges.exact_edge_patching(inputs.model, inputs.batches, max_rows=params.max_rows)
    return _scored("exact_edge", inputs, result, params)


def acdc(inputs: RunInputs, params: AcdcParams) -> RunResult:
    from workbench import circuits
    from workbench.attribution import edges

    model = inputs.model
    ablator = circuits.EdgeAblator(model, inputs.batches, edges.model_graph(model))
    tried, kept, faith = circuits.acdc(ablator, threshold=params.acdc_threshold)
    return RunResult(
        ablator.m_clean,
        ablator.m_corrupt,
        edges=tried,
        metrics=known_circuit_metrics(inputs, tried),
        circuit=CircuitResult(
            f"acdc: greedy pruning, threshold {params.acdc_threshold}",
            f"acdc:{params.acdc_threshold}",
            kept,
            len(circuits.Circuit("acdc", kept).nodes),
            faith,
        ),
    )


def known_circuit_metrics(
    inputs: RunInputs, edge_list: list[tuple[str, str, float]]
) -> dict[str, float]:
    """ROC AUC of |edge score| against the task's known circuit, where it has one."""
    from workbench.tasks import known_circuit

    known = known_circuit(inputs.task, inputs.loaded)
    if known is None:
        return {}
    from workbench.zoo.ground_truth import roc_auc

    auc = roc_auc(edge_list, known)
    return {} if auc is None else {"roc_auc_known_circuit": auc}


METHODS = (
    Method("eap", "edges", EapParams, eap, key=_key, summary="edge attribution patching"),
    Method(
        "eap_ig",
        "edges",
        EapIgParams,
        eap_ig,
        key=_key,
        check=check_ig_params,
        summary="EAP with integrated gradients on the input embeddings",
    ),
    Method(
        "exact_edge",
        "edges",
        ExactEdgeParams,
        exact_edge,
        key=_key,
        default=False,  # a forward pass per edge
        summary="exact patching of every edge",
    ),
    Method(
        "acdc",
        "edges",
        AcdcParams,
        acdc,
        key=_acdc_key,
        default=False,  # a forward pass per edge
        summary="ACDC: greedy pruning of edges (Conmy et al. 2023)",
    ),
)


if __name__ == "__main__":
    from workbench.pipelines import main

    main("edges")
