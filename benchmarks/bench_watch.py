"""What `workbench watch` costs: an idle rescan of already-processed checkpoints, and the latency
from a checkpoint appearing to its rows being queryable.

Idle scan at 10 / 100 / 1,000 registered checkpoints (zoo checkpoints, files hard-linked from one
trained checkpoint), against the baseline of recognising them by content: the sha256 of every
checkpoint's files, which is what a run key needs (so a watcher that keyed on content would pay
it on every scan). Latency: a watcher scanning every 0.5 s with `settle_seconds = 0.5`; a new
checkpoint directory is renamed into place and `workbench sql` polls until its runs are stored.

    python -m benchmarks.bench_watch
"""

import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIG = """
db = "{db}"
settle_seconds = 0.5
[[job]]
pipeline = "heads"
task = "induction"
methods = ["dla"]
n_prompts = 8
"""


def trained_checkpoints(root: Path) -> list[Path]:
    from workbench.zoo import TrainConfig, train_zoo_model

    run = root / "zoo"
    if not run.exists():
        train_zoo_model(TrainConfig(task="induction", out=str(run), steps=200, save_every=50))
    return sorted((run / "induction").glob("step_*"), key=lambda p: int(p.name[5:]))


def linked_copies(src: Path, root: Path, n: int) -> Path:
    runs = root / f"runs{n}"
    for i in range(n):
        dst = runs / "r" / f"step_{i}"
        dst.mkdir(parents=True)
        for f in src.iterdir():
            os.link(f, dst / f.name)
    return runs


def idle_scan(src: Path, root: Path, n: int) -> tuple[float, float]:
    """(seconds per idle rescan of n processed checkpoints, seconds to content-hash them)."""
    from workbench.hashing import sha256_files
    from workbench.store import Store
    from workbench.watch import Watcher, discover, fingerprint, read_config

    runs = linked_copies(src, root, n)
    db = root / f"w{n}.duckdb"
    config = root / f"watch{n}.toml"
    config.write_text(CONFIG.format(db=db))
    with Store(db) as store:  # the state after processing them: each one registered, done
        now = datetime.now(UTC).replace(tzinfo=None)
        for cand in discover(runs):
            store.con.execute(
                "INSERT INTO watched_checkpoints VALUES (?, ?, NULL, 'done', NULL, ?)",
                [str(cand.path.resolve()), fingerprint(cand.path)[0], now],
            )
    watcher = Watcher(runs, read_config(config))
    watcher.scan()  # warm the file system cache, as a long-running watcher has it
    started = time.perf_counter()
    report = watcher.scan()
    scan = time.perf_counter() - started
    assert report.seen == n and report.processed == 0
    started = time.perf_counter()
    for cand in discover(runs):
        sha256_files(sorted(p for p in cand.path.iterdir() if p.is_file()))
    hashing = time.perf_counter() - started
    return scan, hashing


def latency(sources: list[Path], root: Path) -> list[float]:
    """One new (distinct) checkpoint at a time: seconds until its run is stored."""
    import shutil

    runs = root / "live"
    (runs / "r").mkdir(parents=True)
    db = root / "live.duckdb"
    config = root / "live.toml"
    config.write_text(CONFIG.format(db=db))
    env = {**os.environ, "WORKBENCH_LOG": os.environ.get("WORKBENCH_LOG", "WARNING")}
    cmd = [sys.executable, "-m", "workbench", "watch", str(runs), "--config", str(config)]
    watcher = subprocess.Popen([*cmd, "--every", "0.5"], env=env)
    times = []
    try:
        for i, src in enumerate(sources):
            staging = runs / f".step_{i}.tmp"
            shutil.copytree(src, staging)
            appeared = time.perf_counter()
            staging.rename(runs / "r" / f"step_{i}")
            while True:
                out = subprocess.run(
                    [sys.executable, "-m", "workbench", "sql",
                     "SELECT count(*) AS n FROM runs WHERE status = 'done'", "--db", str(db),
                     "--format", "csv"],
                    env=env, capture_output=True, text=True,
                )  # fmt: skip
                if out.returncode == 0 and int(out.stdout.splitlines()[1]) > i:
                    break
                time.sleep(0.05)
            times.append(time.perf_counter() - appeared)
    finally:
        watcher.terminate()
        watcher.wait()
    return times


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoints = trained_checkpoints(root)
        src = checkpoints[-1]
        print("| registered checkpoints | idle rescan | content hashing (baseline) | ratio |")
        print("|---:|---:|---:|---:|")
        for n in (10, 100, 1000):
            scan, hashing = idle_scan(src, root, n)
            print(f"| {n:,} | {scan * 1000:.0f} ms | {hashing * 1000:.0f} ms | "
                  f"{hashing / scan:.1f}x |")  # fmt: skip
        times = latency(checkpoints[1:4], root)
        print()
        print(
            "latency from a checkpoint appearing to its run being queryable (settle 0.5 s, "
            f"scan every 0.5 s, one dla run; the first includes the watcher importing torch): "
            f"{', '.join(f'{t:.1f} s' for t in times)}"
        )


if __name__ == "__main__":
    main()
