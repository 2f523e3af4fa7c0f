"""Every page of the app under Streamlit's AppTest, on a fixture workspace built by the real pipeline.

What a page shows is checked against an oracle where there is one: a fresh forward
pass for attention patterns and predictions, the dictionary's own encode for
features, the workspace tables for circuits, training curves and steering runs.
Bad input (no workspace, an empty one, deep links to things that do not exist,
SQL that writes) must give a message on the page and never an exception.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.app_fixture import AppFixture, app_workspace

APP = Path(__file__).resolve().parent.parent / "app.py"
PAGES = ("home", "training", "dictionaries", "features", "prompt", "attention", "circuits", "steering", "sql", "reports")


@pytest.fixture(scope="session")
def app_fixture(tmp_path_factory, model_dirs) -> AppFixture:
    return app_workspace(tmp_path_factory, model_dirs["gpt2"])


@pytest.fixture
def served(app_fixture, monkeypatch) -> AppFixture:
    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(app_fixture.root))
    return app_fixture


def open_page(page: str, timeout: float = 120, **params):
    """Run the app once (st.navigation registers the pages), switch to `page` with `params` in the URL, run it."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=timeout)
    at.run()
    if page != "home":
        at.switch_page(f"app/{page}.py")
    for key, value in params.items():
        at.query_params[key] = str(value)
    return at.run()


def problems(at) -> list[str]:
    return [e.value for e in at.exception] + [e.value for e in at.error]


def chart_data(at, index: int = 0):
    """The data frames behind the index-th Altair chart of the page (one per dataset)."""
    from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df

    chart = at.get("vega_lite_chart")[index]
    return [convert_arrow_bytes_to_pandas_df(d.data.data) for d in chart.proto.datasets]


def texts(at) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [w.value for w in at.warning]
    parts += [i.value for i in at.info] + [c.value for c in at.code]
    return "\n".join(str(p) for p in parts)


def page_links(at) -> list:
    return at.get("page_link")


# ------------------------------------------------------------------------------------------ every page
@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_without_errors(served, page):
    params = {"model": served.model} if page in ("prompt", "attention", "steering") else {}
    at = open_page(page, **params)
    assert not problems(at), problems(at)
    assert at.title and at.title[0].value


@pytest.mark.parametrize("page", [p for p in PAGES if p not in ("attention", "prompt")])
def test_missing_workspace_says_what_to_run(tmp_path, monkeypatch, page):
    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(tmp_path / "nowhere"))
    at = open_page(page)
    assert not problems(at), problems(at)
    assert "does not exist" in texts(at) and "python -m workbench demo" in texts(at)
    assert not (tmp_path / "nowhere").exists(), "the app must not create the workspace"


def test_empty_workspace_says_what_to_run(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(tmp_path / "empty"))
    for page in ("home", "features", "circuits", "sql"):
        at = open_page(page)
        assert not problems(at), problems(at)
        assert "empty" in texts(at) and "python -m workbench" in texts(at)
    assert list((tmp_path / "empty").iterdir()) == []


# ------------------------------------------------------------------------------------------ home
def test_home_lists_what_the_workspace_holds(served):
    at = open_page("home")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Dictionaries"] == "2" and metrics["Circuits"] == "2" and metrics["Steering runs"] == "1"
    shown = texts(at)
    assert served.sae in shown and served.transcoder in shown
    targets = {(link.proto.page, link.proto.query_string) for link in page_links(at)}
    for name in (served.sae, served.transcoder):
        assert ("features", f"dictionary={name}") in targets and ("training", f"runs={name}") in targets
    for circuit in served.circuits:
        assert ("circuits", f"circuit={circuit}") in targets
    assert ("steering", f"run={served.steering_run}") in targets


# ------------------------------------------------------------------------------------------ SQL
def test_sql_page_runs_read_only_queries_and_charts_them(served):
    at = open_page("sql", q="SELECT method, n_nodes FROM circuits ORDER BY method")
    assert not problems(at)
    frame = at.dataframe[0].value
    assert frame["method"].tolist() == ["activation", "path"]
    assert at.get("vega_lite_chart"), "a result with a numeric column gets a chart"
    assert at.query_params["q"] == "SELECT method, n_nodes FROM circuits ORDER BY method"


