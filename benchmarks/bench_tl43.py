"""EAP on TransformerLens 4.3 beside the workbench's: the same model, the same prompts, each in a
fresh process, with its time, its peak memory and the agreement of the scores.

TransformerLens 4.3 brings an edge-level attribution patching of its own
(`transformer_lens.tools.analysis.attribution_patching.attribution_patch` with
`EdgeAttributionConfig(granularity="edge")`, on a `TransformerBridge`). It needs
transformers >= 5.9, and sae-lens keeps this project's environment on TransformerLens 3.9, so
it runs in an environment of its own, outside `make bench`. Without DIR/bin/python the script
builds one there (`python3.11 -m venv DIR`, then pip installs this environment's torch version
and `transformer-lens==4.3.0`; a few minutes, from the package index):

    python -m benchmarks.bench_tl43 [--venv DIR] [--n-prompts N]

Model: the random GPT-2-small-shaped model of `bench_stored_run` (12 layers, d_model 768,
vocabulary 50,257), saved as a Hugging Face directory; N induction prompts (32 by default),
the workbench's own, written to a file both processes read. The metric is the logit difference
of each prompt's answer and wrong token at the last position.

* The workbench: `edge_attribution` as `workbench run edges --method eap` calls it (with each
  score's standard error and the corrupt runs kept for the curve), after loading the model
  the way the runner does; its raw scores (the normalised scores times the clean-corrupt gap).
* TransformerLens 4.3: `TransformerBridge.boot_transformers` on the directory, then
  `attribution_patch` at edge granularity, one call per prompt (each prompt has its own
  answer token; the function itself runs one prompt at a time). Its edges are per position;
  their sum over positions is the workbench's edge. Scores are averaged over prompts.

Printed: each side's seconds and peak resident memory for the attribution alone
(`workbench.profiling`'s stage, sampled while it runs), the peak of the model's load before
it, their ratios, and the largest difference of the 32,491 edges' scores over the largest
|score|.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.bench_methods import gpt2_small

ROOT = Path(__file__).resolve().parent.parent
TL43 = "transformer-lens==4.3.0"
DEFAULT_VENV = Path(tempfile.gettempdir()) / "workbench-tl43-venv"

# Both sides time and sample the attribution with `workbench.profiling` (standard library
# only: the other environment imports it from this repository, on its PYTHONPATH). Before the
# attribution, the process's largest resident memory is the load's peak.
MEASURED = """
from workbench import profiling

def measured(work):
    load_peak = profiling.peak_rss()
    with profiling.recording() as stages, profiling.stage("attribution"):
        result = work()
    (stage,) = stages
    return result, {"seconds": stage.seconds, "peak": stage.rss_peak, "load_peak": load_peak}
"""

# The workbench's side: writes the prompts' tokens for the other side, and its own figures.
WORKBENCH = (
    MEASURED
    + """
import json, sys, torch
from workbench.attribution.batches import make_batches
from workbench.attribution.edges import edge_attribution
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.tasks import load_task
model_dir, n, per_batch, tokens_out, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    sys.argv[4], sys.argv[5]
loaded = load_checkpoint(resolve_checkpoints(model_dir)[0])
batches = make_batches(load_task("induction", loaded, n_prompts=n), max_batch=per_batch)
torch.save({"clean": torch.cat([b.clean for b in batches]),
            "corrupt": torch.cat([b.corrupt for b in batches]),
            "answer": torch.cat([b.answer for b in batches]),
            "wrong": torch.cat([b.wrong for b in batches])}, tokens_out)
result, figures = measured(lambda: edge_attribution(loaded.model, batches))
gap = result.metric_clean - result.metric_corrupt
scores = {f"{s}|{d}": v * gap for s, d, v in result.edges()}
with open(out, "w") as f:
    json.dump(figures | {"scores": scores}, f)
"""
)

# TransformerLens 4.3's side, run by the other environment's Python.
TRANSFORMER_LENS_43 = (
    MEASURED
    + """
import json, sys, torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.tools.analysis.attribution_patching import (
    EdgeAttributionConfig, attribution_patch,
)
model_dir, tokens_in, out = sys.argv[1], sys.argv[2], sys.argv[3]
# the model has no tokenizer of its own (its inputs are token ids); the bridge wants one
vocab = {"<unk>": 0}
tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
    unk_token="<unk>", bos_token="<unk>", eos_token="<unk>", pad_token="<unk>",
    name_or_path=model_dir,
)
bridge = TransformerBridge.boot_transformers(model_dir, device="cpu", tokenizer=tokenizer)
bridge.eval()
data = torch.load(tokens_in)
clean, corrupt, answer, wrong = data["clean"], data["corrupt"], data["answer"], data["wrong"]
n = int(clean.shape[0])
config = EdgeAttributionConfig(granularity="edge")

