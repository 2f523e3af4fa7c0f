"""Prompt explorer: type a prompt, see the model's predictions at every position and the top dictionary
features on every token, each feature a link to its dashboard.

One forward pass gives the logits and, when a dictionary is chosen, the activation at
the dictionary's input site; the dictionary's `encode` turns it into feature
activations ([pos, d_sae]). Nothing is written anywhere.
"""

from typing import NamedTuple

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st
import torch

from app import shell
from workbench.report import tokens_html, token_label, TOKENS_CSS

MAX_TOKENS = 256
TOP_K = 10


class Forward(NamedTuple):
    tokens: list[str]
    top_ids: np.ndarray  # [pos, TOP_K] next-token predictions
    top_probs: np.ndarray  # [pos, TOP_K]
    top_strs: list[list[str]]
    actual_prob: np.ndarray  # [pos] probability given to the token that really came next (nan at the end)
    features: np.ndarray | None  # [pos, d_sae] activations of the chosen dictionary
    cut: int  # tokens dropped from the end (longer than MAX_TOKENS or the model's context)


@st.cache_resource(max_entries=16, show_spinner="running the model…")  # a page-local record: shared, never mutated
def forward(model_name: str, prompt: str, dictionary: str | None, dictionary_stamp: float) -> Forward:
    model, lock = shell.loaded_model(model_name)
    encoder = shell.loaded_dictionary(dictionary, dictionary_stamp) if dictionary else None
    site = encoder.cfg.site if encoder is not None else None
    with lock, torch.no_grad():
        full = model.to_tokens(prompt, truncate=False)
        tokens = full[:, :min(MAX_TOKENS, model.cfg.n_ctx)]
        logits, cache = model.run_with_cache(tokens, names_filter=[site] if site else lambda name: False)
        probs = logits[0].float().softmax(-1)  # [pos, d_vocab]
        top = probs.topk(TOP_K, dim=-1)
        nxt = tokens[0, 1:]
        actual = torch.cat([probs[:-1].gather(1, nxt[:, None])[:, 0], torch.tensor([float("nan")])])
        features = None
        if encoder is not None:
            acts = encoder.site_input(cache[site][0].float())  # [pos, d_in] (one head's slice for per-head dictionaries)
            features = encoder.encode(acts.to(encoder.W_enc.device)).float().cpu().numpy()
        strs = [[model.to_single_str_token(int(i)) for i in row] for row in top.indices]
    return Forward([str(t) for t in model.to_str_tokens(tokens[0])], top.indices.numpy(), top.values.numpy(), strs,
                   actual.numpy(), features, full.shape[1] - tokens.shape[1])


st.title("Prompt explorer")
top = st.columns([2, 2])
model_name = shell.model_select(where=top[0])
if model_name is None:
    st.stop()
names = [n for n in shell.workspace().dictionary_names() if shell.dictionary_cfg(n).get("model") == model_name] \
    if shell.workspace().exists() else []
dictionary = shell.url_select("Dictionary (features)", ["(none)"] + names, "dictionary", "(none)", where=top[1],
                              help="dictionaries trained on this model's activations")
dictionary = None if dictionary == "(none)" else dictionary
prompt = shell.url_text("Prompt", "prompt", "When Mary and John went to the store, John gave a drink to", area=True, height=90)
if not prompt.strip():
    st.warning("Type a prompt to see what the model predicts and which features fire.")
    st.stop()
result = forward(model_name, prompt, dictionary, shell.dictionary_stamp(dictionary) if dictionary else 0.0)
n_pos = len(result.tokens)
if result.cut:
    st.warning(f"The prompt was cut to its first {n_pos} tokens ({result.cut} more did not fit the model's context).")
pos = shell.url_number("Position", "pos", n_pos - 1, min_value=0, max_value=n_pos - 1, step=1,
                       help="the token whose predictions and features are shown below")

st.html(f"<style>{TOKENS_CSS}</style>")
surprise = -np.log(np.clip(np.nan_to_num(result.actual_prob, nan=1.0), 1e-12, 1.0))
titles = [f"pos {i}: p(next = actual) = {p:.3f}; top: " + ", ".join(f"{token_label(s)} {q:.2f}" for s, q in
                                                                        zip(result.top_strs[i][:3], result.top_probs[i][:3]))
          for i, p in enumerate(np.nan_to_num(result.actual_prob, nan=1.0))]
