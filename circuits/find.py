"""`find_circuit`: every method behind one call, the same from Python and from the CLI.

```python
from workbench import load_model
from data.tasks import make_task
from circuits import CircuitOptions, find_circuit

model = load_model("ref-gpt2")
prompts = make_task("ioi", model.tokenizer, n=32, template=0)
run = find_circuit(model, prompts, CircuitOptions(method="relp"))
run.graph.top(10), run.curve
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from circuits.components import DEFAULT_FAMILIES
from circuits.evaluate import CurvePoint, faithfulness_curve
from circuits.graph import Graph
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from data.tasks import TaskPrompts
    from transformer_lens.model_bridge import TransformerBridge

METHODS = ("activation", "attribution", "ig", "relp", "path", "acdc", "features", "transcoder", "codes")
GRADIENT_METHODS = ("attribution", "ig", "relp")


@dataclass(frozen=True)
class CircuitOptions:
    """How to find a circuit (every field has a CLI flag of the same name)."""

    method: str = "relp"
    """activation | attribution | ig | relp | path | acdc | features | transcoder | codes."""
    positions: str = "auto"
    """each: one node per position; all: one per component; auto: each when every prompt has one length (path: all)."""
    edges: bool = False
    """attribution/ig/relp: score writer -> reader edges (a graph with adjacency) instead of nodes only."""
    families: tuple[str, ...] = DEFAULT_FAMILIES
    """Node families for node-level methods: embed, resid, attn, mlp, head."""
    steps: int = 5
    """ig: integration steps (1 = attribution patching)."""
    detach_pattern: bool = False
    """relp: also freeze attention patterns."""
    threshold: float = 0.01
    """acdc: the objective rise below which an edge is pruned."""
    objective: str = "kl"
    """acdc: kl (KL to the clean distribution) or metric (task metric change)."""
    dictionaries: tuple[str, ...] = ()
    """features/transcoder: dictionary names in the workspace (SAEs anywhere, transcoders on MLPs)."""
    via: str = "relp"
    """features/transcoder: the gradient method scoring features (attribution, ig or relp)."""
    max_features: int = 200
    """features/transcoder: feature nodes kept (largest |score|) before edges are computed."""
    node_threshold: float = 0.8
    """features/transcoder: cumulative-influence fraction of nodes kept by pruning."""
    edge_threshold: float = 0.98
    """features/transcoder: cumulative-influence fraction of edges kept by pruning."""
    code_positions: str = "final"
    """codes: read head outputs at the final position (the paper) or at every position."""
    code_size: int = 8
    """codes: codebook entries per head (few examples: a small codebook keeps chance uniqueness low)."""
    curve: str = "mean"
    """Faithfulness/completeness curve ablation: mean, resample or none."""


class CircuitRun(NamedTuple):
    graph: Graph
    curve: list[CurvePoint]  # empty when not computed or not applicable
    extra: dict[str, Any]  # method-specific results (ACDC verification, transcoder weight split, codes table)


def find_circuit(model: "TransformerBridge", prompts: "TaskPrompts", options: CircuitOptions = CircuitOptions(),
                 workspace=None) -> CircuitRun:
    """Run one method on the prompts and (for component graphs) measure its faithfulness curve."""
    method = options.method
    if method not in METHODS:
        raise WorkbenchError(f"unknown circuit method {method!r}; choose one of {', '.join(METHODS)}")
    auto_each = prompts.same_length and method != "path"  # exact edge patching per position costs E x pos forwards
    per_position = options.positions == "each" or (options.positions == "auto" and auto_each)
    if options.positions not in ("each", "all", "auto"):
        raise WorkbenchError(f"--positions must be each, all or auto, not {options.positions!r}")
    graph, extra = _run_method(model, prompts, options, per_position, workspace)
    curve = []
    if options.curve != "none" and graph.info.granularity in ("position", "component"):
        curve = faithfulness_curve(model, prompts, graph, ablation=options.curve)
    return CircuitRun(graph, curve, extra)


def _run_method(model, prompts, options: CircuitOptions, per_position: bool, workspace) -> tuple[Graph, dict]:
    from circuits import acdc, attribution, patching

    method = options.method
    rules = attribution.RelPRules(detach_pattern=options.detach_pattern)
    if method == "activation":
        return patching.activation_patch(model, prompts, options.families, per_position), {}
    if method in GRADIENT_METHODS and options.edges:
        return attribution.attribute_edges(model, prompts, method, per_position, options.steps, rules), {}
    if method in GRADIENT_METHODS:
        return attribution.attribute(model, prompts, method, options.families, per_position, options.steps, rules), {}
    if method == "path":
        return patching.path_patch(model, prompts, per_position), {}
    if method == "acdc":
        result = acdc.acdc(model, prompts, options.threshold, options.objective)
        return result.graph, {"kl": result.kl, "metric": result.metric, "recovered": result.recovered,
                              "kept_edges": len(result.kept), "forwards": result.forwards}
    if method == "codes":
        from circuits.codes import code_circuit

        result = code_circuit(model, prompts, positions=options.code_positions, code_size=options.code_size)
        return result.graph, {"heads": [row._asdict() for row in result.heads[:20]]}
    return _feature_method(model, prompts, options, workspace)


def _feature_method(model, prompts, options: CircuitOptions, workspace) -> tuple[Graph, dict]:
    from circuits.features import feature_circuit, load_dictionaries, transcoder_split

    if not options.dictionaries:
        raise WorkbenchError(f"--method {options.method} needs at least one --dictionary NAME from the workspace")
    if workspace is None:
        raise WorkbenchError(f"--method {options.method} reads dictionaries from a workspace; pass one")
    dictionaries = load_dictionaries(workspace, options.dictionaries, model)
    if options.method == "transcoder" and not any(not d.cfg.is_sae for d in dictionaries):
        raise WorkbenchError("--method transcoder needs a transcoder among the --dictionary names "
                             f"({', '.join(options.dictionaries)} are all SAEs); use --method features for SAEs")
    result = feature_circuit(model, prompts, dictionaries, via=options.via, steps=options.steps,
                             max_features=options.max_features, node_threshold=options.node_threshold,
                             edge_threshold=options.edge_threshold, detach_pattern=options.detach_pattern)
    extra: dict[str, Any] = {"component_scores": result.component_scores}
    if options.method == "transcoder":
        rows = transcoder_split(model, result, dictionaries)
        extra["transcoder_split"] = [r._asdict() for r in rows[:50]]
    return result.graph, extra


def parse_options(**values) -> CircuitOptions:
    """CircuitOptions from CLI-style values (None = default)."""
    known = CircuitOptions.__dataclass_fields__
    clean = {k: v for k, v in values.items() if k in known and v is not None}
    for key in ("families", "dictionaries"):
        if key in clean:
            clean[key] = tuple(clean[key])
    return CircuitOptions(**clean)
