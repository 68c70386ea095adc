"""The OpenAI wire format: request validation and error bodies, independent of any HTTP library."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

_TYPES = {400: "invalid_request_error", 404: "not_found_error", 408: "timeout_error", 413: "invalid_request_error"}


class ApiError(Exception):
    """A client error: HTTP ``status`` and OpenAI's error object ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> bytes:
        """The JSON body (ASCII-escaped, so text with lone surrogates from a client still encodes).

        >>> ApiError(404, "no such model", "model", "model_not_found").body()[:60]
        b'{"error": {"message": "no such model", "type": "not_found_er'
        """
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        err = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return json.dumps({"error": err}, ensure_ascii=True).encode("ascii")


def parse_json(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object (ApiError 400 for invalid UTF-8 or JSON, deep nesting, a non-object).

    >>> parse_json(b'{"a": 1}')
    {'a': 1}
    >>> try:
    ...     parse_json(b"[" * 100000)
    ... except ApiError as e:
    ...     print(e.status, e)
    400 the body nests too deeply to parse; send a flat JSON object
    """
    try:
        msg = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise ApiError(400, "the body nests too deeply to parse; send a flat JSON object") from None
    except ValueError as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ApiError(400, f"the body must be a JSON object, not {type(msg).__name__}")
    return msg


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def text_field(msg: dict[str, Any], key: str, *, required: bool = True) -> str:
    """A non-empty string field that encodes as UTF-8 (no lone surrogates from ``\\ud800`` escapes)."""
    value = msg.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value:
        got = "missing" if key not in msg else f"a {type(value).__name__}"
        raise ApiError(400, f"'{key}' must be a non-empty string; it is {got}", key)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"'{key}' holds a lone surrogate (an unpaired \\ud800-\\udfff escape)", key) from None
    return value


@dataclasses.dataclass(frozen=True)
class Completion:
    """A validated ``POST /v1/completions`` request."""

    model: str
    tokens: list[int]
    max_tokens: int
    temperature: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _int(msg: dict[str, Any], key: str, default: Any, lo: int, hi: int) -> Any:
    value = msg.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ApiError(400, f"'{key}' must be an integer in {lo}..{hi}; got {json.dumps(value)[:40]}", key)
    return value


def completion(
    msg: dict[str, Any], models: Sequence[str], encode: Callable[[str], Sequence[int]], max_model_len: int
) -> Completion:
    """Validate a completions body against the served ``models`` and the context ``max_model_len``.

    >>> completion({"model": "base", "prompt": "hi", "max_tokens": 3}, ["base"], lambda s: list(s.encode()), 8)
    ... # doctest: +ELLIPSIS
    Completion(model='base', tokens=[104, 105], max_tokens=3, temperature=1.0, seed=None, stop=(), ...)
    """
    model = text_field(msg, "model")
    if model not in models:
        raise ApiError(404, f"the model {model!r} does not exist; served: {sorted(models)}", "model", "model_not_found")
    prompt = msg.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    elif isinstance(prompt, list):
        raise ApiError(400, "'prompt' must be one string (one prompt per request)", "prompt")
    tokens = list(encode(text_field({"prompt": prompt} if "prompt" in msg else {}, "prompt")))
    room = max_model_len - len(tokens)
    if room < 1:
        raise ApiError(400, f"the prompt is {len(tokens)} tokens; this model's context is {max_model_len}", "prompt")
    max_tokens = _int(msg, "max_tokens", min(16, room), 1, max_model_len)
    if len(tokens) + max_tokens > max_model_len:
        raise ApiError(
            400,
            f"this model's maximum context length is {max_model_len} tokens; you asked for {len(tokens) + max_tokens}"
            f" ({len(tokens)} in the prompt, {max_tokens} in the completion): lower max_tokens or the prompt",
            "max_tokens",
        )
    temperature = msg.get("temperature", 1.0)
    temperature = 1.0 if temperature is None else temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise ApiError(400, "'temperature' must be a number in 0..2 (0: greedy)", "temperature")
    seed = _int(msg, "seed", None, -(2**63), 2**64 - 1)
    stop = msg.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of at most 4 non-empty strings", "stop")
    for k in range(len(stops)):
        text_field({"stop": stops[k]}, "stop")
    stream = msg.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    options = msg.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    if _int(msg, "n", 1, 1, 1) != 1 or msg.get("echo") or msg.get("logprobs") is not None:
        raise ApiError(400, "this server supports n=1, echo=false and logprobs=null only", "n")
    if not math.isfinite(temperature):
        raise ApiError(400, "'temperature' must be finite", "temperature")
    return Completion(
        model, tokens, max_tokens, float(temperature), seed, tuple(stops), stream, bool(options.get("include_usage"))
    )
