"""Each script in examples/ runs as a user would run it, on the default model (the upstream
chatbot against a real `memedit serve` of the bare default model on loopback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(name: str, *args: str, env: dict[str, str] | None = None, cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def lines(out: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines()) if v}


def test_chatbot_local(tmp_path: Path) -> None:
    out = lines(run("chatbot_local.py", cwd=tmp_path))
    assert "Berlin" not in out["before"]
    assert "Berlin" in out["after"] and out["routing"] == "[1]"
    assert "Paris" in out["unrelated"]


def test_chatbot_upstream(tmp_path: Path, bare_server: str) -> None:
    env = {"OPENAI_BASE_URL": f"{bare_server}/v1", "OPENAI_MODEL": "smollm2"}
    out = run("chatbot_upstream.py", env=env, cwd=tmp_path)
    got = lines(out)
    assert "Berlin" not in got["before"] and "Berlin" in got["after"]
    assert "in scope: True edits used: (1,)" in out
    assert "(in scope: False)" in got["unrelated"]


def test_langchain_rag(tmp_path: Path) -> None:
    out = lines(run("langchain_rag.py", "Where did Leo Arons die?", cwd=tmp_path))
    assert out["retrieved"] == "['The place of death of Leo Arons is Berlin']"  # not France's
    assert "Berlin" in out["answer"]


def test_knowedit_eval(tmp_path: Path) -> None:
    out = run("knowedit_eval.py", "--dataset", "ZsRE", "--limit", "2", "--out", "ev", cwd=tmp_path)
    assert "## ZsRE" in out and "| Metric | memory | unedited |" in out
    edit = next(ln for ln in out.splitlines() if ln.startswith("| Edit Succ."))
    memory, unedited = (float(x) for x in edit.strip("|").split("|")[1:3])
    assert memory > unedited  # the edits are answered
    assert (tmp_path / "ev" / "summary.json").is_file()
