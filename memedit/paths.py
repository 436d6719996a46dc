"""Where memedit keeps files: the cache directory and the KnowEdit data directory."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of memedit's cache: ``$MEMEDIT_CACHE``, else ``$XDG_CACHE_HOME/memedit``,
    else ``~/.cache/memedit``. Created on first use, never at import."""
    env = os.environ.get("MEMEDIT_CACHE")
    if env:
        root = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "memedit"
    root.mkdir(parents=True, exist_ok=True)
    return root


def knowedit_dir() -> Path:
    """The KnowEdit data directory: ``$MEMEDIT_KNOWEDIT_DIR``, else ``../shared/knowedit`` next
    to the project checkout (or the current directory). Raises if neither exists."""
    env = os.environ.get("MEMEDIT_KNOWEDIT_DIR")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parents[1]
    candidates += [here.parent / "shared" / "knowedit", Path.cwd().parent / "shared" / "knowedit"]
    for c in candidates:
        if (c / "dev").is_dir():
            return c
    tried = ", ".join(str(c) for c in candidates)
    msg = f"KnowEdit data not found (tried {tried}); set MEMEDIT_KNOWEDIT_DIR to its directory"
    raise FileNotFoundError(msg)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
