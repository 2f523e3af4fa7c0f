"""Reports: one self-contained HTML file that renders offline, plus the tables behind it.

`python -m workbench report [--dictionary NAME] [--circuit ID] [--steering ID] [--features 3,17] --out FILE.html`
(and the app's Reports page) writes:

    FILE.html          provenance, SAE evaluation, feature dashboards, circuits, steering results;
                       charts are Vega-Lite specs drawn by the Vega/Vega-Lite/vega-embed bundle
                       inlined once in the page (no CDN, no network)
    FILE_data/         every table the report shows, as Parquet and JSON, plus report.json
                       (provenance and the list of tables)

Escaping. Model and corpus text is data, never markup: every string that reaches
the page goes through `html.escape`, and every JSON blob inside a `<script>` has
`<`, `>` and `&` written as `\\u003c`, `\\u003e`, `\\u0026`, so a token that reads
`</script><script>…` stays text in tables, token strips and charts alike.

The module also holds what the app shares with the report, so both show the same
thing the same way:
- display helpers: `token_label`, `tokens_html` (escaped, shaded token strips);
- read-only views of a workspace: `read`/`read_many` (views built only for the tables a
  query names), `table_names`, `dictionary_summary`, `training_curves`, the
  in-memory `FeatureIndex` of a dictionary's feature tables (one read, then every
  dashboard and search is a lookup), and `activation_sample` (a dictionary's feature
  activations on a spread sample of the activation store, for histograms).

Layout of this file: display helpers; the page (sections, blocks, HTML); building a
report and its CLI; what goes in it; the shared views.
"""

from __future__ import annotations

import contextlib
import functools
import html
import json
import math
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, NamedTuple, Sequence

import pandas as pd

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from workbench.workspace import Workspace

# ------------------------------------------------------------------------------------------ display helpers
_VISIBLE = {" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍"}


def token_label(token: str) -> str:
    """A token as a short readable label: leading/trailing whitespace made visible (' the' -> '␣the')."""
    if token == "":
        return "∅"
    stripped = token.strip(" \n\t\r")
    if stripped == token:
        return token
    lead = token[: len(token) - len(token.lstrip(" \n\t\r"))]
    trail = token[len(token.rstrip(" \n\t\r")):] if stripped else ""
    return "".join(_VISIBLE[c] for c in lead) + stripped + "".join(_VISIBLE[c] for c in trail)


def tokens_html(tokens: Sequence[str], values: Sequence[float] | None = None, *, scale: float | None = None,
                focus: int | None = None, titles: Sequence[str] | None = None, color: str = "255,120,0") -> str:
    """Tokens as escaped inline spans, each shaded by its value (0 -> clear, `scale` -> full colour).

    `focus` outlines one position (the token a feature fired on); `titles`
    become hover text. Spaces stay spaces; line breaks and tabs show as ⏎ and ⇥.
    """
    values = list(values) if values is not None else [0.0] * len(tokens)
    peak = scale if scale and scale > 0 else max([abs(v) for v in values] + [1e-9])
    spans = []
    for i, (tok, value) in enumerate(zip(tokens, values)):
        alpha = 0.0 if not math.isfinite(value) else min(1.0, abs(value) / peak)
        tint = color if value >= 0 else "40,110,255"
        title = titles[i] if titles is not None else f"{value:.3g}"
        border = "outline:2px solid #222;" if i == focus else ""
        spans.append(f'<span class="tok" style="background:rgba({tint},{alpha:.2f});{border}" '
                     f'title="{html.escape(title, quote=True)}">{html.escape(_strip_text(tok))}</span>')
    return '<span class="toks">' + "".join(spans) + "</span>"


TOKENS_CSS = (".toks{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:0.85em;line-height:1.9;white-space:pre-wrap}"
              ".tok{padding:1px 0;border-radius:2px}")


def _strip_text(token: str) -> str:
    """A token as it reads inside running text: spaces kept, line breaks and tabs shown as marks."""
    if token == "":
        return "∅"
    return token.replace("\r", "").replace("\n", "⏎").replace("\t", "⇥")


def script_json(obj: Any) -> str:
    """JSON safe to place inside a <script> element: no '<', '>' or '&' survive as themselves."""
    text = json.dumps(obj, default=_json_default, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


# ------------------------------------------------------------------------------------------ the page
@dataclass
class Block:
    """One piece of a section: exactly one of text (escaped), html (already safe), table, chart."""

    text: str | None = None
    html: str | None = None
    table: pd.DataFrame | None = None
    chart: dict | None = None  # a Vega-Lite spec (alt.Chart.to_dict())
    caption: str | None = None
    name: str | None = None  # a table's file name under FILE_data/ (tables without one are not exported)


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)
    anchor: str = ""
    exports: dict = field(default_factory=dict)  # name -> full DataFrame written beside the report

    def add_text(self, text: str) -> "Section":
        self.blocks.append(Block(text=text))
        return self

    def add_table(self, frame: pd.DataFrame, caption: str | None = None, *, name: str | None = None,
                  max_rows: int = 200) -> "Section":
        """A table: the first `max_rows` rows on the page, all of them in FILE_data/<name>.parquet and .json."""
        shown = frame.head(max_rows)
        if len(frame) > max_rows:
            caption = (caption + " " if caption else "") + f"(first {max_rows} of {len(frame):,} rows; all in {name or 'the data folder'})"
        self.blocks.append(Block(table=shown, caption=caption, name=name))
        if name:
            self.exports[name] = frame
        return self

    def add_chart(self, chart, caption: str | None = None) -> "Section":
        """`chart` is an Altair chart (or a ready Vega-Lite dict); its data is inlined into the spec."""
        self.blocks.append(Block(chart=chart_spec(chart), caption=caption))
        return self

    def add_html(self, safe_html: str, caption: str | None = None) -> "Section":
        """Markup built here from escaped pieces (e.g. `tokens_html`); never raw model or corpus text."""
        self.blocks.append(Block(html=safe_html, caption=caption))
        return self


