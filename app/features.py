"""Feature dashboard: one dictionary feature the way SAE dashboards show it, and search over all features.

From the feature tables (`python -m workbench features`): density, mean and max
activation, top-activating contexts with the feature's activation shaded on every
token, samples from each activation quantile, the output tokens the decoder
direction promotes and suppresses through the unembedding, and the features with
the most similar decoder directions. The activation histogram encodes a spread
sample of the activation store with the dictionary (cached once per dictionary).
"""

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from app import shell
from workbench.report import SORTS, TOKENS_CSS, token_label, tokens_html

st.title("Feature dashboard")
ws = shell.require_workspace()
names = ws.dictionary_names()
if not names:
    st.info("No dictionaries yet: train one with `python -m workbench train`, then `python -m workbench features`.",
            icon=":material/inbox:")
    st.stop()
top = st.columns([3, 1])
dictionary = shell.url_select("Dictionary", names, "dictionary", names[0], where=top[0], what="dictionary")
cfg = shell.dictionary_cfg(dictionary)
d_sae = int(cfg.get("d_sae") or 0)
index = shell.feature_index(dictionary)
if index is None:
    st.info(f"The feature tables of `{dictionary}` have not been computed yet: run `python -m workbench features "
            f"--dictionary {dictionary} --workspace {ws.root}`.", icon=":material/inbox:")
    st.stop()

def activation_histogram(dictionary: str, feature: int) -> None:
    """The feature's activations on a sample of cached tokens, encoded in the background once per dictionary:
    the page draws at once and this part polls until the sample is ready."""
    pending = isinstance(shell.activation_sample(dictionary), shell.Pending)

    @st.fragment(run_every=1 if pending else None)
    def draw() -> None:
        sample = shell.activation_sample(dictionary)
        if isinstance(sample, shell.Pending):
            st.caption(f"Activation histogram: {sample.what}…")
            return
        if pending:  # it was still computing when the page was drawn: redraw the page once, which stops the polling
            st.rerun(scope="app")
        if sample is None:
            st.caption("No cached activations of this dictionary's site in the store, so no activation histogram; "
                       "cache them with `python -m workbench cache`.")
            return
        values = sample.of(feature)
        if len(values):
            st.altair_chart(alt.Chart(pd.DataFrame({"activation": values})).mark_bar(color="#f28e2b").encode(
                x=alt.X("activation:Q", bin=alt.Bin(maxbins=40)), y=alt.Y("count():Q", title="tokens")).properties(height=200),
                width="stretch")
        st.caption(f"Activations on {len(values):,} of {sample.tokens:,} sampled tokens ({sample.source}).")

    draw()


finder, board = st.columns([1, 2], gap="large")
with finder:
    st.subheader("Find features")
    text = shell.url_text("Top contexts contain", "text", "", help="case-insensitive text in a feature's top-activating contexts")
    promotes = shell.url_text("Promotes a token containing", "promotes", "")
    low, high = st.columns(2)
    min_d = shell.url_number("log10 density ≥", "dmin", -10.0, min_value=-10.0, max_value=0.0, step=0.5, where=low)
    max_d = shell.url_number("log10 density ≤", "dmax", 0.0, min_value=-10.0, max_value=0.0, step=0.5, where=high)
    sort = shell.url_select("Sort by", list(SORTS), "sort", "max activation")
    found = index.search(text=text, promotes=promotes, min_log_density=min_d, max_log_density=max_d, sort=sort)
    found["promotes"] = found["promotes"].map(lambda ts: " ".join(token_label(t) for t in (ts if ts is not None else [])))
    st.caption(f"{len(found)} features{' (first 200)' if len(found) == 200 else ''}; pick a row to open it.")

    def _open_row() -> None:
        rows = st.session_state["found"]["selection"]["rows"]
        if rows:
            shell.set_url_value("feature", int(st.session_state["_found_ids"][rows[0]]))

    st.session_state["_found_ids"] = found["feature"].tolist()
    st.dataframe(found, hide_index=True, height=520, on_select=_open_row, selection_mode="single-row", key="found",
                 column_config={"density": st.column_config.NumberColumn(format="%.2e"),
                                "mean_activation": st.column_config.NumberColumn("mean act", format="%.3g"),
                                "max_activation": st.column_config.NumberColumn("max act", format="%.3g")})

