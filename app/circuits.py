"""Circuits: open a published circuit (or start a new run), prune its graph, inspect nodes, compare methods.

Scores follow the circuits package's one sign convention (denoising: moving a node
from its corrupt to its clean value; positive = the node carries the behaviour),
so circuits from different methods on the same task are directly comparable.
The graph is drawn with layers left to right; edges are kept when
|weight| ≥ threshold × the largest |weight|, nodes when |score| ≥ threshold × the
largest |score| or when a kept edge touches them.
"""

import json

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from app import shell
from workbench.report import token_label

MAX_EDGES = 400
KIND_ORDER = {"embed": 0, "resid": 1, "head": 2, "attn": 3, "feature": 4, "error": 5, "mlp": 6, "logits": 9}

st.title("Circuits")
shell.require_workspace()
TASKS = ("ioi", "greater_than", "docstring", "induction")


@st.fragment(run_every=2 if any(j.process.poll() is None for j in shell.launched("circuit")) else None)
def run_panel() -> None:
    """Start `python -m workbench circuit ...` in its own process, and follow the runs this server started."""
    with st.expander("Run a new circuit", expanded="circuits" not in shell.tables(), icon=":material/play_arrow:"):
        with st.form("run_circuit"):
            row = st.columns(4)
            model = row[0].selectbox("Model", shell.known_models() or ["ref-gpt2"])
            task = row[1].selectbox("Task", TASKS)
            method = row[2].selectbox("Method", ("activation", "attribution", "ig", "relp", "path", "acdc", "features",
                                                 "transcoder", "codes"), index=3)
            n = row[3].number_input("Prompt pairs", 2, 512, 32)
            row = st.columns([1, 1, 2])
            positions = row[0].selectbox("Positions", ("auto", "each", "all"), help="each: per-position nodes; all: whole components")
            edges = row[1].checkbox("Score edges", help="attribution, ig, relp: edge scores as well")
            names = [d for d in shell.workspace().dictionary_names() if shell.dictionary_cfg(d).get("model") == model]
            dictionaries = row[2].multiselect("Dictionaries (features, transcoder, codes)", names)
            if st.form_submit_button("Run", type="primary", icon=":material/play_arrow:"):
                argv = ["circuit", "--model", model, "--task", task, "--method", method, "--n", str(int(n)), "--positions", positions]
                argv += ["--edges"] if edges else []
                for name in dictionaries:
                    argv += ["--dictionary", name]
                shell.launch(argv)
                st.rerun(scope="app")
        for job in shell.launched("circuit"):
            code = job.process.poll()
            state = "running" if code is None else ("finished" if code == 0 else f"failed (exit {code})")
            st.markdown(f"`{' '.join(job.argv)}` · **{state}**")
            st.code(shell.log_tail(job) or "(no output yet)", language=None)
            if code == 0 and not st.session_state.get(f"seen-{job.id}"):
                st.session_state[f"seen-{job.id}"] = True
                shell.invalidate()
                st.rerun(scope="app")


run_panel()
shell.require_tables("circuits", "circuit_nodes", what="circuits", command="python -m workbench circuit --task ioi "
                     "(or use Run a new circuit above)")

runs = shell.sql("SELECT circuit_id, model, task, method, granularity, n_nodes, n_edges, clean_metric, corrupt_metric, "
                 "runtime_s, created FROM circuits ORDER BY created DESC")
ids = runs["circuit_id"].tolist()
label = {r.circuit_id: f"{r.task} · {r.method} · {r.circuit_id}" for r in runs.itertuples()}
circuit = shell.url_select("Circuit", ids, "circuit", ids[0], format_func=lambda c: label.get(c, c), what="circuit")
chosen = runs[runs["circuit_id"] == circuit].iloc[0]
peer_ids = runs[(runs["model"] == chosen["model"]) & (runs["task"] == chosen["task"])]["circuit_id"].tolist()
batch = [("SELECT * FROM circuits WHERE circuit_id = ?", [circuit]),
         ("SELECT * FROM circuit_nodes WHERE circuit_id = ? ORDER BY node", [circuit]),
         ("SELECT circuit_id, component, sum(score) AS score FROM circuit_nodes WHERE list_contains(?, circuit_id) "
          "GROUP BY circuit_id, component", [peer_ids])]
