"""Attention viewer: attention patterns per layer and head for a prompt.

One forward pass caches every `blocks.<l>.attn.hook_pattern` ([batch, head, query, key],
rows sum to 1); the page shows one head as a query × key heatmap, every head of a
layer side by side, and TransformerLens's head detector scores (previous-token,
duplicate-token, induction) for every head, where a click opens that head.
"""

from typing import NamedTuple

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st
import torch

from app import shell
from workbench.report import token_label

MAX_TOKENS = 160
DETECTORS = ("previous_token_head", "duplicate_token_head", "induction_head")
DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to Mary. When Mary and John went to the store"


class Patterns(NamedTuple):
    tokens: list[str]
    patterns: np.ndarray  # [layer, head, query, key]
    detectors: dict[str, np.ndarray]  # name -> [layer, head]
    cut: int  # tokens dropped from the end of the prompt (longer than MAX_TOKENS or the model's context)


@st.cache_resource(max_entries=16, show_spinner="running the model…")  # a page-local record: shared, never mutated
def attention(model_name: str, prompt: str) -> Patterns:
    from transformer_lens import head_detector

    model, lock = shell.loaded_model(model_name)
    with lock, torch.no_grad():
        full = model.to_tokens(prompt, truncate=False)
        tokens = full[:, :min(MAX_TOKENS, model.cfg.n_ctx)]
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("attn.hook_pattern"))
        patterns = np.stack([cache[f"blocks.{l}.attn.hook_pattern"][0].float().cpu().numpy() for l in range(model.cfg.n_layers)])
    detectors = {}
    for name in DETECTORS:  # the head detector's ideal pattern for these very tokens, scored against every head
        ideal = getattr(head_detector, f"get_{name}_detection_pattern")(tokens.cpu())
        detectors[name] = np.array([[float(head_detector.compute_head_attention_similarity_score(
            torch.from_numpy(patterns[l, h]), ideal, exclude_bos=False, exclude_current_token=False, error_measure="mul"))
            for h in range(patterns.shape[1])] for l in range(patterns.shape[0])])
    return Patterns([str(t) for t in model.to_str_tokens(tokens[0])], patterns, detectors, full.shape[1] - tokens.shape[1])


st.title("Attention viewer")
top = st.columns([2, 1, 1, 1])
model_name = shell.model_select(where=top[0])
if model_name is None:
    st.stop()
prompt = shell.url_text("Prompt", "prompt", DEFAULT_PROMPT, area=True, height=90)
if not prompt.strip():
    st.warning("Type a prompt to see its attention patterns.")
    st.stop()
result = attention(model_name, prompt)
n_layers, n_heads, n_pos, _ = result.patterns.shape
if result.cut:
    st.warning(f"The prompt was cut to its first {n_pos} tokens ({result.cut} more did not fit the viewer or the model's context).")
layer = shell.url_number("Layer", "layer", 0, min_value=0, max_value=n_layers - 1, step=1, where=top[1])
head = shell.url_number("Head", "head", 0, min_value=0, max_value=n_heads - 1, step=1, where=top[2])
scale = shell.url_select("Colour scale", ["linear", "sqrt"], "scale", "linear", where=top[3],
                         help="sqrt makes weak attention visible next to a strong sink")

labels = [f"{i}·{token_label(t)}" for i, t in enumerate(result.tokens)]


def heatmap(pattern: np.ndarray, size: int, title: str | None = None) -> alt.Chart:
    q, k = np.tril_indices(len(labels))
    frame = pd.DataFrame({"query": [labels[i] for i in q], "key": [labels[j] for j in k], "weight": pattern[q, k]})
    return alt.Chart(frame, title=title or alt.Undefined, width=size, height=size).mark_rect().encode(
        x=alt.X("key:N", sort=labels, title="key (attended to)", axis=alt.Axis(labelLimit=90, labelAngle=-60) if size > 200 else None),
        y=alt.Y("query:N", sort=labels, title="query (attending)", axis=alt.Axis(labelLimit=90) if size > 200 else None),
        color=alt.Color("weight:Q", scale=alt.Scale(scheme="blues", domain=[0, 1], type=scale), legend=None if size <= 200 else alt.Legend()),
        tooltip=["query", "key", alt.Tooltip("weight:Q", format=".3f")],
    )


def _open_picked_head() -> None:
    picked = st.session_state["detector_chart"]["selection"].get("pick") or []
    if picked:
        shell.set_url_value("layer", int(picked[0]["layer"]))
        shell.set_url_value("head", int(picked[0]["head"]))


tab_head, tab_layer, tab_detect = st.tabs([f"Head L{layer}H{head}", f"All heads in layer {layer}", "Head detector"])
with tab_head:
    st.altair_chart(heatmap(result.patterns[layer, head], min(720, 60 + 22 * n_pos)), width="content")
    st.caption("Rows are query positions, columns the key positions they attend to; each row sums to 1 (causal: "
               "upper triangle empty).")
with tab_layer:
    per_row = 4
    charts = [heatmap(result.patterns[layer, h], 160, f"H{h}") for h in range(n_heads)]
    rows = [alt.hconcat(*charts[i:i + per_row]) for i in range(0, n_heads, per_row)]
    st.altair_chart(alt.vconcat(*rows), width="content")
with tab_detect:
    detector = shell.url_select("Detector", list(DETECTORS), "detector", DETECTORS[0], format_func=lambda d: d.replace("_", " "))
    scores = result.detectors[detector]
    grid = pd.DataFrame([(l, h, float(scores[l, h])) for l in range(n_layers) for h in range(n_heads)], columns=["layer", "head", "score"])
    pick = alt.selection_point(name="pick", fields=["layer", "head"])
    chart = alt.Chart(grid).mark_rect().encode(
        x=alt.X("head:O"), y=alt.Y("layer:O"), color=alt.Color("score:Q", scale=alt.Scale(scheme="viridis")),
        tooltip=["layer", "head", alt.Tooltip("score:Q", format=".3f")],
        stroke=alt.condition(pick, alt.value("red"), alt.value(None)),
    ).add_params(pick).properties(width=min(40 * n_heads, 600), height=min(30 * n_layers, 500))
    st.altair_chart(chart, on_select=_open_picked_head, selection_mode="pick", key="detector_chart")
    st.caption("Score of each head against the detector's ideal pattern on this prompt (TransformerLens head detector, "
               "'mul' measure: the share of attention on the pattern's positions). Click a head to open it.")
