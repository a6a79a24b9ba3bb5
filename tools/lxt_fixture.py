"""Writes an AttnLRP fixture computed by lxt 2.1 itself (the reference implementation of
Achtibat et al. 2024, "AttnLRP: Attention-Aware Layer-wise Relevance Propagation for
Transformers"), for testing `workbench.prompt.lrp` against an independent implementation.

lxt 2.1 patches transformers' model classes in place (and `torch.nn.LayerNorm` with them) and
was tested with transformers 4.52, so this script runs in an environment of its own, not in the
project's `.venv`:

    python3.11 -m venv /tmp/lxtvenv
    /tmp/lxtvenv/bin/pip install torch==2.13.0                    # the CPU build
    /tmp/lxtvenv/bin/pip install --no-deps lxt==2.1
    /tmp/lxtvenv/bin/pip install transformers==4.52.4 safetensors numpy
    HF_HUB_OFFLINE=1 /tmp/lxtvenv/bin/python tools/lxt_fixture.py tests/prompt/data/lxt

`--no-deps`: lxt's own requirements bring open_clip_torch and torchvision, which only its
vision-transformer patches use and whose builds need another torch. lxt imports torchvision's
vision-transformer module when it is imported, so where torchvision is absent this script puts
an empty stand-in under that name first (after transformers is imported, so transformers still
finds no torchvision); nothing of it is used for GPT-2 or Llama.

Everything is made locally from fixed seeds, on the CPU in float32 with one thread (nothing is
downloaded); a second run writes identical files. The models are the two of
`tests/prompt/lxt_weights.py` (a tiny GPT-2 with biases and learned positions, a tiny Llama
with grouped-query attention and a gated MLP), written to a temporary directory, loaded with
`attn_implementation="eager"`, and patched with lxt's default AttnLRP map for their module
(`lxt.efficient.monkey_patch(modeling_gpt2)`, `monkey_patch(modeling_llama)`). For each model
and each of two targets (the model's top next token at the last position, and token TARGET_2)
the relevance is lxt's input × gradient after `logits[0, -1, target].backward()` on the patched
model, fed `inputs_embeds`. OUTDIR receives:

* `gpt2.npz`, `llama.npz` (`numpy.load`, no pickle):
  - `input_ids` int64 [pos], `targets` int64 [2];
  - `logits` float32 [pos, vocab]: the unpatched model's logits (the workbench's TransformerLens
    conversion is checked against them);
  - `value` float32 [2]: the target's logit at the last position, from the patched forward;
  - `tokens` float32 [2, pos]: relevance of `inputs_embeds`, summed over the hidden dimension;
  - `positional` float32 [2, pos] (GPT-2 only): relevance of the output of `transformer.wpe`;
  - `layers` float32 [2, n_layers + 1, pos]: relevance of each decoder block's input hidden
    states and of the last block's output (before the final norm);
* `README.md`: the versions, the prompt, targets and summary numbers, and the files' sizes and
  hashes.
"""

import importlib.util
import json
import os
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/
from tests.prompt import lxt_weights as lw  # noqa: E402
from tools.fixture_files import dist_version, file_table  # noqa: E402

TARGET_2 = 5  # the second target token of every model
KINDS = ("gpt2", "llama")


def _stand_in_for_torchvision() -> None:
    """An empty `torchvision.models.vision_transformer` (its `nn` is torch's) where torchvision
    is not installed: lxt imports it for its vision-transformer patches only."""
    if importlib.util.find_spec("torchvision") is not None:
        return
    from importlib.machinery import ModuleSpec

    root = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    vit = types.ModuleType("torchvision.models.vision_transformer")
    for module in (root, models, vit):
        module.__spec__ = ModuleSpec(module.__name__, None)
    vit.nn = torch.nn  # type: ignore[attr-defined]
    models.vision_transformer = vit  # type: ignore[attr-defined]
    root.models = models  # type: ignore[attr-defined]
    sys.modules.update({m.__name__: m for m in (root, models, vit)})


def load(kind: str, directory: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    lw.write_model(kind, directory)
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), torch_dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def blocks_of(model: Any) -> list[Any]:
    inner = model.transformer if hasattr(model, "transformer") else model.model
    return list(inner.h if hasattr(inner, "h") else inner.layers)


def relevance(model: Any, ids: torch.Tensor, target: int) -> dict[str, Any]:
    """lxt's input × gradient at the embeddings, positions and block boundaries, for the
    target's logit at the last position (the model is patched already)."""
    kept: dict[str, torch.Tensor] = {}
    handles = []
    blocks = blocks_of(model)

    def keep(name: str, tensor: torch.Tensor) -> None:
        tensor.retain_grad()
        kept[name] = tensor

    for i, block in enumerate(blocks):
        handles.append(
            block.register_forward_pre_hook(
                lambda _m, args, kwargs, i=i: keep(
                    f"layer{i}", args[0] if args else kwargs["hidden_states"]
                ),
                with_kwargs=True,
            )
        )
    handles.append(
        blocks[-1].register_forward_hook(
            lambda _m, _a, out: keep(
                f"layer{len(blocks)}", out[0] if isinstance(out, tuple) else out
            )
        )
    )
    if hasattr(model, "transformer"):  # GPT-2's learned positions
        handles.append(
            model.transformer.wpe.register_forward_hook(lambda _m, _a, out: keep("pos", out))
        )
    try:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, use_cache=False).logits
        logit = logits[0, -1, target]
        logit.backward()
    finally:
        for handle in handles:
            handle.remove()

    def summed(t: torch.Tensor) -> np.ndarray:
        assert t.grad is not None
        return (t * t.grad).sum(-1)[0].detach().numpy().astype(np.float32)

    out = {
        "value": float(logit.detach()),
        "tokens": summed(embeds),
        "layers": np.stack([summed(kept[f"layer{i}"]) for i in range(len(blocks) + 1)]),
        "logits": logits[0].detach().numpy(),
    }
    if "pos" in kept:
        out["positional"] = summed(kept["pos"])
    return out


