"""The workbench core: model access, sites, the workspace, the activation store, interventions, the CLI.

`from workbench import load_model, Workspace` gives the common entry points;
they are imported on first use so that `python -m workbench --help` stays fast.
"""

from workbench.errors import WorkbenchError

_LAZY = {"load_model": "workbench.model", "DEFAULT_MODEL": "workbench.model", "Workspace": "workbench.workspace"}

__all__ = ["DEFAULT_MODEL", "WorkbenchError", "Workspace", "load_model"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
