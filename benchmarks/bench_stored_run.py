"""A stored edge run against the bound of its work: what a user waits for and what their machine
must hold when they run `workbench run edges --method eap` (attribution, faithfulness curve,
circuit, store), each figure a ratio against a baseline measured in the same run, with the
profile of the run (where its time and memory go, stage by stage: `workbench.profiling`).

* wall time less the model's load, over one forward + backward pass of the same batch (the
  process that measures it loads the same model and prompts); goal <= 5x;
* the run's peak RSS, beside the peak of that baseline process (the weights and one batch's
  activations and gradients); goal < 2 GB;
* EAP's attribution alone (the run's `attribution` stage, first and only call) over the forward
  + backward pass; goal <= 1.6x;
* SmolLM2-135M (when `make smollm2` has imported it), 16 prompts: the same run's wall time
  (goal <= 15 s) and peak RSS (goal < 2.5 GB), and `sae_features` training and scanning a TopK
  SAE on 200,000 tokens at `blocks.6.hook_resid_post`, as `bench_methods` does (peak RSS goal
  < 2.5 GB).

Model: a random GPT-2-small-shaped model (12 layers, 12 heads, d_model 768, vocabulary 50,257)
saved as a Hugging Face directory; 32 induction prompts of 13 tokens, one batch.

Each edge run is repeated (`--repeats`, 3 by default; the GPT-2 baseline before each run):
each time figure is the fastest of the repeats, with their range beside it, and the memory rows
take the largest peak.

    python -m benchmarks.bench_stored_run [--gpt2-only] [--repeats N]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.bench_methods import SMOLLM2, gpt2_small
from workbench.core import Hook

# One `workbench` command with its stages recorded: argv[1] is where the JSON goes.
PROFILED = """
import json, sys, time
from workbench import profiling
from workbench.cli import cli, finish
with profiling.recording() as stages:
    code = cli(sys.argv[2:])
out = {"code": code, "peak": profiling.peak_rss(),
       "stages": [[s.name, s.depth, s.seconds, s.rss_before, s.rss_peak, s.rss_after]
                  for s in stages]}
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
finish(code)  # as the `workbench` command ends
"""

# The baseline: load the model, make the same batch, best of three forward + backward passes.
FORWARD_BACKWARD = """
import json, sys, time, torch
from workbench import profiling
from workbench.attribution.batches import logit_diff, make_batches
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.tasks import load_task
loaded = load_checkpoint(resolve_checkpoints(sys.argv[2])[0])
n = int(sys.argv[3])
(batch,) = make_batches(load_task("induction", loaded, n_prompts=n), max_batch=n)
model = loaded.model
times = []
for _ in range(4):
    model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    logit_diff(model(batch.clean), batch.answer, batch.wrong).sum().backward()
    times.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
with open(sys.argv[1], "w") as f:
    json.dump({"seconds": min(times[1:]), "peak": profiling.peak_rss(),
               "tokens": list(batch.clean.shape)}, f)
"""

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "WORKBENCH_LOG": "ERROR"}


def child(script: str, *args: str) -> tuple[dict[str, Any], float]:
    """Run `script` in a fresh Python; (what it wrote, its wall seconds)."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", script, out.name, *args],
            env=ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        wall = time.perf_counter() - started
        return json.loads(Path(out.name).read_text()), wall


def stage_seconds(profile: dict[str, Any], name: str) -> float:
    return sum(s[2] for s in profile["stages"] if s[0] == name)


def profile_table(profile: dict[str, Any]) -> str:
    from workbench.profiling import Stage, table

    return table([Stage(*s) for s in profile["stages"]])


def edge_run(model: Path, n_prompts: int, db: Path) -> tuple[dict[str, Any], float]:
    args = ["run", "edges", "--model", str(model), "--task", "induction", "--method", "eap"]
    args += ["--n-prompts", str(n_prompts), "--db", str(db)]
    return child(PROFILED, *args)


def row(measured: str, value: str, bound: str, goal: str, holds: bool) -> str:
    return f"| {measured} | {value} | {bound} | {goal} | {'yes' if holds else 'no'} |"


@dataclass
class Repeated:
    """`repeats` edge runs of one model (each into a new database) and, when asked for, the
    forward + backward baseline measured before each. On a machine other tenants load, the
    fastest of a few runs is the one they slowed least: each time figure is its fastest, with
    the range beside it; memory does not depend on them, and the largest peak is reported."""

    runs: list[tuple[dict[str, Any], float]]
    bases: list[dict[str, Any]]

    @classmethod
    def measure(
        cls, model: Path, n_prompts: int, tmp: Path, repeats: int, baseline: bool
    ) -> "Repeated":
        runs, bases = [], []
        for i in range(repeats):
            if baseline:
                bases.append(child(FORWARD_BACKWARD, str(model), str(n_prompts))[0])
            runs.append(edge_run(model, n_prompts, tmp / f"{model.name}-{i}.duckdb"))
        return cls(runs, bases)

    def seconds(self, figure: str) -> list[float]:
        """Each run's `figure`: `wall`, `after load` (wall less the load) or a stage's name."""
        out = []
        for profile, wall in self.runs:
            if figure == "wall":
                out.append(wall)
            elif figure == "after load":
                out.append(wall - stage_seconds(profile, "load checkpoint"))
            else:
                out.append(stage_seconds(profile, figure))
        return out

    @property
    def fastest(self) -> dict[str, Any]:
        """The profile of the run with the least time after its load."""
        after = self.seconds("after load")
        return self.runs[after.index(min(after))][0]

    @property
    def peak(self) -> float:
        return max(profile["peak"] for profile, _ in self.runs)


