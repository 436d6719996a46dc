"""An upstream OpenAI-compatible chat endpoint, the black box behind ``memedit serve
--upstream``.

`OpenAIUpstream` is a ``chat(messages) -> str`` callable, so ``EditableModel.wrap_chat``
can wrap it like any black-box chat function; the HTTP server recognises it and forwards
whole requests instead (other sampling fields kept, ``stream: true`` passed through as SSE).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from memedit.errors import InvalidRequestError, MemeditError


class UpstreamError(MemeditError):
    """The upstream endpoint refused a request or answered something that is not a chat
    completion."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class OpenAIUpstream:
    """``POST {base_url}/chat/completions`` of an OpenAI-compatible server as model `model`.

    `base_url` is the server's root or its ``/v1`` (both ``http://host:8000`` and
    ``http://host:8000/v1`` work)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 300.0,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            msg = f"upstream URL must start with http:// or https://, got {base_url!r}"
            raise InvalidRequestError(msg, field="upstream", value=base_url)
        if not isinstance(model, str) or not model:
            msg = f"the upstream model must be a non-empty name, got {model!r}"
            raise InvalidRequestError(msg, field="upstream_model", value=model)
        root = base_url.rstrip("/")
        self.base_url = root if root.endswith("/v1") else f"{root}/v1"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout

    @property
    def completions_url(self) -> str:
        return f"{self.base_url}/chat/completions"

    @property
    def headers(self) -> dict[str, str]:
        out = {"Content-Type": "application/json"}
        if self.api_key:
            out["Authorization"] = f"Bearer {self.api_key}"
        return out

    def payload(
        self, body: Mapping[str, Any], messages: Sequence[Mapping[str, str]]
    ) -> dict[str, Any]:
        """The request forwarded upstream: the client's body with the messages memedit chose
        (edits in context when in scope) and the upstream's model name."""
        return {**body, "model": self.model, "messages": [dict(m) for m in messages]}

    def __call__(self, messages: list[dict[str, str]]) -> str:
        import httpx

        body = self.payload({}, messages)
        try:
            r = httpx.post(
                self.completions_url, json=body, headers=self.headers, timeout=self.timeout
            )
        except httpx.HTTPError as exc:
            msg = f"upstream {self.completions_url} could not be reached: {exc}"
            raise UpstreamError(msg) from exc
        return completion_text(r.status_code, r.text, self.completions_url)

    def __repr__(self) -> str:
        return f"OpenAIUpstream({self.base_url!r}, model={self.model!r})"


def completion_text(status: int, text: str, url: str) -> str:
    """The assistant text of an upstream chat completion response, or an `UpstreamError`."""
    import json

    if status != 200:
        msg = f"upstream {url} answered {status}: {text[:500]}"
        raise UpstreamError(msg, status)
    try:
        content = json.loads(text)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        msg = f"upstream {url} did not answer a chat completion: {text[:500]}"
        raise UpstreamError(msg, status) from exc
    return str(content or "")
