"""The SQL page's read-only runner against hostile input, on a real workspace (published DuckDB file + Parquet shards).

Every refusal must leave the workspace byte-for-byte as it was and create no file
anywhere the query pointed at.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from app.readonly import check_readonly, run_readonly
from workbench.errors import WorkbenchError


@pytest.fixture
def sql_workspace(workspace):
    with workspace.write_db("numbers") as con:
        con.execute("CREATE TABLE numbers AS SELECT range AS n, range % 7 AS bucket FROM range(25000)")
    workspace.append_rows("metrics", [{"run": "a", "step": i, "loss": 1.0 / (i + 1)} for i in range(10)])
    return workspace


def _fingerprint(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_reads_published_files_and_shards(sql_workspace):
    result = run_readonly(sql_workspace, "SELECT bucket, count(*) AS n FROM numbers GROUP BY bucket ORDER BY bucket")
    assert result.frame["n"].sum() == 25000 and len(result.frame) == 7 and not result.truncated
    joined = run_readonly(sql_workspace, "WITH m AS (SELECT * FROM metrics) SELECT max(step) AS s FROM m")
    assert int(joined.frame["s"].iloc[0]) == 9
    for query in ("DESCRIBE numbers", "SHOW TABLES", "SUMMARIZE metrics", "FROM numbers LIMIT 3", "VALUES (1, 'a')"):
        assert len(run_readonly(sql_workspace, query).frame) > 0, query


def test_caps_rows_without_materialising_everything(sql_workspace):
    result = run_readonly(sql_workspace, "SELECT * FROM numbers", max_rows=1000)
    assert len(result.frame) == 1000 and result.truncated
    assert result.frame["n"].tolist() == list(range(1000))


HOSTILE = {
    "copy out": "COPY numbers TO '{target}/stolen.csv'",
    "copy out of a select": "COPY (SELECT * FROM numbers) TO '{target}/stolen.parquet' (FORMAT parquet)",
    "attach read-write": "ATTACH '{target}/new.duckdb' AS evil",
    "detach": "DETACH db0",
    "install": "INSTALL httpfs",
    "load": "LOAD httpfs",
    "set": "SET enable_external_access = true",
    "reset": "RESET lock_configuration",
    "pragma": "PRAGMA enable_profiling",
    "call": "CALL pragma_version()",
    "export": "EXPORT DATABASE '{target}/dump'",
    "create": "CREATE TABLE owned AS SELECT 1",
    "insert": "INSERT INTO numbers VALUES (1, 1)",
    "update": "UPDATE numbers SET n = 0",
    "delete": "DELETE FROM numbers",
    "drop": "DROP VIEW numbers",
    "alter": "ALTER VIEW numbers RENAME TO gone",
    "two statements": "SELECT 1; DROP VIEW numbers",
    "checkpoint": "CHECKPOINT",
    "create secret": "CREATE SECRET s (TYPE s3, KEY_ID 'x', SECRET 'y')",
    "use": "USE db0",
}
HOSTILE_SELECTS = {
    "data-modifying CTE": "WITH x AS (INSERT INTO numbers VALUES (1, 1) RETURNING *) SELECT * FROM x",
    "read a file": "SELECT * FROM read_csv('/etc/passwd')",
    "read a file by name": "SELECT * FROM '/etc/passwd'",
    "read text": "SELECT * FROM read_text('/etc/hostname')",
    "glob the disk": "SELECT * FROM glob('/etc/*')",
    "escape the shard folder": "SELECT * FROM read_text('{shards}/../../../../../etc/passwd')",
    "environment": "SELECT getenv('HOME')",
    "secrets": "SELECT * FROM duckdb_secrets()",
    "read outside the workspace": "SELECT * FROM read_parquet('{target}/nothing.parquet')",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_refuses_statements_that_are_not_select(sql_workspace, tmp_path, name):
    target = tmp_path / "target"
    target.mkdir()
    before = _fingerprint(sql_workspace.root)
    query = HOSTILE[name].format(target=target)
    with pytest.raises(WorkbenchError, match=r"refused|exactly one statement"):
        run_readonly(sql_workspace, query)
    assert _fingerprint(sql_workspace.root) == before
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("name", sorted(HOSTILE_SELECTS))
def test_sandbox_stops_hostile_selects(sql_workspace, tmp_path, name):
    target = tmp_path / "target"
    target.mkdir()
    (target / "nothing.parquet").write_bytes(b"")
    before = _fingerprint(sql_workspace.root)
    query = HOSTILE_SELECTS[name].format(target=target, shards=sql_workspace.tables_dir / "metrics")
    assert check_readonly(query)  # the parser passes these: the connection itself must stop them
    with pytest.raises(WorkbenchError) as info:
        run_readonly(sql_workspace, query)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert _fingerprint(sql_workspace.root) == before
    assert [p.name for p in target.iterdir()] == ["nothing.parquet"]


def test_numbers_are_unchanged_after_every_attack(sql_workspace):
    for query in list(HOSTILE.values()) + list(HOSTILE_SELECTS.values()):
        try:
            run_readonly(sql_workspace, query.format(target="/nonexistent", shards=sql_workspace.tables_dir))
        except WorkbenchError:
            pass
    result = run_readonly(sql_workspace, "SELECT count(*) AS c, sum(n) AS s FROM numbers")
    assert int(result.frame["c"].iloc[0]) == 25000 and int(result.frame["s"].iloc[0]) == sum(range(25000))


def test_bad_sql_and_runaway_queries_give_one_line(sql_workspace):
    with pytest.raises(WorkbenchError, match="does not parse"):
        run_readonly(sql_workspace, "SELEC 1")
    with pytest.raises(WorkbenchError, match="empty"):
        run_readonly(sql_workspace, "   ")
    with pytest.raises(WorkbenchError, match="does not exist"):
        run_readonly(sql_workspace, "SELECT * FROM no_such_table")
    with pytest.raises(WorkbenchError, match="stopped"):
        run_readonly(sql_workspace, "SELECT count(*) FROM range(1000000000) a, range(1000) b", timeout_s=0.5)
