"""EditMemory on SQLite with the hashing embedder: add/search/remove, all-or-nothing batches,
bad input writes nothing, and the index is rebuilt from the log when missing, stale or corrupt."""

from __future__ import annotations

import logging
import shutil
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from memedit import EditRequest
from memedit.errors import (
    AlreadyRolledBackError,
    EditNotFoundError,
    EmbedderMismatchError,
    InvalidRequestError,
    MemeditError,
)
from memedit.stores.embedders import HashingEmbedder
from memedit.stores.index import IndexConfig
from memedit.stores.memory import INDEX_FILE, LOG_FILE, EditMemory


def _req(i: int) -> EditRequest:
    return EditRequest(
        prompt=f"The capital city of country{i} is", target_new=f"city{i}", subject=f"country{i}"
    )


@pytest.fixture
def mem(tmp_path: Path) -> Iterator[EditMemory]:
    m = EditMemory.open(tmp_path / "mem", embedder=HashingEmbedder())
    yield m
    m.close()


def _rows(m: EditMemory) -> int:
    with m.log.engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM memedit_edits")).scalar_one())


def _consistent(m: EditMemory) -> None:
    active = {r.id for r in m.list() if r.strategy == "memory"}  # only these are retrieved
    assert set(m.index.ids().tolist()) == active
    assert len(m) == len(active)


def test_add_search_get_remove(mem: EditMemory) -> None:
    recs = mem.add([_req(i) for i in range(10)], payloads=[b"w%d" % i for i in range(10)])
    assert [r.request for r in recs] == [_req(i) for i in range(10)]
    assert len({r.batch_id for r in recs}) == 1 and recs[0].batch_id  # one fresh batch id
    assert all(r.strategy == "memory" and r.active for r in recs)
    assert mem.get(recs[3].id) == recs[3]
    assert mem.payload(recs[3].id) == b"w3"
    hits = mem.search("What is the capital city of country4?", k=3)
    assert hits[0].record.id == recs[4].id
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    batch = mem.search_batch(["capital of country1", "capital of country8"], k=1)
    assert [b[0].record.id for b in batch] == [recs[1].id, recs[8].id]
    rolled = mem.remove(recs[4].id)
    assert rolled.rolled_back_at is not None and rolled.id == recs[4].id
    assert mem.get(recs[4].id).status == "rolled_back"
    assert recs[4].id not in [h.record.id for h in mem.search("country4", k=10)]
    with pytest.raises(AlreadyRolledBackError):
        mem.remove(recs[4].id)
    with pytest.raises(EditNotFoundError):
        mem.remove(10_000)
    with pytest.raises(EditNotFoundError):
        mem.get(10_000)
    assert len(mem) == 9 and len(mem.list()) == 9
    assert len(mem.list(include_rolled_back=True)) == 10
    _consistent(mem)


def test_only_memory_edits_are_retrieved_also_after_a_rebuild(tmp_path: Path) -> None:
    m = EditMemory.open(tmp_path / "mem", embedder=HashingEmbedder())
    weights = m.add([_req(1), _req(2)], strategy="weights", method="rome", payloads=[b"d", None])
    memory = m.add([_req(3)])
    assert len(m) == 1 and [h.record.id for h in m.search("country1", k=5)] == [memory[0].id]
    with pytest.raises(AlreadyRolledBackError):  # all or nothing: the first is not marked
        m.remove_many([weights[0].id, memory[0].id, memory[0].id])
    assert m.get(weights[0].id).active and len(m) == 1
    assert [r.id for r in m.remove_many([w.id for w in weights])] == [w.id for w in weights]
    m.close()
    (tmp_path / "mem" / INDEX_FILE).unlink()
    with EditMemory.open(tmp_path / "mem", embedder=HashingEmbedder()) as again:
        assert len(again) == 1 and again.payload(weights[0].id) == b"d"
        assert not again.get(weights[1].id).active
        _consistent(again)


