"""The workspace publishing rule, checked with real DuckDB files and real processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from workbench.errors import WorkbenchError
from workbench.workspace import Workspace, check_name


def test_write_db_publishes_only_on_success(workspace):
    with workspace.write_db("runs-a") as con:
        con.execute("CREATE TABLE runs AS SELECT 'a' AS run, 1 AS x")
    with pytest.raises(RuntimeError):
        with workspace.write_db("runs-a") as con:
            con.execute("CREATE TABLE runs AS SELECT 'a' AS run, 999 AS x")
            raise RuntimeError("job died half-way")
    # the failed job left no temporary file and did not touch the published one
    assert sorted(p.name for p in workspace.db_dir.iterdir()) == ["runs-a.duckdb"]
    assert workspace.sql("SELECT x FROM runs")["x"].tolist() == [1]


def test_views_union_tables_across_files_and_shards(workspace):
    with workspace.write_db("runs-a") as con:
        con.execute("CREATE TABLE runs AS SELECT 'a' AS run, 1 AS x")
    with workspace.write_db("runs-b") as con:
        con.execute("CREATE TABLE runs AS SELECT 'b' AS run, 2 AS x, 'extra' AS note")
    workspace.append_rows("metrics", [{"run": "a", "step": 1, "loss": 0.5}])
    workspace.append_rows("metrics", [{"run": "a", "step": 2, "loss": 0.25}])
    rows = workspace.sql("SELECT run, x, note FROM runs ORDER BY run")
    assert rows["run"].tolist() == ["a", "b"] and rows["note"].isna().tolist() == [True, False]
    assert workspace.sql("SELECT sum(loss) AS s FROM metrics")["s"].item() == 0.75
    assert workspace.tables() == ["metrics", "runs"]
    with workspace.connect(tables=["runs"]) as con:
        assert [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()] == ["runs"]


def test_readers_cannot_write(workspace):
    with workspace.write_db("runs-a") as con:
        con.execute("CREATE TABLE runs AS SELECT 1 AS x")
    with workspace.connect() as con:
        with pytest.raises(Exception):
            con.execute("INSERT INTO db0.main.runs VALUES (2)")
    assert workspace.sql("SELECT count(*) AS n FROM runs")["n"].item() == 1
    for query, says in (("SELECT nope FROM runs", "nope"), ("SELECT * FROM no_such_table", "no_such_table"), ("SELEC 1", "syntax")):
        with pytest.raises(WorkbenchError, match="SQL error") as e:  # DuckDB's multi-line errors, as one line
            workspace.sql(query)
        assert "\n" not in str(e.value) and says in str(e.value), str(e.value)


def test_reader_process_open_while_writer_process_publishes(tmp_path):
    """A reader looping over `sql` in one process never blocks a writer republishing in another, and never sees half a file."""
    root = tmp_path / "ws"
    writer = textwrap.dedent(f"""
        from workbench.workspace import Workspace
        ws = Workspace({str(root)!r})
        for i in range(30):
            with ws.write_db("counter") as con:
                con.execute("CREATE TABLE counter AS SELECT range AS i FROM range(%d)" % (1000 + i))
        print("writer done")
    """)
    reader = textwrap.dedent(f"""
        from workbench.workspace import Workspace
        ws = Workspace({str(root)!r})
        seen = set()
        for _ in range(200):
            if ws.published_dbs():
                n = ws.sql("SELECT count(*) AS n, max(i) AS m FROM counter").iloc[0]
                assert n["m"] == n["n"] - 1, "a half-written table"
                seen.add(int(n["n"]))
        print("reader saw", len(seen))
    """)
    Workspace(root).write_json("jobs/x.json", {"started": True})
    r = subprocess.Popen([sys.executable, "-c", reader], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    w = subprocess.run([sys.executable, "-c", writer], capture_output=True, text=True, timeout=120)
    out, err = r.communicate(timeout=120)
    assert w.returncode == 0, w.stderr
    assert r.returncode == 0, err
    assert Workspace(root).sql("SELECT count(*) AS n FROM counter")["n"].item() == 1029


def test_job_lock_refuses_a_second_process(workspace):
    holder = textwrap.dedent(f"""
        import sys, time
        from workbench.workspace import Workspace
        with Workspace({str(workspace.root)!r}).job_lock("cache-x"):
            print("locked", flush=True)
            sys.stdin.readline()
    """)
    p = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(WorkbenchError, match=f"already running in another process \\(pid {p.pid}\\)"):
            with workspace.job_lock("cache-x"):
                pass
    finally:
        p.communicate("\n", timeout=30)
    with workspace.job_lock("cache-x"):  # released when the holder exits
        pass


def test_json_is_replaced_atomically_and_names_are_checked(workspace):
    workspace.write_json("jobs/a.json", {"step": 1})
    workspace.write_json("jobs/a.json", {"step": 2})
    assert workspace.read_json("jobs/a.json") == {"step": 2}
    assert workspace.read_json("jobs/missing.json") is None
    assert [p.name for p in (workspace.root / "jobs").iterdir()] == ["a.json"]
    for bad in ("", ".hidden", "a/b", "x;DROP", "a" * 200):
        with pytest.raises(WorkbenchError):
            check_name(bad)
    assert Workspace(workspace.root / "nope").is_empty()
