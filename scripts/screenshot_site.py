"""A PNG screenshot of one page of a built leaderboard site, taken by headless Chromium offline.

    python scripts/screenshot_site.py results/site task-fashion-mnist.html fashion-mnist.png
    python scripts/screenshot_site.py SITE_DIR PAGE OUT.png [--width 1280] [--viewport]

SITE_DIR is a folder written by ``python -m bench site``; PAGE a file in it (``index.html``,
``task-fashion-mnist.html``, ``runs/imdb/map/seed0.html``). The page is opened from a file:// URL,
as a reader of the folder would, and the whole page is captured (``--viewport``: only the first
screen). Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install chromium
chromium-driver``; ``BENCH_BROWSER=1 bash scripts/setup.sh`` does it) and the Python package
``selenium``, which drives Debian's chromedriver: nothing is downloaded (Selenium Manager is off).
tests/test_site_browser.py drives the site with these same helpers.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Headless and quiet: without the background-networking flags Chromium keeps calling home, which an
# offline (CI) machine refuses. --disable-dev-shm-usage: a container's small /dev/shm crashes tabs.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", "--disable-extensions", "--hide-scrollbars",
         "--force-device-scale-factor=1", "--lang=en-US")
MAX_HEIGHT = 16000  # px: a full-page capture of a very long run page is cut here
TIMEOUT = 30.0  # s: page loads and waits


def missing() -> str | None:
    """Why no browser can be driven here (one line), or None when it can."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return (f"no headless browser: {path} not found (Debian package {package}; "
                    "`apt-get install chromium chromium-driver`, or BENCH_BROWSER=1 bash scripts/setup.sh)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the Python package selenium is not installed (it is in bench's test extra: pip install selenium)"
    return None


@contextmanager
def browser(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A headless Chromium (a Selenium WebDriver) with a new empty profile, closed on exit."""
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch a driver or browser
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="bench-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console messages, for errors
        driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
        try:
            driver.set_page_load_timeout(TIMEOUT)
            yield driver
        finally:
            driver.quit()


def page_url(site: Path | str, page: str) -> str:
    """The file:// URL of ``page`` (a path inside the built site ``site``)."""
    path = Path(site, page).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a page of the site in {site}")
    return path.as_uri()


def load_everything(driver: Any) -> None:
    """Wait for the page and all its images, lazy ones too (the task pages' figures are lazy)."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("document.querySelectorAll('img[loading=lazy]').forEach(i => { i.loading = 'eager'; });")
    WebDriverWait(driver, TIMEOUT).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete);"))


def screenshot(driver: Any, out: Path | str, full_page: bool = True) -> Path:
    """Write the current page as a PNG to ``out``: the whole page (up to MAX_HEIGHT px) or the viewport."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load_everything(driver)
    if not full_page:
        out.write_bytes(driver.get_screenshot_as_png())
        return out
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], MAX_HEIGHT), "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot",
                                  {"format": "png", "captureBeyondViewport": True, "clip": clip})
    out.write_bytes(base64.b64decode(shot["data"]))
    return out


def screenshot_page(site: Path | str, page: str, out: Path | str, width: int = 1280,
                    full_page: bool = True) -> Path:
    """Open ``page`` of the built site ``site`` in a fresh headless Chromium and write its PNG to ``out``."""
    url = page_url(site, page)
    with browser(width=width) as driver:
        driver.get(url)
        return screenshot(driver, out, full_page=full_page)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="a folder written by `python -m bench site`")
    parser.add_argument("page", help="a page in it, e.g. index.html or task-fashion-mnist.html")
    parser.add_argument("out", type=Path, help="the PNG file to write")
    parser.add_argument("--width", type=int, default=1280, help="window width in CSS px (default 1280)")
    parser.add_argument("--viewport", action="store_true", help="only the first screen, not the whole page")
    args = parser.parse_args(argv)
    reason = missing()
    if reason:
        print(f"screenshot_site: {reason}", file=sys.stderr)
        return 2
    try:
        out = screenshot_page(args.site, args.page, args.out, width=args.width, full_page=not args.viewport)
    except FileNotFoundError as exc:
        print(f"screenshot_site: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
