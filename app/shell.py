"""What every page shares: the workspace, URL state, cached reads, links between pages, error display.

URL state. Every control that defines a view is bound to one query parameter
(`?dictionary=res-sae&feature=12`). On each run a control takes its value from
the URL when the URL changed since this session last wrote it (a fresh page
load, a deep link, a link from another page), and otherwise keeps what the
user picked; then it writes its value back. A URL value that names something
that does not exist (a missing feature, dictionary, circuit) gives a warning on
the page that says what exists instead, and the control falls back to a default.

Reads. `sql()` opens the workspace read-only for one query and closes it
(`Workspace.connect` attaches every published file READ_ONLY): the app never
holds a connection between runs, so a job writing its own file is never
blocked. Results are cached per workspace *signature* (names, sizes and times of
the published files and shards), so a newly published file is seen at once.
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import pandas as pd
import streamlit as st

from workbench.errors import WorkbenchError
from workbench.workspace import ENV_VAR, Workspace

APP_DIR = Path(__file__).resolve().parent


class PageSpec(NamedTuple):
    name: str  # also the file app/<name>.py
    title: str
    icon: str
    url_path: str
    section: str


PAGES: tuple[PageSpec, ...] = (
    PageSpec("home", "Home", ":material/home:", "", "Workspace"),  # the default page: served at /
    PageSpec("training", "Training monitor", ":material/monitoring:", "training", "Workspace"),
    PageSpec("dictionaries", "Dictionaries", ":material/menu_book:", "dictionaries", "Workspace"),
    PageSpec("features", "Feature dashboard", ":material/scatter_plot:", "features", "Workspace"),
    PageSpec("prompt", "Prompt explorer", ":material/edit_note:", "prompt", "Model"),
    PageSpec("attention", "Attention viewer", ":material/grid_on:", "attention", "Model"),
    PageSpec("circuits", "Circuits", ":material/account_tree:", "circuits", "Results"),
    PageSpec("steering", "Steering playground", ":material/tune:", "steering", "Results"),
    PageSpec("sql", "SQL", ":material/database:", "sql", "Tools"),
    PageSpec("reports", "Reports", ":material/description:", "reports", "Tools"),
)
_ST_PAGES: dict[str, Any] = {}


def _warm_imports() -> None:
    """Import the heavy packages (torch, TransformerLens) once per server, in the background, so the first page
    that runs a model does not pay ~10 s of imports; a page needing them meanwhile just waits on the import lock."""
    import importlib

    for module in ("torch", "transformer_lens.model_bridge"):
        try:
            importlib.import_module(module)
        except Exception:  # a broken optional import shows up, with its message, on the page that needs it
            return


threading.Thread(target=_warm_imports, name="workbench-warm-imports", daemon=True).start()


# ---------------------------------------------------------------------------------------------- shell
def set_workspace_from_argv(argv: Sequence[str]) -> None:
    """`streamlit run app.py -- --workspace DIR` sets the workspace for this server process."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--workspace")
    known, _ = parser.parse_known_args(list(argv))
    if known.workspace:
        os.environ[ENV_VAR] = str(Path(known.workspace).expanduser().resolve())


def workspace() -> Workspace:
    """The workspace this server shows ($WORKBENCH_WORKSPACE, else ./workspace)."""
    return Workspace()


def navigation_pages() -> dict[str, list]:
    """The st.Page objects by sidebar section; Home is the default page, served at `/`."""
    sections: dict[str, list] = {}
    for spec in PAGES:
        page = st.Page(APP_DIR / f"{spec.name}.py", title=spec.title, icon=spec.icon, url_path=spec.url_path,
                       default=spec.name == "home")
        _ST_PAGES[spec.name] = page
        sections.setdefault(spec.section, []).append(page)
    return sections


def sidebar() -> None:
    ws = workspace()
    with st.sidebar:
        st.caption(f"Workspace `{ws.root}`")
        if not ws.exists():
            st.caption(":red[does not exist yet]")
        if st.button("Reload workspace", icon=":material/refresh:", help="drop cached reads and re-read the workspace"):
            st.cache_data.clear()


def invalidate() -> None:
    """Forget cached reads (after this app itself wrote a file)."""
    st.cache_data.clear()


def run_page(page) -> None:
    """Run the page; a user error (bad input, a missing result) becomes one message, not a traceback."""
    from data.tasks import DataError

    try:
        page.run()
    except (WorkbenchError, DataError) as e:
        st.error(" ".join(str(e).split()), icon=":material/error:")