st.markdown("**Surprise of each next token** (shade = −log p(actual next token); hover for the top predictions)")
st.html(tokens_html(result.tokens, surprise, scale=8.0, focus=pos, titles=titles))

left, right = st.columns([1, 1])
with left:
    st.subheader(f"Next-token predictions after `{token_label(result.tokens[pos])}` (pos {pos})")
    preds = pd.DataFrame({"token": [token_label(s) for s in result.top_strs[pos]], "id": result.top_ids[pos],
                          "probability": result.top_probs[pos]})
    st.altair_chart(alt.Chart(preds).mark_bar().encode(
        x=alt.X("probability:Q"), y=alt.Y("token:N", sort="-x"),
        tooltip=["token", "id", alt.Tooltip("probability:Q", format=".4f")]), width="stretch")
with right:
    st.subheader("Every position")
    table = pd.DataFrame({"pos": range(n_pos), "token": [token_label(t) for t in result.tokens],
                          "next": [token_label(t) for t in result.tokens[1:]] + [""],
                          "p(next)": result.actual_prob,
                          "top predictions": [", ".join(f"{token_label(s)} ({p:.2f})" for s, p in zip(r[:5], q[:5]))
                                              for r, q in zip(result.top_strs, result.top_probs)]})
    st.dataframe(table, hide_index=True, height=320)

if result.features is None:
    if not names:
        st.caption("No dictionary trained on this model in the workspace: train one with `python -m workbench train` "
                   "to see features here.")
    st.stop()

st.subheader(f"Top features of `{dictionary}` on each token")
acts = result.features  # [pos, d_sae]
k = shell.url_number("Features per token", "k", 5, min_value=1, max_value=20, step=1, widget="slider")
order = np.argsort(-acts, axis=1)[:, :k]
rows = [(i, token_label(result.tokens[i]), int(f), float(acts[i, f])) for i in range(n_pos) for f in order[i] if acts[i, f] > 0]
frame = pd.DataFrame(rows, columns=["pos", "token", "feature", "activation"])
if frame.empty:
    st.info("No feature of this dictionary is active on this prompt.")
    st.stop()
shown = sorted(frame["feature"].unique())
grid = pd.DataFrame([(i, f"{i}·{token_label(result.tokens[i])}", int(f), float(acts[i, f])) for i in range(n_pos) for f in shown],
                    columns=["pos", "token", "feature", "activation"])
pick = alt.selection_point(name="pick", fields=["feature"])


def _focus_picked() -> None:
    picked = (st.session_state.get("feature_grid") or {}).get("selection", {}).get("pick") or []
    if picked:
        shell.set_url_value("focus", int(picked[0]["feature"]))


st.altair_chart(alt.Chart(grid).mark_rect().encode(
    x=alt.X("feature:O"), y=alt.Y("token:N", sort=list(dict.fromkeys(grid["token"]))),
    color=alt.Color("activation:Q", scale=alt.Scale(scheme="oranges")),
    opacity=alt.condition(pick, alt.value(1.0), alt.value(0.4)),
    tooltip=["pos", "token", "feature", alt.Tooltip("activation:Q", format=".3f")]).add_params(pick),
    on_select=_focus_picked, selection_mode="pick", key="feature_grid")
st.caption("Click a feature to follow it across the prompt below.")

here = frame[frame["pos"] == pos]
st.markdown(f"**Features on `{token_label(result.tokens[pos])}` (pos {pos})**: click through to a feature's dashboard.")
if here.empty:
    st.caption("No feature is active on this token.")
for feature, activation in zip(here["feature"], here["activation"]):
    shell.link("features", f"feature {feature} · activation {activation:.3f}", icon=":material/scatter_plot:",
               dictionary=dictionary, feature=feature)
default_focus = int(here["feature"].iloc[0]) if not here.empty else int(shown[0])
focus = shell.url_number("Feature followed across the prompt", "focus", default_focus, min_value=0,
                         max_value=acts.shape[1] - 1, step=1)
st.html(tokens_html(result.tokens, acts[:, focus], focus=pos))
shell.link("features", f"Open feature {focus}", icon=":material/open_in_new:", dictionary=dictionary, feature=focus)
