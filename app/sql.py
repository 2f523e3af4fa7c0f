"""SQL: read-only queries over every table in the workspace, shown as a table and a chart.

The query, and the chart's mark and axes, live in the URL. What is refused and
how is documented in `app.readonly`: one SELECT-type statement, run on a
connection with external access off and its configuration locked.
"""

import altair as alt
import pandas as pd
import streamlit as st

from app import shell
from app.readonly import MAX_ROWS, QueryResult, run_readonly
from workbench.errors import WorkbenchError

st.title("SQL")
ws = shell.require_workspace()
present = sorted(shell.tables())

with st.expander(f"Tables ({len(present)})", expanded=False):
    if present:
        schema = shell.sql("SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_catalog = current_database() ORDER BY table_name, ordinal_position")
        for table, cols in schema.groupby("table_name", sort=True):
            st.markdown(f"`{table}`: " + ", ".join(f"{c} *{t.lower()}*" for c, t in zip(cols["column_name"], cols["data_type"])))

query = shell.url_text("Query (read-only: one SELECT, WITH, DESCRIBE, SHOW or SUMMARIZE)", "q", "SHOW TABLES", area=True,
                       height=140, help="Ctrl+Enter runs it. Results stop at 10,000 rows; queries stop after 30 s.")


@st.cache_data(max_entries=64, show_spinner="running query…")
def _run(sig: tuple, text: str) -> QueryResult | str:
    try:
        return run_readonly(ws, text)
    except WorkbenchError as e:
        return str(e)


result = _run(shell.signature(ws), query) if query.strip() else "the query is empty: write one SELECT statement"
if isinstance(result, str):
    st.error(result, icon=":material/block:")
    st.stop()

frame = result.frame
st.caption(f"{len(frame):,} rows{' (first ' + f'{MAX_ROWS:,}; add a LIMIT or an aggregate to see the rest)' if result.truncated else ''}"
           f" · {result.seconds * 1000:.0f} ms")
st.dataframe(frame, hide_index=True)
st.download_button("Download CSV", frame.to_csv(index=False).encode(), file_name="query.csv", mime="text/csv",
                   icon=":material/download:")

charts = ["none", "line", "bar", "point", "area"]
numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])]
if len(frame.columns) >= 2 and numeric and len(frame):
    st.subheader("Chart")
    left, mid, right, far = st.columns(4)
    columns = [str(c) for c in frame.columns]
    mark = shell.url_select("Mark", charts, "chart", "point" if len(numeric) >= 2 else "bar", where=left)
    x = shell.url_select("x", columns, "x", columns[0], where=mid)
    y = shell.url_select("y", [str(c) for c in numeric], "y", next((c for c in numeric if c != x), numeric[0]), where=right)
    color = shell.url_select("Colour", ["(none)"] + columns, "color", "(none)", where=far)
    if mark != "none":
        kind = "quantitative" if x in numeric else ("temporal" if pd.api.types.is_datetime64_any_dtype(frame[x]) else "nominal")
        encoding = {"x": alt.X(x, type=kind), "y": alt.Y(y, type="quantitative"), "tooltip": columns[:8]}
        if color != "(none)":
            encoding["color"] = alt.Color(color, type="quantitative" if color in numeric else "nominal")
        chart = getattr(alt.Chart(frame), f"mark_{mark}")().encode(**encoding).interactive()
        st.altair_chart(chart, width="stretch")
