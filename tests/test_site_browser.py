"""``bench site`` in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven by Selenium) opens a site built from real runs of the tiny task from file:// URLs, sorts a
column, filters the rows, follows links to a run page, and takes a screenshot that must not be blank.

Skipped, with the reason, where no browser can be driven (``.ci/run`` installs one;
``BENCH_BROWSER=1 bash scripts/setup.sh`` does for a developer). The browser helpers are
scripts/screenshot_site.py's, so this also tests that script.
"""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from conftest import REPO, TINY_TASK
from PIL import Image

from bench.plugins import load_plugin
from bench.runner import RunConfig, run
from bench.site import build_site
from bench.site_files import write_site

pytestmark = pytest.mark.slow  # a headless browser

_spec = importlib.util.spec_from_file_location("screenshot_site", REPO / "scripts" / "screenshot_site.py")
shot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shot)

REASON = shot.missing()
needs_browser = pytest.mark.skipif(REASON is not None, reason=REASON or "")

TASK = "tiny-digits"
DROPOUT = "mc-dropout@samples=4"
HEADER_RGB = (0x24, 0x29, 0x2F)  # site.css: header { background: #24292f }


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site on disk from real runs: the MAP, MC dropout with an option, and last-layer Laplace
    (whose derived [s=1] / [s tuned] rows give the row filter's select something to hide); real PNG
    figures, so that the page's images must load from file://."""
    if REASON is not None:
        pytest.skip(REASON)
    root = tmp_path_factory.mktemp("results")
    load_plugin(TINY_TASK)
    with pytest.MonkeyPatch.context() as mp:  # the autouse cache fixture is per test; this is per module
        mp.setenv("BENCH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "bench-cache"))
        for method, settings in (("map", {}), ("mc-dropout", {"samples": "4"}), ("laplace-ll", {})):
            run(RunConfig(method=method, task=TASK, seed=0, out=root, settings=settings, quiet=True))
    plots = root / "plots"
    plots.mkdir()
    ramp = np.linspace(0, 255, 200 * 150 * 3).reshape(150, 200, 3).astype(np.uint8)
    for name in (f"reliability_{TASK}.png", f"ood_hist_{TASK}_shuffled.png"):
        Image.fromarray(ramp).save(plots / name)
    out = tmp_path_factory.mktemp("site")
    write_site(build_site(root), out)
    return out


@pytest.fixture(scope="module")
def driver(site: Path):
    with shot.browser() as d:
        yield d


def open_page(driver, site: Path, page: str) -> None:
    driver.get_log("browser")  # a fresh start for console_errors
    driver.get(shot.page_url(site, page))
    shot.load_everything(driver)


def console_errors(driver) -> list[str]:
    """The page's console errors since the last call (a file that failed to load, a script error)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def rows(driver) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#board tbody tr")


def column(driver, key: str) -> list[str]:
    """The ``data-sort`` values of one column of the task table, top to bottom (what the script sorts by)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#board tbody tr'))"
        ".map(r => r.querySelector('td[data-key=\"' + arguments[0] + '\"]').getAttribute('data-sort'));", key)


def visible_labels(driver) -> list[str]:
    return [r.get_attribute("data-label") for r in rows(driver) if r.is_displayed()]


def assert_not_blank(png: Path) -> None:
    """A real rendering: a good share of ink on a light page, many colours (anti-aliased text), and the
    stylesheet's dark header band at the top."""
    image = np.asarray(Image.open(png).convert("RGB"))
    height, width, _ = image.shape
    assert width >= 800 and height >= 400, image.shape
    ink = (image < 240).any(axis=2).mean()
    assert 0.02 < ink < 0.9, f"{png}: {ink:.1%} of the pixels are not white"
    packed = (image[..., 0].astype(np.int64) << 16) | (image[..., 1].astype(np.int64) << 8) | image[..., 2]
    colours = np.count_nonzero(np.bincount(packed.ravel(), minlength=1 << 24))
    assert colours >= 50, f"{png}: only {colours} distinct colours"
    assert (image[5, : width // 2] == HEADER_RGB).all(axis=1).mean() > 0.5, f"{png}: no header band at the top"


def test_the_blankness_check_refuses_blank_and_flat_images(tmp_path: Path) -> None:
    for name, colour in (("white", 255), ("black", 0)):
        Image.new("RGB", (1280, 800), (colour,) * 3).save(tmp_path / f"{name}.png")
        with pytest.raises(AssertionError):
            assert_not_blank(tmp_path / f"{name}.png")


@needs_browser
def test_index_works_offline_and_links_to_the_task_page(driver, site: Path) -> None:
    from selenium.webdriver.common.by import By

    open_page(driver, site, "index.html")
    assert driver.find_element(By.TAG_NAME, "h1").text == "Leaderboard"
    header = driver.find_element(By.TAG_NAME, "header").value_of_css_property("background-color")
    assert header == "rgba({}, {}, {}, 1)".format(*HEADER_RGB)  # static/site.css loaded
    assert driver.execute_script("return document.querySelector('table.sortable th').tabIndex") == 0  # site.js ran
    driver.find_element(By.CSS_SELECTOR, "#tasks tbody").find_element(By.LINK_TEXT, TASK).click()
    assert unquote(driver.current_url).endswith(f"/task-{TASK}.html")
    shot.load_everything(driver)
    assert driver.find_element(By.TAG_NAME, "h1").text == TASK
    images = driver.execute_script("return Array.from(document.images).map(i => i.naturalWidth)")
    assert len(images) == 2 and all(w == 200 for w in images)  # the figures load from file:// too
    assert console_errors(driver) == []


def heads(driver, key: str) -> list[str]:
    """``data-sort`` of ``key`` on the rows that head their group (a method's own row), top to bottom;
    asserts that every derived row sits right below its method's row or a sibling."""
    table = driver.execute_script(
        "return Array.from(document.querySelectorAll('#board tbody tr')).map(r => [r.getAttribute('data-label'),"
        " r.getAttribute('data-parent'), r.querySelector('td[data-key=\"' + arguments[0] + '\"]')"
        ".getAttribute('data-sort')]);", key)
    current = None
    out = []
    for label, parent, value in table:
        if label == parent:
            current = label
            out.append(value)
        else:
            assert parent == current, f"{label} is not below {parent}"
    return out


@needs_browser
def test_a_click_on_a_numeric_header_sorts_its_column_keeping_derived_rows_under_their_method(
        driver, site: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    open_page(driver, site, f"task-{TASK}.html")
    nll = heads(driver, "cls/nll")
    assert len(set(nll)) >= 3 and "" not in nll  # distinct values: both orders cannot be the page's own
    assert len(rows(driver)) > len(nll)  # laplace-ll's derived rows are in the table
    header = driver.find_element(By.CSS_SELECTOR, '#board th[title="cls/nll"]')
    header.click()
    assert header.get_attribute("aria-sort") == "ascending"
    assert heads(driver, "cls/nll") == sorted(nll, key=float)
    header.click()
    assert header.get_attribute("aria-sort") == "descending"
    assert heads(driver, "cls/nll") == sorted(nll, key=float, reverse=True)
    assert sorted(visible_labels(driver)) == sorted(r.get_attribute("data-label") for r in rows(driver))

    # A column where some rows have no value (map has no mutual information): those go last either
    # way. Sorted from the keyboard (Enter on the focused header) this time.
    keys = driver.execute_script("return Array.from(document.querySelectorAll('#board thead th[title]'))"
                                 ".map(th => th.title)")
    gappy = next((k for k in keys if "" in heads(driver, k) and set(heads(driver, k)) - {""}), None)
    assert gappy, "no column of the tiny task's table has a missing value to sort around"
    values = heads(driver, gappy)
    present = [v for v in values if v]
    header = driver.find_element(By.CSS_SELECTOR, f'#board th[title="{gappy}"]')
    for direction, reverse in (("ascending", False), ("descending", True)):
        header.send_keys(Keys.ENTER)
        assert header.get_attribute("aria-sort") == direction
        assert heads(driver, gappy) == sorted(present, key=float, reverse=reverse) + [""] * values.count("")
    assert console_errors(driver) == []


@needs_browser
def test_the_header_and_the_method_column_stay_in_view_while_the_table_scrolls(driver, site: Path) -> None:
    open_page(driver, site, f"task-{TASK}.html")
    driver.set_window_size(700, 500)  # narrower than the full table: it scrolls sideways in its box
    try:
        moved = driver.execute_script("""
            const box = document.querySelector('#board').parentElement;
            const first = () => document.querySelector('#board tbody th').getBoundingClientRect().left;
            const head = () => document.querySelector('#board thead th[title]').getBoundingClientRect().top;
            box.style.maxHeight = '90px';  // shorter than the tiny task's table: it scrolls down too
            const before = [first(), head(), box.getBoundingClientRect().left, box.getBoundingClientRect().top];
            box.scrollLeft = 400; box.scrollTop = 40;  // less than the table's height below the box
            const edge = box.getBoundingClientRect();
            return [[box.scrollLeft, box.scrollTop], before, [first(), head()], [edge.left, edge.top]];""")
    finally:
        driver.set_window_size(1280, 900)
    (across, down), (left, top, _, _), (left_after, top_after), (box_left, box_top) = moved
    assert across > 0 and down > 0  # the box did scroll both ways
    # Scrolled away they would sit 400 px left of and 40 px above the box's edge; stuck, they sit on it.
    assert box_left - 2 <= left_after <= max(left, box_left + 2)  # the method column
    assert box_top - 2 <= top_after <= max(top, box_top + 2)  # the header


@needs_browser
def test_the_index_fits_a_phone_screen(driver, site: Path) -> None:
    driver.set_window_size(390, 844)
    try:
        open_page(driver, site, "index.html")
        overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    finally:
        driver.set_window_size(1280, 900)
    assert overflow <= 0


@needs_browser
def test_the_filter_box_and_the_rows_select_hide_rows(driver, site: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.select import Select

    open_page(driver, site, f"task-{TASK}.html")
    everything = visible_labels(driver)
    kinds = {r.get_attribute("data-label"): r.get_attribute("data-kind") for r in rows(driver)}
    assert {"map", DROPOUT, "laplace-ll"} <= set(everything) and "derived" in kinds.values()
    box = driver.find_element(By.CSS_SELECTOR, '[data-filter-text="board"]')
    kind = Select(driver.find_element(By.CSS_SELECTOR, '[data-filter-kind="board"]'))

    def type_in(text: str) -> None:
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)
        if text:
            box.send_keys(text)

    type_in("dropout")
    assert visible_labels(driver) == [DROPOUT]
    type_in("LAPLACE")  # the label contains the text, whatever its case
    laplace = [label for label in everything if "laplace" in label]
    assert visible_labels(driver) == laplace and len(laplace) >= 2
    kind.select_by_value("method")
    assert visible_labels(driver) == ["laplace-ll"]
    type_in("")
    assert visible_labels(driver) == [label for label in everything if kinds[label] == "method"]
    kind.select_by_value("derived")
    assert visible_labels(driver) == [label for label in everything if kinds[label] == "derived"]
    type_in("no such method")
    assert visible_labels(driver) == []
    type_in("")
    kind.select_by_value("")
    assert visible_labels(driver) == everything
    assert console_errors(driver) == []


@needs_browser
def test_a_run_link_opens_the_run_page_with_its_command(driver, site: Path) -> None:
    from selenium.webdriver.common.by import By

    open_page(driver, site, f"task-{TASK}.html")
    item = next(li for li in driver.find_elements(By.CSS_SELECTOR, "ul.runs li") if li.text.startswith(f"{DROPOUT}:"))
    item.find_element(By.LINK_TEXT, "seed 0").click()
    assert unquote(driver.current_url).endswith(f"/runs/{TASK}/{DROPOUT}/seed0.html")
    shot.load_everything(driver)
    assert driver.find_element(By.TAG_NAME, "h1").text == f"{DROPOUT} on {TASK}, seed 0"
    argv = shlex.split(driver.find_element(By.CSS_SELECTOR, "pre.command").text)
    # the task is registered by a plugin file, so the command loads it before ``run``
    assert argv[:6] == ["python", "-m", "bench", "--plugin", f"PATH/TO/{TINY_TASK.name}", "run"]
    assert "mc-dropout" in argv and TASK in argv
    header = driver.find_element(By.TAG_NAME, "header").value_of_css_property("background-color")
    assert header == "rgba({}, {}, {}, 1)".format(*HEADER_RGB)  # ../../../static/site.css from three folders down
    driver.find_element(By.LINK_TEXT, f"task {TASK}").click()  # and back up
    assert unquote(driver.current_url).endswith(f"/task-{TASK}.html")
    assert driver.find_element(By.TAG_NAME, "h1").text == TASK
    assert console_errors(driver) == []


@needs_browser
def test_screenshots_of_the_task_and_a_run_page_are_not_blank(driver, site: Path, tmp_path: Path) -> None:
    # The script, as a user runs it (a fresh browser): the whole task page.
    assert shot.main([str(site), f"task-{TASK}.html", str(tmp_path / "task.png")]) == 0
    assert_not_blank(tmp_path / "task.png")
    # The helpers on the open browser: the first screen of a run page, and the whole of it (longer).
    open_page(driver, site, f"runs/{TASK}/{DROPOUT}/seed0.html")
    first = shot.screenshot(driver, tmp_path / "run-top.png", full_page=False)
    whole = shot.screenshot(driver, tmp_path / "run.png")
    assert_not_blank(first)
    assert_not_blank(whole)
    assert Image.open(whole).height > Image.open(first).height
    assert shot.main([str(site), "no-such-page.html", str(tmp_path / "none.png")]) == 2


@needs_browser
def test_a_sorted_filtered_view_is_a_link(driver, site: Path) -> None:
    from selenium.webdriver.common.by import By

    open_page(driver, site, f"task-{TASK}.html")
    nll = heads(driver, "cls/nll")
    driver.find_element(By.CSS_SELECTOR, '#board th[title="cls/nll"]').click()
    driver.find_element(By.CSS_SELECTOR, '#board th[title="cls/nll"]').click()  # descending
    box = driver.find_element(By.CSS_SELECTOR, '[data-filter-text="board"]')
    box.send_keys("laplace")
    link = driver.current_url
    assert "sort=board%3Acls%2Fnll%3Adesc" in link and "filter=laplace" in link
    # The link opened afresh shows the same view.
    driver.get(shot.page_url(site, "index.html"))  # another page first: the link must load the task page anew
    driver.get(link)
    shot.load_everything(driver)
    assert driver.find_element(By.CSS_SELECTOR, '#board th[title="cls/nll"]').get_attribute("aria-sort") == "descending"
    assert driver.find_element(By.CSS_SELECTOR, '[data-filter-text="board"]').get_attribute("value") == "laplace"
    assert visible_labels(driver) == [label for label in visible_labels(driver) if "laplace" in label] != []
    driver.find_element(By.CSS_SELECTOR, '[data-filter-text="board"]').clear()
    assert heads(driver, "cls/nll") == sorted(nll, key=float, reverse=True)
    assert console_errors(driver) == []
