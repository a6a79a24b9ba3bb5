"""Wall time and peak memory of every method as users run it (`workbench run ...`, one process
per method, 16 induction prompts), against a baseline measured the same way in the same run:
a process that loads the same model and runs one forward pass over the same prompts.

Models: a random GPT-2-small-shape model (12 layers, 12 heads, d_model 768, vocabulary 50257)
saved as a Hugging Face directory, and SmolLM2-135M when `make smollm2` has imported it.

    python -m benchmarks.bench_methods [--smollm2-only | --gpt2-only]
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from workbench.core import Hook

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = ROOT / "data" / "models" / "smollm2-135m-instruct"
N_PROMPTS = "16"

# (label, pipeline, extra arguments)
METHODS = [
    ("dla", "heads", ["--method", "dla"]),
    ("act_patch_denoise", "heads", ["--method", "act_patch_denoise"]),
    ("attr_patch", "heads", ["--method", "attr_patch"]),
    ("head_importance", "heads", ["--method", "head_importance"]),
    ("eap (+ curve, circuit)", "edges", ["--method", "eap"]),
    ("eap_ig, 5 steps (+ curve, circuit)", "edges", ["--method", "eap_ig"]),
    (
        "head_out patching by position",
        "patching",
        ["--component", "head_out", "--by-position", "--method", "act_patch_denoise"],
    ),  # fmt: skip
    (
        "sae_features (train 200k tokens)",
        "sae",
        [
            "--hook",
            Hook.resid_post(6),
            "--method",
            "sae_features",
            "--training-tokens",
            "200000",
            "--corpus-tokens",
            "20000",
        ],
    ),  # fmt: skip
]

BASELINE = """
import sys, torch
from workbench.attribution.batches import make_batches
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.tasks import load_task
loaded = load_checkpoint(resolve_checkpoints(sys.argv[1])[0])
(batch,) = make_batches(load_task("induction", loaded, n_prompts=int(sys.argv[2])))
with torch.no_grad():
    loaded.model(batch.clean)
"""


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one process, from GNU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "WORKBENCH_LOG": "ERROR"}
        code = subprocess.call(
            ["/usr/bin/time", "-f", "%e %M", "-o", out.name, *cmd],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wall, rss_kb = out.read().split()[-2:]
    if code != 0:
        raise RuntimeError(f"failed ({code}): {' '.join(cmd)}")
    return float(wall), int(rss_kb) / 1e6


def gpt2_small(directory: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
    GPT2LMHeadModel(config).save_pretrained(str(directory))
    return directory


def bench(name: str, model: Path) -> list[str]:
    rows = []
    base_wall, base_rss = timed([sys.executable, "-c", BASELINE, str(model), N_PROMPTS])
    rows.append(f"| {name} | load + 1 forward pass (baseline) | {base_wall:.1f} s | "
                f"{base_rss:.2f} GB | 1.0 | 1.0 |")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for label, pipeline, extra in METHODS:
            cmd = [sys.executable, "-m", "workbench", "run", pipeline, "--model", str(model)]
            cmd += ["--task", "induction", "--n-prompts", N_PROMPTS, "--db", f"{tmp}/w.duckdb"]
            wall, rss = timed([*cmd, *extra])
            rows.append(f"| {name} | {label} | {wall:.1f} s | {rss:.2f} GB | "
                        f"{wall / base_wall:.1f} | {rss / base_rss:.2f} |")  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2-only", action="store_true")
    parser.add_argument("--gpt2-only", action="store_true")
    args = parser.parse_args()
    print("| model | method | wall | peak RSS | wall / baseline | RSS / baseline |")
    print("|---|---|---|---|---|---|")
    rows = []
    if not args.smollm2_only:
        with tempfile.TemporaryDirectory() as tmp:
            rows += bench("random GPT-2-small shape", gpt2_small(Path(tmp) / "gpt2-small"))
    if not args.gpt2_only and (SMOLLM2 / "model.safetensors").is_file():
        rows += bench("SmolLM2-135M", SMOLLM2)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