def name(node):
    if node.kind == "embed":
        return "input"
    if node.kind == "logits":
        return "logits"
    if node.kind in ("mlp_out", "mlp_in"):
        return f"m{node.layer}"
    head = f"a{node.layer}.h{node.head}"
    return head if node.kind == "attn_head_out" else f"{head}<{node.kind[0]}>"

def every_prompt():
    totals = {}
    for i in range(n):
        def metric(logits, i=i):
            return logits[0, -1, answer[i]] - logits[0, -1, wrong[i]]
        found = attribution_patch(bridge, clean[i : i + 1], corrupt[i : i + 1], metric, config)
        for (writer, reader), score in found.edge_scores.items():
            key = f"{name(writer)}|{name(reader)}"
            totals[key] = totals.get(key, 0.0) + score
    return totals

totals, figures = measured(every_prompt)
with open(out, "w") as f:
    json.dump(figures | {"scores": {k: v / n for k, v in totals.items()}}, f)
"""
)


def ensure_venv(venv: Path) -> Path:
    """DIR/bin/python, after building the environment there if it is not yet."""
    python = venv / "bin" / "python"
    if python.exists():
        return python
    import torch

    torch_version = torch.__version__.split("+")[0]
    print(f"building {venv} ({TL43}, torch=={torch_version}) ...", file=sys.stderr)
    subprocess.run(["python3.11", "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={torch_version}"], check=True)
    subprocess.run([*pip, TL43], check=True)
    return python


def child(python: str, script: str, *args: str) -> dict[str, Any]:
    """Run `script` in a fresh `python`; what it wrote to its last argument."""
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    subprocess.run(
        [python, "-c", script, *args],
        env={**os.environ, **env},
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return json.loads(Path(args[-1]).read_text())


def agreement(ours: dict[str, float], theirs: dict[str, float]) -> tuple[int, float, list[str]]:
    """(edges in both, the largest |difference| over the largest |score|, edges in one only)."""
    only = sorted(set(ours) ^ set(theirs))
    both = set(ours) & set(theirs)
    largest = max(abs(v) for v in theirs.values())
    worst = max(abs(ours[k] - theirs[k]) for k in both)
    return len(both), worst / largest, only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--n-prompts", type=int, default=32)
    args = parser.parse_args()
    python = ensure_venv(args.venv)
    n = args.n_prompts
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model = gpt2_small(tmp / "gpt2-small")
        tokens = tmp / "tokens.pt"
        sides: list[tuple[str, dict[str, Any]]] = []
        for label, per_batch in ((f"one batch of {n} prompts", n), ("one prompt at a time", 1)):
            found = child(
                sys.executable, WORKBENCH, str(model), str(n), str(per_batch), str(tokens),
                str(tmp / "workbench.json"),
            )  # fmt: skip
            sides.append((f"workbench (TransformerLens 3.9), {label}", found))
        theirs = child(
            str(python), TRANSFORMER_LENS_43, str(model), str(tokens), str(tmp / "tl43.json")
        )
    print(f"GPT-2-small shape, {n} induction prompts, EAP over every edge:\n")
    print("| | attribution | its peak RSS | the load's peak RSS |")
    print("|---|---:|---:|---:|")
    for label, found in [*sides, ("TransformerLens 4.3, one prompt at a time", theirs)]:
        print(
            f"| {label} | {found['seconds']:.1f} s | {found['peak'] / 1e9:.2f} GB | "
            f"{found['load_peak'] / 1e9:.2f} GB |"
        )
    for label, ours in sides:
        print(
            f"| TransformerLens 4.3 / {label} | {theirs['seconds'] / ours['seconds']:.1f}x | "
            f"{theirs['peak'] / ours['peak']:.2f}x | "
            f"{theirs['load_peak'] / ours['load_peak']:.2f}x |"
        )
    print()
    for label, ours in sides:
        n_both, worst, only = agreement(ours["scores"], theirs["scores"])
        print(
            f"scores of the {label.split(', ')[1]} run: {n_both} edges in both, largest "
            f"difference {worst:.1e} of the largest |score|; in one only: {len(only)}"
            f"{' ' + ', '.join(only[:5]) if only else ''}"
        )


if __name__ == "__main__":
    main()
