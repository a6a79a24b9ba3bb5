"""The app and SQL stay live while a watcher writes: a trainer writes zoo checkpoints, `workbench
watch` analyses them, `workbench sql` queries in a loop and the real app (`streamlit run`, read
by headless Chromium) is reloaded again and again. No reader sees an error, every run is stored
at the end, and the new checkpoints appear in the app without restarting it."""

import subprocess
import sys
import time

import pytest

from tests.app.test_browser import (
    _wait_for_text,
    browser,  # noqa: F401  (the fixture)
    click_view,
    pytestmark,  # noqa: F401  (browser tests: skipped without Chromium)
    streamlit_server,
)
from tests.test_watch import ENV, METHODS_PER_CHECKPOINT, Watching, _config, _rows

TRAINED = 4  # the trainer below saves steps 0, 20, 40 and 60
PROBLEMS = ("Traceback", "Error", "busy", "lock")


def _overview_counts(driver) -> dict[str, int]:
    """The Overview's metrics as the browser shows them (label -> value)."""
    from selenium.webdriver.common.by import By

    counts = {}
    for metric in driver.find_elements(By.CSS_SELECTOR, "[data-testid='stMetric']"):
        label = metric.find_element(By.CSS_SELECTOR, "[data-testid='stMetricLabel']").text
        value = metric.find_element(By.CSS_SELECTOR, "[data-testid='stMetricValue']").text
        counts[label.strip()] = int(value.replace(",", ""))
    return counts


def _reload(driver, url: str, problems: list[str]) -> dict[str, int]:
    """Open the app afresh (a new session of the same server); its Overview's metrics."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    _wait_for_text(driver, "Checkpoints")
    WebDriverWait(driver, 60).until(lambda d: "checkpoints" in _overview_counts(d))
    body = driver.find_element(By.TAG_NAME, "body").text
    problems += [word for word in PROBLEMS if word in body]
    return _overview_counts(driver)


def test_app_and_sql_stay_live_while_a_watcher_writes(tmp_path, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    db = tmp_path / "w.duckdb"
    runs = tmp_path / "runs"
    runs.mkdir()
    watcher = Watching(runs, _config(tmp_path, db), "--every", "0.5")
    trainer = None
    seen: list[int] = []  # the Overview's checkpoint count at each reload
    problems: list[str] = []
    sql_errors: list[str] = []
    try:
        watcher.wait_for_scans(1)  # the database is there, migrated, and being watched
        with streamlit_server(db) as url:
            seen.append(_reload(browser, url, problems)["checkpoints"])  # before any training
            trainer = subprocess.Popen(
                [sys.executable, "-m", "workbench", "zoo", "train", "induction", "--out",
                 str(runs / "train"), "--steps", "60", "--save-every", "20", "--seed", "5"],
                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                out = subprocess.run(
                    [sys.executable, "-m", "workbench", "sql", "SELECT count(*) FROM runs",
                     "--db", str(db), "--format", "json"],
                    env=ENV, capture_output=True, text=True,
                )  # fmt: skip
                if out.returncode != 0:
                    sql_errors.append(out.stderr)
                counts = _reload(browser, url, problems)
                seen.append(counts["checkpoints"])
                finished = trainer.poll() is not None
                if finished and counts["runs done"] >= TRAINED * METHODS_PER_CHECKPOINT:
                    break
                time.sleep(1.0)  # pacing between reloads (the loop waits for the state above)
            # the Timeline page of the same server draws the run trained meanwhile
            click_view(browser, "Timeline")
            _wait_for_text(browser, "Formation steps")
            body = browser.find_element(By.TAG_NAME, "body").text
            problems += [word for word in PROBLEMS if word in body]
            browser.save_screenshot(str(tmp_path / "timeline-live.png"))
    finally:
        if trainer is not None:
            trainer.kill()
        log = watcher.stop()
    assert trainer is not None and trainer.returncode == 0, log[-2000:]
    assert sql_errors == [] and problems == []
    assert len(seen) > 2
    # checkpoints appeared while the app was serving: none at first, all of them at the end
    assert seen[0] == 0 and seen[-1] == TRAINED
    assert seen == sorted(seen)
    done = _rows(db, "SELECT count(*) FROM runs WHERE status = 'done'")[0][0]
    assert done == TRAINED * METHODS_PER_CHECKPOINT
    assert _rows(db, "SELECT count(*) FROM runs WHERE status <> 'done'")[0][0] == 0


pytest.importorskip("selenium")
