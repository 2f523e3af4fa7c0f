"""Reports: write the same self-contained HTML report as `python -m workbench report`, and download it.

The report (see `workbench.report`) renders offline: charts are inlined with the
Vega bundle, every model or corpus string is escaped, and the tables behind it
are written beside it as Parquet and JSON. Reports written here go to the
workspace's `reports/` folder, the one place the app writes.
"""

import io
import time
import zipfile
from pathlib import Path

import streamlit as st

from app import shell
from workbench.report import build_report, _parse_features

st.title("Reports")
ws = shell.require_workspace()
ALL = "(all)"

names = ws.dictionary_names()
circuits = shell.sql("SELECT circuit_id FROM circuits ORDER BY created DESC")["circuit_id"].tolist() if "circuits" in shell.tables() else []
runs = shell.sql("SELECT run_id FROM steering_runs ORDER BY created DESC")["run_id"].tolist() if "steering_runs" in shell.tables() else []
top = st.columns(3)
dictionary = shell.url_select("Dictionary", [ALL] + names, "dictionary", ALL, where=top[0], what="dictionary")
circuit = shell.url_select("Circuit", [ALL] + circuits, "circuit", ALL, where=top[1], what="circuit")
steering = shell.url_select("Steering run", [ALL] + runs, "steering", ALL, where=top[2], what="steering run")
row = st.columns([1, 2])
features_text = shell.url_text("Features to show (ids, comma-separated)", "features", "", where=row[0],
                               help="feature dashboards to include for the dictionary; empty: a few of the most active",
                               placeholder="e.g. 3,17,40")
title = shell.url_text("Title", "title", f"Workbench report: {ws.root.name}", where=row[1])

stamp = time.strftime("%Y%m%d-%H%M%S")
out = ws.reports_dir / f"report-{stamp}.html"
flags = "".join(f" --{flag} {value}" for flag, value in (("dictionary", dictionary), ("circuit", circuit), ("steering", steering))
                if value != ALL) + (f" --features {features_text}" if features_text.strip() else "")
st.caption("The same report from the command line:")
st.code(f"python -m workbench report --workspace {ws.root}{flags} --out {ws.reports_dir}/report.html", language="bash")

if st.button("Write report", type="primary", icon=":material/description:"):
    with st.spinner("writing the report…"):
        result = build_report(ws, out, dictionary=None if dictionary == ALL else dictionary,
                              circuit=None if circuit == ALL else circuit, steering=None if steering == ALL else steering,
                              features=_parse_features(features_text), title=title)
    shell.invalidate()
    st.success(f"Wrote `{result.html}` ({result.charts} charts, {len(result.sections)} sections) and {len(result.tables)} "
               f"tables under `{result.data_dir}`.", icon=":material/check_circle:")


def _zip(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder.parent))
    return buffer.getvalue()


reports = sorted(ws.reports_dir.glob("*.html"), reverse=True) if ws.reports_dir.is_dir() else []
st.subheader("Reports in this workspace")
if not reports:
    st.caption("None yet.")
for path in reports[:20]:
    left, mid, right = st.columns([3, 1, 1])
    left.markdown(f"`{path.name}` · {path.stat().st_size / 1e6:.1f} MB · {time.strftime('%Y-%m-%d %H:%M', time.localtime(path.stat().st_mtime))}")
    mid.download_button("HTML", path.read_bytes, file_name=path.name, mime="text/html", key=f"html-{path.name}",
                        icon=":material/download:")
    data = path.with_name(path.stem + "_data")
    if data.is_dir():
        right.download_button("Tables (zip)", lambda data=data: _zip(data), file_name=f"{data.name}.zip", mime="application/zip",
                              key=f"zip-{path.name}", icon=":material/download:")
