"""An OpenAI-compatible HTTP service in front of an `EditableModel`, plus an edits API.

``create_app(editable, api_keys=...)`` returns a FastAPI app:

* ``POST /v1/chat/completions`` — OpenAI chat completions (``stream: true`` answers as SSE);
  each answer carries the scope decision in a ``memedit`` field and ``X-Memedit-*`` headers.
* ``POST /v1/edits`` (one edit), ``POST /v1/edits/batch``, ``GET /v1/edits``,
  ``GET /v1/edits/{id}``, ``POST /v1/edits/{id}/rollback`` — writes need an API key
  (``Authorization: Bearer KEY`` or ``X-API-Key``); refused writes are logged.
* ``GET /health``; the OpenAPI spec at ``/openapi.json``.

When `editable` wraps an `OpenAIUpstream` (``memedit serve --upstream URL``), chats are
forwarded to it: out-of-scope ones unchanged, in-scope ones with the edits stated in a system
message (as `EditableModel.context_messages` does for any black box); the client's other
fields go along, and ``stream: true`` is passed through as the upstream's SSE, with one more
chunk carrying the ``memedit`` field before ``[DONE]``.

Errors are JSON ``{"error": {"message", "type", "param"}}``; bodies over ``max_body_bytes``
are refused with 413 before they are parsed.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from contextlib import asynccontextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse

from memedit.errors import AlreadyRolledBackError, EditNotFoundError, InvalidRequestError
from memedit.generation import GreedyStream, cut_at_stop
from memedit.integrations import schemas
from memedit.integrations.upstream import OpenAIUpstream

if TYPE_CHECKING:
    import httpx

    from memedit.editable import EditableModel
    from memedit.types import Answer, EditRecord, ScopeDecision

log = logging.getLogger(__name__)

#: Largest request body accepted (bytes) unless told otherwise.
MAX_BODY_BYTES = 1 << 20
#: Most edits one ``GET /v1/edits`` page holds.
MAX_PAGE = 1000

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: refuse request bodies larger than `limit` bytes with a JSON 413."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_413(send, int(declared), self.limit)
            return
        seen = 0

        async def limited() -> MutableMapping[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(seen)
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge as exc:
            await _send_413(send, exc.size, self.limit)


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


async def _send_413(send: Send, size: int, limit: int) -> None:
    body = _error_body(
        f"request body is {size} bytes or more; the limit is {limit}", "request_too_large", None
    )
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _error_body(message: str, kind: str, param: str | None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": param}}).encode()


def record_to_dict(record: EditRecord) -> dict[str, Any]:
    """An edit record as the API returns it."""
    return {
        "id": record.id,
        "status": record.status,
        "strategy": record.strategy,
        "method": record.method,
        "batch_id": record.batch_id,
        "created_at": record.created_at.isoformat(),
        "rolled_back_at": record.rolled_back_at.isoformat() if record.rolled_back_at else None,
        "request": record.request.to_dict(),
    }


def create_app(
    editable: EditableModel,
    *,
    api_keys: Iterable[str] = (),
    max_body_bytes: int = MAX_BODY_BYTES,
    model_id: str = "memedit",
    sync_interval: float = 0.2,
) -> FastAPI:
    """The HTTP app serving `editable` (see the module docstring). Before a read, the index
    picks up edits other processes wrote to a shared log (`EditMemory.sync`, checked at most
    every `sync_interval` seconds: one generation query; a rebuild only when it moved)."""
    keys = tuple(k for k in api_keys if k)
    # One call at a time on the memory (with the scope classifier), and one on the model (or
    # black-box chat function): an edit need not wait for a generation. Both are taken model
    # first, memory second.
    lock = threading.Lock()  # the memory and the scope classifier
    model_lock = threading.Lock()
    upstream = editable.chat_fn if isinstance(editable.chat_fn, OpenAIUpstream) else None
    clients: list[httpx.AsyncClient] = []  # the upstream's connection pool, in this loop

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            for c in clients:
                await c.aclose()

    def client() -> httpx.AsyncClient:
        import httpx

        if not clients:
            assert upstream is not None
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
            clients.append(httpx.AsyncClient(timeout=upstream.timeout, limits=limits))
        return clients[0]

    app = FastAPI(title="memedit", version="0.1.0", lifespan=lifespan)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = schemas.add_components(spec)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    last_sync = [0.0]

    def synced() -> None:
        now = time.monotonic()
        if now - last_sync[0] >= sync_interval:
            editable.memory.sync()
            last_sync[0] = now

    def error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
        return JSONResponse(
            status_code=status,
            content={"error": {"message": message, "type": kind, "param": param}},
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(422, f"{loc or 'body'}: {first.get('msg', 'invalid')}", "invalid_request", loc)

    def authorised(request: Request) -> bool:
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = given or auth[7:].strip()
        ok = bool(given) and any(hmac.compare_digest(given, k) for k in keys)
        if not ok:
            client = request.client.host if request.client else "?"
            log.warning(
                "refused unauthenticated write %s %s from %s (%s)",
                request.method,
                request.url.path,
                client,
                "no key" if not given else "invalid key",
            )
        return ok

    async def json_body(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequestError(
                f"request body is not valid JSON: {exc}", field="body"
            ) from exc

    @app.exception_handler(InvalidRequestError)
    async def _bad(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return error(400 if exc.field == "body" else 422, str(exc), "invalid_request", exc.field)

    @app.exception_handler(EditNotFoundError)
    async def _missing(request: Request, exc: EditNotFoundError) -> JSONResponse:
        return error(404, str(exc), "not_found", "edit_id")

    @app.exception_handler(AlreadyRolledBackError)
    async def _twice(request: Request, exc: AlreadyRolledBackError) -> JSONResponse:
        return error(409, str(exc), "conflict", "edit_id")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "edits": len(editable.memory), "model": model_id}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model"}]}

    async def add(items: list[Any], strategy: str, method: str | None) -> list[dict[str, Any]]:
        import anyio

        def run() -> list[EditRecord]:
            # an in-weight edit changes the model too
            with model_lock if strategy == "weights" else nullcontext(), lock:
                return editable.edit(items, strategy=strategy, method=method)

        return [record_to_dict(r) for r in await anyio.to_thread.run_sync(run)]

    @app.post(
        "/v1/edits",
        status_code=201,
        response_model=None,
        openapi_extra=schemas.body(schemas.EditIn),
    )
    async def create_edit(request: Request) -> Any:
        if not authorised(request):
            return error(401, "writes need a valid API key", "unauthorized")
        body = await json_body(request)
        if not isinstance(body, dict):
            raise InvalidRequestError("an edit must be a JSON object", field="body")
        strategy = body.pop("strategy", "memory")
        method = body.pop("method", None)
        return (await add([body], strategy, method))[0]

    @app.post(
        "/v1/edits/batch",
        status_code=201,
        response_model=None,
        openapi_extra=schemas.body(schemas.EditBatchIn),
    )
    async def create_edits(request: Request) -> Any:
        if not authorised(request):
            return error(401, "writes need a valid API key", "unauthorized")
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
            msg = "a batch must be a JSON object with a list 'requests'"
            raise InvalidRequestError(msg, field="requests")
        out = await add(body["requests"], body.get("strategy", "memory"), body.get("method"))
        return {"object": "list", "data": out}

    @app.get("/v1/edits")
    def list_edits(
        status: str = "active", subject: str | None = None, limit: int = 100, offset: int = 0
    ) -> dict[str, Any]:
        if isinstance(limit, int) and limit > MAX_PAGE:
            msg = f"limit must be at most {MAX_PAGE}, got {limit}"
            raise InvalidRequestError(msg, field="limit", value=limit)
        # filtered and paged by the edit log's database; the bad values it refuses are 422s
        total, page = editable.query(
            status=status, subject=subject or None, limit=limit, offset=offset
        )
        return {"object": "list", "total": total, "data": [record_to_dict(r) for r in page]}

    @app.get("/v1/edits/{edit_id}")
    def get_edit(edit_id: int) -> dict[str, Any]:
        return record_to_dict(editable.memory.get(edit_id))

    @app.post("/v1/edits/{edit_id}/rollback", response_model=None)
    def rollback(edit_id: int, request: Request) -> Any:
        if not authorised(request):
            return error(401, "writes need a valid API key", "unauthorized")
        in_weights = editable.memory.get(edit_id).strategy == "weights"
        with model_lock if in_weights else nullcontext(), lock:
            return record_to_dict(editable.rollback(edit_id))

    @app.post(
        "/v1/chat/completions", response_model=None, openapi_extra=schemas.body(schemas.ChatIn)
    )
    async def chat(request: Request) -> Any:
        import anyio

        body = await json_body(request)
        messages, max_tokens, stream, stop = _check_chat(body)
        name = str(body.get("model") or model_id)
        if upstream is not None:

            def decide() -> tuple[list[dict[str, str]], ScopeDecision]:
                with lock:
                    synced()
                    return editable.context_messages(messages)

            t0 = time.perf_counter()
            sent, decision = await anyio.to_thread.run_sync(decide)
            routed = (time.perf_counter() - t0) * 1000
            return await forward(upstream.payload(body, sent), decision, stream, routed)

        cid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if stream and editable.model is not None:
            # routed now, under the memory lock; generated token by token in the stream's
            # own thread, which holds the model lock until it stops (a client that goes away
            # cancels it, in _sse's finally)

            def route() -> tuple[GreedyStream, ScopeDecision]:
                with lock:
                    synced()
                    decision = editable.route(messages[-1]["content"])
                gen = editable.chat_stream(
                    messages,
                    max_new_tokens=max_tokens,
                    decision=decision,
                    stop=stop,
                    lock=model_lock,
                )
                return gen, decision

            generation, d = await anyio.to_thread.run_sync(route)
            events = _sse(cid, created, name, generation, d, generation.cancel)
            return StreamingResponse(
                events, media_type="text/event-stream", headers=decision_headers(d)
            )

        def run() -> Answer:
            with lock:
                synced()
                decision = editable.route(messages[-1]["content"])
            with model_lock:
                return editable.chat(messages, max_new_tokens=max_tokens, decision=decision)

        answer = await anyio.to_thread.run_sync(run)
        text = cut_at_stop(answer.text, stop)
        d = answer.decision
        if stream:  # a black-box chat function answers whole: one content chunk
            events = _sse(cid, created, name, _once(text), d, None)
            return StreamingResponse(
                events, media_type="text/event-stream", headers=decision_headers(d)
            )
        content = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "memedit": d.to_dict(),
        }
        return JSONResponse(content=content, headers=decision_headers(d))

    async def forward(
        payload: dict[str, Any], d: ScopeDecision, stream: bool, routed_ms: float
    ) -> Any:
        """Send `payload` upstream; the answer goes back with the decision, and a
        Server-Timing header: routing and (unstreamed) the upstream's time, in ms."""
        import httpx

        assert upstream is not None
        url = upstream.completions_url
        req = client().build_request("POST", url, json=payload, headers=upstream.headers)
        t0 = time.perf_counter()
        try:
            resp = await client().send(req, stream=stream)
        except httpx.HTTPError as exc:
            return error(502, f"upstream {url} could not be reached: {exc}", "upstream_error")
        if resp.status_code != 200:
            text = (await resp.aread()).decode("utf-8", "replace")
            await resp.aclose()
            return error(
                502, f"upstream {url} answered {resp.status_code}: {text[:500]}", "upstream_error"
            )
        if not stream:
            try:
                content = resp.json()
            except ValueError:
                return error(502, f"upstream {url} did not answer JSON", "upstream_error")
            if isinstance(content, dict):
                content["memedit"] = d.to_dict()
            waited = (time.perf_counter() - t0) * 1000
            headers = decision_headers(d)
            headers["Server-Timing"] = f"route;dur={routed_ms:.2f}, upstream;dur={waited:.2f}"
            return JSONResponse(content=content, headers=headers)

        async def events() -> AsyncIterator[bytes]:
            try:
                async for line in resp.aiter_lines():
                    if line.strip() == "data: [DONE]":
                        extra: dict[str, Any] = {"object": "chat.completion.chunk"}
                        extra.update(choices=[], memedit=d.to_dict())
                        yield f"data: {json.dumps(extra)}\n\n".encode()
                    yield f"{line}\n".encode()
            finally:
                await resp.aclose()

        headers = {**decision_headers(d), "Server-Timing": f"route;dur={routed_ms:.2f}"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return BodyLimit(app, max_body_bytes)  # type: ignore[return-value]


async def _sse(
    cid: str,
    created: int,
    name: str,
    pieces: AsyncIterator[str],
    d: ScopeDecision,
    cancel: Callable[[], None] | None,
) -> AsyncIterator[bytes]:
    """OpenAI's chunks for an answer given in `pieces`: the role, one chunk per piece,
    the finish reason; then, as the proxy does, a chunk with the decision before
    ``[DONE]``. An error mid-stream ends it with an error event."""
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name}

    def data(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return f"data: {json.dumps({**base, 'choices': choices, **extra})}\n\n".encode()

    try:
        yield data([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
        async for piece in pieces:
            yield data([{"index": 0, "delta": {"content": piece}}])
    except Exception as exc:  # the headers are sent: the client learns it in the stream
        log.exception("chat completion %s failed while streaming", cid)
        body = {"message": f"generation failed: {exc}", "type": "server_error", "param": None}
        yield f"data: {json.dumps({'error': body})}\n\n".encode()
        return
    finally:
        if cancel is not None:  # a client that went away stops the generation
            cancel()
    yield data([{"index": 0, "delta": {}, "finish_reason": "stop"}])
    yield data([], memedit=d.to_dict())
    yield b"data: [DONE]\n\n"


async def _once(text: str) -> AsyncIterator[str]:
    yield text


def decision_headers(d: ScopeDecision) -> dict[str, str]:
    """The scope decision as response headers."""
    return {
        "X-Memedit-In-Scope": "true" if d.in_scope else "false",
        "X-Memedit-Edits": ",".join(str(i) for i in d.used_edit_ids),
    }


def _check_chat(body: Any) -> tuple[list[dict[str, str]], int | None, bool, list[str]]:
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object", field="body")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        msg = f"messages must be a non-empty list, got {type(messages).__name__}"
        raise InvalidRequestError(msg, field="messages", value=messages)
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            msg = f"messages[{i}] must be an object with a string 'content'"
            raise InvalidRequestError(msg, field=f"messages[{i}]", value=m)
        if m.get("role") not in ("system", "user", "assistant"):
            msg = f"messages[{i}].role must be system, user or assistant, got {m.get('role')!r}"
            raise InvalidRequestError(msg, field=f"messages[{i}].role", value=m.get("role"))
        out.append({"role": m["role"], "content": m["content"]})
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        msg = f"max_tokens must be a positive integer, got {max_tokens!r}"
        raise InvalidRequestError(msg, field="max_tokens", value=max_tokens)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        msg = f"stream must be a boolean, got {stream!r}"
        raise InvalidRequestError(msg, field="stream", value=stream)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
        msg = f"stop must be a string or a list of strings, got {stop!r}"
        raise InvalidRequestError(msg, field="stop", value=stop)
    return out, max_tokens, stream, stops


def serve(
    editable: EditableModel,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_keys: Iterable[str] = (),
    max_body_bytes: int = MAX_BODY_BYTES,
    model_id: str = "memedit",
) -> None:
    """Run the app on uvicorn until SIGINT/SIGTERM; uvicorn finishes the requests in flight
    (each accepted edit is committed to the log before its response), then the memory is
    closed (index saved)."""
    import uvicorn

    app = create_app(editable, api_keys=api_keys, max_body_bytes=max_body_bytes, model_id=model_id)
    if not tuple(api_keys):
        log.warning("no API key configured: every write to the edits API will be refused")
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the
    # handler it found; with Python's defaults that would kill the process (SIGTERM) or raise
    # KeyboardInterrupt before the memory is closed. Here the signal, already served, is noted.
    import signal

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            previous[number] = signal.signal(number, _noted)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        editable.close()
        for restored, handler in previous.items():
            signal.signal(restored, handler)
    log.info("memedit serve stopped; edit memory closed")


def _noted(sig: int, frame: object) -> None:
    log.info("signal %d: the server has shut down", sig)
