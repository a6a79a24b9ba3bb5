"""Writes a tuned-lens fixture computed by tuned-lens 0.2.0 itself, for testing
`workbench.prompt.tunedlens` (applying a lens, and training one step by step) against an
independent implementation.

tuned-lens 0.2.0 imports `torchdata.dataloader2`, which torchdata removed after 0.7, so this
script runs in an environment of its own, not in the project's `.venv`:

    python3.11 -m venv /tmp/tlvenv
    /tmp/tlvenv/bin/pip install torch==2.13.0 tuned-lens==0.2.0      # torch: the CPU build
    /tmp/tlvenv/bin/pip install --no-deps torchdata==0.7.1           # has `dataloader2`
    HF_HUB_OFFLINE=1 WANDB_MODE=disabled /tmp/tlvenv/bin/python tools/tuned_lens_fixture.py \\
        tests/prompt/data/tuned_lens

(torchdata 0.7.1 pins torch 2.1.1; its pure-Python `dataloader2` and `datapipes`, all that
tuned-lens imports, work with torch 2.13.) Everything is made locally from fixed seeds, on the
CPU in float32 with one thread (nothing is downloaded); a second run writes identical files.
OUTDIR receives:

* `gpt2/`, `gpt2_centred/`, `llama/`: each model's `config.json` (from transformers); the weights
  are not kept: `tests/prompt/tuned_lens_weights.py` makes them from seeded NumPy generators,
  the same bytes on every machine, and the tests write them beside copies of these directories;
* `apply.npz`: for each model, the token ids, the model's logits, tuned-lens's `LogitLens` and a
  `TunedLens` with seeded translators applied to the model's hidden states;
* `train.npz`: for `gpt2_centred` and `llama` and three optimiser settings, the translators
  after every step of tuned-lens's own training loop (`tuned_lens.scripts.train_loop.Train`),
  and its per-step, per-layer KL losses, from a fixed batch of token windows;
* `fixture.json`: every parameter above, for the tests;
* `README.md`: the versions used, the conventions, and the files' sizes and hashes.
"""

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/
from tests.prompt import tuned_lens_weights as weights  # noqa: E402
from tools.fixture_files import dist_version, file_table  # noqa: E402

N_LAYERS, D_MODEL, N_HEADS, N_KV_HEADS, D_MLP, VOCAB, N_CTX = 3, 16, 4, 2, 64, 64, 32
APPLY = {"n": 2, "ctx": 12, "seed": 10, "translator_seed": 11}
TRAIN = {"windows": 12, "ctx": 16, "seed": 20, "steps": 6, "windows_per_step": 2}
TRAINED_MODELS = ["gpt2_centred", "llama"]
# run name -> tuned-lens `Optimizer` fields, and whether its bfloat16 autocast stays on
RUNS: dict[str, dict[str, Any]] = {
    "sgd": {"optimizer": {}, "bf16": False},
    "sgd_bf16": {"optimizer": {}, "bf16": True},
    "adam_warmup": {"optimizer": {"optimizer": "adam", "warmup_steps": 2, "lr_scale": 10.0},
                    "bf16": False},
}  # fmt: skip


