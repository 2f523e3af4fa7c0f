"""Dictionaries: every trained dictionary's evaluation, and comparisons across runs (e.g. L0 against explained
variance or loss recovered, coloured by architecture).

Rows come from the `dictionaries` table (one row per trained dictionary, written
when training finishes) joined with the evaluation table of `sae.evaluate` when
the dictionary has been evaluated. Explained variance is 1 − FVU (fraction of
variance unexplained, over the dictionary's target).
"""

import altair as alt
import pandas as pd
import streamlit as st

from app import shell

st.title("Dictionaries")
ws = shell.require_workspace()
frame = shell.dictionary_summary()
if frame.empty:
    st.info("No trained dictionaries yet: `python -m workbench train` trains SAEs and transcoders on the activation cache.",
            icon=":material/inbox:")
    st.stop()

numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c]) and c not in ("head",)]
st.dataframe(frame, hide_index=True, column_config={c: st.column_config.NumberColumn(format="%.4g") for c in numeric})

st.subheader("Compare runs")
top = st.columns(4)
x_default = "l0" if "l0" in numeric else numeric[0]
y_default = next((c for c in ("loss_recovered", "explained_variance") if c in numeric), numeric[-1])
x = shell.url_select("x", numeric, "x", x_default, where=top[0])
y = shell.url_select("y", numeric, "y", y_default, where=top[1])
categorical = [c for c in ("arch", "site", "target_site", "model", "kind") if c in frame.columns]
color = shell.url_select("Colour", categorical, "color", "arch" if "arch" in categorical else categorical[0], where=top[2])
log_x = shell.url_toggle("Log x", "logx", x == "l0" and bool((frame["l0"] > 0).all()) if "l0" in frame else False, where=top[3])
scale = alt.Scale(type="log") if log_x and (frame[x] > 0).all() else alt.Scale(zero=False)
base = alt.Chart(frame.dropna(subset=[x, y])).encode(x=alt.X(f"{x}:Q", scale=scale), y=alt.Y(f"{y}:Q", scale=alt.Scale(zero=False)),
                                                     color=alt.Color(f"{color}:N"))
points = base.mark_point(size=90, filled=True).encode(tooltip=["dictionary"] + [c for c in (x, y, color, "d_sae", "k") if c in frame])
lines = base.mark_line(opacity=0.4).encode(order=f"{x}:Q", detail="site:N")  # join only dictionaries of one site
st.altair_chart((lines + points).interactive(), width="stretch")
st.caption("Each point is one dictionary; lines join dictionaries of the same colour group and site in order of x (a "
           "sparsity–fidelity frontier when x is L0).")

st.subheader("One dictionary")
names = frame["dictionary"].tolist()
name = shell.url_select("Dictionary", names, "dictionary", names[0], what="dictionary")
row = frame[frame["dictionary"] == name].iloc[0]
cols = st.columns(5)
for col, (key, label) in zip(cols, (("l0", "L0"), ("explained_variance", "Explained variance"), ("dead_fraction", "Dead fraction"),
                                    ("loss_recovered", "Loss recovered"), ("d_sae", "Features"))):
    value = row.get(key)
    col.metric(label, "—" if value is None or pd.isna(value) else (f"{value:,.0f}" if key == "d_sae" else f"{value:.4g}"))
links = st.columns(3)
with links[0]:
    shell.link("features", "Feature dashboard", icon=":material/scatter_plot:", dictionary=name)
with links[1]:
    shell.link("training", "Training curves", icon=":material/monitoring:", runs=name)
with links[2]:
    shell.link("reports", "Report", icon=":material/description:", dictionary=name)
density = shell.feature_density(name)
if density is not None and len(density):
    st.altair_chart(alt.Chart(density).mark_bar().encode(
        x=alt.X("log10_density:Q", bin=alt.Bin(maxbins=50), title="log10 feature density (fraction of tokens firing)"),
        y=alt.Y("count():Q", title="features")).properties(height=220), width="stretch")
    dead = int((density["density"] <= 0).sum())
    st.caption(f"{len(density):,} features; {dead:,} never fired on the scanned tokens (left out of the log histogram).")
with st.expander("Configuration (cfg.json)"):
    st.json(shell.dictionary_cfg(name))
