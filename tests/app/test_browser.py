"""End to end in a real browser: `streamlit run app/main.py` served on localhost, driven by
headless Chromium (Debian's chromium + chromium-driver) through Selenium. With
`WORKBENCH_SCREENSHOTS=<dir>` the tests also save the app's pictures there (`make screenshots`
writes docs/images); then a test that cannot take its picture fails instead of skipping."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.app import screenshots
from tests.app.screenshots import shoot

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
APP = Path(__file__).resolve().parents[2] / "app" / "main.py"
INSTALLED = os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)
MISSING = "Debian chromium and chromium-driver are not installed (make browser)"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not INSTALLED and screenshots.directory() is None, reason=MISSING),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture()
def server(heads_db):
    with streamlit_server(heads_db) as url:
        yield url


@contextmanager
def streamlit_server(db) -> Iterator[str]:
    """`streamlit run app/main.py` on a free port, reading `db`; yields its URL. The server
    runs in the database's directory and names it by its file name (what the sidebar shows),
    with the toolbar of a deployed app (no developer buttons)."""
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.port",
        str(port),
        "--server.address",
        "127.0.0.1",
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",
    ]
    db = Path(db).resolve()
    proc = subprocess.Popen(
        cmd,
        cwd=db.parent,
        env={**os.environ, "WORKBENCH_DB": db.name},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, proc)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    """Until the Streamlit server at `url` answers its health check (fail after `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail("streamlit did not start")


@pytest.fixture()
def browser():
    with chromium_driver() as driver:
        yield driver


@contextmanager
def chromium_driver() -> Iterator:
    """Headless Chromium driven through Selenium."""
    if not INSTALLED:
        pytest.fail(f"{MISSING}, so ${screenshots.VARIABLE} gets no pictures")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.TemporaryDirectory(prefix="chromium-")  # removed when the driver quits
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        "--window-size=1400,1000",
        f"--user-data-dir={profile.name}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        profile.cleanup()


def _wait_for_text(driver, text: str, timeout: float = 120) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: text in d.find_element(By.TAG_NAME, "body").text)


def _widget(label: str) -> str:
    """XPath of the page element holding the widget labelled `label`."""
    return f"//*[@data-testid='stElementContainer'][.//label[normalize-space()='{label}']]"


def click_view(driver, view: str, timeout: float = 60) -> None:
    """Click a page in the sidebar once its label is there (the sidebar re-renders on load)."""
    from selenium.common.exceptions import (
        ElementClickInterceptedException,
        NoSuchElementException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    xpath = f"//label[.//p[normalize-space()='{view}']]"

    def clicked(d) -> bool:  # type: ignore[no-untyped-def]
        try:
            d.find_element(By.XPATH, xpath).click()
            return True
        except (
            NoSuchElementException,
            StaleElementReferenceException,
            ElementClickInterceptedException,
        ):
            return False

    WebDriverWait(driver, timeout).until(clicked)


def test_app_pages_render_in_a_real_browser(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server)
    _wait_for_text(browser, "Circuit Workbench")
    _wait_for_text(browser, "Checkpoints")  # the overview's tables arrived
    _wait_for_text(browser, "Runs")
    shoot(browser, "app-overview.png")
    for view, expected in (
        ("Heads", "Attention heads"),
        ("Circuit", "Prune by"),
        ("SQL", "SQL console"),
    ):
        click_view(browser, view)
        _wait_for_text(browser, expected)
        assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
    _wait_for_text(browser, "node_id")  # the SQL page ran its example query
    browser.save_screenshot(str(tmp_path / "sql.png"))
    shoot(browser, "app-sql.png", focus=_widget("Example queries"))


def test_clicking_a_node_in_the_circuit_graph_inspects_it(server, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def node_value(driver) -> str:
        css = "input[aria-label='Node (or click one in the graph)']"
        return driver.find_element(By.CSS_SELECTOR, css).get_attribute("value")

    browser.get(server)
    _wait_for_text(browser, "Checkpoints")
    click_view(browser, "Circuit")
    _wait_for_text(browser, "click one in the graph")
    traces = ".js-plotly-plot g.scatterlayer g.trace"  # the first figure's: the graph's
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, traces))
    graph = browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")[0]
    nodes = graph.find_elements(By.CSS_SELECTOR, "g.scatterlayer g.trace")[-1]  # drawn last
    points = nodes.find_elements(By.CSS_SELECTOR, "path.point")
    labels = [t.text for t in nodes.find_elements(By.CSS_SELECTOR, "g.textpoint text")]
    assert len(points) == len(labels) > 1
    chosen = node_value(browser)
    target = next(i for i, label in enumerate(labels) if label and label != chosen)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", points[target])
    # plotly's drag layer lies over the points and turns a click at a point into its selection
    ActionChains(browser).move_to_element(points[target]).pause(0.5).click().perform()
    WebDriverWait(browser, 60).until(lambda d: node_value(d) == labels[target])
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
    shoot(browser, "app-circuit.png", focus=_widget("Node (or click one in the graph)"))


def test_the_graph_page_draws_and_a_click_inspects_a_node(graph_store, browser):
    """An attribution graph in Chromium: its nodes drawn as SVG points, one clicked becomes
    the node inspected (its strongest inputs and outputs listed)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def node_value(driver) -> str:
        css = "input[aria-label='Node (or click one in the graph)']"
        return driver.find_element(By.CSS_SELECTOR, css).get_attribute("value")

    with streamlit_server(graph_store.db) as url:
        browser.get(f"{url}/?view=graph")
        _wait_for_text(browser, "Attribution graph")
        _wait_for_text(browser, "Strongest inputs")
        traces = "g.scatterlayer g.trace"
        WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, traces))
        nodes = browser.find_elements(By.CSS_SELECTOR, traces)[-1]  # the node markers, last
        points = nodes.find_elements(By.CSS_SELECTOR, "path.point")
        assert len(points) > 10
        chosen = node_value(browser)
        for point in reversed(points):  # a node other than the one shown, top of the graph
            browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", point)
            ActionChains(browser).move_to_element(point).pause(0.5).click().perform()
            try:
                WebDriverWait(browser, 30).until(lambda d: node_value(d) != chosen)
                break
            except Exception:  # (a point under another: try the next)
                continue
        assert node_value(browser) != chosen
        assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
        shoot(browser, "app-graph.png", focus=_widget("Node (or click one in the graph)"))


def test_timeline_page_in_a_real_browser(server, browser, tmp_path):
    """The Timeline page draws: the heads' heatmap across training, formation steps beside the
    loss curve, a head's curves with their error bars, a circuit diff between two checkpoints
    with each circuit's faithfulness interval and the stored circuits' cross-recovery
    (screenshot kept out of git)."""
    from selenium.webdriver.common.by import By

    browser.get(server)
    _wait_for_text(browser, "Circuit Workbench")
    click_view(browser, "Timeline")
    _wait_for_text(browser, "Formation steps")
    _wait_for_text(browser, "Circuit diff between two checkpoints")
    _wait_for_text(browser, "Cross-recovery: each checkpoint's circuit at every checkpoint")
    _wait_for_text(browser, "the circuit of the last checkpoint (step 1000) holds")
    _wait_for_text(browser, "error bars: each score's standard error over prompts")
    _wait_for_text(browser, "faithfulness at 1000")  # with its bootstrap interval
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
    browser.save_screenshot(str(tmp_path / "timeline.png"))


def test_the_head_catalogue_in_a_real_browser(server, browser, heads_db, tmp_path):
    """A link to the Heads page with a catalogue score and composition mode opens them; the
    Catalogue tab shows the final checkpoint's catalogue (its heatmap, the heads that lead the
    score, the K-composition pairs, a head's token mappings), and the address bar keeps the
    choices."""
    from urllib.parse import parse_qs, urlparse

    import duckdb
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    con = duckdb.connect(str(heads_db), read_only=True)
    (catalogue,) = con.execute(
        """SELECT catalogue_id FROM catalogues JOIN checkpoints c USING (checkpoint_id)
           WHERE c.step = 1000"""
    ).fetchone()
    con.close()
    browser.get(f"{server}/?view=heads&score=induction&mode=K&catalogue_head=a1.h0")
    _wait_for_text(browser, "Attention heads")
    tab = "//*[@role='tab'][contains(normalize-space(.), 'Catalogue')]"
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.XPATH, tab))
    browser.find_element(By.XPATH, tab).click()
    _wait_for_text(browser, "K-composition: how much of a later head's key circuit")
    _wait_for_text(browser, "attention to the token after an earlier copy")
    _wait_for_text(browser, "What its parameters map tokens to")  # a1.h0's OV and QK mappings
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "Traceback" not in body and f"catalogue {catalogue}" in body
    WebDriverWait(browser, 60).until(lambda d: "heatmap" in _plot_traces(d))
    query = {k: v[0] for k, v in parse_qs(urlparse(browser.current_url).query).items()}
    assert (query["score"], query["mode"], query["catalogue_step"]) == ("induction", "K", "1000")
    assert query["catalogue_head"] == "a1.h0"
    browser.save_screenshot(str(tmp_path / "catalogue.png"))


def test_how_far_to_trust_a_run_in_a_real_browser(server, browser, heads_db, tmp_path):
    """A link to an attr_patch run on the Heads page shows its spot-check badge (as its stored
    metrics decide), the check's figures, the checked heads against their exact patches when
    the expander opens, and the error bars of the leading heads."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.conftest import query
    from workbench.spotcheck import contradicted

    (run,) = query(
        heads_db,
        """SELECT r.run_id FROM runs r JOIN checkpoints c USING (checkpoint_id)
           WHERE r.method = 'attr_patch' AND c.step = 1000""",
    )
    rows = query(
        heads_db, "SELECT metric, value FROM run_metrics WHERE run_id = ?", [run["run_id"]]
    )
    metrics = {r["metric"]: r["value"] for r in rows}
    badge = "contradicted by its spot check" if contradicted(metrics) else "spot check agrees"
    browser.get(f"{server}/?view=heads&method=attr_patch&step=1000")
    _wait_for_text(browser, badge)
    _wait_for_text(browser, f"{int(metrics['spot_n'])} scores patched for real")
    expander = "//*[@data-testid='stExpander']//summary"
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.XPATH, expander))
    browser.find_element(By.XPATH, expander).click()
    WebDriverWait(browser, 60).until(lambda d: "scatter" in _every_trace(d))
    WebDriverWait(browser, 60).until(lambda d: "bar" in _every_trace(d))  # the error bars
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
    browser.save_screenshot(str(tmp_path / "reliability.png"))


def test_stability_over_seeds_in_a_real_browser(seeds_db, browser, tmp_path):
    """A link to the Circuit page's "Across seeds" on `seeds_db` draws the two seeds' circuits
    and each circuit's faithfulness on each seed's model (a heatmap), with the pair's shares."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.conftest import query

    (member, *_) = query(seeds_db, "SELECT model_id FROM seed_groups ORDER BY model_id")
    with streamlit_server(seeds_db) as url:
        browser.get(f"{url}/?view=circuit&model={member['model_id']}&show=Across+seeds")
        _wait_for_text(browser, "Each seed's circuit on each seed's model")
        _wait_for_text(browser, "mean share: layer profile")
        WebDriverWait(browser, 60).until(lambda d: "heatmap" in _every_trace(d))
        assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
        browser.save_screenshot(str(tmp_path / "seeds.png"))


def _type_into(driver, css: str, text: str, commit) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))
    box = driver.find_element(By.CSS_SELECTOR, css)
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(text)
    box.send_keys(*commit)


def test_sql_console_caps_rows_and_times_out_in_a_real_browser(server, browser, tmp_path):
    """The console in Chromium: a billion-row query shows its first rows with the cap's
    message; a runaway cross join ends with the timeout's message; the page keeps working."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(server)
    _wait_for_text(browser, "Checkpoints")
    click_view(browser, "SQL")
    _wait_for_text(browser, "SQL console")
    _type_into(browser, "input[aria-label='Timeout (seconds)']", "2", [Keys.ENTER])
    query = "textarea[aria-label='Query']"
    _type_into(browser, query, "SELECT * FROM range(1000000000)", [Keys.CONTROL, Keys.ENTER])
    _wait_for_text(browser, "more than 1,000,000 rows")
    _wait_for_text(browser, "Showing the first 10,000 of 1,000,000 rows")
    browser.save_screenshot(str(tmp_path / "sql-cap.png"))
    cross = "SELECT sum(a.range * b.range) FROM range(100000) a, range(100000) b"
    _type_into(browser, query, cross, [Keys.CONTROL, Keys.ENTER])
    _wait_for_text(browser, "query stopped after 2 s (the timeout)")
    _type_into(browser, query, "SELECT 41 + 1 AS answer", [Keys.CONTROL, Keys.ENTER])
    _wait_for_text(browser, "1 rows in")
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text


def _plot_traces(driver) -> list[str]:
    """The trace types of the page's first plotly figure (empty until it is drawn)."""
    return driver.execute_script(
        "const gd = document.querySelector('.js-plotly-plot');"
        "return gd && gd._fullData ? gd._fullData.map(t => t.type) : [];"
    )


def _every_trace(driver) -> list[str]:
    """The trace types of every plotly figure drawn on the page."""
    return driver.execute_script(
        "return [...document.querySelectorAll('.js-plotly-plot')].flatMap("
        "gd => gd._fullData ? gd._fullData.map(t => t.type) : []);"
    )


def test_a_deep_link_opens_the_explorer_as_it_was(server, browser, heads_db, tmp_path):
    """A link naming a run, a circuit size, a node and WebGL opens the Circuit page with that run,
    that many edges drawn with WebGL and that node picked; the address bar then holds the page's
    whole state, and opening it in a new session shows the same page."""
    from urllib.parse import parse_qs, urlparse

    import duckdb
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    con = duckdb.connect(str(heads_db), read_only=True)
    run_id, n_edges = con.execute(
        """SELECT run_id, (SELECT count(*) FROM edges e WHERE e.run_id = r.run_id)
           FROM runs r JOIN checkpoints USING (checkpoint_id)
           WHERE method = 'eap' AND step = 1000"""
    ).fetchone()
    con.close()

    def node_value(driver) -> str:
        css = "input[aria-label='Node (or click one in the graph)']"
        return driver.find_element(By.CSS_SELECTOR, css).get_attribute("value")

    def opened(url: str) -> dict:
        browser.get(url)
        _wait_for_text(browser, f"edges from run {run_id}")  # the page settled on the run
        WebDriverWait(browser, 60).until(lambda d: "scattergl" in _plot_traces(d))
        WebDriverWait(browser, 60).until(lambda d: "view=circuit" in d.current_url)
        assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
        assert node_value(browser) == "a1.h0"
        body = browser.find_element(By.TAG_NAME, "body").text
        assert f"30 of {n_edges} edges" in body
        assert "circuit faithfulness over resampled prompts" in body  # its bootstrap interval
        return {k: v[0] for k, v in parse_qs(urlparse(browser.current_url).query).items()}

    first = opened(f"{server}/?view=circuit&run={run_id}&k=30&node=a1.h0&draw=WebGL")
    assert (first["run"], first["k"], first["node"], first["step"]) == (
        run_id,
        "30",
        "a1.h0",
        "1000",
    )
    browser.save_screenshot(str(tmp_path / "deep_link.png"))
    link = browser.current_url
    browser.delete_all_cookies()
    again = opened(link)  # a new session on the published link
    assert again == first


def test_curating_in_a_real_browser(heads_db, browser, tmp_path):
    """Pin nodes (through a link), group two of them into a supernode, save the subgraph, and
    reopen it from the link the page gives: the supernode is drawn in place of its members
    (on a copy of the database: saving is the app's one write)."""
    import json as json_

    import duckdb
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    db = tmp_path / "w.duckdb"
    shutil.copy(heads_db, db)
    pins = ["input", "a0.h1", "a0.h3", "a1.h0", "logits"]
    with streamlit_server(db) as server:
        browser.get(f"{server}/?view=circuit&method=eap&k=30&pins={','.join(pins)}")
        _wait_for_text(browser, "Curate: pin, group")
        label = "input[aria-label='Group label']"
        WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, label))
        _type_into(browser, label, "previous token", [Keys.ENTER])
        members = "input[aria-label='Group these pinned nodes']"
        for node in ("a0.h1", "a0.h3"):
            _type_into(browser, members, node, [Keys.ENTER])
        _wait_for_text(browser, "a0.h3")
        browser.find_element(By.XPATH, "//button[.//p[text()='Group']]").click()
        _wait_for_text(browser, "previous token")
        _type_into(browser, "input[aria-label='Subgraph name']", "browser circuit", [Keys.ENTER])
        time.sleep(1)
        browser.find_element(By.XPATH, "//button[.//p[text()='Save subgraph']]").click()
        _wait_for_text(browser, "Saved subgraph sg-")
        browser.save_screenshot(str(tmp_path / "curate-saved.png"))

        con = duckdb.connect(str(db), read_only=True)
        (sid,) = con.execute("SELECT subgraph_id FROM subgraphs").fetchone()
        grouped = con.execute(
            "SELECT node_id FROM subgraph_nodes WHERE group_label = 'previous token' ORDER BY 1"
        ).fetchall()
        con.close()
        assert grouped == [("a0.h1",), ("a0.h3",)]

        browser.delete_all_cookies()
        browser.get(f"{server}/?view=circuit&subgraph={sid}")
        _wait_for_text(browser, f"subgraph {sid} from run:")
        WebDriverWait(browser, 60).until(lambda d: "scatter" in _plot_traces(d))  # SVG (auto)
        drawn = browser.execute_script(
            "const gd = document.querySelector('.js-plotly-plot');"
            "return JSON.stringify(gd._fullData[gd._fullData.length - 1].customdata);"
        )
        nodes = set(json_.loads(drawn))
        assert "group:previous token" in nodes and not {"a0.h1", "a0.h3"} & nodes
        assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
        browser.save_screenshot(str(tmp_path / "curate-reopened.png"))


def test_the_prompt_page_in_a_real_browser(induction_dir, browser, tmp_path):
    """A prompt analysed by `workbench run prompt` opens from its link with its attention,
    logit lens, attribution, rollout/flow and routes views (screenshot kept out of git)."""
    import duckdb
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from workbench.cli import cli

    db = tmp_path / "workbench.duckdb"
    argv = ["run", "prompt", "--model", str(induction_dir), "--task", "induction", "--index", "1"]
    assert cli([*argv, "--db", str(db)]) == 0
    con = duckdb.connect(str(db), read_only=True)
    (pid,) = con.execute("SELECT prompt_id FROM prompt_views").fetchone()
    con.close()
    with streamlit_server(db) as server:
        browser.get(f"{server}/?view=prompt&prompt={pid}")
        _wait_for_text(browser, "predicted next token")
        WebDriverWait(browser, 60).until(lambda d: _plot_traces(d))
        for tab in ("Logit lens", "Rollout and flow", "Routes"):
            browser.find_element(By.XPATH, f"//*[@role='tab'][contains(., '{tab}')]").click()
            if tab == "Logit lens":  # each layer's prediction at each position: its picture
                _wait_for_text(browser, "read off each layer's residual")
                shoot(browser, "app-prompt.png", focus=_widget("Prompt"))
            time.sleep(0.5)
        _wait_for_text(browser, "information-flow routes")
        assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
        browser.save_screenshot(str(tmp_path / "prompt.png"))


def test_why_this_token_in_a_real_browser(why_db, browser, tmp_path):
    """The Prompt page's Why this token tab draws the methods' token rows, their curves and
    agreement from a stored explanation, the Patchscope tab lists each stream's decoding, and
    the logit lens tab draws the stored tuned lens beside the logit lens."""
    import duckdb
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    db, _ = why_db
    con = duckdb.connect(str(db), read_only=True)
    (pid,) = con.execute("SELECT prompt_id FROM prompt_views").fetchone()
    (text,) = con.execute("SELECT text FROM prompt_patchscope ORDER BY source_layer").fetchone()
    con.close()
    with streamlit_server(db) as server:
        browser.get(f"{server}/?view=prompt&prompt={pid}")
        _wait_for_text(browser, "predicted next token")
        tab = "//*[@role='tab'][contains(normalize-space(.), 'Why this token')]"
        WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.XPATH, tab))
        browser.find_element(By.XPATH, tab).click()
        _wait_for_text(browser, "what each input token contributes to the logit of")
        _wait_for_text(browser, "Spearman's rank correlation of the token scores")
        WebDriverWait(browser, 60).until(lambda d: _every_trace(d).count("heatmap") >= 3)
        WebDriverWait(browser, 60).until(lambda d: "scatter" in _every_trace(d))
        shoot(browser, "app-why.png", focus=_widget("Explanation"))
        browser.find_element(
            By.XPATH, "//*[@role='tab'][contains(normalize-space(.), 'Patchscope')]"
        ).click()
        _wait_for_text(browser, "patched into the inspection prompt's last token")
        browser.find_element(
            By.XPATH, "//*[@role='tab'][contains(normalize-space(.), 'Logit lens')]"
        ).click()  # the stored tuned lens beside the logit lens
        _wait_for_text(browser, "each layer's residual through its trained translator")
        assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
        browser.save_screenshot(str(tmp_path / "why.png"))
    assert text


def test_the_features_page_in_a_real_browser(sae_run, browser, tmp_path):
    """A feature's link opens its dashboard: statistics, activation histogram, top activating
    contexts with the activating token marked, logit effects and its attribution (the feature
    that the session's sae_attr run scores highest; on a copy of the database)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.conftest import query

    (top,) = query(
        sae_run.db,
        """SELECT n.sae_id, n.feature FROM node_scores s JOIN runs r USING (run_id)
           JOIN nodes n USING (node_id) WHERE r.method = 'sae_attr' AND n.kind = 'feature'
           ORDER BY abs(s.score) DESC, n.node_id LIMIT 1""",
    )
    sae, feature = top["sae_id"], top["feature"]
    db = tmp_path / "workbench.duckdb"
    shutil.copy(sae_run.db, db)
    with streamlit_server(db) as server:
        browser.get(f"{server}/?view=features&sae={sae}&feature={feature}")
        _wait_for_text(browser, f"Feature {feature}")
        _wait_for_text(browser, "Top activating contexts")
        _wait_for_text(browser, "Attribution to the task metric")
        WebDriverWait(browser, 60).until(lambda d: "bar" in _plot_traces(d))  # the histogram
        body = browser.find_element(By.TAG_NAME, "body").text
        assert "Traceback" not in body and "not scored by any sae_attr run" not in body
        assert browser.find_elements(By.CSS_SELECTOR, "mark b")  # the activating tokens
        heading = f"//*[@data-testid='stHeading'][contains(., 'Feature {feature} ')]"
        shoot(browser, "app-features.png", focus=heading)
