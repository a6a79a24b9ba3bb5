"""Exact per-head activation patching: the workbench vs `transformer_lens.patching`.

Both compute `act_patch_denoise` scores for every head (output `hook_z`, all positions) on the
same model and prompts, in the same run. The baseline is
`transformer_lens.patching.get_act_patch_attn_head_out_all_pos`, which runs one full forward
pass per head. The workbench starts each patched run at the patched layer and batches all heads
of a layer together. Starting at the patched layer alone bounds the gain on a compute-bound model
at n_layers / mean remaining layers = 2 n_layers / (n_layers + 1); batching removes per-call
overhead on top of that, which dominates on small models.

    python benchmarks/bench_head_patching.py [--zoo data/zoo/induction] [--repeats 3]
"""

import argparse
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def random_gpt2(n_layers: int, d_model: int, n_heads: int, vocab: int):  # type: ignore[no-untyped-def]
    from transformers import GPT2Config, GPT2LMHeadModel

    from workbench.models import load_checkpoint, resolve_checkpoints

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=n_layers,
        n_embd=d_model,
        n_head=n_heads,
        vocab_size=vocab,
        n_positions=128,
        n_ctx=128,
    )
    out = Path(tempfile.mkdtemp(prefix="bench-gpt2-"))
    GPT2LMHeadModel(cfg).save_pretrained(str(out))
    return load_checkpoint(resolve_checkpoints(str(out))[0])


def zoo_model(zoo: str | None):  # type: ignore[no-untyped-def]
    from workbench.models import load_checkpoint, resolve_checkpoints
    from workbench.zoo import TrainConfig, train_zoo_model

    path = Path(zoo) if zoo else Path("data/zoo/induction")
    if not any(path.glob("step_*")):
        path = Path(tempfile.mkdtemp(prefix="bench-zoo-"))
        train_zoo_model(TrainConfig(out=str(path)))
        path = path / "induction"
    return load_checkpoint(resolve_checkpoints(str(path))[-1])


def compare(
    name: str, loaded, n_prompts: int, repeats: int, *, by_position: bool = False
) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Head-output patching (all positions, or each position) against the matching
    `transformer_lens.patching` function, same model and prompts, same run."""
    from transformer_lens import patching

    from workbench.attribution.batches import logit_diff, make_batches
    from workbench.attribution.patching import patch_sweep
    from workbench.tasks import load_task

    model = loaded.model
    task = load_task("induction", loaded, n_prompts=n_prompts)
    (batch,) = make_batches(task, max_batch=n_prompts)
    tl_function = (
        patching.get_act_patch_attn_head_out_by_pos
        if by_position
        else patching.get_act_patch_attn_head_out_all_pos
    )

    def ours() -> torch.Tensor:
        result = patch_sweep(
            model, [batch], component="head_out", direction="denoise", by_position=by_position
        )
        return result.scores.permute(0, 2, 1) if by_position else result.scores[:, :, 0]

    @torch.no_grad()
    def baseline() -> torch.Tensor:
        clean_logits, cache = model.run_with_cache(batch.clean)
        m_clean = logit_diff(clean_logits, batch.answer, batch.wrong).mean()
        m_corr = logit_diff(model(batch.corrupt), batch.answer, batch.wrong).mean()

        def metric(logits: torch.Tensor) -> torch.Tensor:
            return (logit_diff(logits, batch.answer, batch.wrong).mean() - m_corr) / (
                m_clean - m_corr
            )

        return tl_function(model, batch.corrupt, cache, metric)

    max_diff = float((ours() - baseline()).abs().max())
    t_ours, t_base = best_time(ours, repeats), best_time(baseline, repeats)
    n_layers, n_pos = model.cfg.n_layers, int(batch.clean.shape[1])
    bound = 2 * n_layers / (n_layers + 1)
    if by_position:
        bound *= 2 * n_pos / (n_pos + 1)
    return {
        "model": name + (", by position" if by_position else ""),
        "layers x heads": f"{n_layers} x {model.cfg.n_heads}",
        "prompts x tokens": f"{n_prompts} x {n_pos}",
        "transformer_lens s": round(t_base, 3),
        "workbench s": round(t_ours, 3),
        "speed-up": round(t_base / t_ours, 2),
        "start-at-layer bound": f"{bound:.2f}" + (" (layers x positions)" if by_position else ""),
        "max |diff|": f"{max_diff:.1e}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", default=None, help="zoo induction run directory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--by-position-only", action="store_true", help="only the per-position comparisons"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    zoo, gpt2_4l = zoo_model(args.zoo), random_gpt2(4, 256, 8, 5000)
    rows = []
    if not args.by_position_only:
        rows += [
            compare("zoo induction (2L attn-only, d=64)", zoo, 32, args.repeats),
            compare("random GPT-2 4L (d=256)", gpt2_4l, 32, args.repeats),
            compare(
                "random GPT-2-small shape (12L, d=768)",
                random_gpt2(12, 768, 12, 50257),
                16,
                args.repeats,
            ),
        ]
    rows += [
        compare("zoo induction", zoo, 32, args.repeats, by_position=True),
        compare("random GPT-2 4L (d=256)", gpt2_4l, 32, args.repeats, by_position=True),
    ]
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