def chart_spec(chart) -> dict:
    """A Vega-Lite spec with its data inlined (no row limit), from an Altair chart or a dict."""
    if isinstance(chart, dict):
        return chart
    import altair as alt

    with alt.data_transformers.enable("default", max_rows=None):
        return chart.to_dict()


def render_html(title: str, sections: Iterable[Section], provenance: dict | None = None) -> str:
    """The whole report as one HTML document; charts are drawn by the inlined vega-embed bundle."""
    sections = list(sections)
    charts: list[dict] = []
    body = [f"<h1>{html.escape(title)}</h1>", _toc(sections)]
    if provenance:
        body.append(_provenance_html(provenance))
    for i, section in enumerate(sections):
        section.anchor = section.anchor or f"s{i}"
        body.append(f'<section id="{section.anchor}"><h2>{html.escape(section.title)}</h2>')
        for block in section.blocks:
            body.append(_block_html(block, charts))
        body.append("</section>")
    specs = "".join(f'<script type="application/json" id="spec-{i}">{script_json(s)}</script>' for i, s in enumerate(charts))
    script = _vega_bundle() if charts else ""
    return _PAGE.format(title=html.escape(title), css=_CSS + TOKENS_CSS, body="\n".join(body), specs=specs,
                        bundle=script, n_charts=len(charts))


def _block_html(block: Block, charts: list[dict]) -> str:
    caption = f'<p class="caption">{html.escape(block.caption)}</p>' if block.caption else ""
    if block.text is not None:
        return "".join(f"<p>{html.escape(p)}</p>" for p in block.text.split("\n\n")) + caption
    if block.html is not None:
        return f'<div class="html">{block.html}</div>{caption}'
    if block.table is not None:
        return f'<div class="table">{_table_html(block.table)}</div>{caption}'
    charts.append(block.chart)
    return f'<div class="chart" id="chart-{len(charts) - 1}"></div>{caption}'


def _table_html(frame: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        if value is None or (not isinstance(value, (list, tuple, dict, str, bytes)) and pd.isna(value)):
            return ""
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.4g}"
        if isinstance(value, (list, tuple)):
            return html.escape(", ".join(str(v) for v in value))
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _toc(sections: list[Section]) -> str:
    items = "".join(f'<li><a href="#{s.anchor or f"s{i}"}">{html.escape(s.title)}</a></li>' for i, s in enumerate(sections))
    return f'<nav><ol>{items}</ol></nav>'


def _provenance_html(provenance: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td><code>{html.escape(v if isinstance(v, str) else json.dumps(v, default=str))}</code></td></tr>"
                   for k, v in provenance.items())
    return f'<section id="provenance"><h2>Provenance</h2><table class="prov">{rows}</table></section>'


@functools.lru_cache(maxsize=1)
def _vega_bundle() -> str:
    """vega + vega-lite + vega-embed as one script, from vl-convert (the bundle Altair's inline HTML uses)."""
    import vl_convert
    from altair.utils._importers import vl_version_for_vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=vl_version_for_vl_convert())
    return bundle.replace("</script", "<\\/script")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#1f2328}