def make_config(name: str, out: Path) -> None:
    """`out/config.json` for one of `weights.MODELS`, written by transformers."""
    from transformers import GPT2Config, LlamaConfig

    arch = weights.MODELS[name][0]
    cfg: Any
    if arch == "gpt2":
        cfg = GPT2Config(
            n_layer=N_LAYERS, n_embd=D_MODEL, n_head=N_HEADS, vocab_size=VOCAB,  # MLP: 4 d_model
            n_positions=N_CTX, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
    else:
        cfg = LlamaConfig(
            hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS, vocab_size=VOCAB,
            max_position_embeddings=N_CTX, tie_word_embeddings=False, bos_token_id=0,
            eos_token_id=0,
        )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_json_file(str(out / "config.json"))


def load_model(model_dir: Path):
    """The transformers model with the fixture's weights (float32, eval, no gradients)."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, output_loading_info=True
    )
    missing = [k for k in info["missing_keys"] if k != "lm_head.weight"]  # GPT-2: tied
    assert not missing and not info["unexpected_keys"], info
    model.eval()
    model.requires_grad_(False)
    return model


def centring(d: int) -> torch.Tensor:
    """C = I - 11ᵀ/d."""
    return torch.eye(d) - torch.full((d, d), 1.0 / d)


def apply_arrays(name: str, model) -> dict[str, np.ndarray]:
    """The model's and tuned-lens's logits on the fixture's ids, for one model."""
    from tuned_lens.nn.lenses import LogitLens, TunedLens

    ids = torch.from_numpy(weights.token_batch(APPLY["n"], APPLY["ctx"], VOCAB, seed=APPLY["seed"]))
    out = model(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states[:-1]  # the last one (after the final norm) has no translator
    a, b = weights.translators(N_LAYERS, D_MODEL, seed=APPLY["translator_seed"])
    lens = TunedLens.from_model(model)
    for i, translator in enumerate(lens):
        weight = torch.from_numpy(a[i])
        if weights.MODELS[name][0] == "gpt2":
            # the seeded weights act on TransformerLens's centred residual: the same lens on
            # transformers' hidden states h reads C h
            weight = weight @ centring(D_MODEL)
        translator.weight.data.copy_(weight)
        translator.bias.data.copy_(torch.from_numpy(b[i]))
    logit_lens = LogitLens.from_model(model)
    with torch.no_grad():
        tuned = torch.stack([lens(h, idx=i) for i, h in enumerate(hidden)])
        plain = torch.stack([logit_lens(h, idx=i) for i, h in enumerate(hidden)])
    means = torch.stack([h.mean(-1).abs().max() for h in hidden])
    print(f"{name}: largest |mean| of a hidden state per layer {means.tolist()}")
    return {
        f"{name}__ids": ids.numpy(),
        f"{name}__final_logits": out.logits.float().numpy(),
        f"{name}__tuned_lens": tuned.float().numpy(),
        f"{name}__logit_lens": plain.float().numpy(),
    }


@contextmanager
def autocast_off():
    """tuned-lens's loop wraps each layer's lens and loss in a bfloat16 autocast; this turns it
    into a float32 region (the same calls, with `enabled=False`)."""
    real = torch.autocast

    def disabled(device_type: str, dtype=None, **kwargs):
        return real(device_type, dtype=dtype, enabled=False)

    torch.autocast = disabled  # type: ignore[misc, assignment]
    try:
        yield
    finally:
        torch.autocast = real  # type: ignore[misc]


def train_run(model, windows: torch.Tensor, run: dict[str, Any], out: Path) -> dict:
    """tuned-lens's `Train.execute` on `windows` in order (one window per micro-batch), with the
    translators recorded after every optimiser step and the losses it logs."""
    import tuned_lens.scripts.ingredients as ing
    from tuned_lens.scripts.train_loop import State, Train

    opt_fields = dict(run["optimizer"])
    if "optimizer" in opt_fields:
        opt_fields["optimizer"] = ing.OptimizerOption(opt_fields["optimizer"])
    record: dict[str, list] = {"weight": [], "bias": [], "loss": [], "lr": []}

    class FixedBatches(Train):
        """The loop as tuned-lens runs it; only its model, data and logging are ours."""

        def setup(self):
            lens = self.get_lens(model)
            batches = [{"input_ids": w[None]} for w in windows]
            params = [p for p in lens.parameters() if p.requires_grad]
            opt = self.opt.create_optim(params)
            scheduler = self.opt.create_scheduler(opt, self.num_steps)
            step = opt.step

            def recorded_step(*args, **kwargs):
                record["lr"].append([g["lr"] for g in opt.param_groups][0])
                result = step(*args, **kwargs)
                record["weight"].append(
                    torch.stack([t.weight.detach().float().clone() for t in lens]).numpy()
                )
                record["bias"].append(
                    torch.stack([t.bias.detach().float().clone() for t in lens]).numpy()
                )
                return result

            opt.step = recorded_step  # type: ignore[method-assign]
            state = State(
                dataloader=batches,  # type: ignore[arg-type]
                lens=lens,
                opt=opt,
                scheduler=scheduler,
                wandb_id=None,
                nats_to_bpb=1.0,
            )
            grad_acc = self.calculate_gradient_accumulation_steps(windows.shape[1])
            return state, model, grad_acc

        def _log(self, opt, step, losses, tuned_lens, nats_to_bpb):
            record["loss"].append([float(np.mean(losses[f"translator_{i}"]))
                                   for i in range(N_LAYERS)])  # fmt: skip

    train = FixedBatches(
        model=ing.Model(name="fixture"),
        data=ing.Data(),
        opt=ing.Optimizer(**opt_fields),
        dist=ing.Distributed(per_gpu_batch_size=1),
        output=out,
        num_steps=TRAIN["steps"],
        tokens_per_step=TRAIN["windows_per_step"] * windows.shape[1],
        seed=0,
    )
    if run["bf16"]:
        train.execute()
    else:
        with autocast_off():
            train.execute()
    assert len(record["weight"]) == TRAIN["steps"], len(record["weight"])
    return {k: np.asarray(v, dtype=np.float32) for k, v in record.items()}


def main(outdir: Path) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    outdir.mkdir(parents=True, exist_ok=True)
    for name in weights.MODELS:
        make_config(name, outdir / name)
    params = {
        "apply": APPLY,
        "train": TRAIN,
        "trained_models": TRAINED_MODELS,
        "runs": RUNS,
        "n_layers": N_LAYERS,
        "d_model": D_MODEL,
        "vocab": VOCAB,
    }
    apply: dict[str, np.ndarray] = {}
    train: dict[str, np.ndarray] = {}
    windows = torch.from_numpy(
        weights.token_batch(TRAIN["windows"], TRAIN["ctx"], VOCAB, seed=TRAIN["seed"])
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        shutil.copytree(outdir, root, ignore=shutil.ignore_patterns("*.npz", "README.md"))
        weights.write_all(root)
        for name in weights.MODELS:
            model = load_model(root / name)
            apply |= apply_arrays(name, model)
            if name not in TRAINED_MODELS:
                continue
            for run_name, run in RUNS.items():
                rec = train_run(model, windows, run, Path(tmp) / f"out_{name}_{run_name}")
                for key, value in rec.items():
                    train[f"{name}__{run_name}__{key}"] = value
                print(f"{name} {run_name}: losses per step {rec['loss'].mean(1).round(4)}")
    train["windows"] = windows.numpy()
    np.savez_compressed(outdir / "apply.npz", **apply)  # type: ignore[arg-type]
    np.savez_compressed(outdir / "train.npz", **train)  # type: ignore[arg-type]
    (outdir / "fixture.json").write_text(json.dumps(params, indent=1) + "\n")
    write_readme(outdir, params)


def write_readme(outdir: Path, params: dict) -> None:
    versions = {
        "tuned-lens": dist_version("tuned-lens"),
        "transformers": dist_version("transformers"),
        "torch": torch.__version__,
        "torchdata": dist_version("torchdata"),
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }
    listing = file_table(outdir)
    version_lines = "\n".join(f"- {k} {v}" for k, v in versions.items())
    runs = "\n".join(
        f"| `{name}` | {json.dumps(run['optimizer']) if run['optimizer'] else 'defaults'} "
        f"| {'on (as tuned-lens runs)' if run['bf16'] else 'off (float32)'} |"
        for name, run in RUNS.items()
    )
    text = f"""# tuned-lens 0.2.0 fixture

Written by `tools/tuned_lens_fixture.py` (its docstring gives the environment and the command).
Every file here comes from fixed seeds, on the CPU, in float32 unless said otherwise.
tuned-lens's own code decoded the lenses (`tuned_lens.nn.lenses.TunedLens`, `LogitLens`) and
trained them (`tuned_lens.scripts.train_loop.Train.execute`, with its optimiser and scheduler
from `tuned_lens.scripts.ingredients.Optimizer`).

## Versions

{version_lines}

## Models

Each has {N_LAYERS} layers, hidden size {D_MODEL}, {N_HEADS} heads, MLP size {D_MLP}, vocabulary
{VOCAB}, context {N_CTX}; only `config.json` is kept, and
`tests/prompt/tuned_lens_weights.py` makes the weights (its docstring says how):

- `gpt2/`: `GPT2LMHeadModel`, random LayerNorm weights and biases;
- `gpt2_centred/`: the same, with every write into the residual stream centred, so that the
  transformers hidden states have zero mean per token (TransformerLens's residual stream equals
  them);
- `llama/`: `LlamaForCausalLM`, {N_KV_HEADS} key/value heads, random RMSNorm weights.

## `apply.npz` (per model `<m>`)

- `<m>__ids` int64 [{APPLY["n"]}, {APPLY["ctx"]}]: `token_batch(n, ctx, vocab,
  seed={APPLY["seed"]})`;
- `<m>__final_logits` [{APPLY["n"]}, {APPLY["ctx"]}, {VOCAB}]: the model's logits;
- `<m>__tuned_lens` [{N_LAYERS}, {APPLY["n"]}, {APPLY["ctx"]}, {VOCAB}]:
  `TunedLens.forward(h_l, idx=l)` on `hidden_states[l]` (l < n_layers: the input of block l;
  the last hidden state, after the final norm, has no translator), the translators from
  `translators(n_layers, d_model, seed={APPLY["translator_seed"]})` = (A, b) in
  TransformerLens's frame. For the GPT-2 models tuned-lens's translator weight is A·C
  (C = I − 11ᵀ/d): transformers' hidden state h is C h in TransformerLens's centred residual
  stream, so that both lenses decode the same point;
- `<m>__logit_lens`: tuned-lens's `LogitLens` on the same hidden states.

## `train.npz` (per trained model `<m>` in {TRAINED_MODELS}, per run `<r>`)

`windows` int64 [{TRAIN["windows"]}, {TRAIN["ctx"]}] = `token_batch(windows, ctx, vocab,
seed={TRAIN["seed"]})`, fed in order, one window a micro-batch (`per_gpu_batch_size` 1),
{TRAIN["windows_per_step"]} windows a step (`tokens_per_step` =
{TRAIN["windows_per_step"] * TRAIN["ctx"]}), {TRAIN["steps"]} steps (`num_steps`), KL loss
(tuned-lens's default), the lens initialised by `TunedLens.from_model` (zero translators):

- `<m>__<r>__weight` [steps, layers, d, d], `<m>__<r>__bias` [steps, layers, d]: the
  translators after each optimiser step;
- `<m>__<r>__loss` [steps, layers]: each layer's KL (nats per token, before the step), the
  mean over the step's micro-batches as the loop logs it;
- `<m>__<r>__lr` [steps]: the optimiser's learning rate at each step.

| run | `Optimizer` fields | bfloat16 autocast |
|---|---|---|
{runs}

With the default `Optimizer` this is SGD with Nesterov momentum 0.9, learning rate
`lr_scale · (1 − 0.9)` = 0.1, weight decay 1e-3 on every translator parameter, no warm-up, and a
linear decay to zero over the steps; gradients are clipped to a global norm of 1 before each
step. `adam_warmup` is Adam with AMSGrad (betas 0.9, 0.999) at `lr_scale · 1e-3`, with a linear
warm-up over 2 steps after which the rate decays to reach zero at step `num_steps − 2` (the
schedule is given `num_steps − warmup_steps` as its total length). The losses are the mean over
positions of KL(p ‖ q_l), p the model's final distribution at the same position (the KL loss
compares position t with position t), q_l layer l's lens.

Only `gpt2_centred` and `llama` are trained: on `gpt2`, whose hidden states have a non-zero mean
per token, tuned-lens's translator also reads that mean (its weight times the ones vector is not
zero), which TransformerLens's centred residual stream no longer carries; the two trainings then
differ after the first step by design (see `workbench/prompt/tunedlens.py`).

## Files

{listing}
"""
    (outdir / "README.md").write_text(text)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/tuned_lens_fixture.py OUTDIR")
    main(Path(sys.argv[1]))
