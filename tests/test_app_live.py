"""The app beside real jobs in other processes: a training run it follows live, a circuit run it starts.

Each test works on a copy of the fixture workspace, so the shared one stays as built.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.app_fixture import SITE
from tests.test_app import app_fixture, chart_data, open_page, problems  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def copied(app_fixture, tmp_path, monkeypatch):  # noqa: F811
    root = tmp_path / "ws"
    shutil.copytree(app_fixture.root, root)
    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(root))
    return root


@pytest.mark.slow
def test_training_monitor_follows_a_running_job_without_blocking_it(app_fixture, copied):  # noqa: F811
    from workbench.workspace import Workspace

    job = subprocess.Popen([sys.executable, "-m", "workbench", "train", "--workspace", str(copied), "--model", app_fixture.model,
                            "--site", SITE, "--arch", "relu", "--d-sae", "48", "--tokens", "160000", "--batch-size", "128",
                            "--log-every", "10", "--checkpoint-every", "100000", "--name", "live"], cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen_steps, seen_running = [], False
    deadline = time.monotonic() + 240
    try:
        while job.poll() is None and time.monotonic() < deadline:
            at = open_page("training", runs="live")
            assert not problems(at), problems(at)
            seen_running |= any("**live** · running" in p.proto.text for p in at.get("progress"))
            if at.get("vega_lite_chart"):
                seen_steps.append(int(chart_data(at, 0)[0]["step"].max()))
    finally:
        if job.poll() is None:
            job.kill()
    assert job.wait() == 0, job.stderr.read().decode()[-2000:]
    assert seen_running and len(set(seen_steps)) >= 2, (seen_running, seen_steps)
    assert seen_steps == sorted(seen_steps), "a refresh never goes back in time"
    final = Workspace(copied).sql("SELECT max(step) AS s FROM training_metrics WHERE dictionary = 'live'")["s"][0]
    at = open_page("training", runs="live")
    assert int(chart_data(at, 0)[0]["step"].max()) == int(final)
    assert any("**live** · done" in p.proto.text for p in at.get("progress"))


@pytest.mark.slow
def test_circuits_page_runs_a_new_circuit_in_its_own_process(app_fixture, copied):  # noqa: F811
    from app import shell
    from workbench.workspace import Workspace

    before = set(Workspace(copied).sql("SELECT circuit_id FROM circuits")["circuit_id"])
    at = open_page("circuits")
    [box for box in at.selectbox if box.label == "Method"][0].select("activation")
    [box for box in at.selectbox if box.label == "Positions"][0].select("all")
    [box for box in at.number_input if box.label == "Prompt pairs"][0].set_value(4)
    submit = [b for b in at.get("button") if b.proto.label == "Run"][0]
    submit.click().run()
    assert not problems(at), problems(at)
    jobs = [j for j in shell.launched("circuit")]
    assert jobs and jobs[0].argv[:3] == ("circuit", "--model", app_fixture.model)
    assert jobs[0].process.wait(timeout=240) == 0, shell.log_tail(jobs[0])
    after = set(Workspace(copied).sql("SELECT circuit_id FROM circuits")["circuit_id"])
    (new,) = after - before
    at = open_page("circuits", circuit=new)
    assert not problems(at)
    assert {m.label: m.value for m in at.metric}["Method"] == "activation"


def test_app_command_serves_until_interrupted(app_fixture):  # noqa: F811
    import json
    import signal
    import urllib.request

    from app.launch import free_port

    port = free_port()
    cli = subprocess.Popen([sys.executable, "-m", "workbench", "app", "--workspace", str(app_fixture.root), "--no-browser",
                            "--port", str(port), "--json"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # The command says it is serving once the server answers; Ctrl+C from then on is a normal stop.
        said = []
        while not (said and said[-1].startswith("workbench app on ")):
            line = cli.stderr.readline().decode()
            assert line, "".join(said)[-2000:] or "the command exited without serving"
            said.append(line)
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5).read() == b"ok"
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 0, err.decode()[-2000:]
    summary = json.loads(out)
    assert summary["url"] == f"http://127.0.0.1:{port}" and summary["workspace"] == str(app_fixture.root)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