h1{font-size:1.7em}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.4em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}th,td{border:1px solid #d0d7de;padding:3px 7px;text-align:left;vertical-align:top}
thead th{background:#f6f8fa}.table{overflow-x:auto}.caption{color:#57606a;font-size:.85em;margin-top:.2em}
.prov th{background:#f6f8fa;white-space:nowrap}.prov code{white-space:pre-wrap;word-break:break-word}
.chart{margin:.6em 0}nav ol{columns:2}.html{margin:.4em 0}
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{css}</style>
<script type="text/javascript">{bundle}</script>
</head><body>
{body}
{specs}
<script type="text/javascript">
(function () {{
  var drawn = 0, failed = [];
  window.__charts = {{total: {n_charts}, drawn: 0, failed: failed}};
  for (var i = 0; i < {n_charts}; i++) {{
    var spec = JSON.parse(document.getElementById("spec-" + i).textContent);
    vegaEmbed("#chart-" + i, spec, {{actions: false, renderer: "svg"}})
      .then(function () {{ window.__charts.drawn = ++drawn; }})
      .catch(function (err) {{ failed.push(String(err)); console.error(err); }});
  }}
}})();
</script>
</body></html>
"""


# ------------------------------------------------------------------------------------------ building a report
class ReportResult(NamedTuple):
    html: Path
    data_dir: Path
    sections: list[str]
    tables: list[str]
    charts: int


def build_report(workspace: "Workspace", out: str | os.PathLike, *, dictionary: str | None = None,
                 circuit: str | None = None, steering: str | None = None, features: Sequence[int] | None = None,
                 title: str | None = None) -> ReportResult:
    """Write the report for `workspace` to `out` (HTML) and `<out stem>_data/` (tables, report.json).

    With no selection the report covers everything the workspace holds (a few of
    each kind); `dictionary`, `circuit` and `steering` narrow it to those, and
    `features` picks the feature dashboards shown for the dictionary.
    """
    ws = workspace
    if not ws.exists():
        raise WorkbenchError(f"workspace {ws.root} does not exist; build one first with `python -m workbench demo --workspace {ws.root}`")
    if ws.is_empty():
        raise WorkbenchError(f"workspace {ws.root} is empty: nothing to report yet (run `python -m workbench demo` or a cache/train job first)")
    out = Path(out).expanduser().resolve()
    with shared_connection(ws):
        selection = _Selection.of(ws, dictionary, circuit, steering, features)
        sections = [s for s in _sections(ws, selection) if s.blocks]
        prov = provenance(ws, selection)
    page = render_html(title or f"Workbench report: {ws.root.name}", sections, prov)
    data_dir = out.with_name(out.stem + "_data")
    tables = _write_outputs(out, data_dir, page, sections, prov)
    n_charts = sum(1 for s in sections for b in s.blocks if b.chart is not None)
    return ReportResult(out, data_dir, [s.title for s in sections], tables, n_charts)


def provenance(ws: "Workspace", selection: "_Selection | None" = None) -> dict:
    """Where every number came from: code version, library versions, workspace, models, data, parameters."""
    import datetime
    import platform

    prov: dict[str, Any] = {
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "workbench commit": _git_commit(),
        "workspace": str(ws.root),
        "python": platform.python_version(),
        "packages": _versions(),
    }
    models = selection.models if selection else []
    for name in models:
        prov[f"model {name}"] = _model_summary(name)
    if selection:
        prov.update(selection.parameters)
    return prov


def configure_report(parser) -> None:
    parser.add_argument("--dictionary", help="dictionary to report on (default: every dictionary, briefly)")
    parser.add_argument("--circuit", help="circuit id to include (default: every circuit)")
    parser.add_argument("--steering", help="steering run id to include (default: every steering run)")
    parser.add_argument("--features", default=None,
                        help="comma-separated feature ids whose dashboards to include (default: a few of the most active)")
    parser.add_argument("--title", default=None, help="report title")
    parser.add_argument("--out", required=True, help="the HTML file to write; tables go to <out stem>_data/")


def run_report(args) -> dict:
    from workbench.workspace import Workspace

    features = _parse_features(args.features)
    result = build_report(Workspace(args.workspace), args.out, dictionary=args.dictionary, circuit=args.circuit,
                          steering=args.steering, features=features, title=args.title)
    print(f"wrote {result.html} ({result.charts} charts) and {len(result.tables)} tables under {result.data_dir}", file=sys.stderr)
    return {"html": str(result.html), "data_dir": str(result.data_dir), "sections": result.sections,
            "tables": result.tables, "charts": result.charts}


def _parse_features(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise WorkbenchError(f"--features takes comma-separated feature ids (e.g. 3,17,40), not {text!r}") from None


def _write_outputs(out: Path, data_dir: Path, page: str, sections: list[Section], prov: dict) -> list[str]:
    """The data folder is built under a temporary name and swapped in; the HTML is replaced atomically."""
    import shutil
    import uuid

    from workbench.workspace import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = data_dir.with_name(f".{data_dir.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    names: list[str] = []
    try:
        for section in sections:
            for name, frame in section.exports.items():
                _write_table(tmp, name, frame)
                names.append(name)
        (tmp / "report.json").write_text(json.dumps({"provenance": prov, "sections": [s.title for s in sections],
                                                     "tables": names, "html": out.name}, indent=1, default=_json_default))
        old = data_dir.with_name(f".{data_dir.name}.{uuid.uuid4().hex[:8]}.old")
        if data_dir.exists():
            data_dir.rename(old)
        tmp.rename(data_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(out, page)
    return names


def _write_table(folder: Path, name: str, frame: pd.DataFrame) -> None:
    frame = frame.reset_index(drop=True)
    frame.to_parquet(folder / f"{name}.parquet", index=False)
    (folder / f"{name}.json").write_text(frame.to_json(orient="records", default_handler=str))


def _git_commit() -> str:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return (commit or "unknown") + (" (with uncommitted changes)" if dirty else "")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformer-lens", "transformers", "duckdb", "numpy", "pandas", "pyarrow", "streamlit",
                    "altair", "vl-convert-python"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def _model_summary(name: str) -> dict:
    """The model's architecture numbers from its config.json, and the identity of its weights file."""
    from workbench.model import resolve_model_dir

    try:
        directory = resolve_model_dir(name)
    except WorkbenchError as e:
        return {"error": str(e)}
    config = json.loads((directory / "config.json").read_text())
    keys = ("model_type", "architectures", "n_layer", "num_hidden_layers", "n_embd", "hidden_size", "n_head",
            "num_attention_heads", "vocab_size", "n_positions", "max_position_embeddings")
    summary = {"directory": str(directory), **{k: config[k] for k in keys if k in config}}
    weights = sorted(directory.glob("*.safetensors"))
    if weights:
        summary["weights sha256"] = _sha256(weights[0]) if weights[0].stat().st_size < 600_000_000 else "(large; not hashed)"
    return summary


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ what goes in
@dataclass
class _Selection:
    """What the report covers, checked against the workspace: unknown names fail with the list of known ones."""

    dictionaries: list[str]
    circuits: list[str]
    steering: list[str]
    features: list[int] | None
    models: list[str]
    parameters: dict

    @classmethod
    def of(cls, ws: "Workspace", dictionary, circuit, steering, features) -> "_Selection":
        names = ws.dictionary_names()
        dictionaries = [_known(dictionary, names, "dictionary")] if dictionary else names[:MAX_EACH]
        circuits = _ids(ws, "circuits", "circuit_id")
        steering_runs = _ids(ws, "steering_runs", "run_id")
        chosen_circuits = [_known(circuit, circuits, "circuit")] if circuit else circuits[:MAX_EACH]
        chosen_steering = [_known(steering, steering_runs, "steering run")] if steering else steering_runs[:MAX_EACH]
        parameters, models = {}, []
        for name in dictionaries:
            cfg = _dictionary_cfg(ws, name)
            parameters[f"dictionary {name}"] = cfg
            models.append(cfg.get("model"))
        if CATALOG_TABLE in table_names(ws):
            catalog = read(ws, f"SELECT * EXCLUDE (path) FROM {CATALOG_TABLE}")
            parameters["activation cache"] = catalog.to_dict(orient="records")
            models += list(catalog["model"]) if "model" in catalog else []
        models = [m for m in dict.fromkeys(models) if m]
        return cls(dictionaries, chosen_circuits, chosen_steering, list(features) if features else None, models, parameters)


MAX_EACH = 5
CATALOG_TABLE = "activation_catalog"  # workbench.store.CATALOG_TABLE


def _known(name: str, known: list[str], what: str) -> str:
    if name not in known:
        listing = ", ".join(known[:20]) if known else "none"
        raise WorkbenchError(f"{what} {name!r} is not in this workspace (it has: {listing})")
    return name


def _ids(ws: "Workspace", table: str, column: str) -> list[str]:
    if table not in table_names(ws):
        return []
    return [str(v) for v in read(ws, f'SELECT DISTINCT "{column}" FROM "{table}" ORDER BY 1')[column]]


def _dictionary_cfg(ws: "Workspace", name: str) -> dict:
    try:
        return json.loads((ws.dictionaries_dir / name / "cfg.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _sections(ws: "Workspace", selection: _Selection) -> Iterable[Section]:
    yield _overview_section(ws)
    if len(selection.dictionaries) > 1:
        yield _comparison_section(ws)
    for name in selection.dictionaries:
        yield _dictionary_section(ws, name)
        yield _features_section(ws, name, selection.features)
    for circuit_id in selection.circuits:
        yield _circuit_section(ws, circuit_id)
    for run_id in selection.steering:
        yield _steering_section(ws, run_id)


def _overview_section(ws: "Workspace") -> Section:
    section = Section("Workspace")
    present = table_names(ws)
    if CATALOG_TABLE in present:
        section.add_table(read(ws, f"SELECT * EXCLUDE (path) FROM {CATALOG_TABLE}"), "Cached activations: one row per model, run and site.",
                          name="activation_catalog")
    if "model_behaviours" in present:
        section.add_table(read(ws, "SELECT * FROM model_behaviours"), "Model behaviour on the task suite.", name="model_behaviours")
    counts = pd.DataFrame([(t, int(read(ws, f'SELECT count(*) AS n FROM "{t}"')["n"].iloc[0])) for t in present],
                          columns=["table", "rows"])
    section.add_table(counts, "Every table in the workspace.", name="tables")
    return section


def _comparison_section(ws: "Workspace") -> Section:
    import altair as alt

    section = Section("Dictionaries compared")
    summary = dictionary_summary(ws)
    section.add_table(summary, "Every dictionary: configuration, final training figures, evaluation.", name="dictionaries")
    y = "loss_recovered" if "loss_recovered" in summary and summary["loss_recovered"].notna().any() else "explained_variance"
    plotted = summary.dropna(subset=["l0", y]) if "l0" in summary and y in summary else summary.iloc[:0]
    if len(plotted):
        section.add_chart(alt.Chart(plotted).mark_point(size=90, filled=True).encode(
            x=alt.X("l0:Q", title="L0 (active features per token)"), y=alt.Y(f"{y}:Q", scale=alt.Scale(zero=False)),
            color="arch:N", tooltip=["dictionary", "arch", "site", "l0", y]).properties(width=520, height=320),
            f"Sparsity against fidelity: L0 and {y.replace('_', ' ')}, by architecture.")
    return section


def _dictionary_section(ws: "Workspace", name: str) -> Section:
    section = Section(f"Dictionary {name}")
    cfg = _dictionary_cfg(ws, name)
    summary = dictionary_summary(ws)
    row = summary[summary["dictionary"] == name]
    if len(row):
        figures = row.iloc[0].dropna()
        section.add_table(pd.DataFrame({"measure": figures.index, "value": [str(v) for v in figures.values]}),
                          "Evaluation and final training figures.", name=f"dictionary_{name}_summary")
    section.add_table(pd.DataFrame([{"field": k, "value": json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}
                                    for k, v in cfg.items()]), "Configuration (cfg.json), including the training parameters and seeds.")
    curves = training_curves(ws, name)
    if curves is not None and len(curves):
        section.add_chart(_curves_chart(curves), "Training: loss, L0, explained variance and dead fraction by step.")
        section.exports[f"training_metrics_{name}"] = curves
    return section


def training_curves(ws: "Workspace", dictionary: str) -> pd.DataFrame | None:
    """A dictionary's logged training metrics by step (explained variance = 1 - FVU), or None before any."""
    if "training_metrics" not in table_names(ws):
        return None
    return read(ws, "SELECT step, tokens, loss, l0, 1 - fvu AS explained_variance, dead_fraction, lr FROM training_metrics "
                  "WHERE dictionary = ? ORDER BY step", [dictionary])


def _curves_chart(curves: pd.DataFrame):
    import altair as alt

    long = curves.melt(id_vars=["step"], value_vars=["loss", "l0", "explained_variance", "dead_fraction"], var_name="measure")
    return alt.Chart(long).mark_line().encode(x="step:Q", y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False)),
                                              tooltip=["step", "measure", "value"]).properties(width=250, height=150).facet(
        facet="measure:N", columns=4).resolve_scale(y="independent")


DEFAULT_FEATURES = 4


def _features_section(ws: "Workspace", name: str, features: Sequence[int] | None) -> Section:
    """The density histogram of every feature, then one dashboard per selected feature (default: the strongest)."""
    import altair as alt

    section = Section(f"Features of {name}")
    index = feature_index(ws, name)
    density = index.density() if index is not None else None
    if density is None:
        section.add_text(f"No feature tables yet (run `python -m workbench features --dictionary {name}`).")
        return section
    alive = density.dropna(subset=["log10_density"])
    section.add_chart(alt.Chart(alive).mark_bar().encode(
        x=alt.X("log10_density:Q", bin=alt.Bin(maxbins=40), title="log10 density"), y=alt.Y("count():Q", title="features")
    ).properties(width=520, height=200), f"Feature density: {len(density) - len(alive)} of {len(density)} features never fired.")
    chosen = list(features) if features else index.search(sort="max activation", limit=DEFAULT_FEATURES)["feature"].tolist()
    sample = activation_sample(ws, name) if chosen else None
    for feature in chosen:
        data = index.dashboard(int(feature))
        if data is None:
            raise WorkbenchError(f"feature {feature} is not in the feature tables of {name} (it has {len(density)} features)")
        _feature_blocks(section, name, int(feature), data, sample)
    return section


def _feature_blocks(section: Section, name: str, feature: int, data: FeatureDashboard, sample: ActivationSample | None) -> None:
    import altair as alt

    row = data.row
    section.add_html(f"<h3>Feature {feature}</h3>")
    stats = {"density": row["density"], "mean activation": row["mean_activation"], "max activation": row["max_activation"],
             "density percentile": data.density_rank, "tokens scanned": row["tokens"]}
    section.add_table(pd.DataFrame({"measure": list(stats), "value": list(stats.values())}))
    if sample is not None and len(sample.of(feature)):
        section.add_chart(alt.Chart(pd.DataFrame({"activation": sample.of(feature)})).mark_bar(color="#f28e2b").encode(
            x=alt.X("activation:Q", bin=alt.Bin(maxbins=30)), y=alt.Y("count():Q", title="tokens")).properties(width=420, height=160),
            f"Activation histogram on {sample.tokens:,} sampled tokens ({sample.source}).")
    for title, frame in (("Top activations", data.top), ("Quantile samples", data.quantiles)):
        if len(frame):
            rows = "".join(f"<tr><td>{a:.3f}</td><td>{tokens_html(list(t), list(v), scale=row['max_activation'], focus=int(c))}</td></tr>"
                           for a, t, v, c in zip(frame["activation"], frame["window_text"], frame["window_activations"], frame["center"]))
            section.add_html(f"<p><b>{title}</b></p><table>{rows}</table>")
    for key in ("promoted", "suppressed"):
        tokens = row.get(f"{key}_tokens")
        if tokens:
            section.add_table(pd.DataFrame({"token": [token_label(t) for t in tokens], "logit": row[f"{key}_logits"]}),
                              f"{key.capitalize()} tokens (direct logit effect of the decoder direction).")
    similar = ", ".join(f"{f} ({c:.2f})" for f, c in zip(row.get("similar_features") or [], row.get("similar_cosines") or []))
    if similar:
        section.add_text(f"Most similar features (decoder cosine): {similar}.")
    examples = pd.concat([data.top, data.quantiles], ignore_index=True)
    if len(examples):
        section.exports[f"feature_{name}_{feature}_examples"] = examples.drop(columns=["window_tokens"], errors="ignore")


def _circuit_section(ws: "Workspace", circuit_id: str) -> Section:
    import altair as alt

    section = Section(f"Circuit {circuit_id}")
    head = read(ws, "SELECT * FROM circuits WHERE circuit_id = ?", [circuit_id]).iloc[0]
    details = {k: head[k] for k in ("model", "task", "method", "metric", "granularity", "n_prompts", "n_nodes", "n_edges",
                                    "clean_metric", "corrupt_metric", "runtime_s", "prompt", "params")}
    section.add_table(pd.DataFrame({"field": list(details), "value": [str(v) for v in details.values()]}),
                      "How the circuit was found (scores: denoising convention, positive = carries the behaviour).")
    nodes = read(ws, "SELECT * FROM circuit_nodes WHERE circuit_id = ? ORDER BY abs(score) DESC", [circuit_id])
    section.add_table(nodes[["node_id", "kind", "layer", "pos", "head", "feature", "dictionary", "score", "in_circuit"]],
                      "Nodes by |score|.", name=f"circuit_{circuit_id}_nodes", max_rows=30)
    components = nodes.groupby("component", as_index=False)["score"].sum()
    components = components.reindex(components["score"].abs().sort_values(ascending=False).index).head(30)
    section.add_chart(alt.Chart(components).mark_bar().encode(
        x=alt.X("score:Q"), y=alt.Y("component:N", sort="-x"),
        color=alt.condition("datum.score >= 0", alt.value("#2f6fdb"), alt.value("#d6452c")),
        tooltip=["component", "score"]).properties(width=520), "Component scores summed over positions (top 30 by |score|).")
    if "circuit_edges" in table_names(ws) and int(head["n_edges"]):
        edges = read(ws, "SELECT source_id, target_id, weight, in_circuit FROM circuit_edges WHERE circuit_id = ? "
                       "ORDER BY abs(weight) DESC", [circuit_id])
        section.add_table(edges, "Edges by |weight| (rows: source → target).", name=f"circuit_{circuit_id}_edges", max_rows=30)
    if "circuit_curves" in table_names(ws):
        curves = read(ws, "SELECT * FROM circuit_curves WHERE circuit_id = ?", [circuit_id])
        if len(curves):
            section.add_table(curves, "Faithfulness curve.", name=f"circuit_{circuit_id}_curves", max_rows=50)
    return section


def _steering_section(ws: "Workspace", run_id: str) -> Section:
    import altair as alt

    section = Section(f"Steering run {run_id}")
    run = read(ws, "SELECT * FROM steering_runs WHERE run_id = ?", [run_id]).iloc[0]
    section.add_table(pd.DataFrame({"field": run.index, "value": [str(v) for v in run.values]}),
                      "Parameters and effects (target: the target tokens after each prompt; KL and CE increase: on neutral text).",
                      name=f"steering_{run_id}_run")
    generations = read(ws, "SELECT prompt_index, prompt, variant, text FROM steering_generations WHERE run_id = ? "
                         "ORDER BY prompt_index, variant", [run_id])
    if len(generations):
        wide = generations.pivot_table(index=["prompt_index", "prompt"], columns="variant", values="text", aggfunc="first").reset_index()
        section.add_table(wide, "Baseline and steered continuations (same seed).", name=f"steering_{run_id}_generations")
    sweep = read(ws, "SELECT * FROM steering_sweeps WHERE run_id = ? ORDER BY coef", [run_id])
    if len(sweep):
        measures = [c for c in ("target_prob", "feature_act", "kl", "ce_increase", "metric") if sweep[c].notna().any()]
        long = sweep.melt(id_vars=["coef"], value_vars=measures, var_name="measure").dropna()
        section.add_chart(alt.Chart(long).mark_line(point=True).encode(
            x="coef:Q", y=alt.Y("value:Q", title=None), tooltip=["coef", "measure", "value"]).properties(width=250, height=160).facet(
            facet="measure:N", columns=3).resolve_scale(y="independent"), "Dose-response: each measure against the coefficient.")
        section.exports[f"steering_{run_id}_sweep"] = sweep
    return section


# ------------------------------------------------------------------------------------------ views of a workspace
# Read-only summaries shared by the app's pages and the report, so both show the same numbers.
_SHARED = threading.local()


@contextlib.contextmanager
def shared_connection(ws: "Workspace") -> Iterator[None]:
    """Within this block the reads below share one connection to `ws` (every view built once), for a batch job
    such as writing a report; published files are never written again, so holding it blocks no one."""
    with ws.connect() as con:
        _SHARED.con, _SHARED.root = con, ws.root
        try:
            yield
        finally:
            _SHARED.con = None


def _shared(ws: "Workspace"):
    con = getattr(_SHARED, "con", None)
    return con if con is not None and _SHARED.root == ws.root else None


def read(ws: "Workspace", query: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
    """`ws.sql`, with views built only for the tables the query names (a view over many training-metric
    shards costs a read of every shard's footer); falls back to every view if the query needs more."""
    import duckdb

    if (con := _shared(ws)) is not None:
        return con.execute(query, list(params or [])).df()
    names = referenced(query)
    try:
        with ws.connect(tables=names) as con:
            return con.execute(query, list(params or [])).df()
    except duckdb.CatalogException:
        return ws.sql(query, list(params or []))


def read_many(ws: "Workspace", queries: Sequence[str | tuple[str, Sequence[Any]]]) -> list[pd.DataFrame]:
    """Several queries (text, or (text, params)) on one connection: one attach of the workspace for all."""
    pairs = [(q, ()) if isinstance(q, str) else (q[0], q[1]) for q in queries]
    import duckdb

    if (con := _shared(ws)) is not None:
        return [con.execute(q, list(p)).df() for q, p in pairs]
    names = frozenset().union(*(referenced(q) for q, _ in pairs))
    try:
        with ws.connect(tables=names) as con:
            return [con.execute(q, list(p)).df() for q, p in pairs]
    except duckdb.CatalogException:
        with ws.connect() as con:
            return [con.execute(q, list(p)).df() for q, p in pairs]


@functools.lru_cache(maxsize=2048)
def referenced(query: str) -> frozenset[str]:
    """Table names a query refers to, as DuckDB's parser sees them (empty when it does not parse)."""
    import duckdb

    try:
        with duckdb.connect(":memory:", config={"threads": 1}) as parser:
            return frozenset(parser.get_table_names(_without_parameters(query)))
    except duckdb.Error:
        return frozenset()


def _without_parameters(query: str) -> str:
    """The query with its `?` and `$name` placeholders (outside quotes) as NULL: DuckDB will not list the tables of
    a statement with parameters."""
    out, quote, i = [], None, 0
    while i < len(query):
        c = query[i]
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "?" or (c == "$" and i + 1 < len(query) and (query[i + 1].isalnum() or query[i + 1] == "_")):
            out.append("NULL")
            i += 1
            while c == "$" and i < len(query) and (query[i].isalnum() or query[i] == "_"):
                i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def table_names(ws: "Workspace") -> set[str]:
    """Every table name in the workspace, without building any view."""
    if (con := _shared(ws)) is not None:
        return {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    with ws.connect(tables=()) as con:
        found = {r[0] for r in con.execute("SELECT DISTINCT table_name FROM duckdb_tables() WHERE schema_name = 'main' "
                                           "AND database_name <> current_database()").fetchall()}
    shards = {p.name for p in ws.tables_dir.iterdir() if p.is_dir() and any(p.glob("*.parquet"))} if ws.tables_dir.is_dir() else set()
    return found | shards


EVALUATION_TABLE = "dictionary_evals"
_SUMMARY_COLUMNS = ["dictionary", "kind", "arch", "model", "site", "target_site", "head", "d_in", "d_sae", "k", "trained_tokens",
                    "l0", "explained_variance", "loss_recovered", "fvu", "dead_fraction"]


def dictionary_summary(ws: "Workspace") -> pd.DataFrame:
    """One row per dictionary: configuration, final training figures and, when evaluated, the evaluation's.

    Dictionaries trained here have a row in the `dictionaries` table; imported ones
    only a cfg.json, from which the same columns are filled where known.
    """
    present = table_names(ws)
    trained = read(ws, "SELECT * FROM dictionaries QUALIFY row_number() OVER (PARTITION BY dictionary ORDER BY created DESC) = 1") \
        if "dictionaries" in present else pd.DataFrame(columns=["dictionary"])
    rows = [_cfg_row(ws, name) for name in ws.dictionary_names() if name not in set(trained["dictionary"])]
    frame = pd.concat([trained, pd.DataFrame(rows)], ignore_index=True) if rows else trained
    frame = frame[frame["dictionary"].isin(ws.dictionary_names())] if len(frame) else frame
    for column in ("head", "d_in", "d_sae", "k", "trained_tokens", "l0", "fvu", "dead_fraction"):
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    if "fvu" in frame:
        frame["explained_variance"] = 1 - frame["fvu"]
    if EVALUATION_TABLE in present:
        evals = read(ws, f'SELECT * FROM "{EVALUATION_TABLE}"')
        keep = ["dictionary"] + [c for c in evals.columns if c not in frame.columns or c in ("l0", "explained_variance", "fvu", "dead_fraction")]
        evals = evals[keep].drop_duplicates("dictionary", keep="last")
        frame = frame.drop(columns=[c for c in keep if c != "dictionary" and c in frame.columns]).merge(evals, on="dictionary", how="left")
    if len(frame):
        target = frame["target_site"] if "target_site" in frame else pd.Series([None] * len(frame))
        frame["kind"] = ["transcoder" if t and t == t and t != s else "SAE" for t, s in zip(target, frame["site"])]
    if "ce_recovered_zero" in frame:  # the usual "loss recovered": spliced CE against zero-ablating the site
        frame["loss_recovered"] = frame["ce_recovered_zero"]
    ordered = [c for c in _SUMMARY_COLUMNS if c in frame.columns]
    return frame[ordered + [c for c in frame.columns if c not in ordered and c != "created"]].reset_index(drop=True)


def _cfg_row(ws: "Workspace", name: str) -> dict:
    cfg = _dictionary_cfg(ws, name)
    final = (cfg.get("metadata") or {}).get("final") or {}
    row = {k: cfg.get(k) for k in ("arch", "model", "site", "target_site", "head", "d_in", "d_sae", "k")}
    return {"dictionary": name, **row, "trained_tokens": (cfg.get("metadata") or {}).get("trained_tokens"),
            "fvu": final.get("fvu"), "l0": final.get("l0"), "dead_fraction": final.get("dead_fraction")}


FEATURE_COLUMNS = ("feature", "density", "mean_activation", "max_activation", "tokens", "similar_features", "similar_cosines",
                   "head_attribution", "promoted_tokens", "promoted_logits", "suppressed_tokens", "suppressed_logits")
SORTS = {"max activation": ("max_activation", False), "density": ("density", False), "rarest": ("density", True),
         "feature": ("feature", True)}


class FeatureDashboard(NamedTuple):
    """Everything one feature's dashboard shows, from the `features` and `feature_examples` tables."""

    row: dict  # the features row: density, mean/max activation, promoted/suppressed tokens, similar features, ...
    top: pd.DataFrame  # top-activating examples: rank, activation, seq_id, pos, center, window_text, window_activations
    quantiles: pd.DataFrame  # quantile samples: quantile, activation, ... (same columns)
    density_rank: float  # fraction of this dictionary's features that fire less often


class FeatureIndex:
    """A dictionary's feature tables held in memory, so each dashboard and search is a lookup, not a query.

    Built by one read of `features` and `feature_examples` (a copy: no file or connection
    is kept). Examples are an Arrow table sorted by feature with row offsets, so a
    feature's examples are one slice; the text of each feature's top contexts is kept
    lower-cased for search.
    """

    def __init__(self, dictionary: str, features: pd.DataFrame, examples):
        import numpy as np
        import pyarrow.compute as pc

        self.dictionary = dictionary
        self.features = features.set_index(features["feature"].rename(None)).sort_index()
        d_sae = int(self.features.index.max()) + 1 if len(self.features) else 0
        self.examples = examples.sort_by([("feature", "ascending"), ("kind", "descending"), ("quantile", "descending"),
                                          ("activation", "descending")]) if examples is not None else None
        counts = np.zeros(d_sae, dtype=np.int64)
        if self.examples is not None and self.examples.num_rows:
            ids, n = np.unique(self.examples.column("feature").to_numpy(), return_counts=True)
            counts[ids[ids < d_sae]] = n[ids < d_sae]
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.sorted_density = np.sort(self.features["density"].to_numpy())
        self.top_text = [""] * d_sae
        if self.examples is not None and self.examples.num_rows:
            top = self.examples.filter(pc.equal(self.examples.column("kind"), "top"))
            texts = pc.binary_join(top.column("window_text"), "").to_pylist()
            for feature, text in zip(top.column("feature").to_pylist(), texts):
                self.top_text[feature] += (text or "").lower() + "\n"

    def dashboard(self, feature: int) -> FeatureDashboard | None:
        if feature not in self.features.index:
            return None
        row = {k: _plain(v) for k, v in self.features.loc[feature, list(FEATURE_COLUMNS)].items()}
        rank = float(self.sorted_density.searchsorted(row["density"], side="left") / max(len(self.sorted_density), 1))
        examples = pd.DataFrame(columns=EXAMPLE_COLUMNS)
        if self.examples is not None and feature < len(self.offsets) - 1:
            lo, hi = int(self.offsets[feature]), int(self.offsets[feature + 1])
            examples = self.examples.slice(lo, hi - lo).select(EXAMPLE_COLUMNS).to_pandas()
        top = examples[examples["kind"] == "top"].sort_values("activation", ascending=False).reset_index(drop=True)
        quantiles = examples[examples["kind"] == "quantile"].sort_values(["quantile", "activation"], ascending=False).reset_index(drop=True)
        return FeatureDashboard(row, top, quantiles, rank)

    def search(self, *, text: str = "", promotes: str = "", min_log_density: float = -10.0, max_log_density: float = 0.0,
               sort: str = "max activation", limit: int = 200) -> pd.DataFrame:
        """Features firing at all, within a log10-density band, whose top contexts contain `text` and whose promoted
        tokens contain `promotes` (both case-insensitive), sorted, at most `limit`."""
        import numpy as np

        f = self.features
        density = f["density"].to_numpy()
        with np.errstate(divide="ignore"):
            log_density = np.log10(density)
        keep = (density > 0) & (log_density >= min_log_density) & (log_density <= max_log_density)
        if text:
            needle = text.lower()
            keep &= np.array([needle in self.top_text[i] if i < len(self.top_text) else False for i in f.index])
        if promotes:
            needle = promotes.lower()
            keep &= np.array([any(needle in str(t).lower() for t in (ts if ts is not None else [])) for ts in f["promoted_tokens"]])
        column, ascending = SORTS[sort]
        found = f[keep].sort_values([column, "feature"] if column != "feature" else [column], ascending=[ascending, True][:1 + (column != "feature")]).head(limit)
        return pd.DataFrame({"feature": found["feature"].to_numpy(), "density": found["density"].to_numpy(),
                             "mean_activation": found["mean_activation"].to_numpy(), "max_activation": found["max_activation"].to_numpy(),
                             "promotes": [list(ts[:5]) if ts is not None else [] for ts in found["promoted_tokens"]]})

    def density(self) -> pd.DataFrame:
        import numpy as np

        density = self.features["density"].to_numpy()
        with np.errstate(divide="ignore"):
            log_density = np.where(density > 0, np.log10(np.where(density > 0, density, 1.0)), np.nan)
        return pd.DataFrame({"feature": self.features["feature"].to_numpy(), "density": density, "log10_density": log_density})


EXAMPLE_COLUMNS = ["kind", "rank", "quantile", "activation", "seq_id", "pos", "center", "window_text", "window_tokens",
                   "window_activations"]


def feature_index(ws: "Workspace", dictionary: str) -> FeatureIndex | None:
    """The in-memory index of a dictionary's feature tables (None before `python -m workbench features` ran for it)."""
    present = table_names(ws)
    if "features" not in present:
        return None
    shared = _shared(ws)
    with contextlib.nullcontext(shared) if shared is not None else ws.connect(tables={"features", "feature_examples"}) as con:
        features = con.execute(f"SELECT {', '.join(FEATURE_COLUMNS)} FROM features WHERE dictionary = ?", [dictionary]).df()
        if features.empty:
            return None
        examples = None
        if "feature_examples" in present:
            examples = con.sql(f"SELECT feature, {', '.join(EXAMPLE_COLUMNS)} FROM feature_examples WHERE dictionary = $d",
                               params={"d": dictionary}).to_arrow_table()
    return FeatureIndex(dictionary, features, examples)


def feature_dashboard(ws: "Workspace", dictionary: str, feature: int) -> FeatureDashboard | None:
    """One feature's dashboard data (None when the feature has no row); builds the index: for many, use feature_index."""
    index = feature_index(ws, dictionary)
    return index.dashboard(feature) if index is not None else None


def feature_search(ws: "Workspace", dictionary: str, **filters) -> pd.DataFrame:
    """`FeatureIndex.search` on a freshly read index."""
    index = feature_index(ws, dictionary)
    return index.search(**filters) if index is not None else pd.DataFrame(columns=["feature", "density", "mean_activation",
                                                                                     "max_activation", "promotes"])


def feature_density(ws: "Workspace", dictionary: str) -> pd.DataFrame | None:
    """Per-feature firing density of a dictionary (feature, density, log10_density), or None before features are computed."""
    index = feature_index(ws, dictionary)
    return index.density() if index is not None else None


def _plain(value: Any) -> Any:
    """numpy scalars and arrays from DuckDB rows as plain Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


class ActivationSample(NamedTuple):
    """A dictionary's nonzero feature activations on a spread sample of cached tokens, grouped by feature (CSC)."""

    tokens: int  # tokens encoded
    source: str  # where they came from
    indptr: Any  # np.ndarray [d_sae + 1]: feature f's values are values[indptr[f]:indptr[f + 1]]
    values: Any  # np.ndarray [nnz] float32

    def of(self, feature: int):
        return self.values[self.indptr[feature]:self.indptr[feature + 1]]


def activation_sample(ws: "Workspace", dictionary: str, n_tokens: int = 32_768, windows: int = 8) -> ActivationSample | None:
    """Encode `n_tokens` cached activations (`windows` evenly spaced stretches of the store) with the dictionary.

    None when the dictionary's input site is not in the activation store. The
    activation histogram of a feature is the histogram of `sample.of(feature)`.
    """
    import numpy as np
    import torch

    from sae import load_dictionary
    from workbench.store import ActivationStore

    d = load_dictionary(ws, dictionary)
    store = ActivationStore(ws)
    try:
        run = store.run(d.cfg.model, [d.cfg.site])
    except WorkbenchError:
        return None
    per_window = max(1, min(n_tokens, run.rows) // windows)
    starts = np.linspace(0, max(0, run.rows - per_window), windows).astype(int)
    features, values, seen = [], [], 0
    with torch.no_grad():
        for start in dict.fromkeys(starts.tolist()):
            for batch in store.scan(d.cfg.model, d.cfg.site, 4096, start_row=start, max_rows=per_window, run=run.name):
                acts = d.encode(d.site_input(batch.acts.to(d.W_enc.dtype)))  # [rows, d_sae]
                rows, cols = acts.nonzero(as_tuple=True)
                features.append(cols.numpy())
                values.append(acts[rows, cols].float().numpy())
                seen += acts.shape[0]
    feats = np.concatenate(features) if features else np.zeros(0, dtype=np.int64)
    vals = np.concatenate(values) if values else np.zeros(0, dtype=np.float32)
    order = np.argsort(feats, kind="stable")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(feats, minlength=d.cfg.d_sae))])
    return ActivationSample(seen, f"store run {run.name}", indptr, vals[order])
