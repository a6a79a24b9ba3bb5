"""The Circuit page at real size: time from opening a deep link in headless Chromium to the
graph drawn, at 500 / 2,000 / 5,000 / 10,000 edges out of an EAP run's full edge set
(SmolLM2-135M when imported, >100,000 edges; else a random GPT-2-small-shape model, ~32,000),
with each of the page's renderers: SVG (the default, edges batched into one path per colour
and width) and WebGL (`Scattergl`), measured in the same run on the same edges.

The time covers what a user waits for: the server's SQL pruning and figure, the transfer, and
plotly drawing in the browser (the page is ready when its caption names the edges and the
figure holds that many edge segments). Best of three opens each, a new session every time.

    python -m benchmarks.bench_explorer [--db data/bench/explorer.duckdb]
"""

import argparse
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

SMOLLM2 = Path("data/models/smollm2-135m-instruct")
SIZES = (500, 2_000, 5_000, 10_000)
SEGMENTS = """
const gd = document.querySelector('.js-plotly-plot');
if (!gd || !gd._fullData) return -1;
let n = 0;
for (const t of gd._fullData) if (t.mode === 'lines') n += Math.round(t.x.length / 3);
return n;
"""
CAPTION = "return document.body.innerText.includes(arguments[0]);"


def edge_run(db: Path) -> tuple[str, str, int]:
    """(model, run id, edges stored) of the benchmark's EAP run, made once."""
    import duckdb

    from workbench.cli import cli

    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        if (SMOLLM2 / "model.safetensors").is_file():
            model = str(SMOLLM2)
        else:
            from benchmarks.bench_head_patching import random_gpt2

            model = str(random_gpt2(12, 768, 12, 50257).checkpoint.path)
        argv = ["run", "edges", "--model", model, "--task", "induction", "--method", "eap"]
        assert cli([*argv, "--n-prompts", "16", "--db", str(db)]) == 0
    con = duckdb.connect(str(db), read_only=True)
    try:
        row = con.execute(
            """SELECT m.model_id, r.run_id, count(*) FROM runs r JOIN edges e USING (run_id)
               JOIN checkpoints c USING (checkpoint_id) JOIN models m USING (model_id)
               WHERE r.method = 'eap' GROUP BY ALL"""
        ).fetchone()
    finally:
        con.close()
    assert row is not None
    return str(row[0]), str(row[1]), int(row[2])


def open_time(driver, url: str, k: int, timeout: float = 120) -> tuple[float, int]:  # type: ignore[no-untyped-def]  # noqa: E501
    """Seconds from asking for `url` to its graph drawn with `k` edges; the segments drawn.
    (Polled with one cheap script every 20 ms: the figure first, the page's text only once a
    figure is there, so that measuring does not slow the page down.)"""
    driver.delete_all_cookies()
    start = time.perf_counter()
    driver.get(url)
    caption = f"{k:,} of "
    while time.perf_counter() - start < timeout:
        drawn = driver.execute_script(SEGMENTS)
        if drawn > 0 and driver.execute_script(CAPTION, caption):
            return time.perf_counter() - start, int(drawn)
        time.sleep(0.02)
    raise TimeoutError(f"{url} did not draw within {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", default="data/bench/explorer.duckdb")
    args = parser.parse_args()
    from tests.app.test_browser import chromium_driver, streamlit_server

    model, run_id, stored = edge_run(Path(args.db))
    print(f"model {model}, EAP run {run_id}: {stored:,} edges stored")
    rows = []
    with streamlit_server(Path(args.db)) as server, chromium_driver() as driver:
        open_time(driver, f"{server}/?view=circuit&run={run_id}&k=10&paths=0", 10)  # warm
        for k in SIZES:
            best: dict[str, float] = {}
            for draw in ("WebGL", "SVG"):
                url = f"{server}/?view=circuit&run={run_id}&k={k}&paths=0&draw={draw}"
                times = [open_time(driver, url, k) for _ in range(3)]
                best[draw] = min(t for t, _ in times)
                segments = times[0][1]
            rows.append((k, segments, best["SVG"], best["WebGL"]))
    print()
    print("| edges (top k) | segments drawn | SVG s (default) | WebGL s | WebGL / SVG |")
    print("|---|---|---|---|---|")
    for k, segments, svg, gl in rows:
        print(f"| {k:,} | {segments:,} | {svg:.2f} | {gl:.2f} | {gl / svg:.2f} |")


if __name__ == "__main__":
    main()
