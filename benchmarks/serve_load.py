"""Loopback load on `memedit serve` from a second process (BENCHMARKS.md, issue #6).

    python benchmarks/serve_load.py                      # both targets, 8 clients x 1,000
    python benchmarks/serve_load.py --targets proxy --requests 200

Starts, as subprocesses on 127.0.0.1, a `memedit serve` of the bare default model (the
"upstream") and, per target, the server under load:

  local  `memedit serve` of the default model with a fresh edit memory;
  proxy  `memedit serve --upstream <the bare server>` with a fresh edit memory.

This process then drives it with `--clients` threads sending `--requests` mixed requests in
total (chat 30 %, edit 30 %, list 25 %, rollback 15 %; half the chats ask about an edited
subject), and checks: no error, every accepted edit in the log exactly once, every rollback
marked. Chats generate at most `--max-tokens` tokens to keep the run short. Then, one
request at a time, out-of-scope chats alternately straight to the upstream and through the
proxy give the proxy's overhead (p50 of each, and the median of the paired differences),
and a set of bad requests must each be refused with a JSON error.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
KINDS = ("chat", "edit", "list", "rollback")
WEIGHTS = (0.30, 0.30, 0.25, 0.15)
OUT_OF_SCOPE = (
    "What is the capital of France?",
    "Name a primary colour.",
    "How many legs does a spider have?",
    "What is two plus two?",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


THREADS = {"OMP_NUM_THREADS": "1"}  # see --threads


def start(args: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "memedit.cli", "serve", "--port", str(port), *args]
    with open(log, "wb") as out:
        env = {**os.environ, **THREADS}
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait()


def pct(xs: list[float], q: float) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, round(q * (len(ys) - 1)))] if ys else float("nan")


class Load:
    """The mixed load of one client thread; results merged under a lock."""

    def __init__(self, base: str, max_tokens: int, guard: threading.Lock) -> None:
        self.base = base
        self.max_tokens = max_tokens
        self.guard = guard
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.created: dict[int, str] = {}  # id -> prompt
        self.rolled_back: set[int] = set()

    def client(self, c: int, n: int, seed: int) -> None:
        rng = random.Random(seed * 1000 + c)
        mine: list[tuple[int, str]] = []  # (id, subject) of this client's active edits
        with httpx.Client(base_url=self.base, timeout=None) as http:
            for i in range(n):
                kind = rng.choices(KINDS, WEIGHTS)[0]
                if kind == "rollback" and not mine:
                    kind = "edit"
                t0 = time.perf_counter()
                try:
                    self.one(http, kind, c, i, rng, mine)
                except Exception as exc:  # a benchmark reports every failure, whatever it is
                    with self.guard:
                        self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                    continue
                with self.guard:
                    self.latency[kind].append((time.perf_counter() - t0) * 1000)

    def one(
        self,
        http: httpx.Client,
        kind: str,
        c: int,
        i: int,
        rng: random.Random,
        mine: list[tuple[int, str]],
    ) -> None:
        if kind == "edit":
            subject = f"Person {c}-{i}"
            body = {"prompt": f"The employer of {subject} is", "target_new": f"Firm {c}{i}"}
            body["subject"] = subject
            r = http.post("/v1/edits", json=body, headers=AUTH)
            expect(r, 201)
            eid = r.json()["id"]
            mine.append((eid, subject))
            with self.guard:
                if eid in self.created:
                    self.errors.append(f"edit id {eid} returned twice")
                self.created[eid] = body["prompt"]
        elif kind == "rollback":
            eid, _ = mine.pop(rng.randrange(len(mine)))
            r = http.post(f"/v1/edits/{eid}/rollback", headers=AUTH)
            expect(r, 200)
            with self.guard:
                self.rolled_back.add(eid)
        elif kind == "list":
            expect(http.get("/v1/edits", params={"limit": 20}), 200)
        else:
            if mine and rng.random() < 0.5:
                question = f"Who is the employer of {rng.choice(mine)[1]}?"
            else:
                question = rng.choice(OUT_OF_SCOPE)
            body = {
                "model": "bench",
                "messages": [{"role": "user", "content": question}],
                "max_tokens": self.max_tokens,
            }
            r = http.post("/v1/chat/completions", json=body)
            expect(r, 200)
            if "memedit" not in r.json():
                raise AssertionError("chat answer without its scope decision")


def expect(r: httpx.Response, status: int) -> None:
    if r.status_code != status:
        raise AssertionError(f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text}")


def check_log(base: str, load: Load) -> tuple[int, int, int]:
    """(lost, duplicated, unmarked rollbacks) against the server's own edit list."""
    seen: list[dict[str, Any]] = []
    with httpx.Client(base_url=base, timeout=None) as http:
        while True:
            page = http.get(
                "/v1/edits", params={"status": "all", "limit": 1000, "offset": len(seen)}
            )
            expect(page, 200)
            data = page.json()["data"]
            if not data:
                break
            seen += data
    by_id: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for rec in seen:
        by_id[rec["id"]].append(rec)
    prompts = [rec["request"]["prompt"] for rec in seen]
    # an id listed twice, a prompt stored twice, or a stored edit no client was told about
    duplicated = sum(len(v) - 1 for v in by_id.values()) + len(prompts) - len(set(prompts))
    duplicated += sum(1 for i in by_id if i not in load.created)
    lost = sum(
        1 for i, p in load.created.items() if p not in [r["request"]["prompt"] for r in by_id[i]]
    )
    unmarked = sum(
        1 for i in load.rolled_back if [r["status"] for r in by_id[i]] != ["rolled_back"]
    )
    return lost, duplicated, unmarked


