"""Steering playground: add dictionary features or saved vectors with coefficients, generate baseline and
steered text side by side, and sweep the coefficient for a dose-response curve; browse saved steering runs.

Everything here goes through `workbench.steering`: `side_by_side` samples both
continuations with the same seed (any difference is the intervention's), and
`Meter.dose_response` reads the target tokens' probability, the feature's own
activation and the KL divergence on neutral text at each coefficient. Nothing is
written to the workspace; `python -m workbench steer` saves runs.
"""

import json
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from app import shell
from workbench.errors import WorkbenchError

st.title("Steering playground")
ws = shell.require_workspace()
tab_live, tab_saved = st.tabs(["Playground", "Saved runs"])


def _parse_terms(text: str) -> list[tuple[str, float]]:
    """'12:4, 7:-2' -> [('12', 4.0), ('7', -2.0)]: feature ids (or vector names) with coefficients."""
    terms = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        name, _, coef = part.rpartition(":")
        try:
            terms.append((name.strip(), float(coef)))
        except ValueError:
            raise WorkbenchError(f"steering term {part!r}: write NAME:COEF, e.g. 12:4 or 7:-2.5") from None
        if not name.strip():
            raise WorkbenchError(f"steering term {part!r}: write NAME:COEF, e.g. 12:4 or 7:-2.5")
    return terms


def _vectors() -> dict[str, Path]:
    folder = shell.workspace().root / "vectors"
    files = sorted(p for ext in ("*.safetensors", "*.npy", "*.json") for p in folder.glob(ext)) if folder.is_dir() else []
    return {p.stem: p for p in files}


@st.cache_resource(max_entries=32, show_spinner="generating…")  # page-local results: shared, never mutated
def _generate(model_name: str, source: str, terms: tuple, mode: str, prompt: str, positions: str, n_new: int,
              temperature: float, seed: int, stamp: float) -> tuple[str, str]:
    from workbench.steering import side_by_side

    model, lock = shell.loaded_model(model_name)
    with lock:
        build = _builder(model, source, terms, mode, positions)
        pair = side_by_side(model, prompt, build(1.0), max_new_tokens=n_new, temperature=temperature, seed=seed)
    return pair.baseline.text, pair.steered.text


@st.cache_resource(max_entries=16, show_spinner="sweeping the coefficient…")
def _sweep(model_name: str, source: str, terms: tuple, mode: str, prompt: str, positions: str, coefs: tuple,
           targets: tuple, stamp: float) -> pd.DataFrame:
    from workbench.steering import Meter, neutral_tokens

    model, lock = shell.loaded_model(model_name)
    with lock:
        build = _builder(model, source, terms, mode, positions)
        target_ids = []
        for text in targets:
            ids = model.to_tokens(text, prepend_bos=False)[0].tolist()
            if len(ids) != 1:
                raise WorkbenchError(f"target {text!r} is {len(ids)} tokens for this tokenizer; give single tokens")
            target_ids.append(ids[0])
        feature = _features(source, terms)[0] if source != "vector" and len(terms) == 1 else None
        meter = Meter(model, [prompt], targets=target_ids, feature=feature, neutral=neutral_tokens(model, n=4, context=32))
        rows = meter.dose_response(build, list(coefs))
    return pd.DataFrame([r._asdict() for r in rows])


def _features(dictionary: str, terms: tuple) -> list:
    from workbench.interventions import Feature

    loaded = shell.loaded_dictionary(dictionary)
    features = []
    for name, _ in terms:
        if not name.lstrip("-").isdigit():
            raise WorkbenchError(f"{name!r} is not a feature id of {dictionary} (0..{loaded.cfg.d_sae - 1})")
        features.append(Feature.from_dictionary(loaded, int(name), f"{dictionary}:{name}"))
    return features


def _builder(model, source: str, terms: tuple, mode: str, positions: str):
    """coef -> interventions: every term scaled by the sweep coefficient (1 = the coefficients as typed)."""
    from workbench.directions import SteeringVector, feature_vector
    from workbench.interventions import ClampFeature, Positions

    where = Positions.parse(positions)
    if source == "vector":
        files = _vectors()
        missing = [n for n, _ in terms if n not in files]
        if missing:
            raise WorkbenchError(f"no vector {', '.join(missing)} under {shell.workspace().root / 'vectors'}")
        vectors = [(SteeringVector.load(files[n]), c) for n, c in terms]
        return lambda k: [v.add(k * c, where) for v, c in vectors]
    features = list(zip(_features(source, terms), [c for _, c in terms]))
    if mode == "clamp":
        return lambda k: [ClampFeature(f, k * c, where) for f, c in features]
    return lambda k: [feature_vector(f).add(k * c, where) for f, c in features]