if "circuit_curves" in shell.tables():
    batch.append(("SELECT * FROM circuit_curves WHERE circuit_id = ?", [circuit]))
head, nodes, peer_scores, *curves = shell.sql_many(batch)  # one connection for everything this circuit shows
head = head.iloc[0]
has_edges = "circuit_edges" in shell.tables() and int(head["n_edges"]) > 0

cols = st.columns(6)
cols[0].metric("Task", head["task"])
cols[1].metric("Method", head["method"])
cols[2].metric("Clean metric", f"{head['clean_metric']:.3f}", help=f"mean {head['metric']} on the clean prompts")
cols[3].metric("Corrupt metric", f"{head['corrupt_metric']:.3f}")
cols[4].metric("Nodes / edges", f"{int(head['n_nodes'])} / {int(head['n_edges'])}")
cols[5].metric("Runtime", f"{head['runtime_s']:.1f} s")
with st.expander("Run details"):
    st.markdown(f"Model `{head['model']}` · granularity **{head['granularity']}** · {int(head['n_prompts'])} prompts · "
                f"parameters `{head['params']}`")
    tokens = json.loads(head["prompt_tokens"] or "[]")
    if tokens:
        st.markdown("First clean prompt, by position: " + " ".join(f"`{i}:{token_label(t)}`" for i, t in enumerate(tokens)))

top = st.columns([2, 1, 1])
threshold = shell.url_number("Pruning threshold (fraction of the largest |score| / |weight|)", "threshold", 0.05,
                             min_value=0.0, max_value=1.0, step=0.01, where=top[0], widget="slider")
only_circuit = shell.url_toggle("Only the method's circuit", "kept", False, where=top[1],
                                help="show only the nodes and edges the method kept (in_circuit)")
collapse = shell.url_toggle("Sum over positions", "collapse", False, where=top[2],
                            help="merge each component's per-position nodes into one") if (nodes["pos"] >= 0).any() else False

view = nodes.copy()
if only_circuit:
    view = view[view["in_circuit"]]
if collapse:
    view = view.groupby(["component", "kind", "layer", "head", "feature", "dictionary"], as_index=False).agg(
        score=("score", "sum"), node=("node", "min"))
    view["node_id"], view["pos"] = view["component"], -1
peak = float(view["score"].abs().max() or 1.0)
kept = view[view["score"].abs() >= threshold * peak]

edges = pd.DataFrame()
if has_edges and not collapse:
    edges = shell.sql("SELECT source, target, source_id, target_id, weight, in_circuit FROM circuit_edges WHERE circuit_id = ? "
                      "AND abs(weight) >= ? * (SELECT max(abs(weight)) FROM circuit_edges WHERE circuit_id = ?) "
                      + ("AND in_circuit " if only_circuit else "") + f"ORDER BY abs(weight) DESC LIMIT {MAX_EDGES}",
                      [circuit, threshold, circuit])
    touched = set(edges["source"]) | set(edges["target"])
    kept = view[view["node"].isin(touched) | view["node"].isin(kept["node"])]


def layout(frame: pd.DataFrame) -> pd.DataFrame:
    """x = layer then kind (embeddings left, logits right); y = rank within that column."""
    frame = frame.copy()
    frame["column"] = frame["layer"] * 10 + frame["kind"].map(KIND_ORDER).fillna(8)
    frame["x"] = frame["column"].rank(method="dense")
    frame = frame.sort_values(["column", "pos", "head", "feature"])
    frame["y"] = frame.groupby("column").cumcount() - frame.groupby("column")["node"].transform("count") / 2
    return frame


def _pick_node() -> None:
    for key in ("graph_chart", "grid_chart", "bar_chart"):
        picked = ((st.session_state.get(key) or {}).get("selection") or {}).get("node") or []
        if picked:
            shell.set_url_value("node", str(picked[0]["node_id"]))


