"""Pictures of the app for the docs: with `WORKBENCH_SCREENSHOTS=<dir>` set, the browser tests
save PNGs of the pages they drive into that directory once each page has settled (`make
screenshots` writes docs/images). Without it nothing is written."""

import io
import os
import time
from pathlib import Path

import pytest

VARIABLE = "WORKBENCH_SCREENSHOTS"
# The pictures are saved as palette PNGs: the app's flat colours survive, the files stay small.
COLOURS = 256

# True once the page is done: no script run going, nothing left over from the previous run,
# no loading placeholder, the fonts loaded, every plotly figure and every shown table drawn.
_SETTLED = """
const stale = document.querySelector('[data-stale="true"]');
const running = document.querySelector('[data-testid="stStatusWidget"]');
const loading = document.querySelector('[data-testid="stSkeleton"], [data-testid="stSpinner"]');
const plots = [...document.querySelectorAll('.js-plotly-plot')];
const tables = [...document.querySelectorAll('[data-testid="stDataFrame"]')]
    .filter(t => t.checkVisibility());
return document.readyState === 'complete' && document.fonts.status === 'loaded'
    && !stale && !running && !loading && plots.every(p => p._fullLayout && p._fullData)
    && tables.every(t => t.querySelector('canvas'));
"""

# Scroll `arguments[0]` to the top of the view, `arguments[1]` pixels below its edge.
_SCROLL_TO = """
arguments[0].style.scrollMarginTop = arguments[1] + 'px';
arguments[0].scrollIntoView({block: 'start'});
"""
MARGIN = 12  # pixels above the element: about the gap between two of the page's elements


def directory() -> Path | None:
    """Where the pictures go (`$WORKBENCH_SCREENSHOTS`), or None when none are wanted."""
    out = os.environ.get(VARIABLE, "").strip()
    return Path(out).resolve() if out else None


def wait_settled(driver, timeout: float = 60, hold: float = 1.0) -> None:  # type: ignore[no-untyped-def]
    """Until the page has stayed settled for `hold` seconds (a rerun that starts meanwhile
    starts the count again); fails after `timeout`."""
    from selenium.webdriver.support.ui import WebDriverWait

    since: float | None = None

    def steady(d) -> bool:  # type: ignore[no-untyped-def]
        nonlocal since
        if not d.execute_script(_SETTLED):
            since = None
            return False
        now = time.monotonic()
        since = now if since is None else since
        return now - since >= hold

    WebDriverWait(driver, timeout, poll_frequency=0.2).until(steady)


def shoot(driver, name: str, focus: str | None = None) -> None:  # type: ignore[no-untyped-def]
    """When pictures are wanted, save the window as `<dir>/<name>` once the page has settled,
    scrolled so that the element at XPath `focus` is at the top; otherwise nothing."""
    from selenium.webdriver.common.by import By

    out = directory()
    if out is None:
        return
    wait_settled(driver)
    if focus is not None:
        element = driver.find_element(By.XPATH, focus)
        driver.execute_script(_SCROLL_TO, element, MARGIN)
    _pointer_aside(driver)
    wait_settled(driver, hold=0.5)
    png = driver.get_screenshot_as_png()
    if not png:
        pytest.fail(f"the browser gave no screenshot for {name}")
    out.mkdir(parents=True, exist_ok=True)
    _save_small(png, out / name)


def _pointer_aside(driver) -> None:  # type: ignore[no-untyped-def]
    """Move the mouse to the empty right margin of the page, where hovering shows nothing."""
    from selenium.webdriver.common.action_chains import ActionChains

    width, height = driver.execute_script("return [window.innerWidth, window.innerHeight];")
    actions = ActionChains(driver)
    actions.w3c_actions.pointer_action.move_to_location(width - 40, height - 10)
    actions.perform()


def _save_small(png: bytes, path: Path) -> None:
    from PIL import Image  # Streamlit's own dependency

    with Image.open(io.BytesIO(png)) as image:
        small = image.convert("RGB").quantize(COLOURS, method=Image.Quantize.MEDIANCUT)
        small.save(path, optimize=True)
