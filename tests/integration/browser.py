"""Headless Chromium (Debian's `chromium` + `chromium-driver`) driven by Selenium, for the
dashboard's browser tests, and where their screenshots go.

Selenium Manager never runs: the driver's path is given explicitly and SE_OFFLINE is set,
so nothing is downloaded. Chromium's background services (component updates, sync, safe
browsing lists) are switched off: the network is closed in CI and they would only stall.
Without the two binaries the tests skip locally and fail under CI (`CI` set), like the
real-Redis fixtures.
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("SANDQUEUE_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SANDQUEUE_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-output" / "screenshots"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1440,1000")


def _missing() -> str | None:
    absent = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.exists(p) or shutil.which(p))]
    if absent:
        return (f"{' and '.join(absent)} not found: install Debian's chromium and "
                "chromium-driver (apt-get install chromium chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="module")
def chrome() -> Iterator[object]:
    why = _missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"the dashboard's browser tests must run in CI: {why}")
        pytest.skip(why)
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager: never download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="sq-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.enable_downloads = False
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # to see CSP refusals
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver: object) -> list[str]:
    """What the page's console said at level SEVERE since the last call: a script or style
    the Content-Security-Policy refused would be here."""
    logs = driver.get_log("browser")  # type: ignore[attr-defined]
    return [str(e.get("message")) for e in logs if e.get("level") == "SEVERE"]


def screenshot(driver: object, name: str, expected: tuple[str, ...] = ()) -> Path:
    """Save the page as test-output/screenshots/<name>.png and print where; first check
    that the page ran without console errors (no CSP refusal, no script error)."""
    errors = [e for e in console_errors(driver) if not any(x in e for x in expected)]
    assert not errors, f"console errors on {name}: {errors}"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    # The whole page, not just the window: Chromium's DevTools capture beyond the viewport.
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]  # type: ignore[attr-defined]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {  # type: ignore[attr-defined]
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 4000),
                 "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))
    print(f"screenshot: {path}")
    return path