def test_bad_input_writes_nothing(mem: EditMemory) -> None:
    good = _req(1)
    cases: list[tuple[dict[str, object], str]] = [
        ({"requests": [good, {"prompt": "x", "target_new": "y"}]}, "requests[1]"),
        ({"requests": [good, "text"]}, "requests[1]"),
        ({"requests": good}, "requests"),
        ({"requests": []}, "requests"),
        ({"requests": [good], "strategy": "telepathy"}, "strategy"),
        ({"requests": [good], "method": ""}, "method"),
        ({"requests": [good], "batch_id": "b" * 65}, "batch_id"),
        ({"requests": [good, good], "payloads": [b"x"]}, "payloads"),
        ({"requests": [good, good], "payloads": [b"x", "text"]}, "payloads[1]"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InvalidRequestError) as info:
            mem.add(**kwargs)  # type: ignore[arg-type]
        assert info.value.field == field, kwargs
    # invalid requests cannot even be built (EditRequest validates itself)
    with pytest.raises(InvalidRequestError, match="target_new"):
        EditRequest(prompt="Who?", target_new="")
    with pytest.raises(InvalidRequestError, match="subject"):
        EditRequest(prompt="Who?", target_new="x", subject="nobody")
    for bad_query in ("", "   ", None):
        with pytest.raises(InvalidRequestError):
            mem.search(bad_query, k=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="k"):
        mem.search("ok", k=0)
    with pytest.raises(InvalidRequestError, match="edit_id"):
        mem.get("1")  # type: ignore[arg-type]
    assert _rows(mem) == 0 and len(mem) == 0 and mem.log.generation() == 0


class _FailingEmbedder(HashingEmbedder):
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if any("boom" in t for t in texts):
            raise RuntimeError("embedding failed")
        return super().encode(texts)


def test_a_failure_anywhere_leaves_no_partial_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = EditMemory.open(tmp_path / "m", embedder=_FailingEmbedder())
    try:
        [first] = m.add([_req(0)])
        boom = EditRequest(prompt="boom goes the country1", target_new="x")
        with pytest.raises(RuntimeError, match="embedding failed"):
            m.add([_req(1), boom])
        # the index accepts the vectors, then fails: the SQL transaction rolls back
        real_add = m.index.add

        def add_then_fail(vectors: np.ndarray, ids: object) -> None:
            real_add(vectors, ids)
            raise MemoryError("index full")

        monkeypatch.setattr(m.index, "add", add_then_fail)
        with pytest.raises(MemoryError):
            m.add([_req(2), _req(3)])
        monkeypatch.undo()
        # the database fails at commit after the index took the vectors: the index rolls back
        monkeypatch.setattr(m.log, "_bump", _raise_db_error)
        with pytest.raises(sa.exc.OperationalError):
            m.add([_req(4), _req(5)])
        monkeypatch.undo()
        assert [r.id for r in m.list(include_rolled_back=True)] == [first.id]
        assert _rows(m) == 1
        _consistent(m)
        assert [r.request for r in m.add([_req(6)])] == [_req(6)]  # still works afterwards
        _consistent(m)
    finally:
        m.close()


def _raise_db_error(conn: object) -> int:
    raise sa.exc.OperationalError("UPDATE memedit_meta", {}, Exception("disk I/O error"))


def test_reopen_uses_a_current_index_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "mem"
    with EditMemory.open(path, embedder=HashingEmbedder()) as m:
        recs = m.add([_req(i) for i in range(30)])
        m.remove(recs[0].id)
    assert (path / INDEX_FILE).is_file() and (path / LOG_FILE).is_file()
    with caplog.at_level(logging.INFO, logger="memedit.stores"):
        m2 = EditMemory.open(path, embedder=HashingEmbedder())
    try:
        assert "rebuilding" not in caplog.text
        assert len(m2) == 29
        assert m2.search("capital city of country5", k=1)[0].record.id == recs[5].id
    finally:
        m2.close()


@pytest.mark.parametrize("damage", ["missing", "stale", "corrupt", "foreign", "garbage"])
def test_index_is_rebuilt_from_the_log(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "mem"
    with EditMemory.open(path, embedder=HashingEmbedder()) as m:
        m.add([_req(i) for i in range(5)])
        m.save()
        shutil.copy(path / INDEX_FILE, tmp_path / "old.faiss")
        recs = m.add([_req(i) for i in range(5, 12)])
        m.remove(recs[0].id)
    index_file = path / INDEX_FILE
    if damage == "missing":
        index_file.unlink()
    elif damage == "stale":  # an older index, as after a crash before the last save
        shutil.copy(tmp_path / "old.faiss", index_file)
    elif damage == "corrupt":
        data = bytearray(index_file.read_bytes())
        data[-3] ^= 0x55
        index_file.write_bytes(bytes(data))
    elif damage == "foreign":  # a current-looking index from another memory
        with EditMemory.open(tmp_path / "other", embedder=HashingEmbedder()) as other:
            other.add([_req(i) for i in range(11)])
        shutil.copy(tmp_path / "other" / INDEX_FILE, index_file)
    else:
        index_file.write_bytes(b"not an index at all")
    with caplog.at_level(logging.INFO, logger="memedit.stores"):
        m2 = EditMemory.open(path, embedder=HashingEmbedder())
    try:
        assert "rebuilding the edit index" in caplog.text
        assert len(m2) == 11
        _consistent(m2)
        assert m2.search("capital city of country9", k=1)[0].record.id == recs[4].id
    finally:
        m2.close()
    # the rebuilt index was saved: the next open uses it
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="memedit.stores"):
        EditMemory.open(path, embedder=HashingEmbedder()).close()
    assert "rebuilding" not in caplog.text


def test_rows_without_embeddings_are_embedded_on_rebuild(tmp_path: Path) -> None:
    path = tmp_path / "mem"
    with EditMemory.open(path, embedder=HashingEmbedder()) as m:
        recs = m.add([_req(i) for i in range(4)])
        with m.log.engine.begin() as conn:
            conn.execute(sa.text("UPDATE memedit_edits SET embedding = NULL"))
    (path / INDEX_FILE).unlink()
    with EditMemory.open(path, embedder=HashingEmbedder()) as m2:
        assert m2.search("capital city of country2", k=1)[0].record.id == recs[2].id
        with m2.log.engine.connect() as conn:
            nulls = conn.execute(
                sa.text("SELECT count(*) FROM memedit_edits WHERE embedding IS NULL")
            ).scalar_one()
        assert nulls == 0


def test_other_embedder_is_refused(tmp_path: Path) -> None:
    EditMemory.open(tmp_path / "mem", embedder=HashingEmbedder()).close()
    with pytest.raises(EmbedderMismatchError) as info:
        EditMemory.open(tmp_path / "mem", embedder=HashingEmbedder(dim=128))
    assert "dim=256" in str(info.value) and "dim=128" in str(info.value)


def test_in_memory_store_backs_up_through_raw_connection(tmp_path: Path) -> None:
    with EditMemory.open(embedder=HashingEmbedder()) as m:
        assert m.index_path is None and m.log.url.startswith("sqlite")
        recs = m.add([_req(1), _req(2)])
        m.save()  # nothing to write, no error
        raw = m.log.engine.raw_connection()
        try:
            dst = sqlite3.connect(tmp_path / LOG_FILE)
            raw.driver_connection.backup(dst)  # type: ignore[union-attr]
            dst.close()
        finally:
            raw.close()
    with EditMemory.open(tmp_path, embedder=HashingEmbedder()) as copy:
        assert [r.id for r in copy.list()] == [r.id for r in recs]
        assert copy.search("capital city of country2", k=1)[0].record.id == recs[1].id


def test_open_validates_arguments_and_close_is_final(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidRequestError) as info:
        EditMemory.open(tmp_path / "file", embedder=HashingEmbedder())
    assert info.value.field == "path"
    with pytest.raises(InvalidRequestError, match="embedder"):
        EditMemory.open(embedder=object())  # type: ignore[arg-type]
    m = EditMemory.open(embedder=HashingEmbedder())
    m.close()
    m.close()
    with pytest.raises(MemeditError, match="closed"):
        m.add([_req(1)])


def test_ivf_store_round_trips(tmp_path: Path) -> None:
    cfg = IndexConfig(flat_limit=200, nprobe=64)
    path = tmp_path / "mem"
    with EditMemory.open(path, embedder=HashingEmbedder(), index_config=cfg) as m:
        recs = m.add([_req(i) for i in range(150)])
        recs += m.add([_req(i) for i in range(150, 400)])
        assert m.index.kind == "ivf"
        m.remove(recs[10].id)
    with EditMemory.open(path, embedder=HashingEmbedder(), index_config=cfg) as m2:
        assert m2.index.kind == "ivf" and len(m2) == 399
        _consistent(m2)
        assert m2.search("The capital city of country321 is", k=1)[0].record.id == recs[321].id
