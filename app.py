"""The workbench app: `streamlit run app.py [-- --workspace DIR]` or `python -m workbench app`.

This file is the router: it fixes the workspace (from `--workspace`, else
$WORKBENCH_WORKSPACE, else ./workspace), draws the sidebar, and runs the page the
URL names. Every page lives in `app/<page>.py`; its state lives in the URL query
string, so a link reopens the same view. The app only reads the workspace (one
short-lived read-only connection per query) and writes nothing to it but
exported reports.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `streamlit run` from another directory

import streamlit as st  # noqa: E402

from app import shell  # noqa: E402

shell.set_workspace_from_argv(sys.argv[1:])
st.set_page_config(page_title="workbench", page_icon=":material/biotech:", layout="wide")
page = st.navigation(shell.navigation_pages(), position="sidebar", expanded=True)
shell.sidebar()
shell.run_page(page)
