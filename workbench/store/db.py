"""`Store`: the one writer of the DuckDB file, and read-only query access for everyone else.

Writes of a run happen in one transaction: the run row, its node scores and edges, and the
model, checkpoint, task and prompt rows it refers to. Readers see all of a run or none of it,
and a process killed mid-run leaves nothing behind. Rows arrive as Arrow tables and are inserted
in bulk (`INSERT ... SELECT` from a registered Arrow table), never row by row.

One done run per run key: `done_runs` (run_key primary key) is written in the run's
transaction. A writer that finds the key taken inside its transaction (another process stored
the same run while this one computed) writes nothing and gets the stored run's id back; with
`replace` (`--force`) the stored run and all its rows are deleted and the new one written, in
the same transaction.

Opening the file waits while another process holds DuckDB's lock (one writer, or several
readers, at a time), retrying with backoff; `lock_wait` bounds the wait (`math.inf`: no bound),
and a wait that names its purpose is logged at INFO every `LOCK_LOG_SECONDS`.
"""

import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

from workbench.core import utc_now
from workbench.errors import BadInput
from workbench.results import RunResult
from workbench.rows import RunRow, result_rows, run_rows
from workbench.store.schema import (
    CATALOGUE_TABLES,
    EXPLANATION_TABLES,
    GRAPH_TABLES,
    MIGRATIONS,
    PROMPT_TABLES,
    RUN_TABLES,
    SCHEMA_VERSION,
)

if TYPE_CHECKING:
    from workbench.subgraphs import Subgraph

logger = logging.getLogger(__name__)

DEFAULT_DB = Path("data") / "workbench.duckdb"
# How long opening the file waits while another process holds DuckDB's lock (one writer, or
# several readers, at a time): one bounded wait, then a clear error. Readers wait less; the
# app turns their error into a message on the page. A runner waits far longer for the writes
# of a run it has computed (`run_lock_wait`: --lock-wait, $WORKBENCH_LOCK_WAIT).
LOCK_WAIT_SECONDS = 30.0
READ_LOCK_WAIT_SECONDS = 10.0
RUN_LOCK_WAIT_SECONDS = 3600.0
LOCK_WAIT_ENV = "WORKBENCH_LOCK_WAIT"
LOCK_LOG_SECONDS = 30.0  # a long wait says so this often


class DatabaseBusy(BadInput):
    """Another process held the database's lock for longer than we waited."""


def run_lock_wait(seconds: float | None = None) -> float:
    """How long a runner waits for the database lock: `seconds` (--lock-wait), else
    $WORKBENCH_LOCK_WAIT, else one hour; 0 means no limit (`math.inf`)."""
    if seconds is None:
        text = os.environ.get(LOCK_WAIT_ENV, "").strip()
        if not text:
            return RUN_LOCK_WAIT_SECONDS
        try:
            seconds = float(text)
        except ValueError:
            raise BadInput(f"{LOCK_WAIT_ENV}={text}: not a number of seconds") from None
        where = f"{LOCK_WAIT_ENV}={text}"
    else:
        where = f"--lock-wait {seconds:g}"
    if not seconds >= 0:
        raise BadInput(f"{where}: must be 0 (no limit) or a positive number of seconds")
    return math.inf if seconds == 0 else float(seconds)


def default_db_path(db: str | os.PathLike[str] | None = None) -> Path:
    """`--db`, else `$WORKBENCH_DB`, else `data/workbench.duckdb`."""
    if db:
        return Path(db)
    env = os.environ.get("WORKBENCH_DB")
    return Path(env) if env else DEFAULT_DB


@dataclass
class RunWrite:
    """Everything one run writes, as `Store.write_run` takes it: its record, the registry rows
    it refers to, its own rows (without run_id), rows with their own keys, and its staged files
    (staged path -> final path)."""

    run: RunRow
    registry: dict[str, pa.Table]
    rows: dict[str, pa.Table]
    linked: dict[str, pa.Table] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


