"""The app and the report in a real headless Chromium (Debian's chromium + chromedriver).

One Streamlit server (its own process, a free port) serves the fixture workspace;
the browser loads every page, follows deep links, and checks that no exception or
error box is shown; screenshots go to test-artifacts/<test>/ (or
$WORKBENCH_TEST_ARTIFACTS). The report is opened from disk with the network cut
off, and every chart must draw.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest

from tests.app_fixture import chromium, chromium_available, page_problems, screenshot, wait_for_app, wait_for_charts
from tests.test_app import app_fixture  # noqa: F401  (the session-scoped fixture workspace)

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not chromium_available(), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")]

PAGES = {
    "home": "",
    "training": "training",
    "dictionaries": "dictionaries",
    "features": "features",
    "prompt": "prompt",
    "attention": "attention",
    "circuits": "circuits",
    "steering": "steering",
    "sql": "sql",
    "reports": "reports",
}


@pytest.fixture(scope="module")
def server(app_fixture):  # noqa: F811
    from app.launch import start_app

    with start_app(app_fixture.root) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        driver.set_window_size(1400, 1800)
        yield driver


def visit(browser, url: str) -> list[str]:
    browser.get(url)
    wait_for_app(browser)
    return page_problems(browser)


def test_every_page_loads_without_exceptions(server, browser, app_fixture):  # noqa: F811
    for name, path in PAGES.items():
        assert visit(browser, f"{server.url}/{path}") == [], name
        title = browser.execute_script("const h = document.querySelector('h1'); return h ? h.innerText : ''")
        assert title, f"{name}: no page title"
        screenshot(browser, "test_every_page_loads_without_exceptions", name)


def test_deep_links_reopen_the_same_view(server, browser, app_fixture):  # noqa: F811
    url = f"{server.url}/features?dictionary={app_fixture.sae}&feature=7"
    assert visit(browser, url) == []
    heading = browser.execute_script("return Array.from(document.querySelectorAll('h3')).map(h => h.innerText).join('|')")
    assert f"Feature 7 · {app_fixture.sae}" in heading
    assert "feature=7" in browser.current_url and f"dictionary={app_fixture.sae}" in browser.current_url
    screenshot(browser, "test_deep_links_reopen_the_same_view", "feature-7")

    from workbench.workspace import Workspace

    circuit = app_fixture.circuits[1]
    node = Workspace(app_fixture.root).sql("SELECT node_id FROM circuit_nodes WHERE circuit_id = ? AND kind = 'mlp' "
                                           "ORDER BY node LIMIT 1", [circuit])["node_id"][0]
    assert visit(browser, f"{server.url}/circuits?circuit={circuit}&threshold=0.3&node={quote(node)}") == []
    chosen = browser.execute_script("return Array.from(document.querySelectorAll('[data-testid=\"stSelectbox\"] input'))"
                                    ".map(e => e.value).join('|')")
    assert circuit in chosen and node in chosen
    assert "threshold=0.3" in browser.current_url
    screenshot(browser, "test_deep_links_reopen_the_same_view", "circuit")


def test_bad_links_show_messages_not_tracebacks(server, browser, app_fixture):  # noqa: F811
    cases = {
        "missing-feature": (f"features?dictionary={app_fixture.sae}&feature=99999", "does not exist"),
        "missing-circuit": ("circuits?circuit=no-such-circuit", "not in this workspace"),
        "missing-dictionary": ("features?dictionary=no-such-dictionary", "not in this workspace"),
        "writing-sql": (f"sql?q={quote('DROP VIEW circuits')}", "refused"),
    }
    for name, (path, message) in cases.items():
        browser.get(f"{server.url}/{path}")
        wait_for_app(browser)
        body = browser.execute_script("return document.body.innerText")
        assert message in body, name
        assert not browser.find_elements("css selector", '[data-testid="stException"]'), name
        screenshot(browser, "test_bad_links_show_messages_not_tracebacks", name)


def test_report_renders_offline_with_every_chart(app_fixture, tmp_path):  # noqa: F811
    from workbench.report import build_report
    from workbench.workspace import Workspace

    ws = Workspace(app_fixture.root)
    marked = ws.sql("SELECT DISTINCT feature FROM feature_examples WHERE dictionary = ? AND "
                    "array_to_string(window_text, '') LIKE '%<script>%' ORDER BY feature LIMIT 2", [app_fixture.sae])["feature"]
    assert len(marked), "the fixture corpus's markup line should reach some feature's examples"
    result = build_report(ws, tmp_path / "report.html", dictionary=app_fixture.sae, features=[int(f) for f in marked])
    assert result.charts >= 4
    with chromium(offline=True) as driver:
        driver.set_window_size(1300, 2400)
        driver.get(result.html.as_uri())
        assert wait_for_charts(driver) == {"total": result.charts, "drawn": result.charts, "failed": []}
        assert driver.execute_script("return document.querySelectorAll('.chart svg').length") == result.charts
        assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0, "the report fetched something"
        text = driver.execute_script("return document.body.innerText")
        assert "<script>alert(1)" in text, "corpus text with markup is shown as text"
        assert driver.execute_script("return typeof window.alert_called") == "undefined"
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == []
        screenshot(driver, "test_report_renders_offline_with_every_chart", "report")