def bad_inputs(base: str) -> list[str]:
    """Each bad request must be refused with its status and a JSON error naming the problem."""
    edit = {"prompt": "The employer of Bad Input is", "target_new": "X"}
    cases: list[tuple[str, str, str, dict[str, Any], int]] = [
        ("malformed JSON", "POST", "/v1/edits", {"content": b"{nope", "headers": AUTH}, 400),
        (
            "wrong type",
            "POST",
            "/v1/edits",
            {"json": {**edit, "target_new": 3}, "headers": AUTH},
            422,
        ),
        (
            "oversized body",
            "POST",
            "/v1/edits",
            {"content": b"x" * (2 << 20), "headers": AUTH},
            413,
        ),
        ("missing API key", "POST", "/v1/edits", {"json": edit}, 401),
        (
            "invalid API key",
            "POST",
            "/v1/edits",
            {"json": edit, "headers": {"X-API-Key": "no"}},
            401,
        ),
        ("unknown edit id", "GET", "/v1/edits/987654", {}, 404),
        ("bad chat messages", "POST", "/v1/chat/completions", {"json": {"messages": "hi"}}, 422),
    ]
    failures = []
    with httpx.Client(base_url=base, timeout=None) as http:
        for name, method, path, kwargs, status in cases:
            r = http.request(method, path, **kwargs)
            ok = r.status_code == status and bool(r.json().get("error", {}).get("message"))
            if not ok:
                failures.append(f"{name}: {r.status_code} {r.text[:200]}")
        r = http.post("/v1/edits", json=edit, headers=AUTH)
        eid = r.json()["id"]
        http.post(f"/v1/edits/{eid}/rollback", headers=AUTH)
        r = http.post(f"/v1/edits/{eid}/rollback", headers=AUTH)
        if r.status_code != 409:
            failures.append(f"rollback twice: {r.status_code} {r.text[:200]}")
    return failures


def overhead(upstream: str, proxy: str, pairs: int) -> dict[str, float]:
    """Out-of-scope chats one at a time, alternately straight to the upstream and through the
    proxy (ms): p50 of each, the median paired difference, and p50 of the proxy's own share of
    each proxied request (its latency at the client less the upstream's time inside it, from
    the proxy's Server-Timing header)."""
    direct, proxied, diffs, own, route = [], [], [], [], []
    with httpx.Client(timeout=None) as http:
        for i in range(pairs + 5):
            q = OUT_OF_SCOPE[i % len(OUT_OF_SCOPE)]
            body = {"model": "smollm2", "messages": [{"role": "user", "content": q}]}
            body["max_tokens"] = 1
            times: dict[str, float] = {}
            inside = routed = 0.0
            for base in (upstream, proxy) if i % 2 else (proxy, upstream):
                t0 = time.perf_counter()
                r = http.post(f"{base}/v1/chat/completions", json=body)
                times[base] = (time.perf_counter() - t0) * 1000
                expect(r, 200)
                if base == proxy:
                    if r.json()["memedit"]["in_scope"]:
                        raise SystemExit(f"{q!r} was routed in scope; pick another question")
                    parts = r.headers["server-timing"].split(",")
                    timing = dict(part.strip().split(";dur=") for part in parts)
                    inside, routed = float(timing["upstream"]), float(timing["route"])
            if i < 5:
                continue  # warm-up
            direct.append(times[upstream])
            proxied.append(times[proxy])
            diffs.append(times[proxy] - times[upstream])
            own.append(times[proxy] - inside)
            route.append(routed)
    return {
        "direct": statistics.median(direct),
        "proxied": statistics.median(proxied),
        "paired": statistics.median(diffs),
        "own": statistics.median(own),
        "own_p95": pct(own, 0.95),
        "route": statistics.median(route),
    }