def main(outdir: Path) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    import transformers  # before the stand-in: transformers must find no torchvision

    _stand_in_for_torchvision()
    from lxt.efficient import monkey_patch
    from transformers.models.gpt2 import modeling_gpt2
    from transformers.models.llama import modeling_llama

    outdir.mkdir(parents=True, exist_ok=True)
    ids = torch.tensor([lw.prompt()], dtype=torch.long)
    with tempfile.TemporaryDirectory(prefix="lxt-models-") as tmp:
        models = {kind: load(kind, Path(tmp) / kind) for kind in KINDS}
        with torch.no_grad():  # before lxt patches the classes
            plain = {kind: m(ids, use_cache=False).logits[0].numpy() for kind, m in models.items()}
        monkey_patch(modeling_gpt2)
        monkey_patch(modeling_llama)
        summary: dict[str, dict[str, Any]] = {}
        for kind, model in models.items():
            targets = [int(plain[kind][-1].argmax()), TARGET_2]
            runs = [relevance(model, ids, t) for t in targets]
            gap = max(float(np.abs(r["logits"] - plain[kind]).max()) for r in runs)
            # lxt's norms compute their statistics by hand: the same values to float rounding
            assert gap < 1e-4, f"{kind}: lxt's patched forward changes the logits by {gap}"
            arrays = {
                "input_ids": ids[0].numpy().astype(np.int64),
                "targets": np.array(targets, dtype=np.int64),
                "logits": plain[kind].astype(np.float32),
                "value": np.array([r["value"] for r in runs], dtype=np.float32),
                "tokens": np.stack([r["tokens"] for r in runs]),
                "layers": np.stack([r["layers"] for r in runs]),
            }
            if "positional" in runs[0]:
                arrays["positional"] = np.stack([r["positional"] for r in runs])
            np.savez_compressed(outdir / f"{kind}.npz", **arrays)  # type: ignore[arg-type]
            summary[kind] = {
                "targets": targets,
                "value": [round(r["value"], 5) for r in runs],
                "tokens_sum": [round(float(r["tokens"].sum()), 5) for r in runs],
                "max_abs_token": [round(float(np.abs(r["tokens"]).max()), 5) for r in runs],
                "patched_vs_plain_logit_gap": gap,
            }
    versions = {
        "lxt": dist_version("lxt"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": dist_version("safetensors"),
        "python": sys.version.split()[0],
    }
    assert versions["lxt"] == "2.1", versions
    write_readme(outdir, summary, versions)
    print(json.dumps({"versions": versions, "models": summary}))


def write_readme(outdir: Path, summary: dict[str, dict], versions: dict[str, str]) -> None:
    listing = file_table(outdir)
    rows = "\n".join(
        f"| {kind} | {s['targets']} | {s['value']} | {s['tokens_sum']} | {s['max_abs_token']} |"
        for kind, s in summary.items()
    )
    text = f"""# lxt 2.1 AttnLRP fixture

Written by `tools/lxt_fixture.py` (its docstring gives the environment and the command). Every
file here comes from fixed seeds, on the CPU, in float32. lxt's own code computed the
relevances: `lxt.efficient.monkey_patch` with its default AttnLRP map for transformers'
`modeling_gpt2` and `modeling_llama`, then input × gradient of the target's logit at the last
position.

## Versions

{chr(10).join(f"- {k} {v}" for k, v in versions.items())}

## Models

`tests/prompt/lxt_weights.py` makes both (config and weights from seeded NumPy generators, the
same bytes on every machine; not kept here, the tests write them again): `gpt2`, a
`GPT2LMHeadModel` with biases, random LayerNorm weights and biases and learned positions;
`llama`, a `LlamaForCausalLM` with 4 query heads sharing 2 key/value heads, a SiLU-gated MLP,
rotary positions, random RMSNorm weights and no biases. Loaded with
`attn_implementation="eager"`.

## Prompt and targets

Token ids {lw.prompt()} (seed {lw.PROMPT_SEED}); no tokenizer. Targets: the model's top next
token at the last position, and token {TARGET_2}.

| model | targets | logit | sum of token relevances | largest abs token relevance |
|---|---|---|---|---|
{rows}

## Arrays (`*.npz`)

- `input_ids` [pos], `targets` [2], `logits` [pos, vocab] (unpatched model), `value` [2];
- `tokens` [2, pos]: relevance of `inputs_embeds` (input × gradient, summed over the hidden
  dimension);
- `positional` [2, pos] (`gpt2` only): relevance of `transformer.wpe`'s output;
- `layers` [2, n_layers + 1, pos]: relevance of each block's input and of the last block's
  output (before the final norm).

## Files

{listing}
"""
    (outdir / "README.md").write_text(text)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/lxt_fixture.py OUTDIR")
    main(Path(sys.argv[1]))
