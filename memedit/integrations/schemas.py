"""Request bodies of the HTTP service as pydantic models, for its OpenAPI spec only.

The handlers validate bodies themselves (so that every error is the service's JSON error
naming the field); these models describe the same shapes to clients and code generators.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ChatMessageIn(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatIn(BaseModel):
    """An OpenAI chat completion request (other OpenAI fields are accepted and, in front of
    an upstream, forwarded)."""

    model: str | None = None
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None


class ProbeIn(BaseModel):
    prompt: str
    answers: list[str]
    kind: str = ""


class EditIn(BaseModel):
    """One edit: ``prompt`` answered by ``target_new`` from now on; ``subject`` occurs in
    ``prompt``."""

    prompt: str
    target_new: str
    subject: str = ""
    ground_truth: list[str] = []
    rephrase: list[str] = []
    locality: list[ProbeIn] = []
    portability: list[ProbeIn] = []
    meta: dict[str, Any] = {}
    strategy: Literal["memory", "weights"] = "memory"
    method: str | None = None


class EditBatchIn(BaseModel):
    """Several edits applied together: all land or none do."""

    requests: list[EditIn] = Field(min_length=1)
    strategy: Literal["memory", "weights"] = "memory"
    method: str | None = None


MODELS: tuple[type[BaseModel], ...] = (ChatIn, EditIn, EditBatchIn)


def body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body has the shape of `model`."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def add_components(spec: dict[str, Any]) -> dict[str, Any]:
    """Put the request models (and the models they use) into ``spec``'s components."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in MODELS:
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(js.pop("$defs", {}))
        schemas[model.__name__] = js
    return spec