@pytest.mark.parametrize("query", ["DROP VIEW circuits", "COPY circuits TO '/tmp/wb-stolen.csv'", "ATTACH '/tmp/x.duckdb' AS x",
                                   "INSTALL httpfs", "SELECT * FROM read_csv('/etc/passwd')", "SELECT 1; DELETE FROM circuits"])
def test_sql_page_refuses_writes_with_a_message(served, query):
    before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(served.root).rglob("*") if p.is_file())
    at = open_page("sql", q=query)
    assert not at.exception
    assert at.error and ("refused" in at.error[0].value or "Permission" in at.error[0].value or "one statement" in at.error[0].value)
    after = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(served.root).rglob("*") if p.is_file())
    assert before == after
    assert not Path("/tmp/wb-stolen.csv").exists()


# ------------------------------------------------------------------------------------------ model pages
def test_attention_viewer_shows_the_models_own_patterns(served):
    from workbench.model import load_model

    prompt = "When Mary and John went to the store, John gave a drink to"
    at = open_page("attention", model=served.model, prompt=prompt, layer=1, head=2)
    assert not problems(at)
    shown = chart_data(at, 0)[0]
    model = load_model(served.model, device="cpu")
    with torch.no_grad():
        _, cache = model.run_with_cache(model.to_tokens(prompt), names_filter=["blocks.1.attn.hook_pattern"])
    oracle = cache["blocks.1.attn.hook_pattern"][0, 2].numpy()
    q = shown["query"].str.split("·").str[0].astype(int).to_numpy()
    k = shown["key"].str.split("·").str[0].astype(int).to_numpy()
    assert len(shown) == oracle.shape[0] * (oracle.shape[0] + 1) // 2
    np.testing.assert_allclose(shown["weight"].to_numpy(), oracle[q, k], atol=1e-5)
    assert at.query_params["layer"] == "1" and at.query_params["head"] == "2"


def test_attention_deep_link_out_of_range_warns(served):
    at = open_page("attention", model=served.model, layer=99, head=-3)
    assert not problems(at)
    warnings = " ".join(w.value for w in at.warning)
    assert "99" in warnings and "does not exist" in warnings


def test_prompt_explorer_predictions_match_a_fresh_forward(served):
    from workbench.model import load_model

    prompt = "When Mary and John went to the store, John gave a drink to"
    at = open_page("prompt", model=served.model, prompt=prompt, pos=5)
    assert not problems(at)
    bars = chart_data(at, 0)[0]
    model = load_model(served.model, device="cpu")
    with torch.no_grad():
        probs = model(model.to_tokens(prompt))[0, 5].softmax(-1)
    top = probs.topk(len(bars))
    np.testing.assert_allclose(np.sort(bars["probability"].to_numpy())[::-1], top.values.numpy(), rtol=1e-4)
    assert set(bars["id"]) == set(top.indices.tolist())


def test_prompt_explorer_features_link_to_their_dashboards(served):
    from sae import load_dictionary
    from workbench.model import load_model
    from workbench.workspace import Workspace

    prompt = "When Mary and John went to the store"
    at = open_page("prompt", model=served.model, prompt=prompt, dictionary=served.sae, pos=3)
    assert not problems(at)
    model = load_model(served.model, device="cpu")
    sae = load_dictionary(Workspace(served.root), served.sae)
    with torch.no_grad():
        _, cache = model.run_with_cache(model.to_tokens(prompt), names_filter=[sae.cfg.site])
        acts = sae.encode(cache[sae.cfg.site][0])  # [pos, d_sae]
    expected = {int(f) for f in torch.nonzero(acts[3] > 0).flatten()}
    links = [link for link in page_links(at) if "feature" in link.proto.label]
    linked = {int(link.proto.label.split()[1]) for link in links if "activation" in link.proto.label}
    assert linked and linked <= expected
    grid = chart_data(at, 1)[0]
    for row in grid.sample(min(10, len(grid)), random_state=0).itertuples():
        assert abs(row.activation - float(acts[row.pos, row.feature])) < 1e-4