def link(page: str, label: str, icon: str | None = None, help: str | None = None, **params: Any) -> None:
    """A link to another page (or this one) opening the view the params describe."""
    query = {k: str(v) for k, v in params.items() if v is not None}
    st.page_link(_ST_PAGES[page], label=label, icon=icon, help=help, query_params=query or None)


# ---------------------------------------------------------------------------------------------- reads
def signature(ws: Workspace, shard_tables: Iterable[str] | None = None) -> tuple:
    """Names, sizes and modification times of what is published: changes whenever a job publishes.

    Every result file and dictionary counts; of the Parquet shard tables only `shard_tables`
    (all when None), so a training run appending metrics does not invalidate unrelated reads.
    """
    parts: list[tuple] = []
    for path in ws.published_dbs():
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        parts.append((path.name, stat.st_size, stat.st_mtime_ns))
    wanted = None if shard_tables is None else set(shard_tables)
    if ws.tables_dir.is_dir():
        for folder in sorted(ws.tables_dir.iterdir()):
            if wanted is not None and folder.name not in wanted:
                continue
            shards = [p.stat().st_mtime_ns for p in folder.glob("*.parquet")] if folder.is_dir() else []
            parts.append((folder.name, len(shards), max(shards, default=0)))
    parts.append(tuple(ws.dictionary_names()))
    return (str(ws.root), tuple(parts))


def sql(query: str, params: Sequence[Any] = ()) -> pd.DataFrame:
    """One read-only query over the workspace, cached until something it reads is published anew."""
    from workbench.report import referenced

    ws = workspace()
    return _cached_sql(signature(ws, referenced(query)), query, tuple(params)).copy()


def sql_many(queries: Sequence[str | tuple[str, Sequence[Any]]]) -> list[pd.DataFrame]:
    """Several read-only queries (text, or (text, params)) on one connection: one attach of the workspace
    instead of one per query. Cached together until something they read is published anew."""
    from workbench.report import referenced

    ws = workspace()
    pairs = tuple((q, ()) if isinstance(q, str) else (q[0], tuple(q[1])) for q in queries)
    names = set().union(*(referenced(q) for q, _ in pairs)) if pairs else set()
    return [f.copy() for f in _cached_sql_many(signature(ws, names), pairs)]


def tables() -> set[str]:
    """The table names visible in the workspace."""
    ws = workspace()
    if not ws.exists():
        return set()
    return set(_cached_tables(signature(ws)))


def count_distinct(table: str, column: str) -> int:
    """Distinct values of `column` in `table` (0 when the table or column is absent)."""
    if table not in tables() or column not in columns(table):
        return 0
    return int(sql(f'SELECT count(DISTINCT "{column}") AS n FROM "{table}"')["n"].iloc[0])


CATALOG = "activation_catalog"  # workbench.store.CATALOG_TABLE (not imported: it pulls torch into every page)


def cached_tokens() -> int:
    """Token positions in the activation store, over every cached run (0 when nothing is cached)."""
    if CATALOG not in tables():
        return 0
    return int(sql(f"SELECT coalesce(sum(rows), 0) AS n FROM (SELECT DISTINCT model, run, rows FROM {CATALOG})")["n"].iloc[0])


def columns(table: str) -> list[str]:
    return list(sql(f'SELECT * FROM "{table}" LIMIT 0').columns)


@st.cache_data(max_entries=512, show_spinner=False)
def _cached_sql(sig: tuple, query: str, params: tuple) -> pd.DataFrame:
    from workbench.report import read

    return read(Workspace(sig[0]), query, params)


@st.cache_data(max_entries=256, show_spinner=False)
def _cached_sql_many(sig: tuple, pairs: tuple) -> list[pd.DataFrame]:
    from workbench.report import read_many

    return read_many(Workspace(sig[0]), pairs)


@st.cache_data(max_entries=64, show_spinner=False)
def _cached_tables(sig: tuple) -> list[str]:
    from workbench.report import table_names

    return sorted(table_names(Workspace(sig[0])))


VIEW_SHARDS = ("activation_catalog", "activation_tokens", "dictionaries")  # shard tables the shared views read


def view(function: Callable, *args: Any, **kwargs: Any):
    """`function(workspace, *args, **kwargs)` from `workbench.report`'s shared views, cached until something new is
    published (training metrics excepted: no shared view reads them)."""
    ws = workspace()
    return _cached_view(signature(ws, VIEW_SHARDS), function.__module__, function.__qualname__, args,
                        tuple(sorted(kwargs.items())))


