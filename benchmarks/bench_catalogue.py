"""The head catalogue's cost against the edge run it sits beside, on the same model, in the same
run: each part of `workbench run catalogue` (attention scores on the repeated sequences,
retrieval on needle prompts, OV copying, Q/K/V composition, token mappings) and the whole, over
EAP attribution with its faithfulness curve on 32 induction prompts (what `workbench run edges
--method eap` computes), and over one forward + backward pass of that batch.

    python -m benchmarks.bench_catalogue
"""

import os
import warnings
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

from benchmarks.bench_edges import forward_backward, induction_batches  # noqa: E402
from benchmarks.bench_head_patching import best_time, random_gpt2, zoo_model  # noqa: E402
from benchmarks.bench_methods import SMOLLM2  # noqa: E402


def catalogue_costs(name: str, loaded, n_prompts: int) -> list[list[str]]:  # type: ignore[no-untyped-def]
    import torch

    from workbench import circuits
    from workbench.attribution import edges
    from workbench.catalogue import maps, scores
    from workbench.catalogue.run import DEFAULT_SEQUENCES, catalogue_params, draw_vocabulary

    model = loaded.model
    batches = induction_batches(loaded, n_prompts)

    def eap_run() -> None:
        result = edges.edge_attribution(model, batches)
        circuits.faithfulness_curve(model, batches, result.graph, result.edges(), runs=result.runs)

    t_fb = best_time(forward_backward(model, batches[0]))
    t_eap = best_time(eap_run, repeats=2)
    params = catalogue_params(
        loaded, n_sequences=DEFAULT_SEQUENCES, length=None, seed=0, dtype="float32"
    )
    vocabulary = draw_vocabulary(loaded)
    tokens = scores.repeated_tokens(
        vocabulary, n_sequences=params.n_sequences, half=params.length, bos=params.bos,
        seed=params.seed,
    )  # fmt: skip
    needles = scores.needle_prompts(
        vocabulary, n_prompts=params.n_sequences, context=params.needle_context,
        needle=params.needle, cue=params.cue, bos=params.bos, seed=params.seed,
    )  # fmt: skip
    with torch.no_grad():
        parts = {
            "attention scores": best_time(lambda: scores.pattern_scores(model, tokens)),
            f"retrieval ({params.needle_context} tokens)": best_time(
                lambda: scores.retrieval_scores(model, needles), repeats=2
            ),
            "OV copying": best_time(lambda: scores.copying_scores(model)),
            "Q/K/V composition": best_time(
                lambda: [scores.composition_scores(model, mode) for mode in scores.COMPOSITIONS],
                repeats=2,
            ),
            "token mappings (OV, QK)": best_time(
                lambda: maps.top_mappings(model, vocabulary), repeats=2
            ),
        }
    total = sum(parts.values())
    shape = f"{params.n_sequences} x {2 * params.length + (params.bos is not None)} tokens"
    rows = [[name, part, f"{t:.2f} s", f"{t / t_eap:.2f}", ""] for part, t in parts.items()]
    rows += [
        [name, f"catalogue ({shape})", f"{total:.2f} s", f"{total / t_eap:.2f}",
         f"{total / t_fb:.1f}"],
        [name, f"eap + curve ({n_prompts} prompts)", f"{t_eap:.2f} s", "1", f"{t_eap / t_fb:.1f}"],
    ]  # fmt: skip
    return rows


def on_three_models(costs: Callable[..., list[list[str]]]) -> list[list[str]]:
    """`costs(name, loaded, n_prompts)` on the zoo's induction model and a random
    GPT-2-small-shaped model with 32 prompts, and on SmolLM2-135M with 16 where it is
    imported (`make smollm2`): the rows of each, in that order."""
    rows = costs("zoo induction (2L, d=64)", zoo_model(None), 32)
    rows += costs("random GPT-2-small shape", random_gpt2(12, 768, 12, 50257), 32)
    if (SMOLLM2 / "model.safetensors").is_file():
        from workbench.models import load_checkpoint, resolve_checkpoints

        rows += costs("SmolLM2-135M", load_checkpoint(resolve_checkpoints(str(SMOLLM2))[0]), 16)
    return rows


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A Markdown table of `rows` under `header`: the columns before "seconds" are text (left
    aligned), the rest numbers (right aligned)."""
    text = header.index("seconds")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * text + ["---:"] * (len(header) - text)) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    rows = on_three_models(catalogue_costs)
    print_table(["model", "part", "seconds", "over eap + curve", "over forward + backward"], rows)


if __name__ == "__main__":
    main()
