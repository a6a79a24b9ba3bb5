"""The Features page in a real browser (headless Chromium) on the session's SAE run."""

import pytest

from tests.app.test_browser import (  # noqa: F401  (pytestmark: skipped without Chromium)
    _wait_for_text,
    chromium_driver,
    click_view,
    pytestmark,
    streamlit_server,
)


@pytest.fixture()
def sae_server(sae_run):
    with streamlit_server(sae_run.db) as url:
        yield url


@pytest.fixture()
def browser():
    with chromium_driver() as driver:
        yield driver


def test_feature_dashboard_renders_with_highlighted_contexts(sae_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(sae_server)
    _wait_for_text(browser, "Circuit Workbench")
    _wait_for_text(browser, "Checkpoints")  # the overview has arrived
    click_view(browser, "Features")
    for text in ("SAE features", "explained variance", "Top activating contexts", "promoted"):
        _wait_for_text(browser, text)
    marks = browser.find_elements(By.TAG_NAME, "mark")
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "Traceback" not in body
    dead = "never active on the corpus" in body or "no examples" in body
    assert marks or dead  # feature 0's top contexts, the activating token highlighted
    browser.save_screenshot(str(tmp_path / "features.png"))
