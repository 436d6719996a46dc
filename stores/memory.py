"""`EditMemory`: the memory strategy's store — an embedder, a FAISS index and the SQL edit log.

The log is the source of truth. Every change (add a batch, roll an edit back) is one SQL
transaction that also raises the log's *generation*; the in-memory index changes with it and
is undone if the transaction fails, so a batch lands whole or not at all. The index file is a
cache: it records the log id and generation it reflects, and on open a file that is missing,
stale (another generation, another log, another embedder, another count) or corrupt is
rebuilt from the log, from the embeddings stored there (no re-embedding needed).

Layout of a directory memory (``EditMemory.open(path)``)::

    path/log.db        SQLite edit log (WAL)
    path/index.faiss   FAISS index + header (log id, generation, checksum)

With ``url=`` the log lives in any SQLAlchemy database (e.g. PostgreSQL shared by replicas);
each replica keeps its own index (in `path` if given, else in memory) and calls `sync` to pick
up edits written elsewhere.
"""

from __future__ import annotations

import builtins
import functools
import logging
import os
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from memedit.errors import IndexFileError, InvalidRequestError, MemeditError
from memedit.types import EditRecord, EditRequest, Hit

from .embedders import Embedder, MiniLMEmbedder
from .index import IndexConfig, VectorIndex, read_index_file, write_index_file
from .log import RETRIEVED_STRATEGY, EditLog, EditPage, check_batch_fields

if TYPE_CHECKING:
    from numpy.typing import NDArray

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
LOG_FILE = "log.db"
#: Largest batch one `add` accepts (one transaction, one embedding pass).
MAX_BATCH = 100_000


@functools.lru_cache(maxsize=1)
def _shared_default_embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder()