def run_target(
    target: str, upstream: str, args: argparse.Namespace, tmp: Path
) -> tuple[str, subprocess.Popen[bytes]]:
    mem = ["--memory", str(tmp / f"{target}-mem"), "--api-key", KEY]
    extra = (
        ["--upstream", f"{upstream}/v1", "--upstream-model", "smollm2"] if target == "proxy" else []
    )
    proc, base = start([*mem, *extra], tmp / f"{target}.log")
    guard = threading.Lock()
    load = Load(base, args.max_tokens, guard)
    per = [
        args.requests // args.clients + (c < args.requests % args.clients)
        for c in range(args.clients)
    ]
    t0 = time.perf_counter()
    threads = [
        threading.Thread(target=load.client, args=(c, per[c], args.seed))
        for c in range(args.clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lost, duplicated, unmarked = check_log(base, load)
    total = sum(len(v) for v in load.latency.values())
    print(
        f"\n[{target}] {args.clients} clients x {args.requests} requests in {wall:.1f} s "
        f"({total / wall:.1f} req/s), chats max_tokens={args.max_tokens}"
    )
    print(f"{'kind':<9} {'n':>5} {'p50 ms':>9} {'p95 ms':>9}")
    for kind in KINDS:
        xs = load.latency.get(kind, [])
        print(f"{kind:<9} {len(xs):>5} {pct(xs, 0.5):>9.1f} {pct(xs, 0.95):>9.1f}")
    print(f"errors: {len(load.errors)}" + "".join(f"\n  {e}" for e in load.errors[:10]))
    print(
        f"edits accepted: {len(load.created)}; lost: {lost}; duplicated: {duplicated}; "
        f"rolled back: {len(load.rolled_back)} (unmarked: {unmarked})"
    )
    failures = bad_inputs(base)
    print(f"bad input (8 kinds): {failures or 'all refused with JSON errors'}")
    return base, proc


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--targets", default="local,proxy")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--pairs", type=int, default=200, help="overhead samples (one request each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS of the servers (torch, faiss); 1 by default: on a 2-core machine "
        "shared with other jobs, 2 threads made one-token chats ~5x slower",
    )
    args = p.parse_args()
    THREADS["OMP_NUM_THREADS"] = str(args.threads)
    targets = [t for t in args.targets.split(",") if t]
    print(
        f"serve_load: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
        f"servers with OMP_NUM_THREADS={args.threads}, load average {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory(prefix="memedit-serve-load-") as d:
        tmp = Path(d)
        up_proc, upstream = start([], tmp / "upstream.log")
        procs = [up_proc]
        try:
            proxy = None
            for target in targets:
                base, proc = run_target(target, upstream, args, tmp)
                procs.append(proc)
                if target == "proxy":
                    proxy = base
                else:
                    print(f"[{target}] SIGTERM exit code: {stop(proc)}")
            if proxy is not None and args.pairs:
                o = overhead(upstream, proxy, args.pairs)
                print(
                    f"\nproxy overhead, out-of-scope chats (max_tokens 1, {args.pairs} pairs, "
                    "proxy memory holding the load's edits):\n"
                    f"  direct p50 {o['direct']:.1f} ms, through the proxy p50 "
                    f"{o['proxied']:.1f} ms; difference of p50s "
                    f"{o['proxied'] - o['direct']:.1f} ms, median paired difference "
                    f"{o['paired']:.1f} ms\n"
                    f"  proxy's own time per request (client latency - upstream time inside it): "
                    f"p50 {o['own']:.1f} ms, p95 {o['own_p95']:.1f} ms; routing p50 "
                    f"{o['route']:.1f} ms"
                )
        finally:
            for proc in procs:
                if proc.poll() is None:
                    stop(proc)


if __name__ == "__main__":
    main()
