"""Circuit discovery: which components and features carry a behaviour, and how faithful the answer is.

One sign convention (denoising: from the corrupt run toward the clean run,
gradients on the corrupt run), one graph type (`circuits.graph.Graph`, stored in
DuckDB), every method behind `find_circuit`:

- `circuits.patching`: exact activation patching (nodes) and path patching (edges);
- `circuits.attribution`: attribution patching, EAP-IG and RelP, for nodes and edges;
- `circuits.acdc`: greedy edge pruning with a threshold, verified by real ablation;
- `circuits.features`: feature circuits / attribution graphs over SAE and transcoder
  features with error nodes, pruned by cumulative influence; the transcoder weight split;
- `circuits.codes`: discrete-code circuit identification from a handful of examples;
- `circuits.evaluate`: faithfulness/completeness curves, agreement with exact patching,
  ROC AUC and precision/recall against planted ground truth;
- `circuits.export`: circuit-tracer/Neuronpedia graph JSON and Graphviz DOT;
- `circuits.commands`: `python -m workbench circuit`.

See docs/circuits.md for the conventions, tables and formats.
"""

_LAZY = {"find_circuit": "circuits.find", "CircuitOptions": "circuits.find", "CircuitRun": "circuits.find",
         "Graph": "circuits.graph", "Node": "circuits.graph", "save_graph": "circuits.graph", "load_graph": "circuits.graph"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'circuits' has no attribute {name!r}")
