"""The `edges` pipeline: every edge of the model's graph scored by EAP, EAP-IG or exact edge
patching (see `workbench.attribution.edges`).

    workbench run edges --model data/zoo/induction --task induction --checkpoint all
    workbench run edges --model my-gpt2 --task ioi.jsonl --method eap_ig --ig-steps 10
    workbench run edges --model my-gpt2 --task ioi.jsonl --method eap_ig --ig-rule left
"""

from dataclasses import dataclass, field
from functools import partial
from typing import Any

from pipelines.common import (
    MethodResult,
    PipelineConfig,
    RunOutcome,
    RunSpec,
    link_circuit,
    pipeline_main,
    run_configured,
)
from workbench import records
from workbench.attribution.ig import DEFAULT_IG_RULE, check_ig_rule
from workbench.errors import BadInput
from workbench.models import LoadedModel
from workbench.tasks import Task

METHODS = ("eap", "eap_ig", "exact_edge", "acdc")
DEFAULT_METHODS = ("eap", "eap_ig")  # exact_edge and acdc cost a forward pass per edge


@dataclass
class EdgesConfig(PipelineConfig):
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    ig_steps: int = 5
    ig_rule: str = DEFAULT_IG_RULE
    acdc_threshold: float = 0.02
    faithful_target: float = 0.8
    max_rows: int = 512


def method_params(method: str, cfg: EdgesConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"graph": "input+heads(qkv)+mlps+logits"}
    params["circuit"] = f"smallest top-n with faithfulness >= {cfg.faithful_target}"
    if method == "eap_ig":
        params["ig_steps"] = cfg.ig_steps
        params["ig_rule"] = cfg.ig_rule
    if method == "acdc":
        params["threshold"] = cfg.acdc_threshold
        params["circuit"] = "edges kept by greedy pruning"
    return params


def compute(method: str, loaded: LoadedModel, task: Task, *, cfg: EdgesConfig) -> MethodResult:
    from workbench import circuits
    from workbench.attribution import edges
    from workbench.attribution.batches import make_batches, model_device

    batches = make_batches(task, max_batch=cfg.max_batch, device=model_device(loaded.model))
    if method == "acdc":
        return _acdc(loaded, batches, cfg)
    if method == "exact_edge":
        result = edges.exact_edge_patching(loaded.model, batches, max_rows=cfg.max_rows)
    else:
        steps = cfg.ig_steps if method == "eap_ig" else 0
        result = edges.edge_attribution(loaded.model, batches, ig_steps=steps, ig_rule=cfg.ig_rule)
    edge_list = result.edges()
    curve = circuits.faithfulness_curve(loaded.model, batches, result.graph, edge_list)
    size = circuits.smallest_faithful(curve, cfg.faithful_target)
    circuit = circuits.select(edge_list, f"top:{size}")
    faith = next(f for n, _, f in curve if n == size)
    rows = {"edges": records.edge_rows(edge_list), "faithfulness_curves": records.curve_rows(curve)}
    metrics = known_circuit_metrics(loaded, edge_list)
    if method == "eap_ig":
        metrics["ig_completeness"] = result.completeness
    rows["run_metrics"] = records.metric_rows(metrics)

    linked = link_circuit(
        f"{method}: smallest top-n with faithfulness >= {cfg.faithful_target}",
        circuit.rule,
        circuit.edges,
        faith,
    )

    return MethodResult(result.metric_clean, result.metric_corrupt, rows, linked)


def known_circuit_metrics(
    loaded: LoadedModel, edge_list: list[tuple[str, str, float]]
) -> dict[str, float]:
    """ROC AUC of |edge score| against the known circuit, for zoo models that have one."""
    if loaded.info.architecture != "zoo:induction" or loaded.tokenizer is None:
        return {}
    from workbench.zoo.ground_truth import known_induction_edges, roc_auc

    auc = roc_auc(edge_list, known_induction_edges(loaded))
    return {} if auc is None else {"roc_auc_known_circuit": auc}


def _acdc(loaded: LoadedModel, batches: list, cfg: EdgesConfig) -> MethodResult:  # type: ignore[type-arg]
    from workbench import circuits
    from workbench.attribution import edges

    model = loaded.model
    ablator = circuits.EdgeAblator(model, batches, edges.model_graph(model))
    tried, kept, faith = circuits.acdc(ablator, threshold=cfg.acdc_threshold)
    rows = {"edges": records.edge_rows(tried)}
    rows["run_metrics"] = records.metric_rows(known_circuit_metrics(loaded, tried))
    linked = link_circuit(
        f"acdc: greedy pruning, threshold {cfg.acdc_threshold}",
        f"acdc:{cfg.acdc_threshold}",
        kept,
        faith,
    )

    return MethodResult(ablator.m_clean, ablator.m_corrupt, rows, linked)


def run(cfg: EdgesConfig) -> list[RunOutcome]:
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise BadInput(f"--method {unknown[0]}: not an edges method ({', '.join(METHODS)})")
    if cfg.ig_steps < 1:
        raise BadInput(f"--ig-steps {cfg.ig_steps}: must be at least 1")
    check_ig_rule(cfg.ig_rule)
    specs = [RunSpec(m, method_params(m, cfg), partial(compute, m, cfg=cfg)) for m in cfg.methods]
    return run_configured("edges", cfg, lambda loaded, task: specs)


def main(argv: list[str] | None = None) -> None:
    pipeline_main("edges", argv)


if __name__ == "__main__":
    main()
