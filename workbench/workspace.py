"""The workspace: a directory of published results, and read-only SQL over all of them.

DuckDB lets one process hold a file read-write, and any connection held open
elsewhere (even read-only) blocks that writer. So no file is ever shared
between a writer and a reader:

1. A job writes its tables into a DuckDB file of its own under a temporary
   name (`write_db`), and renames it into `db/<name>.duckdb` when complete.
   A published file is never opened for writing again; re-running a job
   publishes a replacement by rename (readers holding the old one keep reading it).
2. Live, append-only rows (training metrics) go to Parquet shards under
   `tables/<table>/`, each written under a temporary name and renamed (`append_rows`).
3. Progress of a running job is a small JSON file under `jobs/`, replaced atomically.
4. A reader (`connect`, `sql`) opens an in-memory DuckDB, attaches every published
   file read-only, and exposes each table name as one view: the UNION ALL BY NAME of
   that table across files and shards. It closes everything when the query is done.

Every table therefore carries its own key columns (dictionary name, circuit id, ...)
so rows from different files stay distinguishable in the union.

Layout:
    <root>/db/*.duckdb              published result files
    <root>/tables/<table>/*.parquet live append-only shards
    <root>/jobs/*.json              progress of running jobs, and their lock files
    <root>/dictionaries/<name>/     trained dictionaries (cfg.json + safetensors)
    <root>/store/                   activation store (see workbench.store)
    <root>/reports/                 exported reports
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

import duckdb

from workbench.errors import WorkbenchError, one_line

ENV_VAR = "WORKBENCH_WORKSPACE"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class Workspace:
    """A workspace directory; nothing is created until something is written."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root or os.environ.get(ENV_VAR) or "workspace").expanduser().resolve()

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    # ------------------------------------------------------------------ paths
    @property
    def db_dir(self) -> Path:
        return self.root / "db"

    @property
    def tables_dir(self) -> Path:
        return self.root / "tables"

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    @property
    def dictionaries_dir(self) -> Path:
        return self.root / "dictionaries"

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    def exists(self) -> bool:
        return self.root.is_dir()

    def is_empty(self) -> bool:
        """True when nothing has been published yet (no result files, no shards, no dictionaries)."""
        return not (self.published_dbs() or self._shard_tables() or self.dictionary_names())

    def published_dbs(self) -> list[Path]:
        return sorted(self.db_dir.glob("*.duckdb")) if self.db_dir.is_dir() else []

    def dictionary_names(self) -> list[str]:
        if not self.dictionaries_dir.is_dir():
            return []
        return sorted(p.name for p in self.dictionaries_dir.iterdir() if (p / "cfg.json").is_file())

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def write_db(self, name: str) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection to a private DuckDB file, published as `db/<name>.duckdb` on success.

        On an exception the temporary file is removed and any published file of
        the same name is left exactly as it was.
        """
        check_name(name, "result name")
        self.db_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.db_dir / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        con = duckdb.connect(str(tmp))
        try:
            yield con
            con.execute("CHECKPOINT")
            con.close()
            os.replace(tmp, self.db_dir / f"{name}.duckdb")
        except BaseException:
            con.close()
            for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
                leftover.unlink(missing_ok=True)
            raise

    def append_rows(self, table: str, rows, shard: str | None = None) -> Path:
        """Publish rows (a pyarrow Table, pandas DataFrame or list of dicts) as one Parquet shard of `table`."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        check_name(table, "table name")
        if isinstance(rows, list):
            rows = pa.Table.from_pylist(rows)
        elif not isinstance(rows, pa.Table):
            rows = pa.Table.from_pandas(rows, preserve_index=False)
        folder = self.tables_dir / table
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{shard or uuid.uuid4().hex}.parquet"
        tmp = folder / f".{final.name}.tmp"
        pq.write_table(rows, tmp)
        os.replace(tmp, final)
        return final

    def write_json(self, relpath: str, obj: Any) -> Path:
        """Replace a small JSON file atomically (readers see the old or the new content, never half)."""
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(obj, indent=1, default=str))
        return path

    def read_json(self, relpath: str) -> Any | None:
        path = self.root / relpath
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def job_lock(self, name: str) -> Iterator[None]:
        """Exclusive, process-wide lock for a named job; a second holder gets a clear error, not a wait.

        The lock is an flock on `jobs/<name>.lock`, released by the kernel if the holder dies.
        """
        check_name(name, "job name")
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        path = self.jobs_dir / f"{name}.lock"
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise WorkbenchError(f"job {name!r} is already running in another process (pid {f.read().strip() or '?'})") from None
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ reading
    @contextlib.contextmanager
    def connect(self, tables: Iterable[str] | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """An in-memory connection with every published file attached read-only and one view per table.

        `tables` limits the views to those names: binding a view over many Parquet
        shards reads every shard's footer, so a reader that knows what it needs skips that.
        """
        wanted = None if tables is None else set(tables)
        con = duckdb.connect(":memory:")
        try:
            sources: dict[str, list[str]] = {}
            for i, path in enumerate(self.published_dbs()):
                try:
                    con.execute(f"ATTACH '{sql_path(path)}' AS db{i} (READ_ONLY)")
                except duckdb.Error:
                    continue  # replaced or removed between listing and attaching; the next query sees its successor
            # One catalog listing for all attached files (database_name sorts db0, db1, ... in attach order per table).
            for alias, table in con.execute(
                "SELECT database_name, table_name FROM duckdb_tables() WHERE database_name LIKE 'db%' AND schema_name = 'main' "
                "ORDER BY CAST(substr(database_name, 3) AS INTEGER)"
            ).fetchall():
                sources.setdefault(table, []).append(f'{alias}.main."{table}"')
            for table in self._shard_tables():
                glob = sql_path(self.tables_dir / table) + "/*.parquet"
                sources.setdefault(table, []).append(f"read_parquet('{glob}', union_by_name = true)")
            for table, parts in sources.items():
                if wanted is not None and table not in wanted:
                    continue
                union = " UNION ALL BY NAME ".join(f"SELECT * FROM {p}" for p in parts)
                con.execute(f'CREATE VIEW "{table}" AS {union}')
            yield con
        finally:
            con.close()

    def sql(self, query: str, params: list | None = None):
        """Run one query over the workspace and return a pandas DataFrame (DuckDB's errors as one-line WorkbenchErrors)."""
        with self.connect() as con:
            try:
                return con.execute(query, params or []).df()
            except duckdb.Error as e:
                raise WorkbenchError(f"SQL error: {one_line(e)}") from e

    def tables(self) -> list[str]:
        """Names of the tables visible to `sql`."""
        with self.connect() as con:
            return [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1").fetchall()]

    def _shard_tables(self) -> list[str]:
        if not self.tables_dir.is_dir():
            return []
        return sorted(p.name for p in self.tables_dir.iterdir() if p.is_dir() and any(p.glob("*.parquet")))


def check_name(name: str, what: str = "name") -> str:
    """Names become file names and SQL identifiers: letters, digits, '_', '-', '.'; no leading dot."""
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > 120:
        raise WorkbenchError(f"bad {what} {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit")
    return name


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file and rename, so no reader sees a partial file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sql_path(path: Path | str) -> str:
    """`path` as the inside of a SQL string literal (single quotes doubled): `f"ATTACH '{sql_path(p)}'"`."""
    return str(path).replace("'", "''")
