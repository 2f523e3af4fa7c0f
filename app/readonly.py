"""Read-only SQL over a workspace, enforced by DuckDB itself rather than by matching keywords.

Three walls, each enough on its own for the common attacks:

1. The parser. DuckDB splits the text into statements (`extract_statements`);
   exactly one statement of type SELECT is allowed (that includes WITH, FROM-first,
   VALUES, DESCRIBE, SHOW and SUMMARIZE, which DuckDB parses as SELECT). COPY,
   ATTACH, DETACH, INSTALL/LOAD, SET/RESET/USE, PRAGMA, CALL, EXPORT, CREATE,
   INSERT/UPDATE/DELETE, DROP, ALTER and everything else are refused by type.
2. The catalog. Published files are attached READ_ONLY (`Workspace.connect`), so
   even a data-modifying CTE that the parser classes as SELECT cannot write.
3. The sandbox. Before the user's text runs, the connection turns off external
   access (no file reads or writes outside the workspace's own shard folder, no
   extension install or load, no secrets) and then locks its configuration,
   so no later statement can turn any of it back on.

Results are capped at `max_rows` (read from a streaming reader, never
materialised whole) and a query running past `timeout_s` is interrupted.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import duckdb
import pandas as pd

from workbench.errors import WorkbenchError, one_line
from workbench.workspace import Workspace

MAX_ROWS = 10_000
TIMEOUT_S = 30.0


class QueryResult(NamedTuple):
    frame: pd.DataFrame
    truncated: bool  # more rows existed than were returned
    seconds: float


def check_readonly(query: str) -> str:
    """The query if it is exactly one SELECT statement; a WorkbenchError naming what it is otherwise."""
    if not query or not query.strip():
        raise WorkbenchError("the query is empty: write one SELECT statement")
    try:
        statements = duckdb.connect(":memory:").extract_statements(query)
    except duckdb.Error as e:
        raise WorkbenchError(f"the query does not parse: {one_line(e, 400)}") from None
    if len(statements) != 1:
        raise WorkbenchError(f"write exactly one statement (this text holds {len(statements)}); only SELECT queries run here")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise WorkbenchError(f"refused: this is a {kind.name} statement, and the SQL page is read-only "
                             "(SELECT, WITH, DESCRIBE, SHOW and SUMMARIZE only; nothing that writes, attaches, copies, "
                             "installs, loads, sets or exports)")
    return query


def run_readonly(ws: Workspace, query: str, max_rows: int = MAX_ROWS, timeout_s: float = TIMEOUT_S) -> QueryResult:
    """Run one SELECT over the workspace on a sandboxed connection; errors come back as one-line WorkbenchErrors."""
    import time

    check_readonly(query)
    if not ws.exists():
        raise WorkbenchError(f"workspace {ws.root} does not exist")
    start = time.perf_counter()
    with ws.connect(tables=_views_for(ws, query)) as con:
        _lock_down(con, ws)
        timer = threading.Timer(timeout_s, con.interrupt)
        timer.start()
        try:
            frame, truncated = _fetch(con, query, max_rows)
        except duckdb.InterruptException:
            raise WorkbenchError(f"the query ran past {timeout_s:g} s and was stopped; add a LIMIT or a WHERE") from None
        except duckdb.Error as e:
            raise WorkbenchError(one_line(e, 400)) from None
        finally:
            timer.cancel()
    return QueryResult(frame, truncated, time.perf_counter() - start)


def _views_for(ws: Workspace, query: str) -> set[str] | None:
    """Only the workspace tables the query names, when it names nothing else (catalog functions and
    information_schema want every view)."""
    from workbench.report import referenced, table_names

    names = referenced(query)
    return names if names and names <= table_names(ws) else None


def _lock_down(con: duckdb.DuckDBPyConnection, ws: Workspace) -> None:
    shard_dir = str(ws.tables_dir).rstrip("/") + "/"
    con.execute("SET allowed_directories = ?", [[shard_dir]])
    for statement in ("SET autoinstall_known_extensions = false", "SET autoload_known_extensions = false",
                      "SET enable_external_access = false", "SET lock_configuration = true"):
        con.execute(statement)


def _fetch(con: duckdb.DuckDBPyConnection, query: str, max_rows: int) -> tuple[pd.DataFrame, bool]:
    import pyarrow as pa

    reader = con.sql(query).to_arrow_reader(max_rows + 1)
    batches, rows = [], 0
    for batch in reader:
        batches.append(batch)
        rows += batch.num_rows
        if rows > max_rows:
            break
    table = pa.Table.from_batches(batches, schema=reader.schema) if batches else reader.schema.empty_table()
    return table.slice(0, max_rows).to_pandas(), rows > max_rows
