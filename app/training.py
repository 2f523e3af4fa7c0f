"""Training monitor: loss, L0, explained variance and dead fraction over training, live while jobs run.

The trainer (`sae.train`) appends its metrics as Parquet shards of the
`training_metrics` table, each published by an atomic rename, and replaces
`jobs/train-<name>.json` with its progress. This page only lists and reads
those files, one short query at a time (no connection or file is held open
between refreshes), so a running job never waits on it. While any job reports
`running`, the charts refresh every few seconds.
"""

import time

import altair as alt
import pandas as pd
import streamlit as st

from app import shell

METRICS = {"loss": "loss", "l0": "L0 (active features per token)", "explained_variance": "explained variance (1 − FVU)",
           "dead_fraction": "dead fraction"}
MAX_POINTS = 2000  # per run and chart; longer runs are thinned evenly
REFRESH_S = 3  # seconds between refreshes while a job runs
IDLE_REFRESH_S = 15  # and otherwise (a job started later is picked up)

st.title("Training monitor")
ws = shell.require_workspace()


def jobs() -> pd.DataFrame:
    rows = []
    for path in sorted(ws.jobs_dir.glob("train-*.json")) if ws.jobs_dir.is_dir() else []:
        doc = ws.read_json(f"jobs/{path.name}") or {}
        rows.append({"job": path.stem.removeprefix("train-"), "status": doc.get("status"), "step": doc.get("step"),
                     "total_steps": doc.get("total_steps"), "tokens_per_s": doc.get("tokens_per_s"),
                     "eta_s": doc.get("eta_s"), "updated": doc.get("updated"), "error": doc.get("error")})
    return pd.DataFrame(rows, columns=["job", "status", "step", "total_steps", "tokens_per_s", "eta_s", "updated", "error"])


progress = jobs()
running = progress[progress["status"] == "running"]
if "training_metrics" not in shell.tables() and running.empty:
    st.info("No training metrics yet. Train a dictionary with `python -m workbench train`; its curves appear here while it "
            "runs.", icon=":material/inbox:")
    st.stop()

logged = shell.sql("SELECT dictionary, count(*) AS n FROM training_metrics GROUP BY 1 ORDER BY 1") \
    if "training_metrics" in shell.tables() else pd.DataFrame({"dictionary": [], "n": []})
names = logged["dictionary"].tolist() + [j for j in running["job"] if j not in set(logged["dictionary"])]
default = list(running["job"]) or names[-3:]
top = st.columns([3, 1, 1, 1])
runs = shell.url_multiselect("Runs", names, "runs", default, where=top[0])
x_axis = shell.url_select("x axis", ["step", "tokens", "elapsed_s"], "x", "step", where=top[1])
smooth = shell.url_number("Smoothing (EMA span, steps)", "smooth", 1, min_value=1, max_value=500, step=1, where=top[2])
log_loss = shell.url_toggle("Log-scale loss", "log", True, where=top[3])


@st.fragment(run_every=REFRESH_S if not running.empty else IDLE_REFRESH_S)
def live() -> None:
    progress = jobs()
    if set(progress.loc[progress["status"] == "running", "job"]) != set(running["job"]):
        st.rerun(scope="app")  # a job started or ended since the page was drawn: redraw the run list too
    for row in progress[progress["job"].isin(runs)].itertuples():
        done = (row.step or 0) / row.total_steps if row.total_steps else 0.0
        age = time.time() - row.updated if row.updated else None
        text = (f"**{row.job}** · {row.status} · step {row.step or 0:,}/{row.total_steps or 0:,}"
                + (f" · {row.tokens_per_s:,.0f} tokens/s" if row.tokens_per_s else "")
                + (f" · ETA {row.eta_s / 60:.1f} min" if row.status == "running" and row.eta_s else "")
                + (f" · updated {age:.0f} s ago" if age is not None else ""))
        st.progress(min(1.0, max(0.0, done)), text=text)
        if row.error:
            st.error(f"{row.job}: {row.error}")
    if not runs:
        st.caption("Pick one or more runs.")
        return
    frame = metrics(tuple(runs))
    if frame.empty:
        st.caption("No metrics logged yet for these runs; the first appear after the trainer's first flush.")
        return
    charts = []
    for column, title in METRICS.items():
        scale = alt.Scale(type="log") if column == "loss" and log_loss and (frame[column] > 0).all() else alt.Scale(zero=False)
        charts.append(alt.Chart(frame, title=title).mark_line().encode(
            x=alt.X(f"{x_axis}:Q", title=x_axis), y=alt.Y(f"{column}:Q", title=None, scale=scale),
            color=alt.Color("dictionary:N"), tooltip=["dictionary", "step", "tokens", alt.Tooltip(f"{column}:Q", format=".4g")],
        ).properties(width=420, height=200))
    st.altair_chart(alt.vconcat(alt.hconcat(*charts[:2]), alt.hconcat(*charts[2:])), width="content")
    last = frame.sort_values("step").groupby("dictionary").tail(1)
    st.dataframe(last[["dictionary", "step", "tokens", "loss", "l0", "explained_variance", "dead_fraction", "lr"]],
                 hide_index=True)


def metrics(selected: tuple[str, ...]) -> pd.DataFrame:
    """The selected runs' metric rows, every stride-th step when a run logged more than MAX_POINTS rows."""
    counts = logged[logged["dictionary"].isin(selected)]
    stride = max(1, int(counts["n"].max() // MAX_POINTS)) if len(counts) else 1
    frame = shell.sql(f"SELECT dictionary, step, tokens, elapsed_s, loss, l0, 1 - fvu AS explained_variance, dead_fraction, lr "
                      f"FROM training_metrics WHERE list_contains(?, dictionary) AND step % {stride} = 0 ORDER BY dictionary, step",
                      [list(selected)])
    if smooth > 1:
        for column in METRICS:
            frame[column] = frame.groupby("dictionary")[column].transform(lambda s: s.ewm(span=smooth).mean())
    return frame


live()