def result_write(run: RunRow, *, registry: dict[str, pa.Table], result: RunResult) -> RunWrite:
    """What a run with this `RunResult` writes: its metrics go on its record, the nodes it
    introduces join the registry rows."""
    run.metric_clean, run.metric_corrupt = result.metric_clean, result.metric_corrupt
    if result.nodes is not None:
        nodes = registry.get("nodes")
        registry = registry | {
            "nodes": pa.concat_tables([nodes, result.nodes]) if nodes else result.nodes
        }
    rows, linked = result_rows(run.run_id, result)
    return RunWrite(run, registry, rows, linked, dict(result.files))


def _connect(
    path: Path, read_only: bool, wait: float, *, purpose: str | None = None
) -> duckdb.DuckDBPyConnection:
    """Open the file, retrying with backoff while another process holds its lock, for at most
    `wait` seconds; with a `purpose`, the wait is logged at INFO as it starts and every
    `LOCK_LOG_SECONDS`."""
    deadline = time.monotonic() + wait
    delay = 0.05
    next_log = time.monotonic()
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as err:
            if "lock" not in str(err).lower():
                raise BadInput(f"{path}: cannot open the database ({err})") from err
            now = time.monotonic()
            if now + delay > deadline:
                raise DatabaseBusy(
                    f"{path}: the database is busy (another process holds it) and stayed busy "
                    f"for {wait:.0f} s; try again when it finishes"
                ) from err
            if purpose is not None and now >= next_log:
                logger.info("waiting for the database lock to %s (%s)", purpose, path)
                next_log = now + LOCK_LOG_SECONDS
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _move_into_place(files: dict[str, str], moved: list[tuple[Path, Path | None]]) -> None:
    """Move each staged path to its final path; an older copy there is set aside (appended to
    `moved` as (final, aside)) until the run commits."""
    for staged, final in files.items():
        target = Path(final)
        aside = None
        if target.exists():
            aside = target.with_name(f".{target.name}.replaced")
            _remove(aside)
            target.rename(aside)
        moved.append((target, aside))
        target.parent.mkdir(parents=True, exist_ok=True)
        Path(staged).rename(target)


def _undo_moves(files: dict[str, str], moved: list[tuple[Path, Path | None]]) -> None:
    for target, aside in moved:
        _remove(target)
        if aside is not None:
            aside.rename(target)
    for staged in files:
        _remove(Path(staged))