@st.cache_data(max_entries=256, show_spinner=False)
def _cached_view(sig: tuple, module: str, name: str, args: tuple, kwargs: tuple):
    import importlib

    return getattr(importlib.import_module(module), name)(Workspace(sig[0]), *args, **dict(kwargs))


def dictionary_summary() -> pd.DataFrame:
    from workbench.report import dictionary_summary as summary

    return view(summary)


def feature_index(name: str):
    """The in-memory `workbench.report.FeatureIndex` of dictionary `name` (None before its feature tables exist);
    read once per dictionary and published state, shared by every session."""
    return _feature_index(signature(workspace(), VIEW_SHARDS), name)


@st.cache_resource(max_entries=3, show_spinner="reading the feature tables…")
def _feature_index(sig: tuple, name: str):
    from workbench.report import feature_index as build

    return build(Workspace(sig[0]), name)


def feature_density(name: str) -> pd.DataFrame | None:
    """Every feature's density (feature, density, log10_density), None before the feature tables exist."""
    if "features" not in tables():
        return None
    frame = sql("SELECT feature, density, CASE WHEN density > 0 THEN log10(density) END AS log10_density FROM features "
                "WHERE dictionary = ? ORDER BY feature", [name])
    return frame if len(frame) else None


class Pending(NamedTuple):
    """A result still being computed in the background (the page shows what it has and checks again)."""

    what: str


_BACKGROUND: dict[tuple, Any] = {}
_BACKGROUND_LOCK = threading.Lock()


def activation_sample(name: str, wait: bool = False):
    """`workbench.report.activation_sample` of dictionary `name`, computed once per dictionary and cache state in a
    background thread: `Pending` until it is ready (unless `wait`), so the dashboard draws at once."""
    from concurrent.futures import ThreadPoolExecutor

    from workbench.report import activation_sample as sample

    root = str(workspace().root)
    key = ("activation_sample", root, name, dictionary_stamp(name), cached_tokens())
    with _BACKGROUND_LOCK:
        future = _BACKGROUND.get(key)
        if future is None:
            future = ThreadPoolExecutor(max_workers=1, thread_name_prefix="workbench-sample").submit(sample, Workspace(root), name)
            _BACKGROUND[key] = future
    if not wait and not future.done():
        return Pending(f"encoding a sample of cached activations with {name}")
    return future.result()


def require_workspace() -> Workspace:
    """The workspace, or a message saying what to run first (and the page stops)."""
    ws = workspace()
    if not ws.exists():
        st.warning(
            f"The workspace `{ws.root}` does not exist yet. Build one with `python -m workbench demo --workspace {ws.root}` "
            "(everything end to end on the reference model), or start with `python -m workbench cache` and point the app "
            "at it with `python -m workbench app --workspace DIR`.", icon=":material/folder_off:")
        st.stop()
    if ws.is_empty():
        st.info(
            f"The workspace `{ws.root}` is empty: nothing has been published yet. Run `python -m workbench demo "
            f"--workspace {ws.root}` to build everything, or `python -m workbench cache --workspace {ws.root}` to start "
            "with an activation cache.", icon=":material/inbox:")
        st.stop()
    return ws


def require_tables(*names: str, what: str, command: str) -> None:
    """Stop the page with a message naming the command that produces the missing tables."""
    missing = [n for n in names if n not in tables()]
    if missing:
        st.info(f"No {what} in this workspace yet (no {', '.join(f'`{m}`' for m in missing)} table). "
                f"Run `{command}` first.", icon=":material/inbox:")
        st.stop()


# ---------------------------------------------------------------------------------------------- jobs
class LaunchedJob(NamedTuple):
    """A workbench command this server started in its own process (it writes its own result file, as from a shell)."""

    id: str
    argv: tuple[str, ...]
    log: Path
    process: Any  # subprocess.Popen
    started: float


_LAUNCHED: dict[str, LaunchedJob] = {}
_LAUNCH_LOCK = threading.Lock()


def launch(argv: Sequence[str]) -> LaunchedJob:
    """Start `python -m workbench <argv> --workspace <this workspace>` as a separate process; its output goes to a log
    file in the system temp folder, and its results reach the workspace the way every job's do."""
    import subprocess
    import sys
    import tempfile
    import time
    import uuid

    job_id = uuid.uuid4().hex[:8]
    folder = Path(tempfile.gettempdir()) / "workbench-app-jobs"
    folder.mkdir(exist_ok=True)
    log = folder / f"{argv[0]}-{job_id}.log"
    full = ("-m", "workbench", *argv, "--workspace", str(workspace().root))
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, *full], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=str(APP_DIR.parent), start_new_session=True)
    job = LaunchedJob(job_id, tuple(argv), log, process, time.time())
    with _LAUNCH_LOCK:
        _LAUNCHED[job_id] = job
    return job


