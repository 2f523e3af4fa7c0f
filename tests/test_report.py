"""The exported report: escaping, contents against the workspace, the tables beside it, the CLI and its bad input.

(That it renders offline with every chart drawn is checked in a real browser in test_browser.py.)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import altair as alt
import pandas as pd
import pytest

from tests.test_app import app_fixture  # noqa: F401  (the session-scoped fixture workspace)
from workbench.report import Section, build_report, render_html, tokens_html

EVIL = "</script><script>window.pwned=1</script><b onmouseover=alert(1)>bold</b>&amp;"


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags(page: str) -> list[tuple[str, dict]]:
    parser = _Tags()
    parser.feed(page)
    return parser.tags


def _cli(*argv: str) -> tuple[int, str, str]:
    from workbench.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_model_and_corpus_text_stays_text():
    section = Section(EVIL).add_text(EVIL)
    section.add_table(pd.DataFrame({EVIL: [EVIL, 1.5]}))
    section.add_html(tokens_html([EVIL, " next"], [1.0, 0.0], titles=[EVIL, EVIL]))
    section.add_chart(alt.Chart(pd.DataFrame({"token": [EVIL, "b"], "v": [1, 2]})).mark_bar().encode(x="token:N", y="v:Q"))
    page = render_html(EVIL, [section], {EVIL: EVIL})
    tags = _tags(page)
    scripts = [t for t in tags if t[0] == "script"]
    assert len(scripts) == 3  # the vega bundle, one chart spec (application/json), the loader
    assert [t[1].get("type") for t in scripts] == ["text/javascript", "application/json", "text/javascript"]
    assert not any(t[0] == "b" for t in tags), "markup from the data became an element"
    assert "window.pwned=1</script>" not in page.split("<script type=\"application/json\"")[1].split("</script>")[0]
    assert page.count("&lt;/script&gt;&lt;script&gt;window.pwned=1") >= 5  # title, toc, heading, text, table, tokens, provenance


def test_report_covers_the_workspace_and_exports_its_tables(app_fixture, tmp_path):  # noqa: F811
    from workbench.workspace import Workspace

    ws = Workspace(app_fixture.root)
    result = build_report(ws, tmp_path / "out" / "full.html")
    titles = result.sections
    assert titles[:2] == ["Workspace", "Dictionaries compared"]
    for expected in (f"Dictionary {app_fixture.sae}", f"Features of {app_fixture.sae}", f"Dictionary {app_fixture.transcoder}",
                     *(f"Circuit {c}" for c in app_fixture.circuits), f"Steering run {app_fixture.steering_run}"):
        assert expected in titles
    data = result.data_dir
    for name in result.tables:
        parquet = pd.read_parquet(data / f"{name}.parquet")
        records = json.loads((data / f"{name}.json").read_text())
        assert len(parquet) == len(records)
    nodes = pd.read_parquet(data / f"circuit_{app_fixture.circuits[0]}_nodes.parquet")
    stored = ws.sql("SELECT node_id, score FROM circuit_nodes WHERE circuit_id = ?", [app_fixture.circuits[0]])
    assert sorted(nodes["node_id"]) == sorted(stored["node_id"])
    merged = nodes.merge(stored, on="node_id", suffixes=("", "_db"))
    assert (merged["score"] == merged["score_db"]).all()
    sweep = pd.read_parquet(data / f"steering_{app_fixture.steering_run}_sweep.parquet")
    assert sweep["coef"].tolist() == [-1.0, 0.0, 1.0, 2.0]
    meta = json.loads((data / "report.json").read_text())
    prov = meta["provenance"]
    assert prov["packages"]["duckdb"] and prov["workbench commit"] and prov["workspace"] == str(ws.root)
    weights = sorted(Path(app_fixture.model).glob("*.safetensors"))[0]
    assert prov[f"model {app_fixture.model}"]["weights sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert prov[f"dictionary {app_fixture.sae}"]["d_sae"] == 96
    assert result.charts >= 6


def test_report_command_selects_what_it_covers(app_fixture, tmp_path):  # noqa: F811
    out = tmp_path / "one.html"
    code, stdout, _ = _cli("report", "--workspace", str(app_fixture.root), "--dictionary", app_fixture.sae, "--circuit",
                           app_fixture.circuits[1], "--steering", app_fixture.steering_run, "--features", "2,5", "--out", str(out),
                           "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["sections"] == ["Workspace", f"Dictionary {app_fixture.sae}", f"Features of {app_fixture.sae}",
                                   f"Circuit {app_fixture.circuits[1]}", f"Steering run {app_fixture.steering_run}"]
    page = out.read_text()
    assert "<h3>Feature 2</h3>" in page and "<h3>Feature 5</h3>" in page and "<h3>Feature 3</h3>" not in page
    assert Path(summary["data_dir"], f"feature_{app_fixture.sae}_5_examples.parquet").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--dictionary", "nope"], "dictionary 'nope' is not in this workspace"),
    (["--circuit", "nope"], "circuit 'nope' is not in this workspace"),
    (["--steering", "nope"], "steering run 'nope' is not in this workspace"),
    (["--features", "a,b"], "--features takes comma-separated feature ids"),
    (["--dictionary", "fx-sae", "--features", "4000"], "feature 4000 is not in the feature tables of fx-sae"),
])
def test_report_bad_input_is_one_line_and_writes_nothing(app_fixture, tmp_path, argv, message):  # noqa: F811
    out = tmp_path / "bad.html"
    code, stdout, stderr = _cli("report", "--workspace", str(app_fixture.root), *argv, "--out", str(out))
    assert code == 1 and stdout == ""
    assert stderr.count("\n") == 1 and message in stderr
    assert list(tmp_path.iterdir()) == []


def test_report_on_a_missing_or_empty_workspace(tmp_path):
    code, _, stderr = _cli("report", "--workspace", str(tmp_path / "none"), "--out", str(tmp_path / "r.html"))
    assert code == 1 and "does not exist" in stderr and "python -m workbench demo" in stderr
    (tmp_path / "empty").mkdir()
    code, _, stderr = _cli("report", "--workspace", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html"))
    assert code == 1 and "empty" in stderr
    assert not (tmp_path / "r.html").exists()


def test_rewriting_a_report_replaces_it_whole(app_fixture, tmp_path):  # noqa: F811
    from workbench.workspace import Workspace

    ws = Workspace(app_fixture.root)
    first = build_report(ws, tmp_path / "r.html", circuit=app_fixture.circuits[0], dictionary=app_fixture.transcoder)
    second = build_report(ws, tmp_path / "r.html", steering=app_fixture.steering_run, dictionary=app_fixture.transcoder)
    assert first.data_dir == second.data_dir
    files = {p.stem for p in second.data_dir.glob("*.parquet")}
    assert files == set(second.tables)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r_data"]