def spread(values: list[float]) -> str:
    """`values` (seconds) as their range, fastest first."""
    low, high = f"{min(values):.2f}", f"{max(values):.2f}"
    return f"{low} s" if low == high else f"{low}-{high} s"


def gpt2_rows(tmp: Path, repeats: int) -> tuple[list[str], list[str]]:
    model = gpt2_small(tmp / "gpt2-small")
    measured = Repeated.measure(model, 32, tmp, repeats, baseline=True)
    base_seconds = [b["seconds"] for b in measured.bases]
    fb, after, attribution = (
        min(base_seconds),
        min(measured.seconds("after load")),
        min(measured.seconds("attribution")),
    )
    base_peak = max(b["peak"] for b in measured.bases)
    peak = measured.peak
    name = f"GPT-2-small shape, 32 prompts x 13 tokens, `eap`, fastest of {repeats}"
    rows = [
        row(f"{name}: wall less load ({spread(measured.seconds('after load'))}) / "
            f"forward+backward ({spread(base_seconds)})", f"{after / fb:.2f}x",
            "about 1.4x + a few forwards", "<= 5x", after / fb <= 5),
        row(f"{name}: peak RSS (baseline process: load + forward+backward "
            f"{base_peak / 1e9:.2f} GB)", f"{peak / 1e9:.2f} GB",
            "weights 0.5 GB + activations about 0.5 GB", "< 2 GB", peak < 2e9),
        row(f"{name}: EAP attribution alone ({spread(measured.seconds('attribution'))}) / "
            "forward+backward", f"{attribution / fb:.2f}x", "about 1.4x", "<= 1.6x",
            attribution / fb <= 1.6),
    ]  # fmt: skip
    return rows, [
        f"GPT-2-small shape, `eap`, 32 prompts (the fastest run):\n"
        f"{profile_table(measured.fastest)}"
    ]


def smollm2_rows(tmp: Path, repeats: int) -> tuple[list[str], list[str]]:
    measured = Repeated.measure(SMOLLM2, 16, tmp, repeats, baseline=False)
    walls, peak = measured.seconds("wall"), measured.peak
    sae_args = ["run", "sae", "--model", str(SMOLLM2), "--task", "induction"]
    sae_args += ["--n-prompts", "16", "--hook", Hook.resid_post(6), "--method", "sae_features"]
    sae_args += ["--training-tokens", "200000", "--corpus-tokens", "20000"]
    sae_args += ["--db", str(tmp / "smollm2-sae.duckdb")]
    sae, sae_wall = child(PROFILED, *sae_args)
    rows = [
        row(f"SmolLM2-135M `eap` with curve and circuit, 16 prompts: wall, fastest of "
            f"{repeats} ({spread(walls)})", f"{min(walls):.1f} s", "", "<= 15 s",
            min(walls) <= 15),
        row("SmolLM2-135M `eap`: peak RSS", f"{peak / 1e9:.2f} GB", "", "< 2.5 GB",
            peak < 2.5e9),
        row(f"SmolLM2-135M `sae_features` (trains a TopK SAE on 200k tokens, {sae_wall:.0f} s): "
            "peak RSS", f"{sae['peak'] / 1e9:.2f} GB", "weights 0.5 GB + a batch + the SAE",
            "< 2.5 GB", sae["peak"] < 2.5e9),
    ]  # fmt: skip
    return rows, [
        f"SmolLM2-135M, `eap`, 16 prompts (the fastest run):\n{profile_table(measured.fastest)}",
        f"SmolLM2-135M, `sae_features`:\n{profile_table(sae)}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpt2-only", action="store_true")
    parser.add_argument(
        "--repeats", type=int, default=3, help="edge runs per model (the fastest is reported)"
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    rows: list[str] = []
    profiles: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        found = gpt2_rows(Path(tmp), args.repeats)
        rows, profiles = rows + found[0], profiles + found[1]
        if not args.gpt2_only and (SMOLLM2 / "model.safetensors").is_file():
            found = smollm2_rows(Path(tmp), args.repeats)
            rows, profiles = rows + found[0], profiles + found[1]
    print("| measured | now | the work's bound | goal | holds |")
    print("|---|---:|---|---:|---|")
    print("\n".join(rows))
    for profile in profiles:
        print(f"\n{profile}")


if __name__ == "__main__":
    main()
