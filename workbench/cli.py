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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        _top_level_parser().parse_args(argv or ["--help"])  # prints help or the 'invalid choice' error and exits
        return 2
    command = argv[0]
    module_name, help_text = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"python -m workbench {command}", description=help_text)
    parser.add_argument("--workspace", default=None, help="workspace directory (default: $WORKBENCH_WORKSPACE or ./workspace)")
    parser.add_argument("--json", action="store_true", help="print one JSON object summarising the result on stdout")
    module = importlib.import_module(module_name)
    getattr(module, f"configure_{command}")(parser)
    args = parser.parse_args(argv[1:])
    try:
        result = getattr(module, f"run_{command}")(args)
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a re-run resumes where it can", file=sys.stderr)
        return 130
    except Exception as e:  # user errors become one line; anything else is a bug and keeps its traceback
        if not _is_user_error(e):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    _print_result(result or {}, as_json=args.json)
    return 0


def _is_user_error(e: Exception) -> bool:
    from data.tasks import DataError

    return isinstance(e, (WorkbenchError, DataError))


def _top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
