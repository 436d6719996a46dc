"""`memedit demo`: edit real KnowEdit facts in the default model and show what changes.

Steps: load the model, answer a few questions, apply edits from real KnowEdit records, answer
again (the edit prompts, a rephrasing, an unrelated question about the same subject), roll
one edit back, then reopen the memory in a fresh process to show the edits persist.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from memedit.datasets import load_requests
from memedit.types import Answer, EditRequest

#: (dataset, record index) of the demo's edits: real dev records of KnowEdit.
DEMO_RECORDS = (("WikiData_recent", 0), ("ZsRE", 2), ("WikiData_counterfact", 0))

Write = Callable[[str], None]


def _first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _short(answer: Answer) -> str:
    d = answer.decision
    tag = f"in scope, edit #{d.used_edit_ids[0]}" if d.in_scope else "out of scope"
    if not d.scores:
        return f"{_first_line(answer.text)!r}   [{tag}; no edit retrieved]"
    return f"{_first_line(answer.text)!r}   [{tag}; top scope score {max(d.scores):.2f}]"


def run_demo(*, model: str | None = None, memory: str | None = None, write: Write) -> int:
    from memedit.editable import EditableModel

    requests: list[EditRequest] = []
    for dataset, index in DEMO_RECORDS:
        requests.append(load_requests(dataset, limit=index + 1)[index])
    mem_dir = Path(memory) if memory else Path(tempfile.mkdtemp(prefix="memedit-demo-"))
    if memory is None:
        write(f"edit memory: {mem_dir} (fresh)")

    t0 = time.perf_counter()
    write("loading the model, the edit memory and the scope classifier …")
    em = EditableModel.load(model, memory=mem_dir)
    write(
        f"ready in {time.perf_counter() - t0:.1f} s: model {em.model_name}, "
        f"{len(em.memory)} edit(s) in memory\n"
    )

    def ask(q: str) -> Answer:
        return em.generate(q, max_new_tokens=16)

    first = requests[0]
    unrelated = first.locality[0].prompt if first.locality else "The capital of France is"
    write("== before editing ==")
    before = {}
    for r in requests:
        before[r.prompt] = ask(r.prompt)
        write(f"  {r.prompt}  →  {_short(before[r.prompt])}")
    before_unrelated = ask(unrelated)
    write(f"  {unrelated}  →  {_short(before_unrelated)}")

    write("\n== applying edits (memory strategy) ==")
    records = em.edit(requests)
    for rec in records:
        write(f"  #{rec.id}: {rec.request.fact}")

    write("\n== after editing ==")
    for r in requests:
        write(f"  {r.prompt}  →  {_short(ask(r.prompt))}   (target: {r.target_new!r})")
    for r in requests:
        if r.rephrase:
            write(f"  rephrased: {r.rephrase[0]}  →  {_short(ask(r.rephrase[0]))}")
            break
    after_unrelated = ask(unrelated)
    same = _first_line(after_unrelated.text) == _first_line(before_unrelated.text)
    write(
        f"  unrelated, same subject: {unrelated}  →  {_short(after_unrelated)}  "
        f"({'unchanged' if same else 'CHANGED'})"
    )

    victim = records[-1]
    write(f"\n== rolling back #{victim.id} ==")
    em.rollback(victim.id)
    back = ask(victim.request.prompt)
    restored = _first_line(back.text) == _first_line(before[victim.request.prompt].text)
    write(
        f"  {victim.request.prompt}  →  {_short(back)}  "
        f"({'original answer restored' if restored else 'differs from the original'})"
    )
    em.close()

    write("\n== a new process reopens the memory ==")
    question = requests[0].prompt
    cmd = [
        sys.executable,
        "-m",
        "memedit.cli",
        "ask",
        "--raw",
        "--max-new-tokens",
        "16",
        "--memory",
        str(mem_dir),
        question,
    ]
    if model:
        cmd += ["--model", model]
    env = dict(os.environ)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        write(f"  the new process failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
        return 1
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    write(f"  $ memedit ask --raw --memory {mem_dir} {question!r}")
    for ln in lines:
        write(f"  {ln}")
    write(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return 0
