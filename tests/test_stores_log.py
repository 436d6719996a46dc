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
    StoreSchemaError,
)
from memedit.stores.embedders import HashingEmbedder
from memedit.stores.log import EditLog
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