# ------------------------------------------------------------------------------------------ circuits
def test_circuits_page_prunes_by_threshold_and_opens_nodes(served):
    from workbench.workspace import Workspace

    ws = Workspace(served.root)
    path = served.circuits[1]
    node = ws.sql("SELECT node_id, score FROM circuit_nodes WHERE circuit_id = ? AND kind = 'mlp' ORDER BY abs(score) DESC LIMIT 1", [path])
    at = open_page("circuits", circuit=path, threshold=0.2, node=node["node_id"][0])
    assert not problems(at)
    edges = ws.sql("SELECT weight FROM circuit_edges WHERE circuit_id = ?", [path])["weight"].abs()
    expected = int((edges >= 0.2 * edges.max()).sum())
    lines = chart_data(at, 0)
    assert any(len(d) == expected and "weight" in d for d in lines), ([len(d) for d in lines], expected)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Score"] == f"{node['score'][0]:.4g}" and metrics["Kind"] == "mlp"
    assert {m.label for m in at.metric} >= {"Pearson r", "Spearman ρ"}


def test_circuits_deep_link_to_a_missing_circuit_warns(served):
    at = open_page("circuits", circuit="no-such-circuit", node="L9H9")
    assert not problems(at)
    warnings = " ".join(w.value for w in at.warning)
    assert "no-such-circuit" in warnings and "not in this workspace" in warnings


# ------------------------------------------------------------------------------------------ training, dictionaries
def test_training_monitor_plots_the_logged_metrics(served):
    from workbench.workspace import Workspace

    at = open_page("training", runs=served.sae)
    assert not problems(at)
    logged = Workspace(served.root).sql("SELECT step, l0 FROM training_metrics WHERE dictionary = ? ORDER BY step", [served.sae])
    plotted = chart_data(at, 0)[0].sort_values("step")
    assert plotted["step"].tolist() == logged["step"].tolist()
    np.testing.assert_allclose(plotted["l0"], logged["l0"], rtol=1e-6)


def test_dictionaries_page_compares_runs(served):
    at = open_page("dictionaries", dictionary=served.transcoder)
    assert not problems(at)
    table = at.dataframe[0].value
    assert set(table["dictionary"]) == {served.sae, served.transcoder}
    assert {m.label: m.value for m in at.metric}["Features"] == "64"


# ------------------------------------------------------------------------------------------ steering
def test_steering_saved_run_shows_the_stored_generations(served):
    from workbench.workspace import Workspace

    at = open_page("steering", model=served.model, run=served.steering_run)
    assert not problems(at)
    stored = Workspace(served.root).sql("SELECT variant, prompt, text FROM steering_generations WHERE run_id = ?", [served.steering_run])
    shown = [c.value for c in at.code]
    for row in stored.itertuples():
        assert row.prompt + row.text in shown


def test_steering_playground_matches_side_by_side(served):
    from sae import load_dictionary
    from workbench.directions import feature_vector
    from workbench.interventions import ALL, Feature
    from workbench.model import load_model
    from workbench.steering import side_by_side
    from workbench.workspace import Workspace

    prompt = "When Mary and John went to the store"
    at = open_page("steering", model=served.model, source=served.sae, terms="5:6", prompt=prompt, tokens=5, temperature=0)
    assert not problems(at)
    model = load_model(served.model, device="cpu")
    feature = Feature.from_dictionary(load_dictionary(Workspace(served.root), served.sae), 5)
    pair = side_by_side(model, prompt, [feature_vector(feature).add(6.0, ALL)], max_new_tokens=5, temperature=0.0, seed=0)
    shown = [c.value for c in at.code]
    assert shown[0] == prompt + pair.baseline.text and shown[1] == prompt + pair.steered.text


# ------------------------------------------------------------------------------------------ reports
def test_reports_page_writes_the_report(served):
    at = open_page("reports", dictionary=served.sae)
    assert not problems(at)
    at.button[0].click().run()
    assert not problems(at), problems(at)
    written = sorted(Path(served.root, "reports").glob("*.html"))
    assert written and (written[-1].with_name(written[-1].stem + "_data") / "report.json").is_file()
    assert "Wrote" in at.success[0].value


