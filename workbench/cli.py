"""`python -m workbench <command>`: the one entry point, and the one place that imports every package.

Each command lives in a module that defines `configure_<command>(parser)` (its
arguments) and `run_<command>(args) -> dict` (the work; the dict is the result
summary). The CLI adds `--workspace` and `--json` to every command, imports a
command's module only when that command runs (so `--help` stays fast), prints
the summary as one JSON object on stdout under `--json` and as `key: value`
lines otherwise, and turns user errors into one line on stderr and exit status 1.
Progress and messages go to stderr, so stdout under `--json` is exactly one object.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import sys

from workbench.errors import WorkbenchError

# command -> (module, one-line help). Later issues add their commands here.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("workbench.demo", "build a workspace end to end on the reference model and report what it did"),
    "models": ("workbench.zoo", "list the bundled models and measure their task behaviour"),
    "zoo": ("workbench.zoo", "build the bundled reference models (`zoo build`)"),
    "cache": ("workbench.caching", "run a model over a corpus and cache the activations of chosen sites in the workspace's store"),
    "circuit": ("circuits.commands", "find the components and features that carry a task behaviour (patching, attribution, IG, RelP, ACDC, transcoders, codes)"),
    "steer": ("workbench.steering", "generate baseline vs steered text and measure target and side effects of an intervention"),
    "app": ("app.launch", "open the Streamlit app on a workspace (serves until Ctrl+C)"),
    "report": ("workbench.report", "write a self-contained HTML report (and its tables as Parquet/JSON) from a workspace"),
    "train": ("sae.commands", "train sparse dictionaries (SAEs, transcoders, codebooks; every variant) on cached activations"),
    "eval": ("sae.commands", "evaluate dictionaries (L0, FVU, CE recovered, KL, density), the superposition toy, MLP sparsity"),
    "features": ("sae.commands", "write per-feature tables (density, top contexts, quantile samples, logits, similar features)"),
}


class _UsageError(Exception):
    """Bad command-line arguments (argparse's own message)."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (argparse prints the whole usage block, then the message, and exits)."""

    def error(self, message: str):
        raise _UsageError(f"{message} (`{self.prog} --help` lists the options)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
            _top_level_parser().parse_args(argv or ["--help"])  # prints help and exits, or raises the 'invalid choice' error
            return 2
        command = argv[0]
        module_name, help_text = COMMANDS[command]
        parser = _Parser(prog=f"python -m workbench {command}", description=help_text)
        parser.add_argument("--workspace", default=None, help="workspace directory (default: $WORKBENCH_WORKSPACE or ./workspace)")
        parser.add_argument("--json", action="store_true", help="print one JSON object summarising the result on stdout")
        module = importlib.import_module(module_name)
        getattr(module, f"configure_{command}")(parser)
        args = parser.parse_args(argv[1:])
    except _UsageError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    try:
        result = getattr(module, f"run_{command}")(args)
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a re-run resumes where it can", file=sys.stderr)
        return 130
    except Exception as e:  # user errors become one line; anything else is a bug and keeps its traceback
        # a user error keeps its own words, even one raised while handling an OSError (it says more than errno)
        message = str(e) if _is_user_error(e) else _environment_error(e)
        if message is None:
            raise
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        return 1
    _print_result(result or {}, as_json=args.json)
    return 0


def _is_user_error(e: Exception) -> bool:
    from data.tasks import DataError

    return isinstance(e, (WorkbenchError, DataError))


# errno -> what to do, for the machine's refusals that no command can fix itself
_ENVIRONMENT = {
    errno.ENOSPC: "the disk is full: free space and re-run (what was published before is intact)",
    errno.EDQUOT: "the disk quota is used up: free space and re-run (what was published before is intact)",
    errno.EFBIG: "a file-size limit was reached: raise it (ulimit -f) and re-run",
    errno.EROFS: "the file system is read-only: pick a workspace you can write with --workspace",
    errno.EACCES: "permission denied: pick a workspace you can write with --workspace, or fix its permissions",
    errno.EPERM: "operation not permitted: pick a workspace you can write with --workspace, or fix its permissions",
    errno.ENOTDIR: "a file is in the way where a directory should be (is --workspace a file?)",
}


def _environment_error(e: BaseException) -> str | None:
    """One line for an OSError the machine raised (disk full, read-only, no permission, a file where a directory
    should be), naming the file; None for anything else."""
    for error in (e, e.__cause__, e.__context__):  # a library may re-raise it wrapped
        if isinstance(error, OSError) and error.errno in _ENVIRONMENT:
            where = f" ({error.filename})" if error.filename else ""
            return f"{error.strerror or error}{where}: {_ENVIRONMENT[error.errno]}"
    return None


def _top_level_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m workbench",
        description="Interpretability workbench: cache activations, train sparse dictionaries, find circuits, steer, explore.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    return parser


def _print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, default=str))
        return
    for key, value in result.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, default=str)
        print(f"{key}: {value}")
