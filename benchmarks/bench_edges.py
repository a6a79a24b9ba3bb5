"""Edge attribution cost and storage throughput, each a ratio against a baseline measured in the
same run on the same model and prompts.

* EAP over all edges vs one forward + one backward pass of the model (target <= 4x): EAP needs
  two forward passes (clean, corrupt) and one backward pass.
* EAP vs exact edge patching (one partial forward pass per edge).
* EAP-IG vs EAP, against the predicted (2 + 3 steps) / 4: IG does the clean and corrupt forward
  passes plus `steps` forward+backward passes (a backward costs about two forwards).
* The faithfulness curve an edge run stores (every point ablates every edge outside its top-n,
  several points per batched forward pass) vs one plain forward pass per point.
* Edge rows written per second into DuckDB by the store's bulk Arrow insert vs row-wise
  `executemany` (target >= 1M rows/s).

    python benchmarks/bench_edges.py
"""

import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

from benchmarks.bench_head_patching import best_time, random_gpt2, zoo_model  # noqa: E402
from workbench.core import Node  # noqa: E402


def induction_batches(loaded, n_prompts: int) -> list:  # type: ignore[no-untyped-def]
    """`n_prompts` induction prompts of `loaded` in one batch (a list of one `PromptBatch`)."""
    from workbench.attribution.batches import make_batches
    from workbench.tasks import load_task

    return make_batches(load_task("induction", loaded, n_prompts=n_prompts), max_batch=n_prompts)


def forward_backward(model, batch) -> Callable[[], None]:  # type: ignore[no-untyped-def]
    """One forward and backward pass of the model on the batch's clean prompts (the baseline)."""
    from workbench.attribution.batches import logit_diff

    def run() -> None:
        model.zero_grad(set_to_none=True)
        logit_diff(model(batch.clean), batch.answer, batch.wrong).sum().backward()
        model.zero_grad(set_to_none=True)

    return run


def edge_costs(name: str, loaded, n_prompts: int, with_exact: bool) -> list[list[str]]:  # type: ignore[no-untyped-def]
    from workbench import circuits
    from workbench.attribution import edges

    model = loaded.model
    batches = induction_batches(loaded, n_prompts)
    batch = batches[0]
    graph = edges.model_graph(model)
    t_fb = best_time(forward_backward(model, batch))
    t_eap = best_time(lambda: edges.edge_attribution(model, batches))
    steps = 5
    t_ig = best_time(lambda: edges.edge_attribution(model, batches, ig_steps=steps))
    rows = [
        [name, f"{graph.n_edges}", "EAP / (1 forward + 1 backward)", f"{t_eap / t_fb:.2f}", "<= 4"],
        [name, f"{graph.n_edges}", f"EAP-IG ({steps} steps) / EAP", f"{t_ig / t_eap:.2f}",
         f"{(2 + 3 * steps) / 4:.2f} predicted"],
    ]  # fmt: skip
    edge_list = edges.edge_attribution(model, batches).edges()
    points = len(circuits.size_grid(len(edge_list)))
    with torch.no_grad():
        t_forward = best_time(lambda: model(batch.clean))
    t_curve = best_time(
        lambda: circuits.faithfulness_curve(model, batches, graph, edge_list), repeats=1
    )
    rows += [
        [name, f"{graph.n_edges}", f"curve ({points} points) / {points} forward passes",
         f"{t_curve / (points * t_forward):.2f}", "a small multiple"],
        [name, f"{graph.n_edges}", "faithfulness curve / EAP", f"{t_curve / t_eap:.2f}", ""],
    ]  # fmt: skip
    if with_exact:
        t_exact = best_time(lambda: edges.exact_edge_patching(model, batches), repeats=1)
        rows.append(
            [name, f"{graph.n_edges}", "exact edge patching / EAP", f"{t_exact / t_eap:.1f}", ""]
        )
    return rows


def insert_rates(n_rows: int = 2_000_000, n_rowwise: int = 20_000) -> list[list[str]]:
    from workbench.rows import RunRow
    from workbench.store import Store

    srcs = [Node.head_of(i % 12, i % 7).id for i in range(1000)]
    dsts = [Node.head_of(i % 12, i % 7, "k").id for i in range(1000)]
    table = pa.table(
        {
            "src": pa.array([srcs[i % 1000] for i in range(n_rows)], pa.string()),
            "dst": pa.array([dsts[(i * 7) % 1000] for i in range(n_rows)], pa.string()),
            "score": pa.array(torch.randn(n_rows).tolist(), pa.float64()),
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        with Store(Path(tmp) / "bulk.duckdb") as store:
            record = RunRow(
                "k",
                "edges",
                "eap",
                "m@0",
                "t",
                {},
                started_at=__import__("datetime").datetime.now(),
            )
            started = time.perf_counter()
            store.write_run(record, registry={}, rows={"edges": table})
            bulk = n_rows / (time.perf_counter() - started)
        con = duckdb.connect(str(Path(tmp) / "rows.duckdb"))
        con.execute("CREATE TABLE edges (run_id VARCHAR, src VARCHAR, dst VARCHAR, score DOUBLE)")
        values = [
            ("r", s, d, v)
            for s, d, v in zip(
                *(table.column(c).to_pylist()[:n_rowwise] for c in ("src", "dst", "score")),
                strict=True,
            )
        ]
        started = time.perf_counter()
        con.executemany("INSERT INTO edges VALUES (?, ?, ?, ?)", values)
        rowwise = n_rowwise / (time.perf_counter() - started)
        con.close()
    return [
        ["DuckDB store", f"{n_rows:,} rows", "bulk Arrow insert rows/s", f"{bulk:,.0f}",
         ">= 1,000,000"],
        ["DuckDB store", f"{n_rowwise:,} rows", "executemany rows/s", f"{rowwise:,.0f}",
         f"bulk is {bulk / rowwise:,.0f}x"],
    ]  # fmt: skip


def main() -> None:
    rows = edge_costs("zoo induction (2L, d=64)", zoo_model(None), 32, with_exact=True)
    rows += edge_costs("random GPT-2 4L (d=256)", random_gpt2(4, 256, 8, 5000), 32, with_exact=True)
    rows += edge_costs(
        "random GPT-2-small shape", random_gpt2(12, 768, 12, 50257), 16, with_exact=False
    )
    rows += insert_rates()
    print("| model | edges | measurement | ratio or rate | target |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
