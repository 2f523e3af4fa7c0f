"""The demo: every step lands in the workspace, and what it reports matches what the workspace holds.

Run on the tiny GPT-2 (the reference model's own demo is what README's first
command runs; its steps are the same commands with larger sizes).
"""

from __future__ import annotations

import json

import pytest
import torch

from workbench.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, model_dirs):
    ws = tmp_path_factory.mktemp("demo") / "ws"
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["demo", "--workspace", str(ws), "--model", str(model_dirs["gpt2"]), "--n", "8", "--tokens", "8192", "--train-tokens", "16k",
                     "--d-sae", "64", "--k", "4", "--pairs", "4", "--no-app", "--json", "--device", "cpu"])
    assert code == 0
    return ws, json.loads(out.getvalue().strip().splitlines()[-1])


def test_demo_builds_every_table_it_reports(demo_run):
    from workbench.workspace import Workspace

    ws, summary = demo_run
    w = Workspace(ws)
    tasks = set(w.sql("SELECT DISTINCT task FROM model_behaviours")["task"])
    assert tasks == {"text", "induction", "ioi", "greater_than", "docstring"}
    catalog = w.sql("SELECT site, rows FROM activation_catalog")
    assert set(catalog["site"]) == {"blocks.1.hook_resid_post", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"}
    assert (catalog["rows"] >= 8192).all()
    assert set(w.sql("SELECT DISTINCT dictionary FROM features")["dictionary"]) == {"demo-sae", "demo-transcoder"}
    methods = w.sql("SELECT circuit_id, method FROM circuits")
    assert set(methods["method"]) == {"activation", "attribution", "relp"}
    assert set(summary["circuits"].values()) <= set(methods["circuit_id"])
    runs = w.sql("SELECT * FROM steering_runs")
    assert len(runs) == 1
    assert str(summary["steering_feature"]) in json.dumps(runs.iloc[0].to_dict(), default=str)


def test_demo_steering_feature_is_the_documented_choice(demo_run):
    """Oracle: recompute the choice from the features table with pandas, independently of the SQL in pick_feature:
    the live feature whose top promoted logit times its largest activation is largest, steered at twice that activation."""
    from workbench.demo import STEER_MULTIPLE
    from workbench.workspace import Workspace

    ws, summary = demo_run
    w = Workspace(ws)
    f = w.sql("SELECT * FROM features WHERE dictionary = 'demo-sae'")
    live = f[(f["density"] >= 0.001) & (f["density"] <= 0.1)].copy()
    if len(live):
        live["boost"] = [float(v[0]) * a for v, a in zip(live["promoted_logits"], live["max_activation"])]
        best = live.sort_values(["boost", "feature"], ascending=[False, True]).iloc[0]
    else:
        best = f.sort_values(["density", "feature"], ascending=[False, True]).iloc[0]
    assert summary["steering_feature"] == int(best["feature"])
    assert summary["steering_coef"] == pytest.approx(STEER_MULTIPLE * best["max_activation"], abs=0.01)
    assert w.sql("SELECT coef FROM steering_runs")["coef"].iloc[0] == pytest.approx(summary["steering_coef"])


def test_demo_behaviour_table_matches_a_fresh_measurement(demo_run, model_dirs):
    """The published IOI logit difference equals a fresh measurement of the same prompts through load_model."""
    from workbench.model import load_model
    from workbench.workspace import Workspace
    from workbench.zoo import measure_model

    ws, _ = demo_run
    rows = Workspace(ws).sql("SELECT value FROM model_behaviours WHERE task = 'ioi' AND figure = 'clean'")
    fresh = measure_model(load_model(model_dirs["gpt2"], device="cpu"), n=8)
    assert rows["value"].iloc[0] == pytest.approx(fresh.ioi.clean, abs=1e-5)
    assert torch.isfinite(torch.tensor(fresh.text_loss))


def test_demo_rejects_bad_sizes_in_one_line(tmp_path, capsys):
    code = main(["demo", "--workspace", str(tmp_path / "ws"), "--d-sae", "0", "--no-app"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --d-sae must be at least 1, got 0"]
    assert not (tmp_path / "ws" / "db").exists()


@pytest.mark.browser
def test_report_from_the_demo_workspace_renders_offline(demo_run, tmp_path):
    """The report of the workspace the demo built draws every chart in a browser with the network cut."""
    from tests.app_fixture import chromium, chromium_available, wait_for_charts
    from workbench.report import build_report
    from workbench.workspace import Workspace

    if not chromium_available():
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    ws, _ = demo_run
    result = build_report(Workspace(ws), tmp_path / "report.html", dictionary="demo-sae")
    assert result.charts >= 4
    with chromium(offline=True) as driver:
        driver.get(result.html.as_uri())
        assert wait_for_charts(driver) == {"total": result.charts, "drawn": result.charts, "failed": []}
        assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
        text = driver.execute_script("return document.body.innerText")
        assert "demo-sae" in text and "activation" in text  # the dictionary and the circuit methods the demo ran
