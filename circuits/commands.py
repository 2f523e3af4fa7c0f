"""`python -m workbench circuit`: find a circuit for a task, store it in the workspace, export it.

    python -m workbench circuit --task ioi --method relp
    python -m workbench circuit --task induction --model planted-induction --method acdc --threshold 0.05
    python -m workbench circuit --task my_prompts.jsonl --method attribution --positions all --edges --export out/
    python -m workbench circuit --task ioi --method transcoder --dictionary tc-mlp0 --dictionary tc-mlp1

Built-in tasks pin template 0 (one prompt length, so positions line up) unless
`--template` is given or `--positions all` asks for whole components over mixed
templates. The circuit is published as `db/circuit-<id>.duckdb` (tables in
docs/circuits.md); `--export DIR` also writes the circuit-tracer/Neuronpedia
graph JSON (`<id>.json`, `graph-metadata.json`) and Graphviz DOT (`<id>.dot`).
"""

from __future__ import annotations

import argparse
import sys

from circuits.find import METHODS, CircuitOptions


def configure_circuit(parser: argparse.ArgumentParser) -> None:
    d = CircuitOptions()
    parser.add_argument("--task", required=True, help="ioi | greater_than | docstring | induction | a prompts .jsonl file")
    parser.add_argument("--method", choices=METHODS, default=d.method, help=f"circuit method (default {d.method})")
    parser.add_argument("--model", default="ref-gpt2", help="bundled model name, model directory or hub name (default ref-gpt2)")
    parser.add_argument("--dictionary", dest="dictionaries", action="append", default=None, metavar="NAME",
                        help="a workspace dictionary for --method features/transcoder (repeat for several)")
    parser.add_argument("--n", type=int, default=32, help="prompt pairs (default 32)")
    parser.add_argument("--split", default="train", help="train | heldout (default train)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--template", type=int, default=None, help="pin one template (default 0 for built-in tasks)")
    parser.add_argument("--positions", choices=("auto", "each", "all"), default=d.positions,
                        help="one node per position (each), per component (all), or each when lengths agree (auto)")
    parser.add_argument("--edges", action="store_true", help="attribution/ig/relp: score edges too")
    parser.add_argument("--families", nargs="+", default=None, help=f"node families (default {' '.join(d.families)})")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"ig: integration steps (default {d.steps})")
    parser.add_argument("--detach-pattern", action="store_true", help="relp: also freeze attention patterns")
    parser.add_argument("--threshold", type=float, default=d.threshold, help=f"acdc: pruning threshold (default {d.threshold})")
    parser.add_argument("--objective", choices=("kl", "metric"), default=d.objective, help="acdc objective (default kl)")
    parser.add_argument("--via", choices=("attribution", "ig", "relp"), default=d.via,
                        help="features/transcoder: gradient method for feature scores (default relp)")
    parser.add_argument("--max-features", type=int, default=d.max_features)
    parser.add_argument("--node-threshold", type=float, default=d.node_threshold)
    parser.add_argument("--edge-threshold", type=float, default=d.edge_threshold)
    parser.add_argument("--code-positions", choices=("final", "all"), default=d.code_positions)
    parser.add_argument("--code-size", type=int, default=d.code_size)
    parser.add_argument("--curve", choices=("mean", "resample", "none"), default=d.curve,
                        help="ablation for the faithfulness/completeness curve (default mean)")
    parser.add_argument("--export", default=None, metavar="DIR", help="also write <id>.json (Neuronpedia) and <id>.dot here")
    parser.add_argument("--top", type=int, default=10, help="nodes listed in the summary (default 10)")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when present)")


def run_circuit(args: argparse.Namespace) -> dict:
    from circuits.find import find_circuit, parse_options
    from circuits.graph import save_graph
    from workbench.workspace import Workspace

    workspace = Workspace(args.workspace)
    model = load_circuit_model(args.model, args.device)
    prompts = circuit_prompts(args, model)
    options = parse_options(**vars(args))
    print(f"circuit: {options.method} on {args.task} ({len(prompts)} prompt pairs) with {args.model}", file=sys.stderr)
    run = find_circuit(model, prompts, options, workspace)
    curve_rows = [p._asdict() | {"ablation": options.curve} for p in run.curve]
    circuit_id = save_graph(workspace, run.graph, curves=curve_rows)
    exports = export_graph(run.graph, args.export) if args.export else []
    return summary(run, circuit_id, workspace, exports, args.top)


def load_circuit_model(name: str, device: str | None):
    """load_model, building a planted-circuit model first when one is named and not yet built."""
    from data.planted import PLANTED, ensure_planted
    from workbench.model import load_model

    if name in PLANTED:
        ensure_planted(name)
    return load_model(name, device=device)


def circuit_prompts(args: argparse.Namespace, model):
    """The task's prompts; for per-position work on built-in tasks, one template and one token length.

    A template's words can tokenize to different lengths, so 4n prompts are drawn
    and the first n of the most common length are kept (said on stderr).
    """
    from circuits.components import one_length
    from data.tasks import TASKS, make_task

    builtin = args.task in TASKS and args.task != "induction"
    if not builtin or args.positions == "all":
        return make_task(args.task, model.tokenizer, n=args.n, split=args.split, seed=args.seed, template=args.template)
    template = 0 if args.template is None else args.template
    drawn = make_task(args.task, model.tokenizer, n=4 * args.n, split=args.split, seed=args.seed, template=template)
    prompts = one_length(drawn, args.n)
    if len(prompts) < args.n:
        print(f"circuit: only {len(prompts)} of {len(drawn)} drawn prompts share the most common length "
              f"({int(prompts.final_pos[0]) + 1} tokens); using those", file=sys.stderr)
    return prompts


def export_graph(graph, directory: str) -> list[str]:
    from pathlib import Path

    from circuits.export import to_dot, write_neuronpedia
    from workbench.workspace import atomic_write_text

    json_path = write_neuronpedia(graph, directory)
    dot_path = Path(directory) / f"{graph.circuit_id}.dot"
    atomic_write_text(dot_path, to_dot(graph))
    return [str(json_path), str(dot_path)]


def summary(run, circuit_id: str, workspace, exports: list[str], top: int) -> dict:
    graph = run.graph
    info = graph.info
    result = {"circuit_id": circuit_id, "model": info.model, "task": info.task, "method": info.method,
              "granularity": info.granularity, "n_prompts": info.n_prompts, "clean_metric": round(info.clean_metric, 4),
              "corrupt_metric": round(info.corrupt_metric, 4), "runtime_s": round(info.runtime_s, 3),
              "nodes": len(graph), "edges": int((graph.adjacency != 0).sum()),
              "circuit_nodes": len(graph.circuit_nodes()),
              "top": [{"node": n.id, "score": round(s, 5)} for n, s in graph.top(top)],
              "database": str(workspace.db_dir / f"circuit-{circuit_id}.duckdb")}
    if run.curve:
        result["faithfulness"] = [[p.size, round(p.faithfulness, 4), round(p.completeness, 4)] for p in run.curve]
    if exports:
        result["exports"] = exports
    return result | {k: v for k, v in run.extra.items() if k != "component_scores"}
