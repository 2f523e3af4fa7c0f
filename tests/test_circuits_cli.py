"""The circuit graph in real DuckDB, its exports, and the `circuit` command: results, one-line errors, nothing lost."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch

from circuits.attribution import attribute_edges
from circuits.export import to_dot, to_neuronpedia, validate_neuronpedia, write_neuronpedia
from circuits.find import CircuitOptions, find_circuit
from circuits.graph import load_graph, save_graph
from data.tasks import make_task
from workbench.cli import main
from workbench.errors import WorkbenchError


@pytest.fixture(scope="module")
def edge_graph(tiny_model):
    prompts = make_task("ioi", tiny_model.tokenizer, n=4, template=0)
    graph = attribute_edges(tiny_model, prompts, "relp", per_position=True)
    graph.node_mask = graph.scores.abs() >= graph.scores.abs().median()
    graph.edge_mask = graph.adjacency.abs() > graph.adjacency.abs().max() * 0.05
    return graph


def test_graph_round_trips_through_duckdb(workspace, edge_graph):
    circuit_id = save_graph(workspace, edge_graph, curves=[{"ablation": "mean", "size": 3, "faithfulness": 0.5,
                                                           "completeness": 0.4, "metric_circuit": 1.0, "metric_complement": 0.1}])
    back = load_graph(workspace, circuit_id)
    assert back.nodes == edge_graph.nodes and back.info == edge_graph.info
    torch.testing.assert_close(back.scores, edge_graph.scores)
    torch.testing.assert_close(back.adjacency, edge_graph.adjacency)
    torch.testing.assert_close(back.channels, edge_graph.channels)
    assert torch.equal(back.node_mask, edge_graph.node_mask) and torch.equal(back.edge_mask, edge_graph.edge_mask)
    rows = workspace.sql(f"SELECT kind, count(*) AS n FROM circuit_nodes WHERE circuit_id = '{circuit_id}' GROUP BY kind")
    n_pos = max(n.pos for n in edge_graph.nodes) + 1  # 2 layers, 4 heads
    assert dict(zip(rows["kind"], rows["n"])) == {"embed": n_pos, "head": 8 * n_pos, "mlp": 2 * n_pos, "logits": n_pos}
    heads_in = workspace.sql("SELECT count(*) AS n FROM circuit_edges WHERE weight_k IS NOT NULL")
    assert int(heads_in["n"][0]) > 0
    assert workspace.sql("SELECT size FROM circuit_curves")["size"].tolist() == [3]
    with pytest.raises(WorkbenchError, match="no circuit 'nope'"):
        load_graph(workspace, "nope")


def test_neuronpedia_json_follows_circuit_tracer_layout(tmp_path, edge_graph):
    data = to_neuronpedia(edge_graph)
    validate_neuronpedia(data)
    assert {n["feature_type"] for n in data["nodes"]} <= {"embedding", "logit", "cross layer transcoder"}
    assert all(re.fullmatch(r"-?\w+_-?\d+_\d+", n["node_id"]) for n in data["nodes"])
    assert len(data["links"]) == int(edge_graph.edge_mask[edge_graph.node_mask][:, edge_graph.node_mask].sum()) or data["links"]
    path = write_neuronpedia(edge_graph, tmp_path, slug="ioi-relp")
    write_neuronpedia(edge_graph, tmp_path, slug="ioi-relp")  # re-export replaces its index entry
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == ["ioi-relp"] and json.loads(path.read_text())["metadata"]["slug"] == "ioi-relp"
    broken = json.loads(path.read_text())
    broken["links"].append({"source": "nope", "target": broken["nodes"][0]["node_id"], "weight": 1.0})
    with pytest.raises(WorkbenchError, match="names a node"):
        validate_neuronpedia(broken)
    del broken["nodes"][0]["ctx_idx"]
    with pytest.raises(WorkbenchError, match="ctx_idx"):
        validate_neuronpedia(broken)


def test_dot_export_is_well_formed(tmp_path, edge_graph):
    dot = to_dot(edge_graph)
    declared = set(re.findall(r"^  (n\d+) \[label", dot, flags=re.M))
    for source, target in re.findall(r"(n\d+) -> (n\d+)", dot):
        assert source in declared and target in declared
    assert dot.count("{") == dot.count("}") and dot.startswith("digraph circuit {")
    if shutil.which("dot"):
        (tmp_path / "g.dot").write_text(dot)
        subprocess.run(["dot", "-Tsvg", str(tmp_path / "g.dot"), "-o", str(tmp_path / "g.svg")], check=True)


def test_circuit_command_json_and_same_as_python(model_dirs, tiny_model, workspace, tmp_path, capsys):
    code = main(["circuit", "--task", "ioi", "--method", "attribution", "--model", str(model_dirs["gpt2"]), "--n", "4",
                 "--workspace", str(workspace.root), "--json", "--export", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0 and out.count("\n") == 1
    summary = json.loads(out)
    graph = load_graph(workspace, summary["circuit_id"])
    python = find_circuit(tiny_model, make_task("ioi", tiny_model.tokenizer, n=4, template=0), CircuitOptions(method="attribution"))
    torch.testing.assert_close(graph.scores, python.graph.scores)
    assert summary["faithfulness"][0] == [0, 0.0, 0.0] and len(summary["exports"]) == 2
    validate_neuronpedia(json.loads(open(summary["exports"][0]).read()))


@pytest.mark.parametrize("lines, message", [
    (['{"clean": " Mary and John", "corrupt": " Anna and John", "answer": " Mary", "wrong": " John"}', '{"clean": oops}'],
     "line 2: not valid JSON"),
    (['{"clean": " Mary and John", "corrupt": " Anna", "answer": " Mary", "wrong": " John"}'], "line 1: clean and corrupt"),
    (['{"clean": " Mary and John", "corrupt": " Anna and John", "answer": " Mary Mary", "wrong": " John"}'],
     "line 1: answer ' Mary Mary' is 2 tokens"),
])
def test_bad_task_files_are_one_line_naming_the_line(model_dirs, workspace, tmp_path, capsys, lines, message):
    task = tmp_path / "prompts.jsonl"
    task.write_text("\n".join(lines) + "\n")
    code = main(["circuit", "--task", str(task), "--method", "attribution", "--model", str(model_dirs["gpt2"]),
                 "--workspace", str(workspace.root)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: ") and message in err[-1]
    assert not workspace.published_dbs()


def test_feature_methods_need_a_dictionary_and_the_right_model(model_dirs, workspace, capsys):
    code = main(["circuit", "--task", "ioi", "--method", "transcoder", "--model", str(model_dirs["gpt2"]),
                 "--workspace", str(workspace.root)])
    assert code == 1 and "--dictionary" in capsys.readouterr().err
    code = main(["circuit", "--task", "ioi", "--method", "features", "--dictionary", "missing", "--model",
                 str(model_dirs["gpt2"]), "--workspace", str(workspace.root)])
    assert code == 1 and "no dictionary 'missing'" in capsys.readouterr().err