with board:
    default = int(found["feature"].iloc[0]) if len(found) else 0
    feature = shell.url_number("Feature", "feature", default, min_value=0, max_value=max(d_sae - 1, 0), step=1,
                               what="Feature", hint=f" (`{dictionary}` has {d_sae} features)")
    data = index.dashboard(int(feature))
    if data is None:
        st.warning(f"Feature {feature} of `{dictionary}` has no row in the feature tables; recompute them with "
                   f"`python -m workbench features --dictionary {dictionary}`.", icon=":material/link_off:")
        st.stop()
    row = data.row
    st.subheader(f"Feature {feature} · {dictionary}")
    cols = st.columns(4)
    cols[0].metric("Density", f"{row['density']:.3%}", help=f"fraction of {row['tokens']:,} tokens it fires on")
    cols[1].metric("Mean activation", f"{row['mean_activation']:.4g}", help="mean over the tokens it fires on")
    cols[2].metric("Max activation", f"{row['max_activation']:.4g}")
    cols[3].metric("Density percentile", f"{data.density_rank:.0%}", help="share of this dictionary's features that fire less often")
    if row["density"] == 0:
        st.info("This feature never fired on the tokens the tables were computed on (a dead feature).")
    links = st.columns(2)
    if len(data.top):
        context = "".join(t for t in data.top["window_text"].iloc[0][: int(data.top["center"].iloc[0]) + 1] if t != "<|endoftext|>")
        with links[0]:
            shell.link("prompt", "Top context in the prompt explorer", icon=":material/edit_note:", model=cfg.get("model"),
                       dictionary=dictionary, prompt=context)
    with links[1]:
        shell.link("steering", "Steer with this feature", icon=":material/tune:", model=cfg.get("model"), source=dictionary,
                   terms=f"{feature}:4")

    left, right = st.columns(2)
    with left:
        density = index.density()
        alive = density.dropna(subset=["log10_density"])
        mark = pd.DataFrame({"x": [np.log10(row["density"])]}) if row["density"] > 0 else pd.DataFrame({"x": []})
        chart = alt.Chart(alive).mark_bar(color="#9aa7b8").encode(
            x=alt.X("log10_density:Q", bin=alt.Bin(maxbins=40), title="log10 density (all features)"), y=alt.Y("count():Q", title="features"))
        rule = alt.Chart(mark).mark_rule(color="#d6452c", strokeWidth=2).encode(x="x:Q")
        st.altair_chart((chart + rule).properties(height=200), width="stretch")
        st.caption(f"Red: this feature. {int((density['density'] <= 0).sum()):,} of {len(density):,} features are dead.")
    with right:
        activation_histogram(dictionary, int(feature))

    st.html(f"<style>{TOKENS_CSS} .ex td{{padding:2px 8px;vertical-align:top}} .ex .a{{font-family:monospace;color:#555}}</style>")

    def examples_html(frame: pd.DataFrame) -> str:
        rows = "".join(
            f'<tr><td class="a">{a:.3f}</td><td>{tokens_html(list(t), list(v), scale=row["max_activation"], focus=int(c))}</td></tr>'
            for a, t, v, c in zip(frame["activation"], frame["window_text"], frame["window_activations"], frame["center"]))
        return f'<table class="ex">{rows}</table>'

    st.markdown("**Top activations** (shade = the feature's activation on each token; outlined = the maximum)")
    if len(data.top):
        st.html(examples_html(data.top))
    else:
        st.caption("No examples stored.")
    if len(data.quantiles):
        st.markdown("**Quantile samples** (each interval of (0, max] is sampled uniformly)")
        n_q = int(data.quantiles["quantile"].max()) + 1
        for q, group in data.quantiles.groupby("quantile", sort=False):
            lo, hi = row["max_activation"] * q / n_q, row["max_activation"] * (q + 1) / n_q
            st.caption(f"Interval {int(q) + 1} of {n_q}: activation in ({lo:.3g}, {hi:.3g}]")
            st.html(examples_html(group))

    promoted, suppressed = st.columns(2)
    for col, key, title in ((promoted, "promoted", "Promoted tokens"), (suppressed, "suppressed", "Suppressed tokens")):
        tokens, logits = row.get(f"{key}_tokens"), row.get(f"{key}_logits")
        with col:
            st.markdown(f"**{title}** (direct effect on the logits of one unit of the decoder direction)")
            if tokens:
                st.dataframe(pd.DataFrame({"token": [token_label(t) for t in tokens], "logit": logits}), hide_index=True,
                             column_config={"logit": st.column_config.NumberColumn(format="%+.3f")})
            else:
                st.caption("Not computed: this dictionary's output has no direction in the residual stream.")

    st.markdown("**Similar features** (decoder cosine similarity)")
    similar = list(zip(row.get("similar_features") or [], row.get("similar_cosines") or []))
    cols = st.columns(max(1, len(similar)))
    for col, (other, cosine) in zip(cols, similar):
        with col:
            shell.link("features", f"{other} · {cosine:.2f}", icon=":material/scatter_plot:", dictionary=dictionary, feature=other)
    heads = row.get("head_attribution")
    if heads:
        st.markdown("**Heads** (share of decoder weight per attention head)")
        st.altair_chart(alt.Chart(pd.DataFrame({"head": range(len(heads)), "share": heads})).mark_bar().encode(
            x="head:O", y="share:Q"), width="stretch")
