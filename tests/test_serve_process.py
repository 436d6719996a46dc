"""`memedit serve` as a real process on the default model: the CLI starts, answers, and on
SIGTERM exits cleanly without losing an accepted edit; two processes on one PostgreSQL log
answer each other's edits."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from memedit.stores.memory import EditMemory  # noqa: E402

from .serving import Served  # noqa: E402

pytestmark = pytest.mark.integration

KEY = "process-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EDIT = {
    "prompt": "The place of death of Leo Arons is",
    "target_new": "Berlin",
    "subject": "Leo Arons",
}
ASK = {"messages": [{"role": "user", "content": "Where did Leo Arons die?"}], "max_tokens": 8}


def _edit(i: int) -> dict[str, str]:
    return {"prompt": f"The employer of Person {i} is", "target_new": f"Firm {i}"}


def test_serve_cli_answers_and_sigterm_loses_no_accepted_edit(tmp_path: Path) -> None:
    mem = tmp_path / "mem"
    served = Served(["--memory", str(mem), "--api-key", KEY], tmp_path / "log")
    try:
        with httpx.Client(base_url=served.url, timeout=None) as c:
            assert c.get("/health").json()["status"] == "ok"
            first = c.post("/v1/edits", json=EDIT, headers=AUTH)
            assert first.status_code == 201, first.text
            r = c.post("/v1/chat/completions", json=ASK)
            assert r.headers["x-memedit-in-scope"] == "true"
            assert "Berlin" in r.json()["choices"][0]["message"]["content"]
            assert c.post("/v1/edits", json=EDIT).status_code == 401

        # 8 writers keep adding edits; SIGTERM lands while some are in flight
        accepted: list[tuple[int, str]] = []
        guard = threading.Lock()
        enough = threading.Event()

        def writer(w: int) -> None:
            try:
                with httpx.Client(base_url=served.url, timeout=None) as c:
                    for n in range(10_000):
                        body = _edit(w * 10_000 + n)
                        try:
                            r = c.post("/v1/edits", json=body, headers=AUTH)
                        except httpx.TransportError:
                            return  # the server stopped taking connections: not accepted
                        if r.status_code != 201:
                            return  # refused while shutting down: not accepted either
                        with guard:
                            accepted.append((r.json()["id"], body["prompt"]))
                            if len(accepted) >= 40:
                                enough.set()
            finally:
                enough.set()  # a writer that stops early must not leave the test waiting

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        enough.wait()
        assert served.terminate() == 0
        for t in threads:
            t.join()
    finally:
        served.terminate()
    log = (tmp_path / "log").read_text()
    assert "Shutting down" in log or "shutdown" in log.lower()
    with EditMemory.open(mem) as memory:
        stored = {r.id: r.request.prompt for r in memory.list()}
    assert len(accepted) >= 40
    assert all(stored.get(i) == prompt for i, prompt in accepted)  # every accepted edit kept
    prompts = list(stored.values())
    assert len(prompts) == len(set(prompts))  # and none twice
    assert stored[first.json()["id"]] == EDIT["prompt"]


@pytest.mark.postgres
@pytest.mark.parametrize("sql_url", ["postgres"], indirect=True)
def test_two_serve_processes_share_a_postgres_log(sql_url: str, tmp_path: Path) -> None:
    args = ["--url", sql_url, "--api-key", KEY]
    with (
        Served([*args, "--memory", str(tmp_path / "a")], tmp_path / "a.log") as a,
        Served([*args, "--memory", str(tmp_path / "b")], tmp_path / "b.log") as b,
    ):
        pause = threading.Event()

        def ask(base: str) -> Any:
            r = httpx.post(f"{base}/v1/chat/completions", json=ASK, timeout=None)
            assert r.status_code == 200, r.text
            return r.json()

        assert ask(b.url)["memedit"]["in_scope"] is False
        r = httpx.post(f"{a.url}/v1/edits", json=EDIT, headers=AUTH)
        assert r.status_code == 201, r.text
        eid = r.json()["id"]
        # B re-reads the shared log at most every 0.2 s: the first chat after that sees it
        pause.wait(0.3)
        seen = ask(b.url)
        assert seen["memedit"]["used_edit_ids"] == [eid]
        assert "Berlin" in seen["choices"][0]["message"]["content"]
        r = httpx.post(f"{b.url}/v1/edits/{eid}/rollback", headers=AUTH)
        assert r.status_code == 200, r.text
        pause.wait(0.3)
        assert ask(a.url)["memedit"]["in_scope"] is False
        assert httpx.get(f"{a.url}/v1/edits/{eid}").json()["status"] == "rolled_back"
