"""The Streamlit app's pages (one file each) and the shell they share.

`app.py` at the repository root is the entry point; `app.shell` holds the
plumbing every page uses (the workspace, URL state, cached reads, links);
`app.readonly` runs user SQL on a connection that cannot write or reach files
outside the workspace; `app.launch` starts the server for `python -m workbench app`.
Pages compose the workbench packages and hold no analysis of their own.
"""
