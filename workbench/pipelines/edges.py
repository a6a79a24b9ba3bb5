"""The `edges` pipeline: every edge of the model's graph scored by EAP, EAP-IG or exact edge
patching, or pruned by ACDC (see `workbench.attribution.edges` and `workbench.circuits`).

    workbench run edges --model data/zoo/induction --task induction --checkpoint all
    workbench run edges --model my-gpt2 --task ioi.jsonl --method eap_ig --ig-steps 10
    workbench run edges --model my-gpt2 --task ioi.jsonl --method eap_ig --ig-rule left
"""

from dataclasses import dataclass
from typing import Any

from workbench import profiling
from workbench.attribution.ig import IgParams, check_ig_params
from workbench.registry import Method, RunInputs, option
from workbench.results import RunResult
from workbench.spotcheck import SpotParams, check_spot_params, spot_key, spot_size

GRAPH = "input+heads(qkv)+mlps+logits"


@dataclass(frozen=True)
class EapParams:
    faithful_target: float = option(
        0.8, "The stored circuit is the smallest top-n whose faithfulness reaches this."
    )


@dataclass(frozen=True)
class EapCheckedParams(SpotParams, EapParams):
    pass


@dataclass(frozen=True)
class EapIgParams(IgParams, EapCheckedParams):
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
    if isinstance(params, SpotParams):
        key |= spot_key(spot_size(params, "eap_ig" if isinstance(params, IgParams) else "eap"))
    return key


def _check_eap(params: EapCheckedParams) -> None:
    check_spot_params(params)
    if isinstance(params, IgParams):
        check_ig_params(params)


def _acdc_key(params: AcdcParams) -> dict[str, Any]:
    return {
        "graph": GRAPH,
        "circuit": "edges kept by greedy pruning",
        "threshold": params.acdc_threshold,
    }


def _scored(method: str, inputs: RunInputs, result: Any, params: Any) -> RunResult:
    from workbench.circuits import smallest_faithful_circuit
    from workbench.tasks import known_circuit_metrics

    with profiling.stage("edge list"):
        edge_list = result.edges()
    curve, circuit = smallest_faithful_circuit(
        inputs.model,
        inputs.batches,
        result.graph,
        edge_list,
        target=params.faithful_target,
        method=method,
        runs=result.runs,
        max_tokens=inputs.batch_tokens,
    )
    with profiling.stage("known circuit"):
        metrics = known_circuit_metrics(inputs.task, inputs.loaded, edge_list)
    if method == "eap_ig":
        metrics["ig_completeness"] = result.completeness
    spot = None
    size = spot_size(params, method) if isinstance(params, SpotParams) else 0
    if size:
        from workbench.attribution.spotcheck import check_edges

        with profiling.stage("spot check"):
            spot = check_edges(inputs.model, inputs.batches, result, size)
    return RunResult(
        result.metric_clean,
        result.metric_corrupt,
        edges=edge_list,
        edge_stderr=result.edge_stderr(),
        curve=curve,
        metrics=metrics,
        circuit=circuit,
        spot_check=spot,
    )


def eap(inputs: RunInputs, params: EapCheckedParams) -> RunResult:
    from workbench.attribution import edges

    with profiling.stage("attribution"):
        result = edges.edge_attribution(
            inputs.model, inputs.batches, ig_steps=0,
            for_spot_check=spot_size(params, "eap") > 0,
        )  # fmt: skip
    return _scored("eap", inputs, result, params)


def eap_ig(inputs: RunInputs, params: EapIgParams) -> RunResult:
    from workbench.attribution import edges

    with profiling.stage("attribution"):
        result = edges.edge_attribution(
            inputs.model, inputs.batches, ig_steps=params.ig_steps, ig_rule=params.ig_rule,
            for_spot_check=spot_size(params, "eap_ig") > 0,
        )  # fmt: skip
    return _scored("eap_ig", inputs, result, params)


def exact_edge(inputs: RunInputs, params: ExactEdgeParams) -> RunResult:
    from workbench.attribution import edges

    with profiling.stage("attribution"):
        result = edges.exact_edge_patching(inputs.model, inputs.batches, max_rows=params.max_rows)
    return _scored("exact_edge", inputs, result, params)


def acdc(inputs: RunInputs, params: AcdcParams) -> RunResult:
    from workbench.circuits import run_acdc
    from workbench.tasks import known_circuit_metrics

    found = run_acdc(inputs.model, inputs.batches, params.acdc_threshold)
    return RunResult(
        found.metric_clean,
        found.metric_corrupt,
        edges=found.tried,
        metrics=known_circuit_metrics(inputs.task, inputs.loaded, found.tried),
        circuit=found.circuit,
    )


METHODS = (
    Method(
        "eap",
        "edges",
        EapCheckedParams,
        eap,
        key=_key,
        check=_check_eap,
        summary="edge attribution patching",
    ),
    Method(
        "eap_ig",
        "edges",
        EapIgParams,
        eap_ig,
        key=_key,
        check=_check_eap,
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
