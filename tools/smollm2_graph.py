"""Transcoders for every layer of SmolLM2-135M trained on its text corpus, and the attribution
graph of a factual prompt through them, as a user runs them (`workbench run transcoders`, then
`workbench run graph`), each timed with its peak memory; then the figures the docs quote.

    python -m tools.smollm2_graph [--db FILE] [--picture PNG] [workbench run options]

`make smollm2-graph` runs it after `make smollm2`; with `--picture` it also opens the graph on
the app's Graph page in headless Chromium and saves what the page shows.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

MODEL = "data/models/smollm2-135m-instruct"
CORPUS = "data/corpus/text.txt"
PROMPT = "The capital of France is"
TRAINING = {
    "--expansion": "4",
    "--l1-coefficient": "0.2",
    "--lr": "0.002",
    "--training-tokens": "400000",
    "--corpus-tokens": "140000",
}


def timed(argv: list[str]) -> tuple[float, float]:
    """Run a command; its wall time in seconds and its own peak resident memory in GB."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(argv[:3])} ... exited with status {code}")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KB on Linux
    return seconds, usage.ru_maxrss * scale / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="data/workbench.duckdb")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--picture", type=Path, help="save the Graph page's picture here")
    args, extra = parser.parse_known_args()
    workbench = str(Path(sys.executable).with_name("workbench"))
    train = [workbench, "run", "transcoders", "--model", MODEL, "--task", "induction"]
    train += ["--corpus", CORPUS, "--db", args.db]
    options = dict(TRAINING)
    for flag, value in zip(extra[::2], extra[1::2], strict=False):
        options[flag] = value
    train += [part for pair in options.items() for part in pair]
    t_train, m_train = timed(train)

    import duckdb

    with duckdb.connect(args.db, read_only=True) as con:
        (set_id,) = con.execute(
            "SELECT s.set_id FROM transcoder_sets s JOIN runs r USING (run_id) "
            "ORDER BY r.finished_at DESC NULLS LAST LIMIT 1"
        ).fetchone()  # type: ignore[misc]
    graph = [workbench, "run", "graph", "--model", MODEL, "--transcoders", set_id]
    graph += ["--text", args.prompt, "--db", args.db]
    t_graph, m_graph = timed(graph)

    with duckdb.connect(args.db, read_only=True) as con:
        layers = con.execute(
            "SELECT sae_id, l0, explained_variance FROM saes WHERE set_id = ? ORDER BY "
            "CAST(split_part(sae_id, '-L', 2) AS INT)",
            [set_id],
        ).fetchall()
        row = con.execute(
            "SELECT ce_loss_recovered, n_tokens FROM transcoder_sets WHERE set_id = ?", [set_id]
        ).fetchone()
        g = con.execute(
            "SELECT graph_id, replacement_score, completeness_score, n_features, n_nodes_kept, "
            "n_edges_kept, seconds FROM graphs WHERE set_id = ? AND text = ? "
            "ORDER BY created_at DESC LIMIT 1",
            [set_id, args.prompt],
        ).fetchone()
        top = con.execute(
            "SELECT token, round(probability, 3) FROM graph_nodes WHERE graph_id = ? "
            "AND kind = 'logit' ORDER BY probability DESC LIMIT 3",
            [g[0]],  # type: ignore[index]
        ).fetchall()
    assert row is not None and g is not None
    evs = [ev for _, _, ev in layers]
    print(f"set {set_id}: {len(layers)} layers, trained and measured in {t_train / 60:.1f} min, "
          f"peak {m_train:.2f} GB")  # fmt: skip
    print(f"held-out tokens {row[1]}; CE loss recovered {row[0]:.3f}")
    print(f"explained variance: min {min(evs):.3f}, median {sorted(evs)[len(evs) // 2]:.3f}, "
          f"max {max(evs):.3f}; layers at 0.8 or more: {sum(ev >= 0.8 for ev in evs)}")  # fmt: skip
    for sae_id, l0, ev in layers:
        print(f"  {sae_id}: L0 {l0:.1f}, explained variance {ev:.3f}")
    print(f"graph {g[0]} of {args.prompt!r}: replacement {g[1]:.3f}, completeness {g[2]:.3f}, "
          f"{g[3]} feature nodes, {g[4]} nodes and {g[5]} edges kept; attribution {g[6]:.1f} s, "
          f"command {t_graph:.1f} s, peak {m_graph:.2f} GB; top logits {top}")  # fmt: skip
    if args.picture is not None:
        cold, warm = picture(Path(args.db), str(g[0]), args.picture, drawn=int(g[5]))
        print(f"the Graph page opened in {cold:.2f} s first, then in {warm:.2f} s (best of "
              f"three, a new session each); its picture is {args.picture}")  # fmt: skip


def picture(db: Path, graph_id: str, out: Path, *, drawn: int) -> tuple[float, float]:
    """Open the graph on the app's Graph page in headless Chromium, save the settled page as
    `out`; the seconds until the page had drawn its figure's `drawn` kept edges: the first
    open (the app's server just started), then the best of three more, a new session each (as
    `benchmarks/bench_graph.py` times the page)."""
    from selenium.webdriver.common.by import By

    from benchmarks.bench_graph import graph_drawn, open_time
    from tests.app import screenshots
    from tests.app.test_browser import chromium_driver, streamlit_server

    ready = graph_drawn(drawn)
    with streamlit_server(db) as server, chromium_driver() as driver:
        url = f"{server}/?view=graph&graph={graph_id}"
        cold = open_time(driver, url, ready)
        warm = min(open_time(driver, url, ready) for _ in range(3))
        screenshots.wait_settled(driver)
        driver.set_window_size(1400, 2000)  # the scores and the whole figure
        figure = driver.find_element(By.CSS_SELECTOR, ".js-plotly-plot")
        driver.execute_script(screenshots._SCROLL_TO, figure, 420)
        screenshots.wait_settled(driver, hold=0.5)
        out.parent.mkdir(parents=True, exist_ok=True)
        screenshots._save_small(driver.get_screenshot_as_png(), out)
    return cold, warm


if __name__ == "__main__":
    main()
