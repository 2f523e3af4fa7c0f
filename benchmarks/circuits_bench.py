"""Circuit methods, measured side by side in one run: speed, agreement with exact patching, planted ground truth.

    python benchmarks/circuits_bench.py                  # reference model (ref-gpt2) + planted models
    python benchmarks/circuits_bench.py --skip-planted   # only the IOI speed and agreement tables
    python benchmarks/circuits_bench.py --model DIR --json results.json

1. Speed (IOI, the reference model): exhaustive activation patching of every
   residual position, attention output, MLP output and head at every layer and
   position, against attribution patching, RelP, RelP with frozen patterns and
   EAP-IG, on the same prompts in the same process. Ratio = patching time /
   method time. Target: attribution and RelP >= 50x.
2. Agreement (the RelP paper's table): Pearson correlation of each method with
   exact patching per node family, with runtimes. Target: RelP >= 0.9 on MLP
   outputs and above attribution patching there. Then the same agreement on other
   prompt sets (every held-out IOI template, greater-than, docstring), with the
   spread of RelP minus attribution per family: one prompt set's difference in
   the third decimal is not a ranking.
3. Ground truth (the planted-circuit models): ROC AUC, precision and recall of
   every method's components (and edges, where the method scores edges).
   Target: activation, attribution, IG and RelP >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from circuits.attribution import RelPRules, attribute, attribute_edges  # noqa: E402
from circuits.components import AGREEMENT_FAMILIES, one_length  # noqa: E402
from circuits.evaluate import pearson, score_edges, score_ground_truth  # noqa: E402
from circuits.patching import activation_patch, path_patch  # noqa: E402
from data.tasks import make_task  # noqa: E402

SPEED_METHODS = (("attribution", "attribution", None, 1), ("relp", "relp", RelPRules(), 1),
                 ("relp_detach", "relp", RelPRules(detach_pattern=True), 1), ("ig_5", "ig", None, 5))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ref-gpt2", help="model for the IOI speed/agreement tables (default ref-gpt2)")
    parser.add_argument("--n", type=int, default=32, help="IOI prompt pairs (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats of each gradient method (median)")
    parser.add_argument("--skip-planted", action="store_true")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--skip-sets", action="store_true", help="skip the agreement sweep over other prompt sets")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    report: dict = {"torch_threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if not args.skip_reference:
        report["ioi"] = reference_tables(args.model, args.n, args.repeats)
        if not args.skip_sets:
            report["agreement_sets"] = agreement_sets(args.model, args.n, report["ioi"])
    if not args.skip_planted:
        report["planted"] = planted_tables()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


# ---------------------------------------------------------------------------- 1 + 2: IOI on the reference model
def reference_tables(name: str, n: int, repeats: int) -> dict:
    from circuits.commands import load_circuit_model
    from workbench.errors import WorkbenchError

    try:
        model = load_circuit_model(name, None)
    except WorkbenchError as e:
        print(f"[ioi] skipped: {e}")
        return {"skipped": str(e)}
    drawn = make_task("ioi", model.tokenizer, n=4 * n, split="heldout", template=0, seed=0)
    prompts = one_length(drawn, n).to(model.cfg.device)  # one token length, so positions line up
    attribute(model, prompts, "attribution", families=AGREEMENT_FAMILIES)  # warm-up
    exact = activation_patch(model, prompts, families=AGREEMENT_FAMILIES, per_position=True)
    n_nodes = len(exact.nodes)
    print(f"\n== IOI on {name}: {n} held-out prompt pairs, {prompts.clean.shape[1]} positions, {n_nodes} nodes "
          f"(clean metric {exact.info.clean_metric:.3f}, corrupt {exact.info.corrupt_metric:.3f}) ==")
    print(f"{'method':<22}{'seconds':>10}{'speed-up':>10}   " + "".join(f"{f:>9}" for f in AGREEMENT_FAMILIES))
    print(f"{'activation (exact)':<22}{exact.info.runtime_s:>10.3f}{1.0:>10.1f}   " + "".join(f"{1.0:>9.3f}" for _ in AGREEMENT_FAMILIES))
    rows = {"activation": {"seconds": exact.info.runtime_s, "nodes": n_nodes, "pairs": len(prompts)}}
    for label, method, rules, _ in SPEED_METHODS:
        times, graph = [], None
        for _ in range(repeats):
            graph = attribute(model, prompts, method, families=AGREEMENT_FAMILIES, rules=rules, steps=5)
            times.append(graph.info.runtime_s)
        seconds = sorted(times)[len(times) // 2]
        corr = {f: pearson(_family(graph, f), _family(exact, f)) for f in AGREEMENT_FAMILIES}
        rows[label] = {"seconds": seconds, "speedup": exact.info.runtime_s / seconds, "pearson": corr}
        print(f"{label:<22}{seconds:>10.3f}{exact.info.runtime_s / seconds:>10.1f}   " + "".join(f"{corr[f]:>9.3f}" for f in AGREEMENT_FAMILIES))
    relp, attr = rows["relp"]["pearson"]["mlp"], rows["attribution"]["pearson"]["mlp"]
    print(f"targets: RelP MLP Pearson {relp:.3f} (>= 0.9: {relp >= 0.9}; beats attribution {attr:.3f}: {relp > attr}); "
          f"speed-up attribution {rows['attribution']['speedup']:.0f}x, RelP {rows['relp']['speedup']:.0f}x (>= 50x: "
          f"{min(rows['attribution']['speedup'], rows['relp']['speedup']) >= 50})")
    return rows


PROMPT_SETS = (("ioi", 0), ("ioi", 1), ("ioi", 2), ("ioi", 3), ("greater_than", 0), ("docstring", 0))


def agreement_sets(name: str, n: int, ioi: dict | None = None) -> dict:
    """Pearson agreement with exact patching of attribution, RelP and IG on each of `PROMPT_SETS` (held-out split).

    `ioi`, the rows of `reference_tables` (the same prompts as the first set), supplies that set's figures
    instead of patching it again.
    """
    from circuits.commands import load_circuit_model
    from circuits.evaluate import agreement_table
    from workbench.errors import WorkbenchError

    try:
        model = load_circuit_model(name, None)
    except WorkbenchError as e:
        return {"skipped": str(e)}
    methods = ("attribution", "relp", "ig")
    print(f"\n== agreement with exact patching on other prompt sets ({name}, held-out split, up to {n} pairs of one length) ==")
    print(f"{'set':<16}{'pairs':>6}  {'method':<12}" + "".join(f"{f:>9}" for f in AGREEMENT_FAMILIES))
    out: dict = {}
    for task, template in PROMPT_SETS:
        label = f"{task}/{template}"
        if (task, template) == PROMPT_SETS[0] and ioi and "relp" in ioi:
            table = {m: ioi["ig_5" if m == "ig" else m]["pearson"] for m in methods}
            _agreement_rows(out, label, ioi["activation"]["pairs"], table, methods)
            continue
        try:
            prompts = one_length(make_task(task, model.tokenizer, n=4 * n, split="heldout", template=template, seed=0), n)
        except WorkbenchError as e:
            print(f"{label:<16} skipped: {e}")
            continue
        rows, _ = agreement_table(model, prompts.to(model.cfg.device), methods=methods, families=AGREEMENT_FAMILIES)
        _agreement_rows(out, label, len(prompts), {m: {r.family: r.pearson for r in rows if r.method == m} for m in methods}, methods)
    if out:
        print(f"{'RelP - attribution':<34}" + "".join(f"{f:>9}" for f in AGREEMENT_FAMILIES))
        summary = {}
        for stat in ("mean", "min", "max"):
            row = {}
            for f in AGREEMENT_FAMILIES:
                diffs = [v["pearson"]["relp"][f] - v["pearson"]["attribution"][f] for v in out.values()]
                row[f] = {"mean": sum(diffs) / len(diffs), "min": min(diffs), "max": max(diffs)}[stat]
            summary[stat] = row
            print(f"  {stat + ' over ' + str(len(out)) + ' sets':<32}" + "".join(f"{row[f]:>+9.3f}" for f in AGREEMENT_FAMILIES))
        out["relp_minus_attribution"] = summary
    return out


def _agreement_rows(out: dict, label: str, pairs: int, table: dict, methods) -> None:
    out[label] = {"pairs": pairs, "pearson": table}
    for m in methods:
        print(f"{label if m == methods[0] else '':<16}{pairs if m == methods[0] else '':>6}  {m:<12}"
              + "".join(f"{table[m][f]:>9.3f}" for f in AGREEMENT_FAMILIES))


def _family(graph, family: str) -> torch.Tensor:
    return torch.tensor([s for node, s in zip(graph.nodes, graph.scores.tolist()) if node.kind == family])


# ---------------------------------------------------------------------------- 3: planted ground truth
def planted_tables() -> dict:
    from circuits.acdc import acdc
    from circuits.codes import code_circuit
    from circuits.features import feature_circuit, quick_dictionaries
    from data.planted import PLANTED, ensure_planted, load_ground_truth
    from workbench.model import load_model

    out = {}
    for name in PLANTED:
        model = load_model(ensure_planted(name))
        truth = load_ground_truth(name)
        prompts = make_task("induction", model.tokenizer, n=16, seed=0).to(model.cfg.device)
        print(f"\n== ground truth: {name} (circuit {sorted(truth.components())}) ==")
        print(f"{'method':<30}{'ROC AUC':>9}{'precision':>11}{'recall':>8}{'seconds':>10}   selected")
        rows = {}
        whole = dict(families=("head", "mlp"), per_position=False)
        acdc_graph = acdc(model, prompts, threshold=0.05).graph
        runs = [("activation", lambda: activation_patch(model, prompts, **whole)),
                ("attribution", lambda: attribute(model, prompts, "attribution", **whole)),
                ("ig (5 steps)", lambda: attribute(model, prompts, "ig", steps=5, **whole)),
                ("relp", lambda: attribute(model, prompts, "relp", **whole)),
                ("relp (frozen patterns)", lambda: attribute(model, prompts, "relp", rules=RelPRules(detach_pattern=True), **whole)),
                ("acdc (kl, 0.05)", lambda: acdc_graph),
                ("codes (final, 8)", lambda: code_circuit(model, prompts[:10], code_size=8).graph)]
        for label, run in runs:
            rows[label] = _score_row(label, run(), truth)
        start = time.perf_counter()
        dicts = quick_dictionaries(model, _induction_tokens(model, 256), train_tokens=40_000)
        trained = time.perf_counter() - start
        for label, chosen in (("features (SAEs + transcoders)", dicts),
                              ("transcoder (MLPs only)", [d for d in dicts if not d.cfg.is_sae])):
            result = feature_circuit(model, prompts, chosen, via="relp", max_features=200)
            rows[label] = _score_row(label, result.graph, truth, result.component_scores)
        print(f"  (the {len(dicts)} dictionaries trained in {trained:.1f}s with the sae trainer, not counted above)")
        print("edges")
        for label, run in (("path patching", lambda: path_patch(model, prompts)),
                           ("attribution", lambda: attribute_edges(model, prompts, "attribution")),
                           ("relp", lambda: attribute_edges(model, prompts, "relp")),
                           ("acdc", lambda: acdc_graph)):
            graph = run()
            score = score_edges(graph, truth)
            rows[f"edges: {label}"] = score._asdict()
            print(f"  {label:<28}{score.roc_auc:>9.3f}{score.precision:>11.2f}{score.recall:>8.2f}{graph.info.runtime_s:>10.2f}   "
                  f"{', '.join(score.selected)}")
        out[name] = rows
    return out


def _score_row(label: str, graph, truth, importance=None) -> dict:
    score = score_ground_truth(graph, truth, importance=importance)
    print(f"{label:<30}{score.roc_auc:>9.3f}{score.precision:>11.2f}{score.recall:>8.2f}{graph.info.runtime_s:>10.2f}   "
          f"{', '.join(score.selected)}")
    return score._asdict()


def _induction_tokens(model, n: int, seed: int = 0) -> torch.Tensor:
    """[n, 1 + 2 * 20] rows of BOS + 20 random tokens repeated (the model's context holds 48)."""
    from data.tasks import induction_sequences

    return induction_sequences(model.tokenizer, n, length=20, seed=seed)


if __name__ == "__main__":
    raise SystemExit(main())
