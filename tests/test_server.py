"""The HTTP service on a real uvicorn (loopback, free port) over a black-box chat callable:
edits API, auth, validation, chat with the scope decision, SSE streaming."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from memedit.editable import EditableModel  # noqa: E402
from memedit.integrations.server import create_app  # noqa: E402
from memedit.stores.embedders import HashingEmbedder  # noqa: E402
from memedit.stores.memory import EditMemory  # noqa: E402

from .test_editable import OverlapScope  # noqa: E402

KEY = "test-key"
EDIT = {
    "prompt": "The place of death of Leo Arons is",
    "target_new": "Berlin",
    "subject": "Leo Arons",
}


def echo(messages: list[dict[str, str]]) -> str:
    return json.dumps(messages)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def base(tmp_path: Path) -> Iterator[str]:
    mem = EditMemory.open(tmp_path / "mem", embedder=HashingEmbedder())
    em = EditableModel(memory=mem, scope=OverlapScope(), chat_fn=echo)
    app = create_app(em, api_keys=[KEY], max_body_bytes=4096)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        thread.join(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join()
    em.close()


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def test_edit_chat_rollback_roundtrip(base: str) -> None:
    with httpx.Client(base_url=base) as c:
        r = c.post("/v1/edits", json=EDIT, headers=_auth())
        assert r.status_code == 201, r.text
        eid = r.json()["id"]
        assert c.get(f"/v1/edits/{eid}").json()["request"]["target_new"] == "Berlin"
        msgs = [{"role": "user", "content": "Where did Leo Arons die?"}]
        r = c.post("/v1/chat/completions", json={"model": "x", "messages": msgs})
        assert r.status_code == 200
        body = r.json()
        assert body["memedit"]["used_edit_ids"] == [eid]
        assert r.headers["x-memedit-in-scope"] == "true"
        assert "Berlin" in body["choices"][0]["message"]["content"]  # fact sent upstream
        other = [{"role": "user", "content": "What is the capital of France?"}]
        r = c.post("/v1/chat/completions", json={"messages": other})
        assert r.json()["memedit"]["in_scope"] is False
        assert json.loads(r.json()["choices"][0]["message"]["content"]) == other  # unchanged
        assert c.post(f"/v1/edits/{eid}/rollback", headers=_auth()).json()["status"] == (
            "rolled_back"
        )
        r = c.post(f"/v1/edits/{eid}/rollback", headers=_auth())
        assert r.status_code == 409 and "already rolled back" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"messages": msgs})
        assert r.json()["memedit"]["in_scope"] is False
        assert c.get("/v1/edits", params={"status": "rolled_back"}).json()["total"] == 1
        assert c.get("/v1/edits").json()["total"] == 0


def test_batch_and_stream(base: str) -> None:
    with httpx.Client(base_url=base) as c:
        other = {**EDIT, "prompt": "Leo Arons was born in", "target_new": "Rome"}
        r = c.post("/v1/edits/batch", json={"requests": [EDIT, other]}, headers=_auth())
        assert r.status_code == 201 and len(r.json()["data"]) == 2
        msgs = [{"role": "user", "content": "Where did Leo Arons die?"}]
        with c.stream("POST", "/v1/chat/completions", json={"messages": msgs, "stream": True}) as r:
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
        pieces = [ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"]]
        assert "Berlin" in "".join(pieces)
        # the decision closes the stream in a chunk of its own, as the proxy sends it
        assert chunks[-1]["choices"] == [] and chunks[-1]["memedit"]["in_scope"] is True


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        ({"content": b"{not json", "headers": _auth()}, 400, "body"),
        ({"json": {**EDIT, "target_new": 5}, "headers": _auth()}, 422, "target_new"),
        ({"json": {**EDIT, "colour": "red"}, "headers": _auth()}, 422, "colour"),
        ({"json": {"prompt": "x" * 5000, "target_new": "y"}, "headers": _auth()}, 413, None),
        ({"json": EDIT}, 401, None),
        ({"json": EDIT, "headers": {"Authorization": "Bearer wrong"}}, 401, None),
    ],
)
def test_bad_writes_are_refused(
    base: str, kwargs: dict[str, Any], status: int, param: str | None
) -> None:
    with httpx.Client(base_url=base) as c:
        r = c.post("/v1/edits", **kwargs)
        assert r.status_code == status, r.text
        assert r.json()["error"]["param"] == param
        assert r.json()["error"]["message"]
        assert c.get("/v1/edits").json()["total"] == 0  # nothing written


def test_unknown_edit_and_bad_chat(base: str) -> None:
    with httpx.Client(base_url=base) as c:
        r = c.get("/v1/edits/999")
        assert r.status_code == 404 and "999" in r.json()["error"]["message"]
        r = c.post("/v1/edits/999/rollback", headers=_auth())
        assert r.status_code == 404
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": 3}]})
        assert r.status_code == 422 and r.json()["error"]["param"] == "messages[0]"
        r = c.post("/v1/chat/completions", json={"messages": [], "stream": True})
        assert r.status_code == 422 and r.json()["error"]["param"] == "messages"
        assert c.get("/health").json()["status"] == "ok"
        spec = c.get("/openapi.json").json()
        body = spec["paths"]["/v1/edits"]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": "#/components/schemas/EditIn"}
        schemas = spec["components"]["schemas"]
        assert {"prompt", "target_new"} <= set(schemas["EditIn"]["required"])
        assert schemas["ChatIn"]["properties"]["messages"]["items"] == {
            "$ref": "#/components/schemas/ChatMessageIn"
        }
        assert "ChatMessageIn" in schemas and "EditBatchIn" in schemas


@pytest.mark.postgres
def test_two_servers_share_a_postgres_log(tmp_path: Path) -> None:
    import os

    url = os.environ.get("MEMEDIT_TEST_PG_URL")
    if not url:
        pytest.skip("postgres: MEMEDIT_TEST_PG_URL is not set")
    import uuid

    import sqlalchemy as sa

    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    shared = f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
    servers = []
    try:
        for _ in range(2):
            mem = EditMemory.open(url=shared, embedder=HashingEmbedder())
            em = EditableModel(memory=mem, scope=OverlapScope(), chat_fn=echo)
            port = _free_port()
            cfg = uvicorn.Config(
                create_app(em, api_keys=[KEY]), host="127.0.0.1", port=port, log_level="warning"
            )
            server = uvicorn.Server(cfg)
            thread = threading.Thread(target=server.run, daemon=True)
            thread.start()
            while not server.started:
                thread.join(0.02)
            servers.append((server, thread, em, f"http://127.0.0.1:{port}"))
        a, b = servers[0][3], servers[1][3]
        eid = httpx.post(f"{a}/v1/edits", json=EDIT, headers=_auth()).json()["id"]
        msgs = {"messages": [{"role": "user", "content": "Where did Leo Arons die?"}]}
        seen = None
        for _ in range(100):  # B syncs at most every 0.2 s
            seen = httpx.post(f"{b}/v1/chat/completions", json=msgs).json()["memedit"]
            if seen["in_scope"]:
                break
            threading.Event().wait(0.05)
        assert seen is not None and seen["used_edit_ids"] == [eid]
        httpx.post(f"{b}/v1/edits/{eid}/rollback", headers=_auth()).raise_for_status()
        for _ in range(100):
            seen = httpx.post(f"{a}/v1/chat/completions", json=msgs).json()["memedit"]
            if not seen["in_scope"]:
                break
            threading.Event().wait(0.05)
        assert seen["in_scope"] is False
    finally:
        for server, thread, em, _ in servers:
            server.should_exit = True
            thread.join()
            em.close()
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


def _put(c: Any, subject: str, n: int) -> int:
    edit = {"prompt": f"The colour of {subject} number {n} is", "target_new": f"c{n}"}
    r = c.post("/v1/edits", json={**edit, "subject": subject}, headers=_auth())
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def test_list_edits_filters_and_pages_in_the_log(base: str) -> None:
    with httpx.Client(base_url=base) as c:
        ids = [_put(c, "Ada" if i % 2 else "Bob", i) for i in range(7)]
        ada = [i for n, i in enumerate(ids) if n % 2]
        c.post(f"/v1/edits/{ada[0]}/rollback", headers=_auth()).raise_for_status()

        def page(**params: Any) -> tuple[int, list[int]]:
            r = c.get("/v1/edits", params=params)
            assert r.status_code == 200, r.text
            return r.json()["total"], [d["id"] for d in r.json()["data"]]

        assert page() == (6, [i for i in ids if i != ada[0]])
        assert page(subject="Ada") == (2, ada[1:])
        assert page(subject="Ada", status="all") == (3, ada)
        assert page(subject="Ada", status="rolled_back") == (1, ada[:1])
        assert page(subject="Nobody") == (0, [])
        assert page(subject="") == page()  # an empty subject filters nothing, as before
        assert page(status="all", limit=2, offset=1) == (7, ids[1:3])  # total is all matches
        assert page(status="all", offset=7) == (7, [])  # past the end: an empty page
        assert page(status="all", limit=0) == (7, [])
        for params, param in [
            ({"status": "gone"}, "status"),
            ({"limit": -1}, "limit"),
            ({"limit": 1001}, "limit"),
            ({"offset": -3}, "offset"),
        ]:
            r = c.get("/v1/edits", params=params)
            assert r.status_code == 422, (params, r.text)
            err = r.json()["error"]
            assert err["param"] == param and str(next(iter(params.values()))) in err["message"]
        r = c.get("/v1/edits", params={"limit": "many"})
        assert r.status_code == 422 and "limit" in r.json()["error"]["param"]


class Slow:
    """A forward pre-hook that counts the model's passes and makes each take `delay` s."""

    def __init__(self, model: Any, delay: float = 0.0) -> None:
        self.n = 0
        self.delay = delay
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: Any) -> None:
        self.n += 1
        if self.delay:
            threading.Event().wait(self.delay)