class EditMemory:
    """Edits retrievable by similarity of their prompt to a query (see the module docstring).
    Build one with `EditMemory.open`."""

    def __init__(
        self,
        edit_log: EditLog,
        embedder: Embedder,
        *,
        index_path: Path | None = None,
        index_config: IndexConfig | None = None,
    ) -> None:
        self.log = edit_log
        self.embedder = embedder
        self.index_path = index_path
        self.index = VectorIndex(embedder.dim, index_config)
        self._lock = threading.RLock()
        self._generation: int | None = None  # log generation the index reflects (None: unknown)
        self._saved_generation: int | None = None
        self._closed = False
        self.log.bind_embedder(embedder.name, embedder.dim)
        self._load_or_rebuild()

    @classmethod
    def open(
        cls,
        path: str | Path | None = None,
        *,
        url: str | None = None,
        embedder: Embedder | None = None,
        index_config: IndexConfig | None = None,
    ) -> EditMemory:
        """Open (or create) an edit memory.

        `path`: a directory holding the SQLite log (``log.db``) and the index (``index.faiss``).
        `url`: a SQLAlchemy URL for the log instead; the index then lives in `path` if given,
        else only in memory. Neither: everything in memory. `embedder`: defaults to MiniLM;
        a memory refuses to open with another embedder than the one that wrote it
        (`EmbedderMismatchError`).
        """
        directory: Path | None = None
        if path is not None:
            directory = Path(path)
            if directory.exists() and not directory.is_dir():
                msg = f"path must be a directory for the edit memory, but {directory} is a file"
                raise InvalidRequestError(msg, field="path", value=str(directory))
            directory.mkdir(parents=True, exist_ok=True)
        if url is None:
            url = f"sqlite:///{directory / LOG_FILE}" if directory is not None else "sqlite://"
        elif not isinstance(url, str) or not url:
            msg = f"url must be a SQLAlchemy URL string, got {url!r}"
            raise InvalidRequestError(msg, field="url", value=url)
        if embedder is None:
            embedder = _shared_default_embedder()
        _check_embedder(embedder)
        edit_log = EditLog(url)
        try:
            return cls(
                edit_log,
                embedder,
                index_path=directory / INDEX_FILE if directory is not None else None,
                index_config=index_config,
            )
        except BaseException:
            edit_log.close()
            raise

    # ------------------------------------------------------------------ index lifecycle
    def _remove_dead_temporaries(self) -> None:
        """Delete half-written index files left by processes that died while saving."""
        assert self.index_path is not None
        for tmp in self.index_path.parent.glob(f"{self.index_path.name}.tmp-*"):
            try:
                pid = int(tmp.name.rsplit("-", 1)[1])
                os.kill(pid, 0)
            except ProcessLookupError:
                tmp.unlink(missing_ok=True)
            except (ValueError, PermissionError, OSError):
                continue

    def _load_or_rebuild(self) -> None:
        if self.index_path is not None:
            self._remove_dead_temporaries()
        reason = "no index file" if self.index_path is not None else "in-memory index"
        if self.index_path is not None and self.index_path.is_file():
            try:
                index, header = read_index_file(
                    self.index_path, self.embedder.dim, self.index.config
                )
                reason = self._staleness(header)
                if not reason:
                    self.index = index
                    self._generation = self._saved_generation = int(header["generation"])
                    return
            except IndexFileError as exc:
                reason = str(exc)
        if self.index_path is not None:
            log.info("rebuilding the edit index from the log (%s)", reason)
        self.rebuild()

    def _staleness(self, header: dict[str, Any]) -> str:
        """Why a saved index does not match the log ("" if it does)."""
        with self.log.engine.connect() as conn:
            generation = self.log.generation(conn)
            active = self.log.count_active(conn, strategy=RETRIEVED_STRATEGY)
        checks = (
            ("log_id", self.log.log_id),
            ("generation", generation),
            ("embedder", self.embedder.name),
            ("count", active),
        )
        for key, want in checks:
            if header.get(key) != want:
                return f"index file {key} {header.get(key)!r} != log {want!r}"
        return ""

    def rebuild(self) -> None:
        """Rebuild the index from the log's active edits (their stored embeddings; edits
        without one are embedded now) and save it."""
        with self._lock:
            self._check_open()
            for _ in range(5):
                generation = self.log.generation()
                ids, vectors = self._active_vectors()
                if self.log.generation() == generation:
                    break
                log.info("the log changed during the rebuild; reading it again")
            self.index.reset(vectors, ids)
            self._generation = generation
            self._saved_generation = None
            self.save()

    def _active_vectors(self) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        dim = self.embedder.dim
        ids: builtins.list[int] = []
        parts: builtins.list[NDArray[np.float32]] = []
        missing: builtins.list[tuple[int, int, str]] = []  # (row, id, prompt)
        with self.log.engine.connect() as conn:
            for chunk in self.log.active_vectors(conn):
                block = np.zeros((len(chunk), dim), dtype=np.float32)
                for j, (edit_id, prompt, blob) in enumerate(chunk):
                    if blob is not None and len(blob) == 4 * dim:
                        block[j] = np.frombuffer(blob, dtype=np.float32)
                    else:
                        missing.append((len(ids) + j, edit_id, prompt))
                ids.extend(e for e, _, _ in chunk)
                parts.append(block)
        vectors = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
        if missing:
            log.info("embedding %d logged edits that have no stored embedding", len(missing))
            fresh = self._embed([p for _, _, p in missing])
            vectors[[r for r, _, _ in missing]] = fresh
            with self.log.engine.begin() as conn:
                self.log.set_embeddings(
                    conn, [(e, v.tobytes()) for (_, e, _), v in zip(missing, fresh, strict=True)]
                )
        return np.asarray(ids, dtype=np.int64), vectors

    def sync(self) -> bool:
        """Pick up changes other processes made to a shared log (rebuilds the index when the
        log's generation moved). Returns whether anything changed."""
        with self._lock:
            self._check_open()
            if self._generation is not None and self.log.generation() == self._generation:
                return False
            self.rebuild()
            return True

    def save(self) -> None:
        """Write the index file (if this memory has a directory and the index changed)."""
        with self._lock:
            self._check_open()
            if self.index_path is None:
                return
            if self._generation is None:  # another writer interleaved: re-read the log first
                self.rebuild()
                return
            if self._saved_generation == self._generation and self.index_path.is_file():
                return
            header = {
                "log_id": self.log.log_id,
                "generation": self._generation,
                "embedder": self.embedder.name,
            }
            write_index_file(self.index_path, self.index, header)
            self._saved_generation = self._generation

    def close(self) -> None:
        """Save the index and release the database connections. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                self.save()
            finally:
                self._closed = True
                self.log.close()

    def __enter__(self) -> EditMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            msg = "this EditMemory is closed"
            raise MemeditError(msg)

    def _advance(self, new_generation: int) -> None:
        """Our own change moved the log to `new_generation`; if someone else's change came in
        between, the index no longer reflects the log exactly (`save`/`sync` rebuild)."""
        if self._generation is not None and new_generation == self._generation + 1:
            self._generation = new_generation
        else:
            self._generation = None

    # ------------------------------------------------------------------ edits
    def _embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        vectors = np.asarray(self.embedder.encode(list(texts)), dtype=np.float32)
        if vectors.shape != (len(texts), self.embedder.dim) or not np.isfinite(vectors).all():
            msg = (
                f"embedder {self.embedder.name!r} returned an array of shape {vectors.shape} "
                f"(finite: {bool(np.isfinite(vectors).all())}) for {len(texts)} texts; "
                f"expected ({len(texts)}, {self.embedder.dim}) finite values"
            )
            raise MemeditError(msg)
        return np.ascontiguousarray(vectors)

    def add(
        self,
        requests: Sequence[EditRequest],
        *,
        strategy: str = "memory",
        method: str = "memory",
        batch_id: str = "",
        payloads: Sequence[bytes | None] | None = None,
    ) -> builtins.list[EditRecord]:
        """Add a batch of edits: all land (log rows and index entries) or none do.

        Each edit is retrieved by its prompt. `batch_id` groups the batch (a fresh random id
        when empty); `payloads` are optional blobs stored with each edit (e.g. a strategy's
        weights), read back with `payload`.
        """
        reqs = _check_requests(requests)
        check_batch_fields(strategy, method, batch_id)
        blobs = _check_payloads(payloads, len(reqs))
        batch = batch_id or uuid.uuid4().hex
        vectors = self._embed([r.prompt for r in reqs])  # before the transaction opens
        embeddings = [v.tobytes() for v in vectors]
        with self._lock:
            self._check_open()
            ids: builtins.list[int] | None = None
            try:
                with self.log.engine.begin() as conn:
                    records, generation = self.log.insert(
                        conn,
                        reqs,
                        strategy=strategy,
                        method=method,
                        batch_id=batch,
                        payloads=blobs,
                        embeddings=embeddings,
                    )
                    ids = [r.id for r in records]
                    if strategy == RETRIEVED_STRATEGY:
                        self.index.add(vectors, ids)
                    else:
                        ids = None
            except BaseException:
                if ids is not None:
                    self.index.remove(ids)
                raise
            self._advance(generation)
        log.debug("added %d edit(s), batch %s", len(records), batch)
        return records

    def remove(self, edit_id: int) -> EditRecord:
        """Roll one edit back: it is marked in the log and leaves the index. Returns its record
        (with ``rolled_back_at`` set)."""
        return self.remove_many([edit_id])[0]

    def remove_many(self, edit_ids: Sequence[int]) -> builtins.list[EditRecord]:
        """Roll several edits back in one transaction: all are marked, or none is (e.g. when
        one was rolled back before). Returns their records in the order given."""
        ids = [_check_id(i) for i in edit_ids]
        if not ids:
            msg = "remove_many needs at least one edit id"
            raise InvalidRequestError(msg, field="edit_ids", value=edit_ids)
        with self._lock:
            self._check_open()
            records: builtins.list[EditRecord] = []
            generation = 0
            with self.log.engine.begin() as conn:
                for edit_id in ids:
                    record, generation = self.log.mark_rolled_back(conn, edit_id)
                    records.append(record)
            self.index.remove(ids)
            self._advance(generation)
        return records

    def get(self, edit_id: int) -> EditRecord:
        """The record of one edit, active or rolled back (`EditNotFoundError` if unknown)."""
        self._check_open()
        return self.log.get(_check_id(edit_id))

    def payload(self, edit_id: int) -> bytes | None:
        """The blob stored with an edit, or None."""
        self._check_open()
        return self.log.payload(_check_id(edit_id))

    def list(self, *, include_rolled_back: bool = False) -> builtins.list[EditRecord]:
        """All active edits in id order (and the rolled-back ones, if asked)."""
        self._check_open()
        return self.log.records(include_rolled_back=include_rolled_back)

    def query(
        self,
        *,
        status: str = "active",
        subject: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> EditPage:
        """Edits by status (``active``, ``rolled_back`` or ``all``) and exact subject (None:
        any), filtered and paged in the log's database, in id order: ``(total, records)``,
        the number that match and at most `limit` of them (None: all) after the first
        `offset` (`EditLog.query`)."""
        self._check_open()
        return self.log.query(status=status, subject=subject, limit=limit, offset=offset)

    def __len__(self) -> int:
        return self.index.ntotal

    # ------------------------------------------------------------------ retrieval
    def search(self, query: str, k: int) -> builtins.list[Hit]:
        """The `k` active edits whose prompts are most similar to `query`, best first."""
        return self.search_batch([_check_query(query, "query")], k)[0]

    def search_batch(self, queries: Sequence[str], k: int) -> builtins.list[builtins.list[Hit]]:
        """`search` for many queries at once (one embedding pass, one index search)."""
        if isinstance(queries, str) or not isinstance(queries, Sequence):
            msg = f"queries must be a list of strings, got {type(queries).__name__}"
            raise InvalidRequestError(msg, field="queries", value=queries)
        texts = [_check_query(q, f"queries[{i}]") for i, q in enumerate(queries)]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            msg = f"k must be a positive integer, got {k!r}"
            raise InvalidRequestError(msg, field="k", value=k)
        if not texts:
            return []
        vectors = self._embed(texts)
        return self.search_vectors(vectors, k)

    def search_vectors(
        self, vectors: NDArray[np.float32], k: int
    ) -> builtins.list[builtins.list[Hit]]:
        """`search_batch` for already embedded queries."""
        with self._lock:
            self._check_open()
            if self.index.ntotal == 0:
                return [[] for _ in range(len(vectors))]
            scores, ids = self.index.search(vectors, k)
        wanted = {int(i) for i in ids.ravel() if i >= 0}
        records = self.log.get_many(wanted, active_only=True)
        out: builtins.list[builtins.list[Hit]] = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            hits = [
                Hit(record=records[int(i)], score=float(s))
                for s, i in zip(row_scores, row_ids, strict=True)
                if i >= 0 and int(i) in records
            ]
            out.append(hits)
        return out

    def __repr__(self) -> str:
        return (
            f"EditMemory(log={self.log.safe_url!r}, index={self.index.kind}:{len(self)}, "
            f"embedder={self.embedder.name!r})"
        )


# ---------------------------------------------------------------------------------- checks
def _check_embedder(embedder: object) -> None:
    if not isinstance(embedder, Embedder):
        msg = f"embedder must have name, dim and encode(texts), got {type(embedder).__name__}"
        raise InvalidRequestError(msg, field="embedder", value=embedder)
    dim = embedder.dim
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        msg = f"embedder.dim must be a positive integer, got {dim!r}"
        raise InvalidRequestError(msg, field="embedder.dim", value=dim)
    if not isinstance(embedder.name, str) or not embedder.name:
        msg = f"embedder.name must be a non-empty string, got {embedder.name!r}"
        raise InvalidRequestError(msg, field="embedder.name", value=embedder.name)


def _check_requests(requests: object) -> builtins.list[EditRequest]:
    if isinstance(requests, (str, bytes, EditRequest)) or not isinstance(requests, Sequence):
        msg = f"requests must be a list of EditRequest, got {type(requests).__name__}"
        raise InvalidRequestError(msg, field="requests", value=requests)
    if not requests:
        msg = "requests is empty: nothing to add"
        raise InvalidRequestError(msg, field="requests", value=requests)
    if len(requests) > MAX_BATCH:
        msg = f"{len(requests)} requests in one batch; the limit is {MAX_BATCH}, split it"
        raise InvalidRequestError(msg, field="requests", value=len(requests))
    for i, r in enumerate(requests):
        if not isinstance(r, EditRequest):
            msg = f"requests[{i}] must be an EditRequest, got {type(r).__name__}"
            raise InvalidRequestError(msg, field=f"requests[{i}]", value=r)
    return builtins.list(requests)


def _check_payloads(payloads: object, n: int) -> builtins.list[bytes | None]:
    if payloads is None:
        return [None] * n
    if isinstance(payloads, (str, bytes)) or not isinstance(payloads, Sequence):
        msg = f"payloads must be a list of bytes or None, got {type(payloads).__name__}"
        raise InvalidRequestError(msg, field="payloads", value=payloads)
    if len(payloads) != n:
        msg = f"{len(payloads)} payloads for {n} requests; give one per request (or None)"
        raise InvalidRequestError(msg, field="payloads", value=len(payloads))
    out: builtins.list[bytes | None] = []
    for i, p in enumerate(payloads):
        if p is not None and not isinstance(p, (bytes, bytearray, memoryview)):
            msg = f"payloads[{i}] must be bytes or None, got {type(p).__name__}"
            raise InvalidRequestError(msg, field=f"payloads[{i}]", value=p)
        out.append(None if p is None else bytes(p))
    return out


def _check_id(edit_id: object) -> int:
    if isinstance(edit_id, bool) or not isinstance(edit_id, (int, np.integer)):
        msg = f"edit_id must be an integer, got {type(edit_id).__name__} ({edit_id!r:.40})"
        raise InvalidRequestError(msg, field="edit_id", value=edit_id)
    return int(edit_id)


def _check_query(query: object, name: str) -> str:
    if not isinstance(query, str) or not query.strip():
        msg = f"{name} must be a non-empty string, got {query!r:.80}"
        raise InvalidRequestError(msg, field=name, value=query)
    return query
