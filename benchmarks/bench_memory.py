"""Each method's memory against `--batch-tokens`: a run's peak resident memory is close to a
fixed part (the process, its libraries and the weights) plus a part proportional to the tokens
of one batch, `peak ~ P0 + c x batch tokens`. The script measures it the way users run it (one
`workbench run` process per method and budget, 32 induction prompts), from two budgets, and
prints P0, c, and the largest budget whose predicted peak fits a 16 GB machine.

The peak counted is that of the method's own stages (the load's is excluded: it does not depend
on the batch, and is shown apart).

Models: a random GPT-2-small-shaped model (12 layers, d_model 768, vocabulary 50,257) and
SmolLM2-135M when `make smollm2` has imported it.

    python -m benchmarks.bench_memory [--gpt2-only]
"""

import argparse
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.bench_methods import SMOLLM2, gpt2_small
from benchmarks.bench_stored_run import PROFILED, child

N_PROMPTS = 32
MACHINE = 16e9

# (label, pipeline, arguments)
METHODS = [
    ("heads attr_patch", "heads", ["--method", "attr_patch"]),
    ("edges eap (+ curve, circuit)", "edges", ["--method", "eap"]),
    ("edges eap_ig, 5 steps (+ curve, circuit)", "edges", ["--method", "eap_ig"]),
]


def peaks(profile: dict[str, Any]) -> tuple[float, float]:
    """(the load's peak, the largest peak of any other top-level stage), in bytes."""
    load = work = 0.0
    for name, depth, _seconds, _before, peak, _after in profile["stages"]:
        if depth != 0:
            continue
        if name == "load checkpoint":
            load = max(load, peak)
        else:
            work = max(work, peak)
    return load, work


def measure(model: Path, name: str, budgets: tuple[int, int], tmp: Path) -> list[str]:
    rows = []
    for label, pipeline, extra in METHODS:
        found = []
        for budget in budgets:
            args = ["run", pipeline, "--model", str(model), "--task", "induction"]
            args += ["--n-prompts", str(N_PROMPTS), "--batch-tokens", str(budget)]
            args += ["--db", str(tmp / f"{pipeline}-{budget}.duckdb"), *extra]
            profile, _ = child(PROFILED, *args)
            found.append(peaks(profile))
        (load, low), (_, high) = found
        c = max(high - low, 0.0) / (budgets[1] - budgets[0])
        p0 = low - c * budgets[0]
        fits = f"{int((MACHINE - p0) / c):,}" if c > 0 else "any"
        rows.append(
            f"| {name} | {label} | {load / 1e9:.2f} GB | {low / 1e9:.2f} GB / {high / 1e9:.2f} GB "
            f"| {p0 / 1e9:.2f} GB | {c / 1e6:.2f} MB | {fits} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpt2-only", action="store_true")
    args = parser.parse_args()
    print(
        "| model | method | load peak | method peak at the two budgets | P0 | c per token "
        "| batch tokens that fit 16 GB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        measure(gpt2_small(root / "gpt2-small"), "GPT-2-small shape", (104, 416), root)
        if not args.gpt2_only and (SMOLLM2 / "model.safetensors").is_file():
            measure(SMOLLM2, "SmolLM2-135M", (104, 416), root)


if __name__ == "__main__":
    main()