def playground() -> None:
    top = st.columns([2, 2, 1])
    model_name = shell.model_select(where=top[0])
    if model_name is None:
        return
    dictionaries = [n for n in ws.dictionary_names() if shell.dictionary_cfg(n).get("model") == model_name]
    sources = dictionaries + (["vector"] if _vectors() else [])
    if not sources:
        st.info("Nothing to steer with yet: train a dictionary on this model (`python -m workbench train`), or save a "
                "vector with `python -m workbench steer ... --save-vector <workspace>/vectors/NAME.safetensors`.",
                icon=":material/inbox:")
        return
    source = shell.url_select("Steer with", sources, "source", sources[0], where=top[1],
                              format_func=lambda s: "a saved vector" if s == "vector" else f"features of {s}")
    mode = shell.url_select("Mode", ["add", "clamp"] if source != "vector" else ["add"], "mode", "add", where=top[2],
                            help="add: x += coef · decoder row; clamp: set the feature's activation to coef (delta form)")
    hint = ", ".join(f"{n}:4" for n in list(_vectors())[:2]) if source == "vector" else "0:4, 3:-2"
    terms_text = shell.url_text("Terms (feature or vector : coefficient, comma-separated)", "terms", hint)
    prompt = shell.url_text("Prompt", "prompt", "When Mary and John went to the store, John gave a drink to", area=True, height=80)
    row = st.columns(4)
    positions = shell.url_text("Positions", "positions", "all", where=row[0], help="all | prompt | generated | 3,5,-1")
    n_new = shell.url_number("New tokens", "tokens", 20, min_value=1, max_value=200, step=1, where=row[1])
    temperature = shell.url_number("Temperature", "temperature", 0.0, min_value=0.0, max_value=2.0, step=0.1, where=row[2])
    seed = shell.url_number("Seed", "seed", 0, min_value=0, max_value=2**31 - 1, step=1, where=row[3])
    terms = tuple(_parse_terms(terms_text))
    if not terms or not prompt.strip():
        st.warning("Give at least one term (e.g. `12:4`) and a prompt.")
        return
    stamp = shell.dictionary_stamp(source) if source != "vector" else 0.0
    baseline, steered = _generate(model_name, source, terms, mode, prompt, positions, int(n_new), float(temperature), int(seed), stamp)
    left, right = st.columns(2)
    left.markdown("**Baseline**")
    left.code(prompt + baseline, language=None, wrap_lines=True)
    right.markdown("**Steered** (" + ", ".join(f"{n} × {c:g}" for n, c in terms) + f", {mode})")
    right.code(prompt + steered, language=None, wrap_lines=True)
    if source != "vector" and len(terms) == 1:
        shell.link("features", f"Open feature {terms[0][0]} of {source}", icon=":material/scatter_plot:",
                   dictionary=source, feature=terms[0][0])

    st.subheader("Dose-response")
    row = st.columns([2, 2])
    coefs_text = shell.url_text("Multipliers of the terms", "sweep", "-2,-1,0,0.5,1,2,4", where=row[0],
                                help="each multiplier scales every coefficient above; 1 = as typed")
    targets_text = shell.url_text("Target tokens (comma-separated, each one token)", "targets", "", where=row[1],
                                  help="their summed next-token probability is the target effect; empty: none")
    try:
        coefs = tuple(float(c) for c in coefs_text.split(",") if c.strip())
    except ValueError:
        raise WorkbenchError(f"multipliers must be numbers separated by commas, not {coefs_text!r}") from None
    targets = tuple(t for t in (s if s.startswith(" ") else s.strip() for s in targets_text.split(",")) if t.strip())
    if shell.url_toggle("Run the sweep", "dose", False,
                        help="one forward pass over the prompt and four rows of neutral text per multiplier"):
        curve = _sweep(model_name, source, terms, mode, prompt, positions, coefs, targets, stamp)
        measures = [c for c in ("target_prob", "feature_act", "kl", "ce_increase", "metric") if curve[c].notna().any()]
        long = curve.melt(id_vars=["coef"], value_vars=measures, var_name="measure").dropna()
        st.altair_chart(alt.Chart(long).mark_line(point=True).encode(
            x=alt.X("coef:Q", title="multiplier"), y=alt.Y("value:Q"), color="measure:N",
            facet=alt.Facet("measure:N", columns=3), tooltip=["coef", "measure", alt.Tooltip("value:Q", format=".4g")]
        ).resolve_scale(y="independent").properties(width=260, height=180))
        st.dataframe(curve, hide_index=True)
        st.caption("target_prob: summed probability of the target tokens after the prompt; feature_act: the feature's "
                   "activation there after the edit; kl: KL(baseline ‖ steered) on neutral text, nats/token.")


