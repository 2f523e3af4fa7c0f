"""Home: what the workspace holds (models, cached sites, dictionaries, circuits, steering runs, jobs), with links."""

import streamlit as st

from app import shell

st.title("Workbench")
ws = shell.require_workspace()
present = shell.tables()

counts = shell.sql_many([f'SELECT count(*) AS n FROM "{t}"' for t in sorted(present)]) if present else []
row_counts = {t: int(f["n"].iloc[0]) for t, f in zip(sorted(present), counts)}

jobs = sorted(ws.jobs_dir.glob("*.json")) if ws.jobs_dir.is_dir() else []
running = [j for j in (ws.read_json(f"jobs/{p.name}") or {} for p in jobs) if str(j.get("status", "")).lower() == "running"]
cols = st.columns(5)
cols[0].metric("Cached tokens", f"{shell.cached_tokens():,}")
cols[1].metric("Dictionaries", len(ws.dictionary_names()))
cols[2].metric("Circuits", shell.count_distinct("circuits", "circuit_id"))
cols[3].metric("Steering runs", shell.count_distinct("steering_runs", "run_id"))
cols[4].metric("Running jobs", len(running))

st.subheader("Models and cached sites")
if shell.CATALOG in present:
    catalog = shell.sql(f"SELECT model, run, site, width, shape, dtype, rows, sequences, context, corpus, split, complete "
                        f"FROM {shell.CATALOG} ORDER BY model, run, site")
    st.dataframe(catalog, hide_index=True)
    for model in catalog["model"].drop_duplicates():
        left, right = st.columns(2)
        with left:
            shell.link("attention", f"Attention in {model}", icon=":material/grid_on:", model=model)
        with right:
            shell.link("prompt", f"Prompt explorer on {model}", icon=":material/edit_note:", model=model)
else:
    st.caption("No activation cache yet: `python -m workbench cache --model ref-gpt2 --sites blocks.1.hook_resid_post`.")

st.subheader("Dictionaries")
names = ws.dictionary_names()
if names:
    for name in names:
        cfg = shell.dictionary_cfg(name)
        left, mid, right = st.columns([3, 2, 2])
        left.markdown(f"**{name}** · {cfg.get('arch', '?')} on `{cfg.get('site', '?')}`"
                      + (f" → `{cfg['target_site']}`" if cfg.get("target_site") else "")
                      + f" · {cfg.get('d_sae', '?')} features")
        with mid:
            shell.link("features", "Features", icon=":material/scatter_plot:", dictionary=name)
        with right:
            shell.link("training", "Training curves", icon=":material/monitoring:", runs=name)
else:
    st.caption("No dictionaries yet: `python -m workbench train` trains an SAE or transcoder on the cache.")

for title, table, key, page, param in (("Circuits", "circuits", "circuit_id", "circuits", "circuit"),
                                       ("Steering runs", "steering_runs", "run_id", "steering", "run")):
    st.subheader(title)
    if table in present:
        ids = shell.sql(f'SELECT DISTINCT "{key}" FROM "{table}" ORDER BY 1')[key].tolist()
        for item in ids:
            shell.link(page, str(item), icon=":material/open_in_new:", **{param: item})
    else:
        st.caption(f"None yet (no `{table}` table).")

if "model_behaviours" in present:
    st.subheader("Model behaviour")
    st.dataframe(shell.sql("SELECT model, task, figure, value, passed, split, measured_at FROM model_behaviours "
                           "ORDER BY model, task, figure"), hide_index=True)

if jobs:
    st.subheader("Jobs")
    st.dataframe([{"job": p.stem, **{k: v for k, v in (ws.read_json(f"jobs/{p.name}") or {}).items()
                                     if isinstance(v, (str, int, float, bool))}} for p in jobs], hide_index=True)

st.subheader("Tables")
st.caption("Every table the SQL page can query, with its row count.")
for table in sorted(present):
    left, right = st.columns([4, 1])
    left.markdown(f"`{table}` · {row_counts.get(table, 0):,} rows")
    with right:
        shell.link("sql", "Query", icon=":material/database:", q=f'SELECT * FROM "{table}" LIMIT 100')