main, side = st.columns([3, 1])
with main:
    if kept.empty:
        st.info("No node passes this threshold: lower it.")
    elif has_edges and not collapse:
        placed = layout(kept)
        where = placed.set_index("node")[["x", "y"]]
        lines = edges[edges["source"].isin(where.index) & edges["target"].isin(where.index)].copy()
        lines[["x", "y"]] = where.loc[lines["source"]].to_numpy()
        lines[["x2", "y2"]] = where.loc[lines["target"]].to_numpy()
        lines["sign"] = np.where(lines["weight"] >= 0, "positive", "negative")
        lines["|weight|"] = lines["weight"].abs()
        pick = alt.selection_point(name="node", fields=["node_id"])
        rules = alt.Chart(lines).mark_rule(opacity=0.55).encode(
            x=alt.X("x:Q", axis=None), y=alt.Y("y:Q", axis=None), x2="x2:Q", y2="y2:Q",
            strokeWidth=alt.StrokeWidth("|weight|:Q", scale=alt.Scale(range=[0.3, 6]), legend=None),
            color=alt.Color("sign:N", scale=alt.Scale(domain=["positive", "negative"], range=["#2f6fdb", "#d6452c"])),
            tooltip=["source_id", "target_id", alt.Tooltip("weight:Q", format=".4g")])
        dots = alt.Chart(placed).mark_circle(stroke="black", strokeWidth=0.5).encode(
            x="x:Q", y="y:Q", size=alt.Size("abs_score:Q", scale=alt.Scale(range=[40, 700]), legend=None),
            color=alt.Color("score:Q", scale=alt.Scale(scheme="redblue", domainMid=0)),
            opacity=alt.condition(pick, alt.value(1.0), alt.value(0.5)),
            tooltip=["node_id", "kind", alt.Tooltip("score:Q", format=".4g")]).transform_calculate(
            abs_score="abs(datum.score)").add_params(pick)
        labels = alt.Chart(placed).mark_text(dy=-12, fontSize=10).encode(x="x:Q", y="y:Q", text="node_id:N")
        st.altair_chart((rules + dots + labels).properties(height=520), width="stretch", on_select=_pick_node,
                        selection_mode="node", key="graph_chart")
        st.caption(f"{len(lines)} edges (of {int(head['n_edges'])}) and {len(placed)} nodes after pruning; blue = "
                   "positive weight, red = negative; node colour = score. Click a node for its details.")
    elif (kept["pos"] >= 0).any():
        grid = kept.assign(position=kept["pos"].astype(str) + "·" + kept["pos"].map(
            lambda p: token_label(tokens[p]) if 0 <= p < len(tokens) else ""))
        order = layout(grid).drop_duplicates("component")["component"].tolist()
        pick = alt.selection_point(name="node", fields=["node_id"])
        chart = alt.Chart(grid).mark_rect().encode(
            x=alt.X("position:N", sort=sorted(grid["position"].unique(), key=lambda s: int(s.split("·")[0]))),
            y=alt.Y("component:N", sort=order),
            color=alt.Color("score:Q", scale=alt.Scale(scheme="redblue", domainMid=0)),
            stroke=alt.condition(pick, alt.value("black"), alt.value(None)),
            tooltip=["node_id", alt.Tooltip("score:Q", format=".4g")]).add_params(pick).properties(height=max(240, 14 * len(order)))
        st.altair_chart(chart, width="stretch", on_select=_pick_node, selection_mode="node", key="grid_chart")
        st.caption("Score of patching each component at each position (denoising; blue = carries the behaviour).")
    else:
        pick = alt.selection_point(name="node", fields=["node_id"])
        bars = alt.Chart(kept).mark_bar().encode(
            x=alt.X("score:Q"), y=alt.Y("node_id:N", sort="-x"),
            color=alt.condition("datum.score >= 0", alt.value("#2f6fdb"), alt.value("#d6452c")),
            opacity=alt.condition(pick, alt.value(1.0), alt.value(0.6)),
            tooltip=["node_id", alt.Tooltip("score:Q", format=".4g")]).add_params(pick)
        st.altair_chart(bars.properties(height=max(200, 16 * len(kept))), width="stretch", on_select=_pick_node,
                        selection_mode="node", key="bar_chart")
with side:
    st.markdown("**Top nodes** by |score|")
    ranked = view.reindex(view["score"].abs().sort_values(ascending=False).index).head(15)
    st.dataframe(ranked[["node_id", "score"]], hide_index=True, height=420,
                 column_config={"score": st.column_config.NumberColumn(format="%.4g")})

