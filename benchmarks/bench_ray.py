"""Jobs per second: the local executor against the Ray executor with 2 workers, on one machine.

The workload is `workbench demo`'s jobs (every registered method) on the checkpoints of a zoo
induction run, each executor into its own fresh database. Baseline: the local executor as
`workbench run` uses it (one process, torch's default threads, the database opened per
operation). Also measured: the local executor on one thread (what each Ray worker gets) and the
Ray executor's start-up (a new local instance) on its own.

    python -m benchmarks.bench_ray [--checkpoints N]
"""

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import ray
    import torch

    from workbench.jobs import RunOptions, demo_jobs
    from workbench.runner import run_jobs
    from workbench.zoo import TrainConfig, train_zoo_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoints", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        steps = 100 * (args.checkpoints - 1)
        train_zoo_model(TrainConfig(task="induction", out=str(root), steps=steps, save_every=100))
        jobs = demo_jobs(RunOptions(str(root / "induction"), "induction"))
        rows: list[tuple[str, float, int]] = []

        def timed(name: str, **kwargs: object) -> None:
            (root / name).mkdir()
            start = time.perf_counter()
            outcomes = run_jobs(jobs, db=str(root / name / "w.duckdb"), **kwargs)  # type: ignore[arg-type]
            assert all(o.status == "done" for o in outcomes)
            rows.append((name, time.perf_counter() - start, len(outcomes)))

        timed("local")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        timed("local, 1 thread")
        torch.set_num_threads(threads)
        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        ray_start = time.perf_counter() - start
        timed("ray, 2 workers", executor="ray")
        ray.shutdown()

    base = rows[0][1]
    print(f"{len(jobs)} jobs ({rows[0][2]} runs) on {args.checkpoints} zoo checkpoints")
    print(f"{'executor':<18} {'seconds':>8} {'jobs/s':>7} {'vs local':>9}")
    for name, seconds, _ in rows:
        print(f"{name:<18} {seconds:8.1f} {len(jobs) / seconds:7.2f} {base / seconds:8.2f}x")
    print(f"(ray start-up, a new local instance, not in the above: {ray_start:.1f} s)")


if __name__ == "__main__":
    main()