# ------------------------------------------------------------------------------------------ URL state
def test_view_state_round_trips_through_the_url(served):
    """Change controls the way a user would; the URL then reopens exactly that view in a new session."""
    at = open_page("circuits", circuit=served.circuits[0])
    at.slider(key="url:threshold").set_value(0.35).run()
    at.toggle(key="url:kept").set_value(True).run()
    assert not problems(at)
    link = dict(at.query_params)
    assert link["threshold"] == "0.35" and link["kept"] == "1" and link["circuit"] == served.circuits[0]
    again = open_page("circuits", **link)
    assert again.slider(key="url:threshold").value == 0.35 and again.toggle(key="url:kept").value is True
    assert [m.value for m in again.metric] == [m.value for m in at.metric]

    at = open_page("features", dictionary=served.transcoder, feature=5)
    at.number_input(key="url:feature").set_value(9).run()
    at.text_input(key="url:promotes").input("a").run()
    assert at.query_params["feature"] == "9" and at.query_params["promotes"] == "a"
    again = open_page("features", **dict(at.query_params))
    assert again.number_input(key="url:feature").value == 9
    assert [m.value for m in again.metric] == [m.value for m in at.metric]


def test_feature_dashboard_shows_the_tables_rows(served):
    from workbench.workspace import Workspace

    ws = Workspace(served.root)
    row = ws.sql("SELECT * FROM features WHERE dictionary = ? AND feature = 11", [served.sae]).iloc[0]
    at = open_page("features", dictionary=served.sae, feature=11)
    assert not problems(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Density"] == f"{row['density']:.3%}" and metrics["Max activation"] == f"{row['max_activation']:.4g}"
    promoted = [d.value for d in at.dataframe if "logit" in d.value.columns][0]
    np.testing.assert_allclose(promoted["logit"].to_numpy(), np.asarray(row["promoted_logits"]), rtol=1e-6)
    similar = {int(link.proto.label.split(" · ")[0]) for link in page_links(at) if " · " in link.proto.label}
    assert similar == set(int(f) for f in row["similar_features"])
    top = ws.sql("SELECT window_text FROM feature_examples WHERE dictionary = ? AND feature = 11 AND kind = 'top' "
                 "ORDER BY activation DESC LIMIT 1", [served.sae])["window_text"][0]
    strip = [h.proto.body for h in at.get("html") if 'class="ex"' in h.proto.body][0]
    first_row = strip.split("</tr>")[0]
    shown_tokens = [html.unescape(t) for t in re.findall(r'<span class="tok"[^>]*>([^<]*)</span>', first_row)]
    assert shown_tokens == [t.replace("\r", "").replace("\n", "⏎").replace("\t", "⇥") or "∅" for t in top]


def test_feature_search_filters(served):
    from workbench.report import feature_search
    from workbench.workspace import Workspace

    ws = Workspace(served.root)
    at = open_page("features", dictionary=served.sae, text="def", dmin=-2)
    assert not problems(at)
    shown = at.dataframe[0].value
    expected = feature_search(ws, served.sae, text="def", min_log_density=-2.0)
    assert shown["feature"].tolist() == expected["feature"].tolist() and len(shown)
    matching = ws.sql("SELECT DISTINCT feature FROM feature_examples WHERE dictionary = ? AND kind = 'top' AND "
                      "array_to_string(window_text, '') ILIKE '%def%'", [served.sae])["feature"]
    assert set(shown["feature"]) <= set(matching)


def test_missing_feature_and_dictionary_links_warn(served):
    at = open_page("features", dictionary=served.sae, feature=5000)
    assert not problems(at)
    assert any("5000" in w.value and "does not exist" in w.value and "96 features" in w.value for w in at.warning)
    at = open_page("features", dictionary="no-such-dictionary")
    assert not problems(at)
    assert any("no-such-dictionary" in w.value and "not in this workspace" in w.value for w in at.warning)


@pytest.mark.parametrize("page, params, message", [
    ("steering", {"terms": "3 plus four"}, "write NAME:COEF"),
    ("steering", {"terms": "5000:4"}, "out of range"),
    ("steering", {"terms": "3:4", "targets": " Mary Mary Mary", "dose": 1}, "give single tokens"),
    ("steering", {"terms": "3:4", "targets": " Mary", "dose": 1, "sweep": "-1,x"}, "multipliers must be numbers"),
    ("attention", {"prompt": "a"}, None),
    ("prompt", {"prompt": "a", "dictionary": "fx-sae"}, None),
    ("sql", {"q": "SELEC 1"}, "does not parse"),
])
def test_bad_input_gives_a_message_not_a_traceback(served, page, params, message):
    at = open_page(page, model=served.model, **params)
    assert not at.exception, at.exception[0].value if at.exception else ""
    if message:
        assert any(message in e.value for e in at.error), [e.value for e in at.error]
    else:
        assert not at.error, [e.value for e in at.error]
