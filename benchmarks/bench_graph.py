"""The cost of an attribution graph (`workbench run graph`'s computation: `attribute`, `prune`
and `graph_scores`) against one plain forward and backward pass of the same model on the same
prompt, measured in the same run: wall time (the forward and backward pass best of three, the
graph once after it) and the peak resident memory of a process that loads the model and does
only that.

Models: the IOI zoo model (2 layers, d_model 64; trained here when `data/zoo/ioi` is missing)
with 256 features per layer, and SmolLM2-135M (30 layers, d_model 576; `make smollm2`, skipped
when absent) with 4,608 features per layer. Transcoders are random with an encoder bias that
makes about as many features fire per token as trained sets do here (L0 ≈ 25 on the zoo, 64 on
SmolLM2): the cost depends on how many features are active, not on what they mean. The graph
runs with `workbench run graph`'s defaults (at most 4,096 feature nodes, batches of 32).

The Graph page at real size (SmolLM2 only): the graph of "The capital of France is" stored once
into `data/bench/graph.duckdb`, opened by a deep link in headless Chromium
(`?view=graph&graph=<id>`, a new session each time) and timed from the request to the pruned
graph drawn (every kept edge in the figure), best of three; the baseline, in the same run, is
the Overview page opened the same way.

    python -m benchmarks.bench_graph
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

SMOLLM2 = Path("data/models/smollm2-135m-instruct")
CASES: dict[str, dict[str, Any]] = {
    "zoo IOI": {"expansion": 4, "l0": 25, "text": None},
    "SmolLM2-135M": {"expansion": 8, "l0": 64, "text": "The capital of France is"},
}


def _model(case: str) -> str:
    if case == "SmolLM2-135M":
        return str(SMOLLM2)
    path = Path("data/zoo/ioi")
    if any(path.glob("step_*")):
        return str(path)
    from workbench.zoo import TrainConfig, train_zoo_model

    out = Path(tempfile.mkdtemp(prefix="bench-zoo-ioi-"))
    train_zoo_model(TrainConfig(task="ioi", out=str(out)))
    return str(out / "ioi")


def random_set(model, expansion: int, l0: int):  # type: ignore[no-untyped-def]
    """Random skip transcoders for every layer, about `l0` features active per token."""
    from statistics import NormalDist

    import torch

    from workbench.transcoders.sets import Transcoder, TranscoderSet

    torch.manual_seed(0)
    d = model.cfg.d_model
    d_tc = expansion * d
    cut = NormalDist().inv_cdf(1 - l0 / d_tc)  # pre-activations are about N(0, 1)
    layers = []
    for _ in range(model.cfg.n_layers):
        w_enc = torch.randn(d, d_tc)
        w_enc /= w_enc.norm(dim=0, keepdim=True)
        layers.append(
            Transcoder(
                W_enc=w_enc,
                b_enc=torch.full((d_tc,), -cut),
                W_dec=torch.randn(d_tc, d) / d_tc**0.5,
                b_dec=torch.zeros(d),
                W_skip=torch.randn(d, d) / d,
            )
        )
    return TranscoderSet(layers)


def measure(case: str, what: str, model_path: str) -> dict:
    """In this process: load the model, then time `what` (graph or forward+backward)."""
    import torch

    from benchmarks.bench_head_patching import best_time
    from workbench.models import load_checkpoint, resolve_checkpoints
    from workbench.tasks import load_task
    from workbench.transcoders.graph import attribute, graph_scores, prune

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    spec = CASES[case]
    loaded = load_checkpoint(resolve_checkpoints(model_path)[-1])
    model = loaded.model
    if spec["text"] is None:
        ids = list(load_task("ioi", loaded).pairs[0].clean_tokens)
    else:
        ids = loaded.encode(str(spec["text"]))
    tokens = torch.tensor(ids)
    zero_first = bool(loaded.prepend_bos and ids[0] == loaded.bos_token_id)
    tset = random_set(model, int(spec["expansion"]), int(spec["l0"]))
    out: dict = {"n_pos": len(ids)}

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(tokens[None])
        logits[0, -1].logsumexp(-1).backward()

    def graph() -> None:
        g = attribute(model, tokens, tset, zero_first_position=zero_first,
                      max_feature_nodes=4096, batch_size=32)  # fmt: skip
        prune(g)
        graph_scores(g)
        out["n_active"] = len(g.active)
        out["n_nodes"] = g.n_nodes

    if what == "graph":  # (once, after a forward and backward pass has warmed up)
        forward_backward()
        started = time.perf_counter()
        graph()
        out["seconds"] = time.perf_counter() - started
    else:
        out["seconds"] = best_time(forward_backward)
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _child(case: str, what: str, model_path: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_graph", "--one", case, what, model_path]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


PAGE_DB = Path("data/bench/graph.duckdb")
HAS_TEXT = "return document.body.innerText.includes(arguments[0]);"


def stored_graph() -> tuple[str, int, int]:
    """(graph id, kept nodes, kept edges) of SmolLM2's benchmark graph, made once."""
    import duckdb

    from workbench.cli import cli
    from workbench.models import load_checkpoint, resolve_checkpoints
    from workbench.transcoders.sets import save_saelens

    set_dir = PAGE_DB.parent / "graph-transcoders"
    if not set_dir.is_dir():
        loaded = load_checkpoint(resolve_checkpoints(str(SMOLLM2))[-1])
        spec = CASES["SmolLM2-135M"]
        save_saelens(random_set(loaded.model, spec["expansion"], spec["l0"]), set_dir)
    argv = ["run", "graph", "--model", str(SMOLLM2), "--transcoders", str(set_dir),
            "--text", str(CASES["SmolLM2-135M"]["text"]), "--db", str(PAGE_DB)]  # fmt: skip
    assert cli(argv) == 0
    con = duckdb.connect(str(PAGE_DB), read_only=True)
    try:
        row = con.execute(
            "SELECT graph_id, n_nodes_kept, n_edges_kept FROM graphs ORDER BY created_at DESC"
        ).fetchone()
    finally:
        con.close()
    assert row is not None
    return str(row[0]), int(row[1]), int(row[2])


