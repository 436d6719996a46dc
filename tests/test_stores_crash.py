"""A real child process adding batches (and saving, and rolling back) is killed with SIGKILL at
random moments; the memory must reopen consistent every time: every active log row searchable,
index count == active rows, no partial batch."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from memedit.stores.embedders import HashingEmbedder
from memedit.stores.memory import EditMemory

BATCH = 300

CHILD = """
import sys
from memedit import EditRequest
from memedit.stores.embedders import HashingEmbedder
from memedit.stores.memory import EditMemory

path, b, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
mem = EditMemory.open(path, embedder=HashingEmbedder())
print("ready", flush=True)
while True:
    reqs = [
        EditRequest(prompt=f"Fact {b}/{j}: the home of item{b}x{j} is", target_new=f"place{j}",
                    subject=f"item{b}x{j}")
        for j in range(size)
    ]
    recs = mem.add(reqs, batch_id=f"b{b}", payloads=[bytes(1024)] * size)
    if b % 3 == 0:
        mem.remove(recs[0].id)
    if b % 2 == 0:
        mem.save()
    print(b, flush=True)
    b += 1
"""


def _check_consistent(path: Path) -> int:
    with EditMemory.open(path, embedder=HashingEmbedder()) as mem:
        assert not list(path.glob("index.faiss.tmp-*"))  # a save cut short leaves no litter
        everything = mem.list(include_rolled_back=True)
        active = [r for r in everything if r.active]
        sizes = Counter(r.batch_id for r in everything)
        assert set(sizes.values()) <= {BATCH}, sizes  # no partial batch
        assert len(mem) == len(active)
        assert set(mem.index.ids().tolist()) == {r.id for r in active}
        hits = mem.search_batch([r.request.prompt for r in active], k=1)
        assert [h[0].record.id for h in hits] == [r.id for r in active]
        return len(active)


@pytest.mark.integration
def test_sigkill_mid_batch_leaves_a_consistent_memory(tmp_path: Path) -> None:
    if not hasattr(signal, "SIGKILL"):
        pytest.skip("needs POSIX SIGKILL")
    path = tmp_path / "mem"
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    seen_active = 0
    for round_ in range(4):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(1000 * round_), str(BATCH)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert child.stdout is not None
        done = 0
        while done < 3:  # let it commit a few batches, then kill it at a random moment
            line = child.stdout.readline()
            if not line:
                _, err = child.communicate()
                pytest.fail(f"the child exited early (rc={child.returncode}):\n{err}")
            if line.strip() != "ready":
                done += 1
        time.sleep(rng.uniform(0.0, 0.06))
        os.kill(child.pid, signal.SIGKILL)
        child.communicate()
        assert child.returncode == -signal.SIGKILL
        active = _check_consistent(path)
        assert active > seen_active  # each round added whole batches
        seen_active = active
