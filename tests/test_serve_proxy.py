"""`memedit serve --upstream`: a real proxy process in front of a real `memedit serve` of the
bare default model (both subprocesses on loopback). Out-of-scope chats reach the upstream
unchanged, in-scope ones with the edit stated in a system message, as the black-box path
does; SSE streams are passed through with the scope decision added."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from memedit.editable import fact_context  # noqa: E402
from memedit.types import EditRequest  # noqa: E402

from .serving import Served  # noqa: E402

pytestmark = pytest.mark.integration

KEY = "proxy-key"
EDIT = {
    "prompt": "The place of death of Leo Arons is",
    "target_new": "Berlin",
    "subject": "Leo Arons",
}
IN_SCOPE = [{"role": "user", "content": "Where did Leo Arons die?"}]
OUT_OF_SCOPE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def proxy(bare_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("proxy")
    args = ["--upstream", f"{bare_server}/v1", "--upstream-model", "smollm2"]
    with Served([*args, "--memory", str(d / "mem"), "--api-key", KEY], d / "log") as served:
        yield served.url


def _chat(base: str, messages: list[dict[str, str]], **extra: Any) -> Any:
    r = httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": "whatever", "messages": messages, "max_tokens": 12, **extra},
        timeout=None,
    )
    assert r.status_code == 200, r.text
    return r


def _streamed(base: str, messages: list[dict[str, str]]) -> tuple[str, list[dict[str, Any]]]:
    body = {"messages": messages, "max_tokens": 12, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=None) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    return text, chunks


def test_proxy_forwards_and_places_edits_in_context(proxy: str, bare_server: str) -> None:
    direct = _chat(bare_server, OUT_OF_SCOPE).json()
    r = _chat(proxy, OUT_OF_SCOPE)
    assert r.headers["x-memedit-in-scope"] == "false"
    body = r.json()
    assert body["memedit"]["in_scope"] is False
    assert body["model"] == "smollm2"  # the upstream answered, under its own model name
    assert body["choices"][0]["message"] == direct["choices"][0]["message"]
    timing = dict(
        part.strip().split(";dur=") for part in r.headers["server-timing"].split(",")
    )  # the proxy's own time and the upstream's, for measuring its overhead
    assert set(timing) == {"route", "upstream"} and float(timing["upstream"]) > 0

    r = httpx.post(f"{proxy}/v1/edits", json=EDIT, headers={"X-API-Key": KEY})
    assert r.status_code == 201, r.text
    eid = r.json()["id"]
    r = _chat(proxy, IN_SCOPE)
    assert r.headers["x-memedit-in-scope"] == "true" and r.headers["x-memedit-edits"] == str(eid)
    told = [{"role": "system", "content": fact_context([EditRequest(**EDIT)])}, *IN_SCOPE]
    expected = _chat(bare_server, told).json()["choices"][0]["message"]["content"]
    assert r.json()["choices"][0]["message"]["content"] == expected
    assert r.json()["memedit"]["used_edit_ids"] == [eid]

    # SSE passthrough: the upstream's chunks, then one with the decision, then [DONE]
    text, chunks = _streamed(proxy, IN_SCOPE)
    assert text == expected
    assert chunks[-1]["memedit"]["used_edit_ids"] == [eid] and chunks[-1]["choices"] == []
    up_text, up_chunks = _streamed(bare_server, told)
    assert len(chunks) == len(up_chunks) + 1 and up_text == text
    text, chunks = _streamed(proxy, OUT_OF_SCOPE)
    assert text == direct["choices"][0]["message"]["content"]
    assert chunks[-1]["memedit"]["in_scope"] is False

    # the stop sequence travels upstream with the other fields
    cut = _chat(proxy, OUT_OF_SCOPE, stop=[text.split()[1]]).json()
    assert cut["choices"][0]["message"]["content"] == text[: text.index(text.split()[1])]

    httpx.post(f"{proxy}/v1/edits/{eid}/rollback", headers={"X-API-Key": KEY}).raise_for_status()
    assert _chat(proxy, IN_SCOPE).json()["memedit"]["in_scope"] is False


def test_unreachable_upstream_is_a_json_502(tmp_path: Path) -> None:
    from .serving import free_port

    dead = f"http://127.0.0.1:{free_port()}/v1"
    with Served(["--upstream", dead, "--upstream-model", "m"], tmp_path / "log") as served:
        r = httpx.post(f"{served.url}/v1/chat/completions", json={"messages": OUT_OF_SCOPE})
        assert r.status_code == 502
        assert r.json()["error"]["type"] == "upstream_error"
        assert dead in r.json()["error"]["message"]
