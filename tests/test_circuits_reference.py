"""Circuit methods on the bundled reference model (`ref-gpt2`), where behaviour matters.

The done-when bar on IOI: RelP correlates with exact activation patching at
least 0.9 on MLP outputs, and better than attribution patching there. The
speed target (>= 50x over exhaustive patching) is measured side by side in
benchmarks/circuits_bench.py, never in a timed test.
"""

from __future__ import annotations

import json

import pytest

from circuits.components import one_length
from circuits.evaluate import agreement_table
from data.tasks import make_task
from workbench.cli import main

pytestmark = pytest.mark.reference
REF = "ref-gpt2"


@pytest.fixture(scope="module")
def ioi(ref_model):
    return one_length(make_task("ioi", ref_model.tokenizer, n=96, split="heldout", template=0, seed=0), 24)


@pytest.fixture(scope="module")
def mlp_agreement(ref_model, ioi):
    rows, exact = agreement_table(ref_model, ioi, methods=("attribution", "relp"), families=("mlp",))
    pearson = {r.method: r.pearson for r in rows}
    print(f"\nIOI MLP outputs on {REF} ({len(ioi)} pairs, gap {exact.info.clean_metric - exact.info.corrupt_metric:.3f}): "
          f"RelP {pearson['relp']:.3f}, attribution {pearson['attribution']:.3f}")
    return pearson, exact


def test_relp_tracks_activation_patching_on_ioi_mlp_outputs(mlp_agreement):
    pearson, exact = mlp_agreement
    assert exact.info.clean_metric - exact.info.corrupt_metric > 0.5, "the reference model does not do IOI"
    assert pearson["relp"] >= 0.9


def test_relp_beats_attribution_on_ioi_mlp_outputs(mlp_agreement):
    pearson, _ = mlp_agreement
    assert pearson["relp"] > pearson["attribution"]


def test_circuit_command_on_the_reference_model(ref_model, tmp_path, capsys):
    code = main(["circuit", "--task", "ioi", "--method", "relp", "--n", "16", "--workspace", str(tmp_path / "ws"),
                 "--export", str(tmp_path / "out"), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["model"] == REF and summary["n_prompts"] == 16 and summary["granularity"] == "position"
    sizes = [row[0] for row in summary["faithfulness"]]
    assert sizes == sorted(sizes) and summary["faithfulness"][-1][1] == pytest.approx(1.0, abs=1e-4)
