"""The command line on a persistent memory: edits land, list, roll back; bad files are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memedit.cli import main


def test_edit_list_rollback_roundtrip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mem = str(tmp_path / "mem")
    args = ["edit", "--memory", mem, "--prompt", "The place of death of Leo Arons is"]
    assert main([*args, "--target", "Berlin", "--subject", "Leo Arons"]) == 0
    assert "#1: The place of death of Leo Arons is Berlin" in capsys.readouterr().out
    assert main(["edits", "--memory", mem]) == 0
    assert "#1 [active]" in capsys.readouterr().out
    assert main(["rollback", "--memory", mem, "1"]) == 0
    assert main(["edits", "--memory", mem, "--all"]) == 0
    assert "#1 [rolled_back]" in capsys.readouterr().out
    assert main(["rollback", "--memory", mem, "1"]) == 1
    assert "rolled back" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"\xff\xfe not utf-8", "not UTF-8"),
        (b'[{"prompt": ', "not valid JSON"),
        (
            json.dumps([{"prompt": "Who is X?", "target_new": "Y"}, {"prompt": "Q?"}]).encode(),
            "request 1",
        ),
        (json.dumps([{"prompt": "Who?", "target_new": "  "}]).encode(), "target_new"),
        (json.dumps([{"prompt": "Who?", "target_new": "Y", "subject": "Z"}]).encode(), "subject"),
    ],
)
def test_bad_edit_file_is_named_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, needle: str
) -> None:
    bad = tmp_path / "edits.json"
    bad.write_bytes(content)
    mem = str(tmp_path / "mem")
    assert main(["edit", "--memory", mem, "--file", str(bad)]) == 1
    err = capsys.readouterr().err
    assert needle in err and str(bad) in err
    assert main(["edits", "--memory", mem]) == 0
    assert capsys.readouterr().out.strip() == ""


def test_unknown_model_name_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "pull", "no-such-model-xyz"]) == 1
    assert "no-such-model-xyz" in capsys.readouterr().err


def test_eval_rejects_an_unknown_unrelated_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["eval", "--unrelated", "squad", "--out", str(out), "--limit", "1"]) == 1
    err = capsys.readouterr().err
    assert "unrelated source 'squad'" in err and "['nq']" in err
    assert not out.exists()  # refused before anything ran
