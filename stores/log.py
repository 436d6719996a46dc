"""The SQL edit log (SQLAlchemy 2 Core): the source of truth of the edit memory.

Two tables:

* ``memedit_edits`` — one row per applied edit: the request as JSON, strategy, method, batch id,
  creation and rollback times (UTC), an optional payload blob, and the embedding of the edit's
  prompt (float32 bytes) so an index can be rebuilt, or a replica synced, without re-embedding.
* ``memedit_meta`` — key/value facts about the store: schema version, a random log id, the
  embedder identity and dimension, and a *generation* counter raised in the same transaction as
  every change, so a saved index can tell whether it is current.

On SQLite and PostgreSQL an expression index on the request's subject (``SUBJECT_INDEX``)
serves `EditLog.query`'s subject filter. It is not part of the schema version: a log written
before it existed gets it when next opened (where the database lets this process create it;
otherwise the filter scans), and a memedit that does not know it ignores it.

A SQLite file by default; any SQLAlchemy URL (PostgreSQL for many replicas) otherwise. An
in-memory SQLite log uses one shared connection (``StaticPool``) so it lives as long as the
engine and supports ``engine.raw_connection()`` (the wrapper backs it up through it).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any, NamedTuple, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

from memedit.errors import (
    AlreadyRolledBackError,
    EditNotFoundError,
    EmbedderMismatchError,
    InvalidRequestError,
    StoreSchemaError,
)
from memedit.types import EditRecord, EditRequest

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA_VERSION = 1
EDITS_TABLE = "memedit_edits"
META_TABLE = "memedit_meta"
# Only edits of this strategy are retrieved for queries (and so indexed); the others (in-weight
# edits, adapters) are logged for persistence and rollback but act through the model itself.
RETRIEVED_STRATEGY = "memory"

#: `EditLog.query` statuses: what each keeps.
QUERY_STATUSES = ("active", "rolled_back", "all")
SUBJECT_INDEX = "ix_memedit_edits_subject"

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER only

metadata = sa.MetaData()
edits = sa.Table(
    EDITS_TABLE,
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("request", sa.JSON, nullable=False),
    sa.Column("strategy", sa.String(32), nullable=False),
    sa.Column("method", sa.String(64), nullable=False),
    sa.Column("batch_id", sa.String(64), nullable=False, index=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("rolled_back_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("payload", sa.LargeBinary, nullable=True),
    sa.Column("embedding", sa.LargeBinary, nullable=True),
    sqlite_autoincrement=True,  # ids are never reused, even after the newest row is gone
)
meta = sa.Table(
    META_TABLE,
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

_RECORD_COLUMNS = (
    edits.c.id,
    edits.c.request,
    edits.c.strategy,
    edits.c.method,
    edits.c.batch_id,
    edits.c.created_at,
    edits.c.rolled_back_at,
)


class EditPage(NamedTuple):
    """One page of `EditLog.query`: how many edits match, and those on the page (id order)."""

    total: int
    records: list[EditRecord]


# The request's subject as SQL text, per database: the index is built on this expression and
# the subject filter is written with the very same text (a bound JSON path would not match it).
_SUBJECT_SQL = {
    "sqlite": "json_extract(request, '$.subject')",
    "postgresql": "(request ->> 'subject')",
}
_INDEX_EXISTS = {
    "sqlite": "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = :name",
    "postgresql": (
        "SELECT count(*) FROM pg_indexes WHERE schemaname = current_schema() AND indexname = :name"
    ),
}


def _subject_of(dialect: str) -> sa.ColumnElement[str]:
    """The request's subject as a text expression (SQLAlchemy's portable JSON accessor on a
    database without an entry in ``_SUBJECT_SQL``, and no index)."""
    sql = _SUBJECT_SQL.get(dialect)
    if sql is None:
        return edits.c.request["subject"].as_string()
    return sa.literal_column(sql, sa.String)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)  # py3.10 has no datetime.UTC


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)  # SQLite returns naive UTC
    return value.astimezone(timezone.utc)  # PostgreSQL returns the session's zone


def _record(row: Any) -> EditRecord:
    created = _aware(row.created_at)
    assert created is not None
    return EditRecord(
        id=int(row.id),
        request=EditRequest.from_dict(row.request),
        strategy=row.strategy,
        method=row.method,
        created_at=created,
        rolled_back_at=_aware(row.rolled_back_at),
        batch_id=row.batch_id,
    )


def _retry_on_race(fn: Callable[[], T], attempts: int = 3) -> T:
    for attempt in range(attempts):
        try:
            return fn()
        except (sa.exc.IntegrityError, sa.exc.OperationalError, sa.exc.ProgrammingError):
            # a concurrent creator won (duplicate key / table exists / SQLite busy): read again
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout, and a static pool when in memory."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True)
    database = parsed.database or ""
    in_memory = database in ("", ":memory:") or "mode=memory" in str(parsed.query)
    if in_memory:
        engine = sa.create_engine(
            url, poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
    else:
        engine = sa.create_engine(url, connect_args={"timeout": 30.0})

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        if not in_memory:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives a process kill
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return engine


class EditLog:
    """The edit log at one SQLAlchemy URL (see the module docstring)."""

    def __init__(self, url: str, *, engine: Engine | None = None) -> None:
        self.url = url
        self.engine = engine if engine is not None else make_engine(url)
        try:
            self.log_id: str = _retry_on_race(self._create)
        except BaseException:
            self.engine.dispose()
            raise
        self._subject = _subject_of(self.engine.dialect.name)
        #: whether subject filters are served by the subject index (SQLite, PostgreSQL)
        self.subject_indexed = self._add_subject_index()

    def _create(self) -> str:
        metadata.create_all(self.engine, checkfirst=True)
        with self.engine.begin() as conn:
            found = self._meta_get(conn, "schema_version")
            if found is None:
                self._meta_init(
                    conn,
                    {
                        "schema_version": str(SCHEMA_VERSION),
                        "log_id": uuid.uuid4().hex,
                        "generation": "0",
                    },
                )
            elif found != str(SCHEMA_VERSION):
                msg = (
                    f"the edit log at {self.safe_url} has schema version {found}; "
                    f"this memedit reads version {SCHEMA_VERSION}"
                )
                raise StoreSchemaError(msg)
            log_id = self._meta_get(conn, "log_id")
        if log_id is None:
            msg = f"the edit log at {self.safe_url} has no log_id (not written by memedit?)"
            raise StoreSchemaError(msg)
        return log_id

    def _add_subject_index(self) -> bool:
        """Create the subject index if it is missing (see the module docstring); whether the
        log has it. A database that refuses (read-only file, a role that may not create
        indexes) leaves the log usable: subject filters then scan the table."""
        dialect = self.engine.dialect.name
        if dialect not in _SUBJECT_SQL:
            return False
        exists = sa.text(_INDEX_EXISTS[dialect]).bindparams(name=SUBJECT_INDEX)
        create = f"CREATE INDEX IF NOT EXISTS {SUBJECT_INDEX} ON {EDITS_TABLE} "
        try:
            with self.engine.begin() as conn:
                if conn.execute(exists).scalar_one():
                    return True
                conn.execute(sa.text(f"{create}({_SUBJECT_SQL[dialect]})"))
                return bool(conn.execute(exists).scalar_one())
        except sa.exc.SQLAlchemyError as exc:
            log.info("edit log %s: no subject index (%s); subject filters scan", self.safe_url, exc)
            return False

    @property
    def safe_url(self) -> str:
        """The URL with any password hidden, for messages."""
        return sa.make_url(self.url).render_as_string(hide_password=True)

    # ------------------------------------------------------------------ meta
    @staticmethod
    def _meta_get(conn: Connection, key: str) -> str | None:
        value = conn.execute(sa.select(meta.c.value).where(meta.c.key == key)).scalar()
        return None if value is None else str(value)

    @staticmethod
    def _meta_init(conn: Connection, values: dict[str, str]) -> None:
        """Insert the keys that are missing. Two processes creating the same log at once can
        race here; the loser's transaction fails with IntegrityError and `_retry_on_race`
        runs it again, when the keys exist."""
        query = sa.select(meta.c.key).where(meta.c.key.in_(list(values)))
        have = set(conn.execute(query).scalars())
        missing = [{"key": k, "value": v} for k, v in values.items() if k not in have]
        if missing:
            conn.execute(sa.insert(meta), missing)

    def meta_value(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            return self._meta_get(conn, key)

    def bind_embedder(self, name: str, dim: int) -> None:
        """Record the embedder on first use; refuse a different one later."""

        def bind() -> tuple[str | None, str | None]:
            with self.engine.begin() as conn:
                self._meta_init(conn, {"embedder": name, "embedder_dim": str(dim)})
                return self._meta_get(conn, "embedder"), self._meta_get(conn, "embedder_dim")

        stored, stored_dim = _retry_on_race(bind)
        if stored != name or stored_dim != str(dim):
            msg = (
                f"the edit log at {self.safe_url} was written with embedder {stored!r} "
                f"(dim {stored_dim}); refusing to open it with embedder {name!r} (dim {dim}). "
                "Open it with the same embedder, or export the edits and re-add them."
            )
            raise EmbedderMismatchError(msg)

    def generation(self, conn: Connection | None = None) -> int:
        if conn is None:
            with self.engine.connect() as c:
                return self.generation(c)
        value = self._meta_get(conn, "generation")
        return int(value or 0)

    @staticmethod
    def _bump(conn: Connection) -> int:
        conn.execute(
            sa.update(meta)
            .where(meta.c.key == "generation")
            .values(value=sa.cast(sa.cast(meta.c.value, sa.BigInteger) + 1, sa.Text))
        )
        return int(
            conn.execute(sa.select(meta.c.value).where(meta.c.key == "generation")).scalar_one()
        )

    # ------------------------------------------------------------------ writes
    def insert(
        self,
        conn: Connection,
        requests: Sequence[EditRequest],
        *,
        strategy: str,
        method: str,
        batch_id: str,
        payloads: Sequence[bytes | None],
        embeddings: Sequence[bytes | None],
    ) -> tuple[list[EditRecord], int]:
        """Insert one batch inside the caller's transaction; returns its records and the new
        generation."""
        now = utcnow()
        rows = [
            {
                "request": r.to_dict(),
                "strategy": strategy,
                "method": method,
                "batch_id": batch_id,
                "created_at": now,
                "rolled_back_at": None,
                "payload": p,
                "embedding": e,
            }
            for r, p, e in zip(requests, payloads, embeddings, strict=True)
        ]
        result = conn.execute(
            sa.insert(edits).returning(edits.c.id, sort_by_parameter_order=True), rows
        )
        ids = [int(i) for i in result.scalars().all()]
        records = [
            EditRecord(
                id=i, request=r, strategy=strategy, method=method, created_at=now, batch_id=batch_id
            )
            for i, r in zip(ids, requests, strict=True)
        ]
        return records, self._bump(conn)

    def mark_rolled_back(self, conn: Connection, edit_id: int) -> tuple[EditRecord, int]:
        """Mark one edit rolled back inside the caller's transaction; returns its record and
        the new generation. Raises if it is missing or was rolled back before."""
        now = utcnow()
        done = conn.execute(
            sa.update(edits)
            .where(edits.c.id == edit_id, edits.c.rolled_back_at.is_(None))
            .values(rolled_back_at=now)
        )
        row = conn.execute(sa.select(*_RECORD_COLUMNS).where(edits.c.id == edit_id)).first()
        if row is None:
            msg = f"no edit with id {edit_id} in the edit log"
            raise EditNotFoundError(msg)
        if done.rowcount == 0:
            msg = f"edit {edit_id} was already rolled back at {_aware(row.rolled_back_at)}"
            raise AlreadyRolledBackError(msg)
        return _record(row), self._bump(conn)

    # ------------------------------------------------------------------ reads
    def get(self, edit_id: int) -> EditRecord:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(*_RECORD_COLUMNS).where(edits.c.id == edit_id)).first()
        if row is None:
            msg = f"no edit with id {edit_id} in the edit log"
            raise EditNotFoundError(msg)
        return _record(row)

    def get_many(self, ids: Iterable[int], *, active_only: bool = True) -> dict[int, EditRecord]:
        wanted = sorted({int(i) for i in ids})
        if not wanted:
            return {}
        query = sa.select(*_RECORD_COLUMNS).where(edits.c.id.in_(wanted))
        if active_only:
            query = query.where(edits.c.rolled_back_at.is_(None))
        with self.engine.connect() as conn:
            return {int(row.id): _record(row) for row in conn.execute(query)}

    def payload(self, edit_id: int) -> bytes | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(edits.c.payload).where(edits.c.id == edit_id)).first()
        if row is None:
            msg = f"no edit with id {edit_id} in the edit log"
            raise EditNotFoundError(msg)
        return None if row.payload is None else bytes(row.payload)

    def records(self, *, include_rolled_back: bool = False) -> list[EditRecord]:
        query = sa.select(*_RECORD_COLUMNS).order_by(edits.c.id)
        if not include_rolled_back:
            query = query.where(edits.c.rolled_back_at.is_(None))
        with self.engine.connect() as conn:
            return [_record(row) for row in conn.execute(query)]

    def query(
        self,
        *,
        status: str = "active",
        subject: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> EditPage:
        """Edits by status (``active``, ``rolled_back`` or ``all``) and exact subject (None:
        any; ``""``: edits without one), in id order: the number that match and the page of
        at most `limit` (None: all) after the first `offset`, filtered and paged by the
        database. Bad values raise `InvalidRequestError` naming the argument."""
        check_query_fields(status, subject, limit, offset)
        where: list[sa.ColumnElement[bool]] = []
        if status == "active":
            where.append(edits.c.rolled_back_at.is_(None))
        elif status == "rolled_back":
            where.append(edits.c.rolled_back_at.is_not(None))
        if subject is not None:
            where.append(self._subject == subject)
        # the count rides along as an uncorrelated subquery (computed once): the page and its
        # total come from one statement, one snapshot; only an empty page needs its own count
        count = sa.select(sa.func.count()).select_from(edits).where(*where)
        total_of = count.scalar_subquery().correlate(None).label("total")  # not per row
        page = sa.select(*_RECORD_COLUMNS, total_of).where(*where)
        page = page.order_by(edits.c.id).offset(offset)
        if limit is not None:
            page = page.limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(page).all() if limit != 0 else []
            total = int(rows[0].total) if rows else int(conn.execute(count).scalar_one())
        return EditPage(total=total, records=[_record(row) for row in rows])

    def count_active(self, conn: Connection | None = None, *, strategy: str | None = None) -> int:
        """Active edits (of one strategy, if given)."""
        if conn is None:
            with self.engine.connect() as c:
                return self.count_active(c, strategy=strategy)
        query = sa.select(sa.func.count()).select_from(edits)
        query = query.where(edits.c.rolled_back_at.is_(None))
        if strategy is not None:
            query = query.where(edits.c.strategy == strategy)
        return int(conn.execute(query).scalar_one())

    def active_vectors(
        self, conn: Connection, *, strategy: str = RETRIEVED_STRATEGY, chunk: int = 10_000
    ) -> Iterator[list[tuple[int, str, bytes | None]]]:
        """Active rows of `strategy` as (id, prompt, embedding bytes), in id order, `chunk`
        rows at a time."""
        query = (
            sa.select(edits.c.id, edits.c.request, edits.c.embedding)
            .where(edits.c.rolled_back_at.is_(None), edits.c.strategy == strategy)
            .order_by(edits.c.id)
            .execution_options(yield_per=chunk)
        )
        for part in conn.execute(query).partitions(chunk):
            yield [
                (
                    int(r.id),
                    str(r.request["prompt"]),
                    None if r.embedding is None else bytes(r.embedding),
                )
                for r in part
            ]

    def set_embeddings(self, conn: Connection, values: Sequence[tuple[int, bytes]]) -> None:
        if values:
            conn.execute(
                sa.update(edits)
                .where(edits.c.id == sa.bindparam("eid"))
                .values(embedding=sa.bindparam("emb")),
                [{"eid": i, "emb": e} for i, e in values],
            )

    def close(self) -> None:
        self.engine.dispose()


def check_batch_fields(strategy: str, method: str, batch_id: str) -> None:
    """Validate the per-batch columns against the log's limits, naming the field."""
    from memedit.types import STRATEGIES

    if strategy not in STRATEGIES:
        msg = f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}"
        raise InvalidRequestError(msg, field="strategy", value=strategy)
    for name, value, limit in (("method", method, 64), ("batch_id", batch_id, 64)):
        if not isinstance(value, str) or len(value) > limit:
            msg = f"{name} must be a string of at most {limit} characters, got {value!r:.80}"
            raise InvalidRequestError(msg, field=name, value=value)
    if not method:
        msg = "method must not be empty"
        raise InvalidRequestError(msg, field="method", value=method)


def check_query_fields(status: object, subject: object, limit: object, offset: object) -> None:
    """Validate `EditLog.query`'s arguments, naming the bad one."""
    if status not in QUERY_STATUSES:
        msg = f"status must be one of {', '.join(QUERY_STATUSES)}, got {status!r:.80}"
        raise InvalidRequestError(msg, field="status", value=status)
    if subject is not None and not isinstance(subject, str):
        msg = f"subject must be a string or None, got {subject!r:.80}"
        raise InvalidRequestError(msg, field="subject", value=subject)
    for name, value, optional in (("limit", limit, True), ("offset", offset, False)):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            what = "a non-negative integer" + (" or None" if optional else "")
            msg = f"{name} must be {what}, got {value!r:.80}"
            raise InvalidRequestError(msg, field=name, value=value)