def saved_runs() -> None:
    if "steering_runs" not in shell.tables():
        st.info("No saved steering runs: `python -m workbench steer --feature NAME:F --coef 4 --prompt \"...\"` saves one.",
                icon=":material/inbox:")
        return
    runs = shell.sql("SELECT * FROM steering_runs ORDER BY created DESC")
    names = {r.run_id: f"{r.kind} · coef {r.coef} · {r.run_id}" for r in runs.itertuples()}
    run_id = shell.url_select("Run", runs["run_id"].tolist(), "run", runs["run_id"].iloc[0],
                              format_func=lambda r: names.get(r, r), what="steering run")
    run = runs[runs["run_id"] == run_id].iloc[0]
    cols = st.columns(4)
    cols[0].metric("Kind", run["kind"])
    cols[1].metric("Coefficient", "—" if pd.isna(run["coef"]) else f"{run['coef']:g}")
    cols[2].metric("KL on neutral text", "—" if pd.isna(run["kl"]) else f"{run['kl']:.4f}")
    cols[3].metric("Target prob", "—" if pd.isna(run["target_prob_steered"]) else
                   f"{run['target_prob_baseline']:.3f} → {run['target_prob_steered']:.3f}")
    st.caption(f"model `{run['model']}` · positions {run['positions']} · seed {run['seed']} · temperature "
               f"{run['temperature']} · targets {', '.join(json.loads(run['targets'] or '[]')) or 'none'}")
    with st.expander("Interventions"):
        st.json(json.loads(run["interventions"] or "[]"))
    gens, sweep, layers = shell.sql_many([
        ("SELECT prompt_index, prompt, variant, text FROM steering_generations WHERE run_id = ? ORDER BY prompt_index, variant",
         [run_id]),
        ("SELECT * FROM steering_sweeps WHERE run_id = ? ORDER BY coef", [run_id]),
        ("SELECT * FROM steering_layers WHERE run_id = ?", [run_id])])
    for index, group in gens.groupby("prompt_index"):
        texts = dict(zip(group["variant"], group["text"]))
        prompt_text = group["prompt"].iloc[0]
        left, right = st.columns(2)
        left.markdown(f"**Baseline** · prompt {index}")
        left.code(prompt_text + texts.get("baseline", ""), language=None, wrap_lines=True)
        right.markdown(f"**Steered** · prompt {index}")
        right.code(prompt_text + texts.get("steered", ""), language=None, wrap_lines=True)
    if len(sweep):
        st.subheader("Dose-response")
        measures = [c for c in ("target_prob", "feature_act", "kl", "ce_increase", "metric") if sweep[c].notna().any()]
        long = sweep.melt(id_vars=["coef"], value_vars=measures, var_name="measure").dropna()
        st.altair_chart(alt.Chart(long).mark_line(point=True).encode(
            x="coef:Q", y="value:Q", color="measure:N", facet=alt.Facet("measure:N", columns=3),
            tooltip=["coef", "measure", alt.Tooltip("value:Q", format=".4g")]
        ).resolve_scale(y="independent").properties(width=260, height=180))
    if len(layers):
        st.subheader("Layer sweep")
        st.altair_chart(alt.Chart(layers).mark_bar().encode(x=alt.X("site:N", sort=None), y="score:Q", tooltip=list(layers.columns)),
                        width="stretch")


with tab_live:
    playground()
with tab_saved:
    saved_runs()
