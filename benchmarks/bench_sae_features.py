"""Feature-extraction throughput (tokens/s) against SAELens's encoder on the same cached
activations, measured in one run.

* baseline: `SAE.encode` of SAELens over the cached activations, batch by batch, keeping
  nothing (the least any extraction must do);
* workbench: what `workbench run sae` does per batch of activations
  (`workbench.sae.features`): the encoder's active features (read from its pre-activations as
  SAELens selects them, without a dense result), the reconstruction (sparse: L0 rows of
  `W_dec` per token) and every running statistic (density, sums, maxima, the activation
  histogram, the top-k windows per feature, the reconstruction error);
* for scale, SAELens's own `encode` + dense `decode` (the reconstruction SAELens computes).

Shapes: the zoo SAEs (d_in 64, 256 features) and GPT-2-small residual-stream shape (d_in 768,
24,576 features, as in the `gpt2-small-res-jb` release), TopK (k = 32) and standard (ReLU)
SAEs with random weights (cost does not depend on the weights; the standard SAE's encoder bias
is set so that about 1% of features fire, as a trained one would).

    python -m benchmarks.bench_sae_features
"""

import os
import time
import warnings

import torch

from workbench.core import Hook

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")


def make_sae(architecture: str, d_in: int, d_sae: int):  # type: ignore[no-untyped-def]
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from workbench.sae.saes import LoadedSae, prepare

    torch.manual_seed(0)
    meta = SAEMetadata(hook_name=Hook.resid_post(0))
    if architecture == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=32, metadata=meta))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_(0, 1 / d_in**0.5)
        if architecture == "standard":  # about 1% of features active
            sae.b_enc.fill_(-2.33)
            sae.W_enc.div_(sae.W_enc.norm(dim=0, keepdim=True))
    return LoadedSae(prepare(sae), Hook.resid_post(0), architecture, "random")


def throughput(fn, n_tokens: int, repeats: int = 3) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return n_tokens / best


def compare(
    architecture: str, d_in: int, d_sae: int, n_windows: int, ctx: int, batch: int
) -> list[str]:
    """One row; `batch` windows per call, as `workbench run sae` batches them."""
    from workbench.memory import Scratch
    from workbench.sae.features import FeatureStats, encode_active, reconstruct_active

    sae = make_sae(architecture, d_in, d_sae)
    torch.manual_seed(1)
    cached = torch.randn(n_windows, ctx, d_in)  # the cached activations, [window, pos, d_in]
    batches = [(i, cached[i : i + batch]) for i in range(0, n_windows, batch)]

    @torch.no_grad()
    def encoder_only() -> None:
        for _, x in batches:
            sae.sae.encode(x)

    @torch.no_grad()
    def encode_decode() -> None:
        for _, x in batches:
            sae.sae.decode(sae.sae.encode(x))

    @torch.no_grad()
    def workbench() -> None:
        stats = FeatureStats(d_sae, top_k=10)
        scratch = Scratch()
        for first, x in batches:
            active = encode_active(sae, x, scratch)
            x_hat = reconstruct_active(sae, active, x.shape[0] * x.shape[1]).view(x.shape)
            stats.update_sparse(first, x, active, x_hat)

    n_tokens = n_windows * ctx
    base = throughput(encoder_only, n_tokens)
    full = throughput(encode_decode, n_tokens)
    ours = throughput(workbench, n_tokens)
    with torch.no_grad():
        l0 = float((sae.sae.encode(cached[:batch]) > 0).sum(-1).double().mean())
    return [
        f"{architecture} {d_in}x{d_sae}",
        f"{l0:.0f}",
        f"{base:,.0f}",
        f"{full:,.0f}",
        f"{ours:,.0f}",
        f"{ours / base:.2f}x",
        f"{ours / full:.2f}x",
    ]


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [
        compare("topk", 64, 256, n_windows=1024, ctx=48, batch=64),
        compare("standard", 64, 256, n_windows=1024, ctx=48, batch=64),
        compare("topk", 768, 24576, n_windows=32, ctx=128, batch=8),
        compare("standard", 768, 24576, n_windows=32, ctx=128, batch=8),
    ]
    print(
        "| SAE | L0 | SAELens encode (tokens/s) | SAELens encode+decode | workbench extraction "
        "| workbench / encode | workbench / encode+decode |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
