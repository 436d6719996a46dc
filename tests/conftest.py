"""Shared fixtures. Unit tests build tiny random models; integration tests (marked
``integration``) use the packaged SmolLM2 model and real KnowEdit records."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def knowedit() -> Path:
    from memedit.paths import knowedit_dir

    return knowedit_dir()


@pytest.fixture(scope="session")
def parts() -> dict[str, Any]:
    """The packaged default model, its tokenizer, the scope classifier and the counterfactual
    path, loaded once for the integration tests (a test that edits the weights restores them)."""
    from memedit.counterfactual import default_counterfactual_path
    from memedit.models import load_model
    from memedit.scope import load_scope_classifier

    model, tok = load_model()
    return {
        "model": model,
        "tok": tok,
        "scope": load_scope_classifier(progress=False),
        "cf": default_counterfactual_path(model, tok, progress=False),
    }


def _pg_url() -> str | None:
    return os.environ.get("MEMEDIT_TEST_PG_URL") or None


@pytest.fixture(params=["sqlite", "postgres"])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh SQL database URL: a SQLite file, and a real PostgreSQL schema when
    MEMEDIT_TEST_PG_URL is set (`make test` sets it). Without it the postgres case is skipped
    by name."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'log.db'}"
        return
    url = _pg_url()
    if url is None:
        pytest.skip("postgres: MEMEDIT_TEST_PG_URL is not set (no PostgreSQL server configured)")
    import uuid

    import sqlalchemy as sa

    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # a configured but unreachable server is a failure, not a skip
        pytest.fail(f"PostgreSQL at {url} is configured but unusable: {exc}")
    sep = "&" if "?" in url else "?"
    try:
        yield f"{url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture(scope="session")
def bare_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `memedit serve` of the bare default model (no edits) on a loopback port, in a
    subprocess: the OpenAI-compatible upstream of the proxy, LangChain and example tests. Its
    root URL."""
    from .serving import Served

    log = tmp_path_factory.mktemp("bare-server") / "serve.log"
    with Served([], log) as served:
        yield served.url


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    """A tiny random Llama and its tokenizer, built once per test module."""
    from .tiny import tiny_llama

    return tiny_llama()
