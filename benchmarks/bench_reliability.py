"""What reliability costs, against the run it qualifies, on the same model and prompts in the
same run: the standard errors over prompts (the per-prompt products beside the summed ones) and
a spot check of 8 scores by real patching, over an `eap` run (attribution, faithfulness curve
and circuit with its bootstrap spread, what `workbench run edges --method eap` computes), an
`eap_ig` run (5 steps, the same curve) and an `attr_patch` run; and for `sae_attr` (the
zoo's models with an SAE after each layer, trained here) the check against the run. A method's
check is on by default where this shows it costing at most 10 % of the run.

    python -m benchmarks.bench_reliability
"""

import os
import warnings
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

from benchmarks.bench_catalogue import on_three_models, print_table  # noqa: E402
from benchmarks.bench_edges import induction_batches  # noqa: E402
from benchmarks.bench_head_patching import best_time  # noqa: E402

SPOT = 8  # the default --spot-checks


def reliability_costs(name: str, loaded, n_prompts: int) -> list[list[str]]:  # type: ignore[no-untyped-def]
    from workbench import circuits
    from workbench.attribution import edges
    from workbench.attribution.spotcheck import check_edges, check_heads
    from workbench.core import Node

    model = loaded.model
    batches = induction_batches(loaded, n_prompts)
    graph = edges.model_graph(model)
    kept: dict[str, Any] = {}

    def eap_run() -> None:
        result = edges.edge_attribution(model, batches)
        circuits.smallest_faithful_circuit(
            model, batches, graph, result.edges(), target=0.8, method="eap", runs=result.runs
        )
        kept["result"] = result

    def attribution(errors: bool) -> float:
        return best_time(lambda: edges.edge_attribution(model, batches, errors=errors))

    t_eap = best_time(eap_run, repeats=2)
    # the standard errors' share: the attribution with and without them (the curve's passes
    # vary more from one run to the next than the errors cost)
    t_errors = attribution(True) - attribution(False)
    result = kept["result"]
    t_spot_edges = best_time(lambda: check_edges(model, batches, result, SPOT), repeats=2)

    def eap_ig_run() -> None:
        result = edges.edge_attribution(model, batches, ig_steps=5)
        circuits.smallest_faithful_circuit(
            model, batches, graph, result.edges(), target=0.8, method="eap_ig", runs=result.runs
        )

    t_eap_ig = best_time(eap_ig_run, repeats=1)

    def attr_patch(errors: bool) -> None:
        kept["attr"] = edges.edge_attribution(model, batches, keep_runs=False, errors=errors)

    t_attr_errors = best_time(lambda: attr_patch(True))
    t_attr = best_time(lambda: attr_patch(False))
    cfg = model.cfg
    attr = kept["attr"]
    rows_of = [graph.sources.index(Node.head_of(lyr, h).id) for lyr in range(cfg.n_layers)
               for h in range(cfg.n_heads)]  # fmt: skip
    head_scores = attr.scores[rows_of].sum(1).tolist()  # type: ignore[attr-defined]
    scored = [(Node.head_of(i // cfg.n_heads, i % cfg.n_heads).id, s)
              for i, s in enumerate(head_scores)]  # fmt: skip
    t_spot_heads = best_time(lambda: check_heads(model, batches, scored, SPOT), repeats=2)

    def row(run: str, part: str, t: float, base: float) -> list[str]:
        return [name, run, part, f"{t:.2f} s", f"{t / base:.1%}"]

    return [
        row("eap + curve + circuit", f"the run ({n_prompts} prompts)", t_eap, t_eap),
        row("eap + curve + circuit", "standard errors", t_errors, t_eap),
        row("eap + curve + circuit", f"spot check of {SPOT} edges", t_spot_edges, t_eap),
        row(
            "eap_ig (5 steps) + curve + circuit",
            f"the run ({n_prompts} prompts)",
            t_eap_ig,
            t_eap_ig,
        ),
        row(
            "eap_ig (5 steps) + curve + circuit",
            f"spot check of {SPOT} edges",
            t_spot_edges,
            t_eap_ig,
        ),
        row("attr_patch", f"the run ({n_prompts} prompts)", t_attr, t_attr),
        row("attr_patch", "standard errors", t_attr_errors - t_attr, t_attr),
        row("attr_patch", f"spot check of {SPOT} heads", t_spot_heads, t_attr),
    ]


def sae_attr_costs() -> list[list[str]]:
    """`sae_attr` (its feature circuit, as `workbench run sae --method sae_attr` computes it)
    with and without a spot check of 8 nodes, on each zoo model's final checkpoint with an SAE
    after each of its two layers trained here."""
    import tempfile
    from functools import partial
    from pathlib import Path

    from benchmarks.bench_ig_rules import trained_saes, zoo_final
    from workbench.attribution.batches import make_batches
    from workbench.pipelines.sae import SaeAttrParams
    from workbench.sae.compute import compute_attr
    from workbench.sae.plan import AttrRun
    from workbench.store import Store
    from workbench.tasks import load_task

    root = Path(tempfile.mkdtemp(prefix="bench-reliability-"))
    d = SaeAttrParams()  # the defaults
    rows = []
    for task in ("induction", "ioi"):
        run_dir, loaded = zoo_final(root / "zoo", task)
        db = root / f"{task}.duckdb"
        trained_saes(run_dir, task, loaded, db)
        with Store(db) as store:
            chosen = store.latest_saes(loaded.checkpoint.checkpoint_id)
        batches = make_batches(load_task(task, loaded))
        timed = [
            best_time(
                partial(
                    compute_attr, loaded, batches,
                    AttrRun(chosen, d.n_nodes, d.ig_steps, d.ig_rule, d.faithful_target, spot),
                ),
                repeats=2,
            )
            for spot in (0, SPOT)
        ]  # fmt: skip
        t_run, t_spot = timed[0], timed[1] - timed[0]
        name = f"zoo {task} + 2 SAEs"
        prompts = sum(len(b.clean) for b in batches)
        rows += [
            [name, "sae_attr", f"the run ({prompts} prompts)", f"{t_run:.2f} s", "100.0%"],
            [name, "sae_attr", f"spot check of {SPOT} nodes", f"{t_spot:.2f} s",
             f"{t_spot / t_run:.1%}"],
        ]  # fmt: skip
    return rows


def main() -> None:
    rows = on_three_models(reliability_costs) + sae_attr_costs()
    print_table(["model", "run", "part", "seconds", "over the run"], rows)


if __name__ == "__main__":
    main()
