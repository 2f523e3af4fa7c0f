"""A small workspace for app and report tests, built with the project's own code, and a headless Chromium.

`build_app_workspace(root, model_dir)` runs the real pipeline on a tiny random
GPT-2: cache activations into the store, train a small SAE and a transcoder on
them, write their feature tables, find a circuit and record a steering run,
each through the package that owns it, so every page reads real DuckDB files of
the real schemas. Parts whose package is missing are skipped (and the pages
then show their "run this first" message, which the tests check too).

`chromium(...)` starts Debian's chromium through chromedriver with the flags CI
needs; `wait_for_app(driver)` waits until Streamlit finished running the page;
`page_problems(driver)` lists exceptions and errors shown on the page.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, NamedTuple

CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1000")
ARTIFACTS = Path(os.environ.get("WORKBENCH_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))

PROMPTS = ["When Mary and John went to the store, John gave a drink to",
           "The war lasted from the year 1732 to the year 17"]


# ------------------------------------------------------------------------------------------ the workspace
SITE = "blocks.0.hook_resid_post"
TRANSCODER_IN, TRANSCODER_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
SAE, TRANSCODER = "fx-sae", "fx-transcoder"
HOSTILE_TEXT = "print('<script>alert(1)</script>') # <b>bold</b> & done"


class AppFixture(NamedTuple):
    root: Path
    model: str  # the tiny model's directory, as the workspace names it
    sae: str
    transcoder: str
    circuits: list[str]  # activation patching (per position) then path patching (edges)
    steering_run: str


_BUILT: dict[str, AppFixture] = {}


def app_workspace(tmp_path_factory, model_dir: Path) -> AppFixture:
    """The fixture workspace for `model_dir`, built once per test session however many modules ask for it."""
    key = str(model_dir)
    if key not in _BUILT:
        _BUILT[key] = build_app_workspace(tmp_path_factory.mktemp("app") / "ws", model_dir)
    return _BUILT[key]


def build_app_workspace(root: Path, model_dir: Path) -> AppFixture:
    """Build the fixture workspace under `root` from the tiny model at `model_dir`, through the real commands:
    cache -> train (SAE, transcoder) -> eval -> features -> circuit (two methods) -> steer."""
    from workbench.store import model_name

    root.mkdir(parents=True, exist_ok=True)
    model = model_name(str(model_dir))
    corpus = _corpus(root.parent / "fixture-corpus.txt")
    ws = ["--workspace", str(root)]
    _command(["cache", *ws, "--model", model, "--sites", f"{SITE},{TRANSCODER_IN},{TRANSCODER_OUT}", "--tokens", "6144",
              "--corpus", str(corpus), "--context", "64", "--batch-size", "16"])
    common = ["--model", model, "--tokens", "32768", "--batch-size", "256", "--log-every", "4", "--checkpoint-every", "10000"]
    _command(["train", *ws, *common, "--site", SITE, "--arch", "topk", "--d-sae", "96", "--k", "6", "--name", SAE])
    _command(["train", *ws, *common, "--site", TRANSCODER_IN, "--target", TRANSCODER_OUT, "--arch", "topk", "--d-sae", "64",
              "--k", "4", "--skip", "--name", TRANSCODER])
    _command(["eval", *ws, "--dictionary", f"{SAE},{TRANSCODER}", "--tokens", "2048", "--context", "64", "--batch-size", "8"])
    _command(["features", *ws, "--dictionary", f"{SAE},{TRANSCODER}", "--top", "6", "--quantiles", "4", "--samples", "2"])
    for method in ("activation", "path"):
        _command(["circuit", *ws, "--model", model, "--task", "ioi", "--method", method, "--n", "6", "--curve", "none"])
    _command(["steer", *ws, "--model", model, "--feature", f"{SAE}:3", "--coef", "4", "--prompt",
              "When Mary and John went to the store, John gave a drink to", "--max-new-tokens", "6", "--temperature", "0",
              "--sweep=-1,0,1,2", "--neutral-rows", "2"])
    from workbench.workspace import Workspace

    w = Workspace(root)
    circuits = w.sql("SELECT circuit_id FROM circuits ORDER BY method")["circuit_id"].tolist()
    run = w.sql("SELECT run_id FROM steering_runs")["run_id"].iloc[0]
    return AppFixture(w.root, model, SAE, TRANSCODER, circuits, run)


def _corpus(path: Path) -> Path:
    """A text corpus: documents of the reference corpus, with a line that is markup, to check escaping end to end."""
    from data.corpus import documents

    docs = [HOSTILE_TEXT] + list(_take(documents("reference"), 30)) + [HOSTILE_TEXT]
    path.write_text("\n\n".join(d.replace("\n\n", "\n") for d in docs))
    return path


def _command(argv: list[str]) -> None:
    import contextlib
    import io

    from workbench.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"`python -m workbench {' '.join(argv)}` failed with status {code} while building the app fixture")


def _take(iterable, n: int):
    for i, item in enumerate(iterable):
        if i == n:
            return
        yield item


# ------------------------------------------------------------------------------------------ the browser
def chromium_available() -> bool:
    return bool(shutil.which("chromium") and shutil.which("chromedriver"))


@contextlib.contextmanager
def chromium(offline: bool = False) -> Iterator:
    """A headless Chromium driven by chromedriver, with a fresh profile; `offline` cuts every network request."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="wb-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROME_FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    if offline:
        options.add_argument("--host-resolver-rules=MAP * ~NOTFOUND")
        options.add_argument("--proxy-server=http://127.0.0.1:9")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        if offline:
            driver.execute_cdp_cmd("Network.enable", {})
            driver.execute_cdp_cmd("Network.emulateNetworkConditions",
                                   {"offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0})
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for_app(driver, timeout: float = 90.0, settle: float = 0.6) -> None:
    """Wait until the Streamlit page finished its script run and stayed finished for `settle` seconds."""
    deadline = time.monotonic() + timeout
    idle_since = None
    while time.monotonic() < deadline:
        state = driver.execute_script(
            "const a = document.querySelector('[data-testid=\"stApp\"]');"
            "return a ? a.getAttribute('data-test-script-state') : null;")
        busy = driver.execute_script("return document.querySelectorAll('[data-testid=\"stStatusWidget\"]').length;")
        if state == "notRunning" and not busy:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since >= settle:
                return
        else:
            idle_since = None
        time.sleep(0.15)
    raise TimeoutError(f"the app page did not finish within {timeout} s (state {state!r})")


def wait_for_charts(driver, timeout: float = 60.0) -> dict | None:
    """Wait until a report page has drawn (or failed) every chart; return its `window.__charts` state."""
    deadline, state = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        state = driver.execute_script("return window.__charts")
        if state and state["drawn"] + len(state["failed"]) >= state["total"]:
            break
        time.sleep(0.2)
    return state


def page_problems(driver) -> list[str]:
    """Exceptions (tracebacks) and error boxes shown on the page, as text."""
    found = driver.execute_script(
        "return Array.from(document.querySelectorAll('[data-testid=\"stException\"], [data-testid=\"stAlertContentError\"], "
        "[role=\"dialog\"]')).map(e => e.innerText.slice(0, 500));")
    return list(found)


def screenshot(driver, test_name: str, name: str) -> Path:
    folder = ARTIFACTS / test_name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
