"""The SQL edit log and the memory over it, on SQLite and on a real PostgreSQL (`sql_url`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from memedit import EditRequest
from memedit.errors import (
    AlreadyRolledBackError,
    EditNotFoundError,
    EmbedderMismatchError,
    InvalidRequestError,
    StoreSchemaError,
)
from memedit.stores.embedders import HashingEmbedder
from memedit.stores.log import SUBJECT_INDEX, EditLog
from memedit.stores.memory import EditMemory


def _req(i: int) -> EditRequest:
    return EditRequest(
        prompt=f"The favourite colour of person{i} is",
        target_new=f"colour{i}",
        subject=f"person{i}",
        rephrase=(f"Which colour does person{i} like best?",),
        meta={"i": i},
    )


def test_log_round_trip_and_generation(sql_url: str) -> None:
    elog = EditLog(sql_url)
    try:
        assert elog.generation() == 0
        with elog.engine.begin() as conn:
            recs, gen = elog.insert(
                conn,
                [_req(1), _req(2)],
                strategy="memory",
                method="memory",
                batch_id="b1",
                payloads=[b"\x00\x01", None],
                embeddings=[None, None],
            )
        assert gen == 1 and elog.generation() == 1
        assert recs[1].id > recs[0].id
        got = elog.get(recs[0].id)
        assert got == recs[0]  # request, times (UTC, microseconds) and batch id round-trip
        assert got.created_at.tzinfo is not None
        assert elog.payload(recs[0].id) == b"\x00\x01" and elog.payload(recs[1].id) is None
        with elog.engine.begin() as conn:
            rolled, gen = elog.mark_rolled_back(conn, recs[0].id)
        assert gen == 2 and rolled.rolled_back_at is not None and not rolled.active
        with pytest.raises(AlreadyRolledBackError), elog.engine.begin() as conn:
            elog.mark_rolled_back(conn, recs[0].id)
        with pytest.raises(EditNotFoundError, match="12345"), elog.engine.begin() as conn:
            elog.mark_rolled_back(conn, 12345)
        assert elog.generation() == 2  # failed changes did not count
        assert [r.id for r in elog.records()] == [recs[1].id]
        assert len(elog.records(include_rolled_back=True)) == 2
        assert elog.count_active() == 1
        assert set(elog.get_many([recs[0].id, recs[1].id])) == {recs[1].id}
        with pytest.raises(EditNotFoundError):
            elog.get(12345)
    finally:
        elog.close()


def test_log_refuses_other_embedder_and_schema(sql_url: str) -> None:
    elog = EditLog(sql_url)
    try:
        elog.bind_embedder("model-a/dim=8", 8)
        elog.bind_embedder("model-a/dim=8", 8)  # same one: fine, idempotent
        with pytest.raises(EmbedderMismatchError) as info:
            elog.bind_embedder("model-b/dim=8", 8)
        assert "model-a/dim=8" in str(info.value) and "model-b/dim=8" in str(info.value)
        with elog.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE memedit_meta SET value = '99' WHERE key = 'schema_version'")
            )
    finally:
        elog.close()
    with pytest.raises(StoreSchemaError, match="99"):
        EditLog(sql_url)


def test_memory_over_url_with_index_directory(sql_url: str, tmp_path: Path) -> None:
    emb = HashingEmbedder()
    mem = EditMemory.open(tmp_path / "replica", url=sql_url, embedder=emb)
    try:
        assert mem.log.url == sql_url and mem.index_path == tmp_path / "replica" / "index.faiss"
        recs = mem.add([_req(i) for i in range(20)], batch_id="first")
        assert all(r.batch_id == "first" for r in recs)
        hit = mem.search("Which colour does person7 like best?", k=3)[0]
        assert hit.record.id == recs[7].id and hit.score > 0.3
        mem.remove(recs[7].id)
        assert recs[7].id not in [h.record.id for h in mem.search("person7 colour", k=20)]
        assert len(mem) == 19
    finally:
        mem.close()
    with pytest.raises(EmbedderMismatchError, match="hashing"):
        EditMemory.open(url=sql_url, embedder=HashingEmbedder(dim=64))
    again = EditMemory.open(tmp_path / "replica", url=sql_url, embedder=emb)
    try:
        assert len(again) == 19
        assert again.search("The favourite colour of person3 is", k=1)[0].record.id == recs[3].id
    finally:
        again.close()


def test_replicas_sync_through_a_shared_log(sql_url: str, tmp_path: Path) -> None:
    emb = HashingEmbedder()
    a = EditMemory.open(tmp_path / "a", url=sql_url, embedder=emb)
    b = EditMemory.open(url=sql_url, embedder=emb)  # index in memory only
    try:
        a.add([_req(1)])
        assert len(b) == 0
        assert b.sync() is True and len(b) == 1
        assert b.sync() is False
        [rec] = b.add([_req(2)])
        a.remove(a.list()[0].id)  # a's change interleaves with b's: a's index is now unsure
        assert a.sync() is True
        assert [r.id for r in a.list()] == [rec.id] and len(a) == 1
        # a replica never returns an edit another replica rolled back, even before syncing
        b.remove(rec.id)
        assert a.search("The favourite colour of person2 is", k=5) == []
    finally:
        a.close()
        b.close()


def _insert(elog: EditLog, requests: list[EditRequest]) -> list[int]:
    with elog.engine.begin() as conn:
        recs, _ = elog.insert(
            conn,
            requests,
            strategy="memory",
            method="memory",
            batch_id="b",
            payloads=[None] * len(requests),
            embeddings=[None] * len(requests),
        )
    return [r.id for r in recs]


def _subject_req(i: int, subject: str) -> EditRequest:
    prompt = f"The colour of {subject} number {i} is" if subject else f"Colour number {i} is"
    return EditRequest(prompt=prompt, target_new=f"c{i}", subject=subject)


def test_query_filters_and_pages_in_sql(sql_url: str, tmp_path: Path) -> None:
    elog = EditLog(sql_url)
    try:
        subjects = ["Ada", "Bob", "Ada", "", "Ada", "Bob", "Ada's"]
        ids = _insert(elog, [_subject_req(i, s) for i, s in enumerate(subjects)])
        ada = [i for i, s in zip(ids, subjects, strict=True) if s == "Ada"]
        with elog.engine.begin() as conn:
            elog.mark_rolled_back(conn, ada[1])
            elog.mark_rolled_back(conn, ids[1])

        def got(**kw: object) -> tuple[int, list[int]]:
            page = elog.query(**kw)  # type: ignore[arg-type]
            return page.total, [r.id for r in page.records]

        active = [i for i in ids if i not in (ada[1], ids[1])]
        assert got() == (5, active)
        assert got(subject="Ada") == (2, [ada[0], ada[2]])
        assert got(subject="Ada", status="all") == (3, ada)
        assert got(subject="Ada", status="rolled_back") == (1, [ada[1]])
        assert got(status="rolled_back") == (2, [ids[1], ada[1]])
        assert got(subject="") == (1, [ids[3]])  # the edit without a subject
        assert got(subject="Nobody", status="all") == (0, [])
        assert got(status="all", limit=3) == (7, ids[:3])
        assert got(status="all", limit=3, offset=5) == (7, ids[5:])
        assert got(status="all", offset=7) == (7, [])  # past the end: total, no records
        assert got(status="all", limit=0) == (7, [])
        assert got(subject="Ada", limit=1, offset=1) == (2, [ada[2]])
        total, records = elog.query(subject="Ada")  # unpacks as (total, records)
        assert total == 2 and records == [elog.get(ada[0]), elog.get(ada[2])]
        for kw, field in [
            ({"status": "deleted"}, "status"),
            ({"status": None}, "status"),
            ({"limit": -1}, "limit"),
            ({"limit": True}, "limit"),
            ({"limit": 2.5}, "limit"),
            ({"offset": -1}, "offset"),
            ({"offset": None}, "offset"),
            ({"subject": 5}, "subject"),
        ]:
            with pytest.raises(InvalidRequestError) as info:
                elog.query(**kw)  # type: ignore[arg-type]
            assert info.value.field == field
            assert field in str(info.value) and repr(next(iter(kw.values()))) in str(info.value)
    finally:
        elog.close()
    mem = EditMemory.open(tmp_path / "idx", url=sql_url, embedder=HashingEmbedder())
    try:  # the memory's query is the log's
        assert mem.query(subject="Ada", status="all") == (3, [mem.get(i) for i in ada])
        with pytest.raises(InvalidRequestError, match="limit"):
            mem.query(limit=-5)
    finally:
        mem.close()


def _plan(elog: EditLog, **kw: object) -> str:
    """The query plan of the page statement `query` runs (captured as it is sent)."""
    sent: list[tuple[str, object]] = []

    def capture(conn: object, cursor: object, statement: str, params: object, *a: object) -> None:
        if "ORDER BY" in statement.upper():
            sent.append((statement, params))

    sa.event.listen(elog.engine, "before_cursor_execute", capture)
    try:
        elog.query(**kw)  # type: ignore[arg-type]
    finally:
        sa.event.remove(elog.engine, "before_cursor_execute", capture)
    [(statement, params)] = sent
    with elog.engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        cur = raw.cursor()
        if elog.engine.dialect.name == "sqlite":
            cur.execute(f"EXPLAIN QUERY PLAN {statement}", params)
        else:  # only a bitmap scan of an index on the filter can beat a (disabled) seq scan
            cur.execute("SET enable_seqscan = off")
            cur.execute("SET enable_indexscan = off")
            cur.execute(f"EXPLAIN {statement}", params)
        plan = "\n".join(str(row) for row in cur.fetchall())
        cur.close()
    return plan


def test_subject_filter_uses_the_subject_index(sql_url: str) -> None:
    elog = EditLog(sql_url)
    try:
        _insert(elog, [_subject_req(i, f"S{i % 7}") for i in range(50)])
        assert elog.subject_indexed
        assert SUBJECT_INDEX in _plan(elog, subject="S3", limit=10)
        assert SUBJECT_INDEX not in _plan(elog, limit=10)
    finally:
        elog.close()


def test_a_log_from_before_the_subject_index_opens_and_gets_it(sql_url: str) -> None:
    elog = EditLog(sql_url)
    try:
        ids = _insert(elog, [_subject_req(i, "Ada") for i in range(3)])
        with elog.engine.begin() as conn:  # as a log written by an earlier memedit
            conn.execute(sa.text(f"DROP INDEX {SUBJECT_INDEX}"))
            version = elog._meta_get(conn, "schema_version")
        generation = elog.generation()
    finally:
        elog.close()
    again = EditLog(sql_url)
    try:
        assert again.subject_indexed
        assert SUBJECT_INDEX in _plan(again, subject="Ada")
        assert again.query(subject="Ada") == (3, [again.get(i) for i in ids])
        assert again.meta_value("schema_version") == version  # no migration, no new version
        assert again.generation() == generation
    finally:
        again.close()


def test_a_log_where_the_index_cannot_be_made_still_opens(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    elog = EditLog(url)
    try:
        ids = _insert(elog, [_subject_req(i, "Ada") for i in range(2)])
        with elog.engine.begin() as conn:  # the index's name taken: creating it must fail
            conn.execute(sa.text(f"DROP INDEX {SUBJECT_INDEX}"))
            conn.execute(sa.text(f"CREATE TABLE {SUBJECT_INDEX} (x INTEGER)"))
    finally:
        elog.close()
    again = EditLog(url)
    try:
        assert not again.subject_indexed
        assert again.query(subject="Ada") == (2, [again.get(i) for i in ids])  # by a scan
        assert SUBJECT_INDEX not in _plan(again, subject="Ada")
    finally:
        again.close()