def open_time(driver, url: str, ready, timeout: float = 120) -> float:  # type: ignore[no-untyped-def]
    """Seconds from asking for `url` to `ready(driver)` (polled every 20 ms)."""
    driver.delete_all_cookies()
    start = time.perf_counter()
    driver.get(url)
    while time.perf_counter() - start < timeout:
        if ready(driver):
            return time.perf_counter() - start
        time.sleep(0.02)
    raise TimeoutError(f"{url} was not ready within {timeout} s")


def graph_drawn(n_edges: int):  # type: ignore[no-untyped-def]
    """Whether the Graph page has drawn a graph of `n_edges` kept edges: every edge it draws
    (the strongest `MAX_DRAWN`) in the figure, and its caption."""
    from benchmarks.bench_explorer import SEGMENTS  # (the edge segments a figure draws)
    from workbench.app.views.graph import MAX_DRAWN

    drawn = min(n_edges, MAX_DRAWN)

    def ready(d) -> bool:  # type: ignore[no-untyped-def]
        return d.execute_script(SEGMENTS) >= drawn and d.execute_script(HAS_TEXT, "nodes and")

    return ready


def page_times() -> list[str]:
    from tests.app.test_browser import chromium_driver, streamlit_server

    gid, n_nodes, n_edges = stored_graph()
    graph_ready = graph_drawn(n_edges)

    def overview_ready(d) -> bool:  # type: ignore[no-untyped-def]
        return bool(d.execute_script(HAS_TEXT, "Checkpoints"))

    with streamlit_server(PAGE_DB) as server, chromium_driver() as driver:
        open_time(driver, f"{server}/?view=graph&graph={gid}", graph_ready)  # warm
        graph = min(
            open_time(driver, f"{server}/?view=graph&graph={gid}", graph_ready) for _ in range(3)
        )
        overview = min(
            open_time(driver, f"{server}/?view=overview", overview_ready) for _ in range(3)
        )
    return [f"{n_nodes:,}", f"{n_edges:,}", f"{overview:.2f} s", f"{graph:.2f} s",
            f"{graph / overview:.2f}"]  # fmt: skip


def main() -> None:
    rows = []
    for case in CASES:
        if case == "SmolLM2-135M" and not (SMOLLM2 / "model.safetensors").is_file():
            print(f"{case}: not here (make smollm2); skipped")
            continue
        path = _model(case)
        base = _child(case, "forward_backward", path)
        graph = _child(case, "graph", path)
        rows.append(
            [
                case,
                str(base["n_pos"]),
                f"{graph['n_active']:,}",
                f"{graph['n_nodes']:,}",
                f"{base['seconds'] * 1000:.1f} ms",
                f"{graph['seconds']:.2f} s",
                f"{graph['seconds'] / base['seconds']:.0f}×",
                f"{base['peak_mb']:.0f} MB",
                f"{graph['peak_mb']:.0f} MB",
            ]
        )
    head = ["model", "tokens", "active features", "graph nodes", "forward + backward", "graph",
            "time ratio", "peak memory, forward + backward", "peak memory, graph"]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if (SMOLLM2 / "model.safetensors").is_file():
        page = page_times()
        print()
        print("| nodes kept | edges kept | Overview page | Graph page | Graph / Overview |")
        print("|---|---|---|---|---|")
        print("| " + " | ".join(page) + " |")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2], sys.argv[3], sys.argv[4])))
    else:
        main()