st.subheader("Node details")
node_ids = view["node_id"].tolist()
default_node = ranked["node_id"].iloc[0] if len(ranked) else None
node_id = shell.url_select("Node", node_ids, "node", default_node, what="node")
if node_id is not None:
    row = view[view["node_id"] == node_id].iloc[0]
    cols = st.columns(4)
    cols[0].metric("Score", f"{row['score']:.4g}")
    cols[1].metric("Kind", row["kind"])
    cols[2].metric("Layer", int(row["layer"]))
    cols[3].metric("Position", "all" if int(row["pos"]) < 0 else f"{int(row['pos'])}")
    if row["kind"] == "feature" and row.get("dictionary"):
        shell.link("features", f"Open feature {int(row['feature'])} of {row['dictionary']}", icon=":material/scatter_plot:",
                   dictionary=row["dictionary"], feature=int(row["feature"]))
    if has_edges and not collapse:
        into, out = shell.sql_many([
            ("SELECT source_id AS source, weight FROM circuit_edges WHERE circuit_id = ? AND target_id = ? "
             "ORDER BY abs(weight) DESC LIMIT 10", [circuit, node_id]),
            ("SELECT target_id AS target, weight FROM circuit_edges WHERE circuit_id = ? AND source_id = ? "
             "ORDER BY abs(weight) DESC LIMIT 10", [circuit, node_id])])
        left, right = st.columns(2)
        left.markdown("Strongest edges **into** this node")
        left.dataframe(into, hide_index=True)
        right.markdown("Strongest edges **out of** this node")
        right.dataframe(out, hide_index=True)

if curves:
    curves = curves[0].drop(columns=["circuit_id"])
    numeric = [c for c in curves.columns if pd.api.types.is_numeric_dtype(curves[c])]
    if len(curves) and len(numeric) >= 2:
        st.subheader("Faithfulness curve")
        long = curves.melt(id_vars=[numeric[0]], value_vars=numeric[1:], var_name="measure")
        st.altair_chart(alt.Chart(long).mark_line(point=True).encode(
            x=f"{numeric[0]}:Q", y="value:Q", color="measure:N", tooltip=[numeric[0], "measure", "value"]), width="stretch")

st.subheader("Compare methods")
peers = runs[(runs["model"] == head["model"]) & (runs["task"] == head["task"]) & (runs["circuit_id"] != circuit)]
if peers.empty:
    st.caption(f"No other circuit on {head['task']} for this model: run another method to compare.")
else:
    other = shell.url_select("Compare with", peers["circuit_id"].tolist(), "compare", peers["circuit_id"].iloc[0],
                             format_func=lambda c: label.get(c, c), what="circuit")
    both = peer_scores[peer_scores["circuit_id"].isin([circuit, other])]
    wide = both.pivot(index="component", columns="circuit_id", values="score").dropna()
    if len(wide) < 2:
        st.caption("These circuits share fewer than two components; nothing to compare.")
    else:
        a, b = wide[circuit], wide[other]
        k = min(10, len(wide))
        overlap = len(set(a.abs().nlargest(k).index) & set(b.abs().nlargest(k).index))
        cols = st.columns(3)
        cols[0].metric("Pearson r", f"{a.corr(b):.3f}")
        cols[1].metric("Spearman ρ", f"{a.corr(b, method='spearman'):.3f}")
        cols[2].metric(f"Shared top-{k} components", f"{overlap} / {k}")
        frame = wide.reset_index().rename(columns={circuit: "this", other: "other"})
        lim = float(np.abs(frame[["this", "other"]].to_numpy()).max() or 1.0)
        diagonal = alt.Chart(pd.DataFrame({"v": [-lim, lim]})).mark_line(strokeDash=[4, 4], color="gray").encode(x="v:Q", y="v:Q")
        dots = alt.Chart(frame).mark_circle(size=70).encode(
            x=alt.X("this:Q", title=f"{head['method']} (this)"),
            y=alt.Y("other:Q", title=f"{runs.set_index('circuit_id').loc[other, 'method']}"),
            tooltip=["component", alt.Tooltip("this:Q", format=".4g"), alt.Tooltip("other:Q", format=".4g")])
        st.altair_chart(diagonal + dots, width="stretch")
        st.caption("Each point is a component, its score summed over positions, under both methods; the dashed line is agreement.")