@pytest.fixture
def local(tmp_path: Path) -> Iterator[tuple[str, EditableModel]]:
    """A server of a tiny random local model (its answers never end early)."""
    from .test_editable import MarkerPath
    from .tiny import tiny_llama

    model, tok = tiny_llama()
    model.generation_config.eos_token_id = None
    mem = EditMemory.open(tmp_path / "mem", embedder=HashingEmbedder())
    em = EditableModel(model, tok, memory=mem, scope=OverlapScope(), counterfactual=MarkerPath())
    app = create_app(em, api_keys=[KEY])
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        thread.join(0.02)
    yield f"http://127.0.0.1:{port}", em
    server.should_exit = True
    thread.join()
    em.close()


def _sse(c: Any, body: dict[str, Any]) -> list[Any]:
    with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


def test_local_model_streams_token_by_token(local: tuple[str, EditableModel]) -> None:
    base, _ = local
    with httpx.Client(base_url=base, timeout=60) as c:
        eid = c.post("/v1/edits", json=EDIT, headers=_auth()).json()["id"]
        for query, cut in [
            ("Where did Leo Arons die?", False),
            ("What is the capital of France?", False),
            ("Where did Leo Arons die?", True),
        ]:
            body: dict[str, Any] = {
                "model": "tiny",
                "messages": [{"role": "user", "content": query}],
                "max_tokens": 24,
            }
            whole = c.post("/v1/chat/completions", json=body).json()
            text = whole["choices"][0]["message"]["content"]
            if cut:  # stop at a word of the answer: the cut answers must match too
                body["stop"] = [text[5:7]]
                whole = c.post("/v1/chat/completions", json=body).json()
                text = whole["choices"][0]["message"]["content"]
            chunks = _sse(c, body)
            # OpenAI's shape: role first, content deltas, the finish reason, then (as the
            # proxy does) a chunk with the decision and no choices
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
            assert chunks[-1]["choices"] == [] and chunks[-1]["memedit"] == whole["memedit"]
            assert {ch["id"] for ch in chunks} == {chunks[0]["id"]}
            assert all(ch["model"] == "tiny" for ch in chunks)
            deltas = [ch["choices"][0]["delta"]["content"] for ch in chunks[1:-2]]
            assert all(deltas) and (cut or len(deltas) > 1)
            assert "".join(deltas) == text  # exactly the unstreamed answer
        assert whole["memedit"]["used_edit_ids"] == [eid]


def test_a_client_leaving_mid_stream_stops_the_generation(
    local: tuple[str, EditableModel],
) -> None:
    base, em = local
    assert em.model is not None
    slow = Slow(em.model, delay=0.02)  # 200 tokens take 4 s or more
    try:
        with httpx.Client(base_url=base, timeout=60) as c:
            body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 200}
            with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                for line in r.iter_lines():
                    chunk = json.loads(line[6:]) if line.startswith("data: {") else {}
                    if chunk and chunk["choices"][0]["delta"].get("content"):
                        break  # the first content delta: now hang up
            # a chat waits for the model lock: it is answered once the stream's generation
            # has stopped, well short of its 200 tokens
            r = c.post("/v1/chat/completions", json={**body, "max_tokens": 2})
            assert r.status_code == 200
        assert slow.n < 100
    finally:
        slow.handle.remove()
