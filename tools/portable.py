"""Rerun the `numerics` tests (outcomes that depend on a training run or on float reduction
order) as other machines would compute them, and measure how far their quantities move.

    python -m tools.portable            # make test-portable: other kernels, one thread
    python -m tools.portable --spread   # make spread: seeds x kernels, the range of each quantity

`ATEN_CPU_CAPABILITY` picks PyTorch's CPU kernels (`default`: no SIMD beyond the baseline,
`avx2`, `avx512`; on an AVX-512 machine `avx2` computes what an AVX2 machine computes), so the
zoo models and SAEs train to other, equally valid weights. Each configuration runs in its own
process with one thread (`OMP_NUM_THREADS=1`); two run at once on a two-core machine.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

PORTABLE = (("default", 0), ("avx2", 0))  # (kernel, seed): what test-portable runs


@dataclass(frozen=True)
class Config:
    kernel: str  # a value of ATEN_CPU_CAPABILITY, or "native" (left unset)
    seed: int

    @property
    def name(self) -> str:
        return f"kernel={self.kernel} seed={self.seed} threads=1"


def run_config(config: Config, log_dir: Path, measure_file: Path | None, extra: list[str]) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env |= {"WORKBENCH_TEST_SEED": str(config.seed), "HF_HUB_OFFLINE": "1"}
    env |= {"WANDB_MODE": "disabled"}
    env.pop("ATEN_CPU_CAPABILITY", None)
    if config.kernel != "native":
        env["ATEN_CPU_CAPABILITY"] = config.kernel
    if measure_file is not None:
        env["WORKBENCH_MEASURE_FILE"] = str(measure_file)
    log = log_dir / f"{config.kernel}-{config.seed}.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "numerics and not browser and not ray"]
    cmd += ["-p", "no:cacheprovider"]
    started = time.monotonic()
    with log.open("w") as out:
        code = subprocess.call([*cmd, *extra], env=env, stdout=out, stderr=subprocess.STDOUT)
    lines = log.read_text().strip().splitlines()
    summary = lines[-1] if lines else "(no output)"
    print(f"[{config.name}] {summary}  ({time.monotonic() - started:.0f} s)", flush=True)
    if code not in (0, 5):
        print("\n".join(lines[-60:]), flush=True)
    return 0 if code == 5 else code


def run_all(configs: list[Config], measure_file: Path | None, extra: list[str]) -> int:
    log_dir = Path(tempfile.mkdtemp(prefix="workbench-portable-"))
    jobs = min(len(configs), max(1, os.cpu_count() or 1))
    with ThreadPoolExecutor(jobs) as pool:
        codes = list(pool.map(lambda c: run_config(c, log_dir, measure_file, extra), configs))
    failed = [c.name for c, code in zip(configs, codes, strict=True) if code]
    print(f"portability: {len(configs) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def summarise(measure_file: Path) -> str:
    """Min and max of each measured quantity over every configuration."""
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for line in measure_file.read_text().splitlines():
        row = json.loads(line)
        test = row["test"].split("::", 1)[-1]
        values[(test, row["name"])].append(row["value"])
    width = max((len(f"{t} {n}") for t, n in values), default=0)
    rows = [
        f"{f'{t} {n}':<{width}}  min {min(v):9.4f}  max {max(v):9.4f}  n {len(v)}"
        for (t, n), v in sorted(values.items())
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spread", action="store_true", help="seeds x kernels, with ranges")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kernels", nargs="+", default=["native", "avx2", "default"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/spread.jsonl"))
    args, extra = parser.parse_known_args(argv)
    if not args.spread:
        return run_all([Config(k, s) for k, s in PORTABLE], None, extra)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.unlink(missing_ok=True)
    configs = [Config(k, s) for s in args.seeds for k in args.kernels]
    code = run_all(configs, args.out, extra)
    print(summarise(args.out))
    return code


if __name__ == "__main__":
    sys.exit(main())