class Store:
    """A DuckDB circuit store. Open with `read_only=True` for queries."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        read_only: bool = False,
        lock_wait: float | None = None,
        migrate: bool = True,
        purpose: str | None = None,
    ):
        self.path = default_db_path(path)
        if read_only and not self.path.exists():
            raise BadInput(f"{self.path}: no database here yet (run a pipeline first)")
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.read_only = read_only
        self.migrated_from: int | None = None
        wait = (
            lock_wait
            if lock_wait is not None
            else (READ_LOCK_WAIT_SECONDS if read_only else LOCK_WAIT_SECONDS)
        )
        self.con = _connect(self.path, read_only, wait, purpose=purpose)
        try:
            if read_only:
                self._check_readable()
            elif migrate:  # (a session that migrated once skips the check on later opens)
                self.migrate()
        except BaseException:
            self.con.close()
            raise

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- schema -------------------------------------------------------------------------
    def schema_version(self) -> int:
        exists = self._scalar(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
        )
        if not exists:
            return 0
        version = self._scalar("SELECT max(version) FROM schema_version")
        return int(version) if version is not None else 0

    def _scalar(self, sql: str, params: list[Any] | None = None) -> Any:
        """The first value of a query's first row (None if no rows); the result is drained."""
        rows = self.con.execute(sql, params or []).fetchall()
        return rows[0][0] if rows else None

    def _check_version(self) -> int:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise BadInput(
                f"{self.path}: database schema v{version} is newer than this workbench "
                f"(v{SCHEMA_VERSION}); upgrade the workbench"
            )
        return version

    def _check_readable(self) -> None:
        """Readers never migrate (that would be a write): an older schema is reported."""
        version = self._check_version()
        if version < SCHEMA_VERSION:
            raise BadInput(
                f"{self.path}: database schema v{version} is older than this workbench's "
                f"(v{SCHEMA_VERSION}); upgrade it with `workbench migrate --db {self.path}` "
                "(any pipeline run upgrades it too)"
            )

    def migrate(self) -> None:
        version = self._check_version()
        self.migrated_from = version if version < SCHEMA_VERSION else None
        if version == SCHEMA_VERSION:
            return
        with self.transaction():
            self.con.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER, applied_at TIMESTAMP)"
            )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    self.con.execute(statement)
                self.con.execute(
                    "INSERT INTO schema_version VALUES (?, current_timestamp)", [target]
                )
                logger.info("migrated %s to schema v%d", self.path, target)

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield self.con
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    # --- reads --------------------------------------------------------------------------
    def query(self, sql: str, params: list[Any] | None = None) -> pa.Table:
        relation = self.con.sql(sql, params=params) if params else self.con.sql(sql)
        if relation is None:  # a statement without a result set
            return pa.table({})
        return relation.to_arrow_table()

    def done_run(self, run_key: str) -> str | None:
        run_id = self._scalar("SELECT run_id FROM done_runs WHERE run_key = ?", [run_key])
        return str(run_id) if run_id is not None else None

    def latest_saes(self, checkpoint_id: str) -> list[tuple[str, str]]:
        """(sae_id, directory or pretrained spec) of the SAEs stored for a checkpoint by
        finished runs, the newest per hook, ordered by hook."""
        rows = self.con.execute(
            """SELECT sae_id, coalesce(path, source) AS spec FROM (
                 SELECT s.*, row_number() OVER (PARTITION BY s.hook ORDER BY r.finished_at DESC)
                   AS newest
                 FROM saes s JOIN runs r USING (run_id)
                 WHERE s.checkpoint_id = ? AND r.status = 'done')
               WHERE newest = 1 ORDER BY hook""",
            [checkpoint_id],
        ).fetchall()
        return [(str(sae_id), str(spec)) for sae_id, spec in rows]

    # --- writes -------------------------------------------------------------------------
    def write_run(
        self,
        run: RunRow,
        *,
        registry: dict[str, pa.Table],
        rows: dict[str, pa.Table],
        linked: dict[str, pa.Table] | None = None,
        replace: bool = False,
        files: dict[str, str] | None = None,
    ) -> str:
        """Write a run and everything it refers to in one transaction; returns the id of the
        run stored under its key: `run.run_id`, or, for a done run whose key another writer
        took first, that run's id (and then nothing is written and `files` are removed).

        `registry` holds rows for `models`, `checkpoints`, `tasks`, `prompts` and `nodes`,
        inserted only where their keys are new. `rows` holds the run's own rows
        (`node_scores`, `edges`, `faithfulness_curves`), each with a `run_id` column filled in
        here; `linked` holds rows that carry their own keys (`circuits`, `circuit_edges`).
        With `replace`, finished or failed runs with the same `run_key` are deleted first.
        """
        return self.write(RunWrite(run, registry, rows, linked or {}, files or {}), replace=replace)

    def write(self, w: RunWrite, *, replace: bool = False) -> str:
        """`write_run` of a `RunWrite`."""
        run = w.run
        run.finished_at = run.finished_at or utc_now()
        unique = run.status == "done" and not replace  # the key may be taken already
        moved: list[tuple[Path, Path | None]] = []
        try:
            with self.transaction() as con:
                existing = self.done_run(run.run_key) if unique else None
                if existing is None:
                    self._insert_run(con, w, replace)
                    _move_into_place(w.files, moved)
        except (duckdb.ConstraintException, duckdb.TransactionException):
            _undo_moves(w.files, moved)  # the key taken at commit (another connection here)
            existing = self.done_run(run.run_key) if unique else None
            if existing is None:
                raise
        except BaseException:  # nothing of a run that did not commit stays on disk
            _undo_moves(w.files, moved)
            raise
        if existing is not None:
            logger.debug("run %s: an identical run %s is stored already", run.run_id, existing)
            _undo_moves(w.files, [])
            return existing
        for _, aside in moved:
            if aside is not None:
                _remove(aside)
        return run.run_id

    def _insert_run(self, con: duckdb.DuckDBPyConnection, w: RunWrite, replace: bool) -> None:
        run = w.run
        if replace:
            self._delete_runs(con, run.run_key)
        else:
            con.execute("DELETE FROM runs WHERE run_key = ? AND status = 'failed'", [run.run_key])
        for table, data in w.registry.items():
            self._insert(con, table, data, ignore_existing=True)
        self._insert(con, "runs", run_rows(run))
        if run.status == "done":
            con.execute("INSERT INTO done_runs VALUES (?, ?)", [run.run_key, run.run_id])
        for table, data in w.rows.items():
            if data.num_rows:
                run_ids = pa.array([run.run_id] * data.num_rows, pa.string())
                self._insert(con, table, data.add_column(0, "run_id", run_ids))
        for table, data in w.linked.items():
            if data.num_rows:
                self._insert(con, table, data)

    def write_result(
        self,
        run: RunRow,
        *,
        registry: dict[str, pa.Table],
        result: RunResult,
        replace: bool = False,
    ) -> str:
        """Write a run from its `RunResult`: its rows, its circuit, the nodes it introduces and
        its files (moved from their staged paths into place just before the transaction commits,
        and removed if it does not). Returns what `write_run` returns."""
        return self.write(result_write(run, registry=registry, result=result), replace=replace)

    def has_prompt_views(self, prompt_id: str) -> bool:
        return self._exists("prompt_views", "prompt_id", prompt_id)

    def save_prompt_views(
        self, rows: dict[str, list[dict[str, Any]]], registry: dict[str, pa.Table]
    ) -> str:
        """Store one prompt's views (`workbench.prompt.views.view_rows`) with the model, checkpoint
        and node rows they refer to, in one transaction, replacing the same prompt_id."""
        (head,) = rows["prompt_views"]
        head = head | {"created_at": utc_now()}
        self._replace_keyed("prompt_views", "prompt_id", head, PROMPT_TABLES, rows, registry)
        return str(head["prompt_id"])

    def has_explanation(self, explanation_id: str) -> bool:
        return self._exists("prompt_explanations", "explanation_id", explanation_id)

    def save_explanation(
        self,
        head: dict[str, Any],
        rows: dict[str, list[dict[str, Any]]],
        registry: dict[str, pa.Table],
    ) -> str:
        """Store one prediction's input attribution (`workbench.prompt.run`: its
        `prompt_explanations` row `head`, params as a dict, and its rows by table) in one
        transaction, replacing the same explanation_id."""
        params = json.dumps(head["params"], sort_keys=True)
        head = head | {"params": params, "created_at": utc_now()}
        self._replace_keyed(
            "prompt_explanations", "explanation_id", head, EXPLANATION_TABLES, rows, registry
        )
        return str(head["explanation_id"])

    def has_patchscope(self, patchscope_id: str) -> bool:
        return self._exists("prompt_patchscopes", "patchscope_id", patchscope_id)

    def save_patchscope(
        self, head: dict[str, Any], rows: list[dict[str, Any]], registry: dict[str, pa.Table]
    ) -> str:
        """Store one Patchscope of a prompt (its `prompt_patchscopes` row and the decoded text per
        layer) in one transaction, replacing the same patchscope_id."""
        head = head | {"created_at": utc_now()}
        tables = {"prompt_patchscope": rows}
        self._replace_keyed(
            "prompt_patchscopes", "patchscope_id", head, ("prompt_patchscope",), tables, registry
        )
        return str(head["patchscope_id"])

    def has_tuned_lens(self, lens_id: str) -> bool:
        return self._exists("tuned_lenses", "lens_id", lens_id)

    def save_tuned_lens(
        self,
        head: dict[str, Any],
        metrics: list[dict[str, Any]],
        registry: dict[str, pa.Table],
        staged: Path,
        final: Path,
    ) -> str:
        """Store one tuned lens (`workbench.prompt.lensrun`: its `tuned_lenses` row `head`, params
        as a dict, and its `lens_metrics`) and move its staged directory to `final` in the same
        transaction, replacing the same lens_id; a failure leaves neither (nor the staging)."""
        head = head | {
            "params": json.dumps(head["params"], sort_keys=True),
            "created_at": utc_now(),
        }
        files = {str(staged): str(final)}
        moved: list[tuple[Path, Path | None]] = []
        try:
            self._replace_keyed(
                "tuned_lenses", "lens_id", head, ("lens_metrics",), {"lens_metrics": metrics},
                registry, then=lambda: _move_into_place(files, moved),
            )  # fmt: skip
        except BaseException:
            _undo_moves(files, moved)
            raise
        for _, aside in moved:
            if aside is not None:
                _remove(aside)
        return str(head["lens_id"])

    def tuned_lens_of(self, checkpoint_id: str) -> dict[str, Any] | None:
        """The newest tuned lens stored for a checkpoint (its `tuned_lenses` row), or None."""
        cur = self.con.execute(
            "SELECT * FROM tuned_lenses WHERE checkpoint_id = ? ORDER BY created_at DESC LIMIT 1",
            [checkpoint_id],
        )
        row = cur.fetchone()
        return None if row is None else dict(zip([d[0] for d in cur.description], row, strict=True))

    def _exists(self, table: str, column: str, value: str) -> bool:
        """Whether `table` has a row whose `column` is `value`."""
        return bool(self._scalar(f"SELECT count(*) FROM {table} WHERE {column} = ?", [value]))

    def has_prompt_lens(self, prompt_id: str, lens_id: str) -> bool:
        return bool(
            self._scalar(
                "SELECT count(*) FROM prompt_tuned_lens WHERE prompt_id = ? AND lens_id = ?",
                [prompt_id, lens_id],
            )
        )

    def save_prompt_lens(self, prompt_id: str, lens_id: str, rows: list[dict[str, Any]]) -> None:
        """A tuned lens's predictions on a stored prompt, replacing the same pair's."""
        with self.transaction() as con:
            con.execute(
                "DELETE FROM prompt_tuned_lens WHERE prompt_id = ? AND lens_id = ?",
                [prompt_id, lens_id],
            )
            self._insert(con, "prompt_tuned_lens", pa.Table.from_pylist(rows))

    def has_catalogue(self, catalogue_id: str) -> bool:
        return self._exists("catalogues", "catalogue_id", catalogue_id)

    def save_catalogue(
        self,
        head: dict[str, Any],
        rows: dict[str, list[dict[str, Any]]],
        registry: dict[str, pa.Table],
    ) -> str:
        """Store one head catalogue (`workbench.catalogue.run`: its `catalogues` row `head`,
        params as a dict, and its rows by table) with the model, checkpoint and node rows they
        refer to, in one transaction, replacing the same catalogue_id."""
        head = head | {"params": json.dumps(head["params"], sort_keys=True)}
        self._replace_keyed("catalogues", "catalogue_id", head, CATALOGUE_TABLES, rows, registry)
        return str(head["catalogue_id"])

    def has_cross_recovery(
        self, circuit_ids: list[str], checkpoint_id: str, task_id: str, dtype: str
    ) -> bool:
        """Whether every circuit of `circuit_ids` has its cross-recovery row at the checkpoint
        on the task in the dtype."""
        stored = self._scalar(
            """SELECT count(DISTINCT circuit_id) FROM cross_recovery
               WHERE list_contains(?, circuit_id) AND checkpoint_id = ? AND task_id = ?
                 AND dtype = ?""",
            [circuit_ids, checkpoint_id, task_id, dtype],
        )
        return int(stored) == len(set(circuit_ids))

    def save_seed_group(self, rows: list[dict[str, Any]]) -> None:
        """Add members to seed groups (`workbench.seeds`); a member already in its group keeps
        its row."""
        with self.transaction() as con:
            self._insert(con, "seed_groups", pa.Table.from_pylist(rows), ignore_existing=True)

    def save_cross_recovery(
        self, rows: list[dict[str, Any]], registry: dict[str, pa.Table]
    ) -> None:
        """Store circuits' faithfulness at one checkpoint (`workbench.crossrecovery`) with the
        model, checkpoint and task rows they refer to, in one transaction, replacing the same
        (circuit, checkpoint, task, dtype) rows."""
        with self.transaction() as con:
            for table, data in registry.items():
                self._insert(con, table, data, ignore_existing=True)
            for row in rows:
                con.execute(
                    """DELETE FROM cross_recovery WHERE circuit_id = ? AND checkpoint_id = ?
                       AND task_id = ? AND dtype = ?""",
                    [row["circuit_id"], row["checkpoint_id"], row["task_id"], row["dtype"]],
                )
            self._insert(con, "cross_recovery", pa.Table.from_pylist(rows))

    def _replace_keyed(
        self,
        head_table: str,
        key: str,
        head: dict[str, Any],
        tables: tuple[str, ...],
        rows: dict[str, list[dict[str, Any]]],
        registry: dict[str, pa.Table],
        then: Callable[[], None] | None = None,
    ) -> None:
        """In one transaction: the registry rows (kept where present), then `head` into
        `head_table` and `rows` into `tables`, replacing every row of the same `key` value;
        `then` runs last, before the commit (a failure there rolls the rows back)."""
        value = str(head[key])
        with self.transaction() as con:
            for table, data in registry.items():
                self._insert(con, table, data, ignore_existing=True)
            for table in (head_table, *tables):
                con.execute(f"DELETE FROM {table} WHERE {key} = ?", [value])
            self._insert(con, head_table, pa.Table.from_pylist([head]))
            for table in tables:
                if rows.get(table):
                    self._insert(con, table, pa.Table.from_pylist(rows[table]))
            if then is not None:
                then()

    def transcoder_set(self, set_id: str) -> dict[str, Any] | None:
        """The stored transcoder set `set_id` (its `transcoder_sets` row), or None."""
        cur = self.con.execute("SELECT * FROM transcoder_sets WHERE set_id = ?", [set_id])
        row = cur.fetchone()
        return None if row is None else dict(zip([d[0] for d in cur.description], row, strict=True))

    def has_graph(self, graph_id: str) -> bool:
        return self._exists("graphs", "graph_id", graph_id)

    def save_graph(
        self,
        head: dict[str, Any],
        nodes: pa.Table,
        edges: pa.Table,
        adjacency: pa.Table | None,
        registry: dict[str, pa.Table],
    ) -> str:
        """Store one attribution graph (`workbench.transcoders.run`) in one transaction,
        replacing the same graph_id: its `graphs` row, nodes and kept edges, and its full
        adjacency, where given, as `<db directory>/graphs/<graph_id>.parquet` (written beside it
        first, moved into place just before the transaction commits, removed if it does not)."""
        import pyarrow.parquet as pq

        gid = str(head["graph_id"])
        files: dict[str, str] = {}
        final = None
        if adjacency is not None:  # an imported graph has none
            final = self.path.parent / "graphs" / f"{gid}.parquet"
            final.parent.mkdir(parents=True, exist_ok=True)
            staged = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}")
            pq.write_table(adjacency, staged)
            files[str(staged)] = str(final)
        path = None if final is None else str(final)
        head = head | {"adjacency_path": path, "created_at": utc_now()}
        head["params"] = json.dumps(head["params"], sort_keys=True)
        moved: list[tuple[Path, Path | None]] = []
        try:
            with self.transaction() as con:
                for table, data in registry.items():
                    self._insert(con, table, data, ignore_existing=True)
                for table in ("graphs", *GRAPH_TABLES):
                    con.execute(f"DELETE FROM {table} WHERE graph_id = ?", [gid])
                self._insert(con, "graphs", pa.Table.from_pylist([head]))
                for table, data in (("graph_nodes", nodes), ("graph_edges", edges)):
                    if data.num_rows:
                        self._insert(con, table, data)
                _move_into_place(files, moved)
        except BaseException:
            _undo_moves(files, moved)
            raise
        for _, aside in moved:
            if aside is not None:
                _remove(aside)
        return gid

    def save_subgraph(self, subgraph: "Subgraph") -> str:
        """Store a curated subgraph in one transaction, replacing one of the same name at the
        same checkpoint; returns its id. Bad content (no name, an edge to a node it does not
        hold, an unknown checkpoint) is BadInput and stores nothing."""
        subgraph.check()
        known = self._scalar(
            "SELECT model_id FROM checkpoints WHERE checkpoint_id = ?", [subgraph.checkpoint_id]
        )
        if known is None:
            raise BadInput(f"subgraph: no checkpoint {subgraph.checkpoint_id!r} in {self.path}")
        if known != subgraph.model_id:
            raise BadInput(
                f"subgraph: checkpoint {subgraph.checkpoint_id!r} belongs to {known!r}, "
                f"not {subgraph.model_id!r}"
            )
        sid = subgraph.subgraph_id
        nodes = pa.table(
            {
                "subgraph_id": [sid] * len(subgraph.nodes),
                "node_id": [n.node_id for n in subgraph.nodes],
                "group_label": pa.array([n.group for n in subgraph.nodes], pa.string()),
                "note": pa.array([n.note for n in subgraph.nodes], pa.string()),
            }
        )
        edges = pa.table(
            {
                "subgraph_id": [sid] * len(subgraph.edges),
                "src": pa.array([e.src for e in subgraph.edges], pa.string()),
                "dst": pa.array([e.dst for e in subgraph.edges], pa.string()),
                "score": pa.array([e.score for e in subgraph.edges], pa.float64()),
                "note": pa.array([e.note for e in subgraph.edges], pa.string()),
            }
        )
        with self.transaction() as con:
            for table in ("subgraph_edges", "subgraph_nodes", "subgraphs"):
                con.execute(f"DELETE FROM {table} WHERE subgraph_id = ?", [sid])
            con.execute(
                "INSERT INTO subgraphs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    sid,
                    subgraph.name.strip(),
                    subgraph.model_id,
                    subgraph.checkpoint_id,
                    subgraph.source,
                    subgraph.description,
                    len(subgraph.nodes),
                    len(subgraph.edges),
                    utc_now(),
                ],
            )
            con.register("_subgraph_nodes", nodes)
            con.register("_subgraph_edges", edges)
            try:
                con.execute("INSERT INTO subgraph_nodes SELECT * FROM _subgraph_nodes")
                con.execute("INSERT INTO subgraph_edges SELECT * FROM _subgraph_edges")
            finally:
                con.unregister("_subgraph_nodes")
                con.unregister("_subgraph_edges")
        logger.info("saved subgraph %s (%s)", sid, subgraph.name)
        return sid

    def record_failed_run(self, run: RunRow, *, registry: dict[str, pa.Table]) -> str:
        run.status = "failed"
        return self.write_run(run, registry=registry, rows={})

    @staticmethod
    def _delete_runs(con: duckdb.DuckDBPyConnection, run_key: str) -> None:
        """Delete the runs of a key (done, failed or duplicate) and every row they own."""
        old = "SELECT run_id FROM runs WHERE run_key = ?"
        circuits = f"SELECT circuit_id FROM circuits WHERE run_id IN ({old})"
        con.execute(f"DELETE FROM circuit_edges WHERE circuit_id IN ({circuits})", [run_key])
        con.execute(f"DELETE FROM cross_recovery WHERE circuit_id IN ({circuits})", [run_key])
        con.execute(f"DELETE FROM circuits WHERE run_id IN ({old})", [run_key])
        for table in RUN_TABLES:
            con.execute(f"DELETE FROM {table} WHERE run_id IN ({old})", [run_key])
        con.execute("DELETE FROM done_runs WHERE run_key = ?", [run_key])
        con.execute("DELETE FROM runs WHERE run_key = ?", [run_key])

    def insert(self, table: str, data: pa.Table) -> None:
        """Bulk-insert an Arrow table's rows (its columns by name)."""
        self._insert(self.con, table, data)

    @staticmethod
    def _insert(
        con: duckdb.DuckDBPyConnection, table: str, data: pa.Table, ignore_existing: bool = False
    ) -> None:
        view = f"_incoming_{table}"
        con.register(view, data)
        try:
            columns = ", ".join(data.column_names)
            verb = "INSERT OR IGNORE" if ignore_existing else "INSERT"
            con.execute(f"{verb} INTO {table} ({columns}) SELECT {columns} FROM {view}")
        finally:
            con.unregister(view)