def launched(command: str) -> list[LaunchedJob]:
    """Jobs of `command` this server started on this workspace, newest first."""
    root = str(workspace().root)
    with _LAUNCH_LOCK:
        jobs = [j for j in _LAUNCHED.values() if j.argv[0] == command and root in j.process.args]
    return sorted(jobs, key=lambda j: j.started, reverse=True)


def log_tail(job: LaunchedJob, lines: int = 12) -> str:
    """The last lines of a job's log, each progress-bar line reduced to its latest state."""
    try:
        text = job.log.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(line.split("\r")[-1] for line in text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------- models
class LoadedModel(NamedTuple):
    """A model shared by every session of this server, and the lock that keeps hook users apart."""

    model: Any
    lock: threading.Lock


@st.cache_resource(max_entries=3, show_spinner="loading model…")
def loaded_model(name: str) -> LoadedModel:
    from workbench.model import load_model

    return LoadedModel(load_model(name), threading.Lock())


def loaded_dictionary(name: str, stamp: float | None = None):
    """The dictionary `name` of this workspace (shared; `stamp` = its cfg.json time, so a retrain reloads it)."""
    return _load_dictionary(str(workspace().root), name, dictionary_stamp(name) if stamp is None else stamp)


def dictionary_stamp(name: str) -> float:
    try:
        return (workspace().dictionaries_dir / name / "cfg.json").stat().st_mtime
    except FileNotFoundError:
        raise WorkbenchError(f"dictionary {name!r} is not in the workspace {workspace().root}") from None


@st.cache_resource(max_entries=4, show_spinner="loading dictionary…")
def _load_dictionary(root: str, name: str, stamp: float):
    from sae import load_dictionary

    dictionary = load_dictionary(Workspace(root), name)
    return dictionary.eval() if hasattr(dictionary, "eval") else dictionary


def known_models() -> list[str]:
    """Models named in the workspace (cached activations, dictionaries), then the bundled models that are built."""
    from data import BUNDLED_MODELS, bundled_model_dir

    names: list[str] = []
    if CATALOG in tables():
        names += [m for m in sql(f"SELECT DISTINCT model FROM {CATALOG} ORDER BY 1")["model"] if m]
    for name in workspace().dictionary_names():
        model = dictionary_cfg(name).get("model")
        if model and model not in names:
            names.append(model)
    names += [m for m in BUNDLED_MODELS if m not in names and (bundled_model_dir(m) / "config.json").is_file()]
    return names


def model_select(where=None, name: str = "model") -> str | None:
    """Pick a model: those the workspace names and the built bundled ones, plus any loadable name the URL gives
    (a local HuggingFace directory or a cached hub name), so a link can open a model the workspace never saw."""
    from workbench.model import resolve_model_dir

    options = known_models()
    raw = _url_raw(name)
    if raw and raw not in options:
        try:
            resolve_model_dir(raw)
            options.append(raw)
        except WorkbenchError as e:
            (where or st).warning(f"model `{raw}` cannot be loaded: {e}", icon=":material/link_off:")
    if not options:
        (where or st).info("No model to show: build the reference model with `python -m workbench zoo build`, or "
                           "cache activations of a model into the workspace.", icon=":material/inbox:")
        return None
    return url_select("Model", options, name, options[0], where=where, format_func=_short_model)


def _short_model(name: str) -> str:
    return name if len(name) < 48 else "…" + name[-46:]


def dictionary_cfg(name: str) -> dict:
    import json

    try:
        return json.loads((workspace().dictionaries_dir / name / "cfg.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------- URL state
def _url_raw(name: str) -> str | None:
    value = st.query_params.get(name)
    return None if value is None else str(value)


def _from_url(name: str, key: str) -> bool:
    """True when this control must (re)read the URL: first run, or the URL changed under it (a link, a reload)."""
    return key not in st.session_state or _url_raw(name) != st.session_state.get(f"_url_seen:{name}")


def _write_url(name: str, value: Any) -> None:
    text = None if value is None else str(value)
    if _url_raw(name) != text:
        if text is None:
            st.query_params.pop(name, None)
        else:
            st.query_params[name] = text
    st.session_state[f"_url_seen:{name}"] = text


def url_select(label: str, options: Sequence[Any], name: str, default: Any = None, *,
               format_func: Callable[[Any], str] = str, where=None, help: str | None = None, what: str | None = None) -> Any:
    """A selectbox bound to `?name=`; an unknown URL value warns and falls back to `default` (or the first option)."""
    where = where or st
    options = list(options)
    if not options:
        return None
    key = f"url:{name}"
    fallback = default if default in options else options[0]
    if _from_url(name, key):
        raw = _url_raw(name)
        match = [o for o in options if str(o) == raw]
        if raw is not None and not match:
            shown = ", ".join(str(o) for o in options[:8]) + (" …" if len(options) > 8 else "")
            where.warning(f"{what or label} `{raw}` is not in this workspace; showing `{fallback}`. Available: {shown}.",
                          icon=":material/link_off:")
        st.session_state[key] = match[0] if match else fallback
    elif st.session_state[key] not in options:
        st.session_state[key] = fallback
    value = where.selectbox(label, options, key=key, format_func=format_func, help=help)
    _write_url(name, value)
    return value


def url_text(label: str, name: str, default: str = "", *, area: bool = False, where=None, help: str | None = None,
             height: int | None = None, placeholder: str | None = None) -> str:
    """A text input (or area) bound to `?name=`."""
    where = where or st
    key = f"url:{name}"
    if _from_url(name, key):
        raw = _url_raw(name)
        st.session_state[key] = default if raw is None else raw
    if area:
        value = where.text_area(label, key=key, help=help, height=height, placeholder=placeholder)
    else:
        value = where.text_input(label, key=key, help=help, placeholder=placeholder)
    _write_url(name, value)
    return value


def url_number(label: str, name: str, default: float | int, *, min_value=None, max_value=None, step=None,
               where=None, help: str | None = None, what: str | None = None, widget: str = "number", hint: str = ""):
    """A number input or slider bound to `?name=`; a non-number or out-of-range URL value warns and uses `default`."""
    where = where or st
    key = f"url:{name}"
    cast = int if isinstance(default, int) and not isinstance(step, float) else float
    if _from_url(name, key):
        raw = _url_raw(name)
        value = default
        if raw is not None:
            try:
                value = cast(raw)
                if (min_value is not None and value < min_value) or (max_value is not None and value > max_value):
                    raise ValueError
            except ValueError:
                where.warning(f"{what or label} `{raw}` does not exist: expected a number from {min_value} to "
                              f"{max_value}{hint}; showing {default}.", icon=":material/link_off:")
                value = default
        st.session_state[key] = value
    if widget == "slider":
        value = where.slider(label, min_value=min_value, max_value=max_value, step=step, key=key, help=help)
    else:
        value = where.number_input(label, min_value=min_value, max_value=max_value, step=step, key=key, help=help)
    _write_url(name, value)
    return value


def url_toggle(label: str, name: str, default: bool = False, *, where=None, help: str | None = None) -> bool:
    where = where or st
    key = f"url:{name}"
    if _from_url(name, key):
        raw = _url_raw(name)
        st.session_state[key] = default if raw is None else raw.lower() in ("1", "true", "yes", "on")
    value = where.toggle(label, key=key, help=help)
    _write_url(name, int(value))
    return value


def url_multiselect(label: str, options: Sequence[Any], name: str, default: Sequence[Any] = (), *, where=None,
                    help: str | None = None, max_selections: int | None = None) -> list:
    """A multiselect bound to `?name=a,b,c`; unknown entries in the URL are dropped with a warning."""
    where = where or st
    options = list(options)
    key = f"url:{name}"
    if _from_url(name, key):
        raw = _url_raw(name)
        wanted = [w for w in (raw.split(",") if raw else []) if w]
        chosen = [o for o in options if str(o) in wanted]
        unknown = [w for w in wanted if w not in {str(o) for o in options}]
        if unknown:
            where.warning(f"{label}: {', '.join(f'`{u}`' for u in unknown)} not found; ignored.", icon=":material/link_off:")
        st.session_state[key] = chosen if raw is not None else [o for o in default if o in options]
    else:
        st.session_state[key] = [o for o in st.session_state[key] if o in options]
    value = where.multiselect(label, options, key=key, help=help, max_selections=max_selections)
    _write_url(name, ",".join(str(v) for v in value))
    return value


def set_url_value(name: str, value: Any) -> None:
    """Change a bound control from code (a click in a chart, a button), effective on this run's rerun."""
    st.session_state[f"url:{name}"] = value
