"""Why this token, what each method costs: every input-attribution method of `workbench run
prompt` (`workbench.prompt.inputattr`), its faithfulness curves, Patchscope, and the tuned lens
(applied to the prompt; one training step of `workbench run tuned-lens`), each over one
forward + backward pass of the same prompt (the target's logit at the last position, back to the
token embeddings), on the zoo's induction model, a random GPT-2-small-shaped model and SmolLM2-135M
where it is imported (`make smollm2`), in the same run.

    python -m benchmarks.bench_why
"""

import os
import warnings
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

from benchmarks.bench_catalogue import print_table  # noqa: E402
from benchmarks.bench_head_patching import best_time, random_gpt2, zoo_model  # noqa: E402
from benchmarks.bench_methods import SMOLLM2  # noqa: E402

PROMPT_TOKENS = 12  # the random prompt's length on the zoo and GPT-2 shapes
LENS_STEP_TOKENS = 512  # one tuned-lens training step's tokens


def why_costs(name: str, loaded, ids: list[int]) -> list[list[str]]:  # type: ignore[no-untyped-def]
    import torch

    from workbench.prompt.inputattr import (
        CURVE_KINDS,
        METHODS,
        TargetLogit,
        applicable,
        baseline_embeddings,
        curve,
    )
    from workbench.prompt.patchscope import IDENTITY_IDS, IDENTITY_TEMPLATE, patchscope
    from workbench.prompt.patchscope import template_ids as inspection_ids
    from workbench.prompt.tunedlens import (
        TunedLens,
        TunedLensConfig,
        train_tuned_lens,
        tuned_lens_predictions,
    )

    model = loaded.model
    with torch.no_grad():
        target = int(model(torch.tensor([ids]))[0, -1].argmax())
    fn = TargetLogit(model, ids, target)
    embeds = fn.embeddings()
    baseline = baseline_embeddings(model, embeds, "zero")

    def forward_backward() -> None:
        inputs = embeds.clone().requires_grad_(True)
        fn(inputs).sum().backward()

    t_fb = best_time(forward_backward)
    rows = []
    for method in METHODS:
        if applicable(model, method) is not None:
            rows.append([name, method, "—", "does not apply"])
            continue
        t = best_time(partial(_one_method, fn, model, ids, target, method, baseline), repeats=2)
        rows.append([name, method, f"{t:.3f} s", f"{t / t_fb:.1f}"])
    order = torch.arange(len(ids), dtype=torch.float64).numpy()
    t_curves = best_time(
        lambda: [curve(fn, embeds, baseline, order, kind) for kind in CURVE_KINDS], repeats=2
    )
    rows.append([name, "deletion + insertion curves (one method)", f"{t_curves:.3f} s",
                 f"{t_curves / t_fb:.1f}"])  # fmt: skip
    template = IDENTITY_TEMPLATE if loaded.tokenizer is not None else IDENTITY_IDS
    inspect = inspection_ids(template, loaded.encode if loaded.tokenizer else None,
                             model.cfg.d_vocab)  # fmt: skip
    t_scope = best_time(lambda: patchscope(model, ids, inspect), repeats=2)
    rows.append([name, f"Patchscope ({model.cfg.n_layers + 1} streams, 6 tokens)",
                 f"{t_scope:.3f} s", f"{t_scope / t_fb:.1f}"])  # fmt: skip
    lens = TunedLens.zeros_for(model)
    t_lens = best_time(lambda: tuned_lens_predictions(model, lens, ids), repeats=2)
    rows.append([name, "tuned lens, applied", f"{t_lens:.3f} s", f"{t_lens / t_fb:.1f}"])
    ctx = min(128, model.cfg.n_ctx)
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.cfg.d_vocab, (LENS_STEP_TOKENS // ctx, ctx), generator=gen)
    config = TunedLensConfig(steps=1, tokens_per_step=LENS_STEP_TOKENS)
    t_step = best_time(lambda: train_tuned_lens(model, windows, config, progress=False), repeats=1)
    rows.append([name, f"tuned lens, one training step ({LENS_STEP_TOKENS} tokens)",
                 f"{t_step:.2f} s", f"{t_step / t_fb:.1f}"])  # fmt: skip
    rows.append([name, f"forward + backward ({len(ids)} tokens)", f"{t_fb:.4f} s", "1"])
    return rows


def _one_method(fn, model, ids, target, method, baseline):  # type: ignore[no-untyped-def]
    from workbench.prompt.inputattr import (
        AttributionParams,
        atman_scores,
        captum_scores,
        own_scores,
    )

    embeds = fn.embeddings()
    if method == "atman":
        return atman_scores(fn, embeds, AttributionParams().atman_suppression)
    if method in ("attn_lrp", "relevance_rollout", "alti", "globenc"):
        return own_scores(model, ids, target, method)
    return captum_scores(fn, method, embeds, baseline, AttributionParams())


def main() -> None:
    import torch

    gen = torch.Generator().manual_seed(0)
    zoo = zoo_model(None)
    ids = torch.randint(1, zoo.model.cfg.d_vocab, (PROMPT_TOKENS,), generator=gen).tolist()
    rows = why_costs("zoo induction (2L, d=64)", zoo, ids)
    gpt2 = random_gpt2(12, 768, 12, 50257)
    ids = torch.randint(0, 50257, (PROMPT_TOKENS,), generator=gen).tolist()
    rows += why_costs("random GPT-2-small shape", gpt2, ids)
    if (SMOLLM2 / "model.safetensors").is_file():
        from workbench.models import load_checkpoint, resolve_checkpoints

        smol = load_checkpoint(resolve_checkpoints(str(SMOLLM2))[0])
        rows += why_costs("SmolLM2-135M", smol, smol.encode("The capital of France is"))
    print_table(["model", "method", "seconds", "over forward + backward"], rows)


if __name__ == "__main__":
    main()
