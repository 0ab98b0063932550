"""The server's side of the OpenAI protocol: request bodies, errors, and the translation of a body into a
:class:`~s2d2.config.DecodeConfig` and of generations into response fields.

Requests: the standard fields (``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ``n``, ``stream``)
map onto :class:`~s2d2.config.DecodeConfig`; any other DecodeConfig field (``method``, ``block_size``, ``policy``,
``threshold``, ``top_k``, ...) may be sent as an extra body field (the openai client's ``extra_body``); fields a
request leaves out take the server's defaults (the ``s2d2 serve`` flags). Responses carry ``usage`` and an ``s2d2``
object: the request's decode stats (NFE, tokens per forward, accepted tokens, verifications, ...).

Everything here is pure (no engine, no event loop), so the worker, the streaming and the app all build on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from s2d2.api import Generation, Model
from s2d2.config import DecodeConfig
from s2d2.core.stats import DecodeStats
from s2d2.errors import S2D2Error

SEED_MAX = 2**63 - 1  # the largest seed a request may send (with n choices: 2**63 - n)
# DecodeConfig fields a request may set as extra body fields (the standard OpenAI names map onto the rest)
_EXTRA_FIELDS = frozenset(f.name for f in fields(DecodeConfig) if f.init) - {"max_new_tokens", "generation_config"}


@dataclass(frozen=True)
class ServerConfig:
    """How the server runs: its batch, queue and timeout limits, and the decoding defaults of its requests."""

    model_name: str  # the name clients send as ``model`` (and /v1/models lists)
    # requests decoded together (engine slots): a number, or "auto": as many as fit in the memory left beside the
    # weights, up to 64 on a CPU and 256 on a GPU (s2d2.engine.memory), chosen by each engine once it has loaded
    max_batch: int | str = "auto"
    max_queue: int = 64  # requests waiting for a slot beyond those; more are answered 429
    timeout_s: float = 600.0  # a request still unfinished after this long is cancelled (504)
    defaults: DecodeConfig = field(default_factory=DecodeConfig)
    max_n: int = 8  # choices per request
    api_key: str | None = None  # when set, every /v1/* request must carry it as ``Authorization: Bearer KEY``
    max_body_bytes: int = 8 * 2**20  # a larger request body is answered 413
    shutdown_timeout_s: float = 30.0  # on SIGTERM: how long in-flight requests may finish before they are cut
    data_parallel_size: int = 1  # engine processes (replicas), each with its own copy of the model
    # streamed progress waits up to this long in the engine and goes up as one chunk per request (0: every step);
    # 20 ms: a one-client stream 0.69x -> 0.88x offline speed on 2 cores (BENCHMARKS.md "Serving")
    stream_interval_s: float = 0.02

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_n", "max_body_bytes", "data_parallel_size"):
            value = getattr(self, name)
            if name == "max_batch" and value == "auto":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                extra = " or auto" if name == "max_batch" else ""
                raise S2D2Error(f"{name} must be an integer >= 1{extra}, got {value!r}.")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise S2D2Error(f"max_queue must be an integer >= 0, got {self.max_queue!r}.")
        if not self.timeout_s > 0:
            raise S2D2Error(f"timeout must be > 0 seconds, got {self.timeout_s!r}.")
        if not 0 <= self.stream_interval_s <= 10:
            raise S2D2Error(f"stream interval must be between 0 and 10 seconds, got {self.stream_interval_s!r}.")
        if not self.shutdown_timeout_s >= 0:
            raise S2D2Error(f"shutdown timeout must be >= 0 seconds, got {self.shutdown_timeout_s!r}.")
        if self.api_key is not None and not self.api_key.strip():
            raise S2D2Error("the API key must not be empty.")


class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, *, error_type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, error_type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ------------------------------------------------------------------------------------------------ request bodies
class BaseRequest(BaseModel):
    """Fields common to completions and chat. Unknown fields are kept (``model_extra``) and must be DecodeConfig
    fields; a wrong type or range is a 400. Types are strict (as JSON has them): ``true`` is not the integer 1, nor
    ``"0.5"`` a number."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # accepted for compatibility; only their neutral values are supported
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None
    # s2d2's own: return each choice's step trace (schema s2d2.trace/1) as choices[k].s2d2_trace; streamed, each
    # chunk carries the trace events recorded since the last one (s2d2_trace at the chunk's top level)
    trace: bool = False


class CompletionRequest(BaseRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]  # required: tool calls, the one case OpenAI lets it be null, are not served
    name: str | None = None


class ChatRequest(BaseRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None


# ------------------------------------------------------------------------------------------------ body -> decoding
# what a field that takes one of several types expects, in words (pydantic reports one error per member of the union,
# located at a member's tag such as ``prompt.list[int]``, which names no field a client sent)
_UNION_FIELDS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
    "logprobs": "a boolean or an integer",
    "content": "a string or a list of content parts",
}
_UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|none|literal\[.*\])$")


def validation_message(exc: RequestValidationError) -> APIError:
    """The first validation error as one sentence, naming the field."""
    err = exc.errors()[0] if exc.errors() else {}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    while loc and _UNION_TAG.match(loc[-1]):  # a union member's tag: the field is what precedes it
        loc.pop()
        if loc and loc[-1] in _UNION_FIELDS and err.get("type") != "missing":
            return APIError(400, f"field {'.'.join(loc)!r} must be {_UNION_FIELDS[loc[-1]]}.", param=".".join(loc),
                            code="invalid_value")
    if err.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON.", code="invalid_json")
    if not loc and err.get("type") in ("model_attributes_type", "dict_type"):
        return APIError(400, "the request body must be a JSON object (sent with Content-Type: application/json).",
                        code="invalid_body")
    param = ".".join(loc) or None
    msg = str(err.get("msg", "invalid value")).rstrip(".")
    if err.get("type") == "missing":
        return APIError(400, f"field {param!r} is required.", param=param, code="missing_field")
    return APIError(400, f"field {param!r}: {msg[0].lower() + msg[1:] if msg else msg}.", param=param,
                    code="invalid_value")


def completion_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a completions request: a string, a list of strings, a list of ids, or a list of id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty.", param="prompt", code="invalid_prompt")
    if all(isinstance(x, int) for x in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def decode_config(model: Model, cfg: ServerConfig, body: BaseRequest, max_tokens: int | None,
                  max_param: str) -> DecodeConfig:
    """The request's DecodeConfig: the server's defaults, the standard fields, then s2d2's extra fields."""
    if body.model is not None and body.model != cfg.model_name:
        raise APIError(400, f"model {body.model!r} is not served here; this server serves {cfg.model_name!r}.",
                       param="model", code="model_not_found")
    if not 1 <= body.n <= cfg.max_n:
        raise APIError(400, f"n must be between 1 and {cfg.max_n}, got {body.n}.", param="n",
                       code="invalid_value")
    if body.seed is not None and not 0 <= body.seed <= SEED_MAX - body.n:
        # choice k draws from a seed derived from seed + k: every one must stay a 63-bit integer (what clients and
        # other servers take a seed to be)
        raise APIError(400, f"seed must be between 0 and 2**63 - n ({SEED_MAX - body.n}), got {body.seed}.",
                       param="seed", code="invalid_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0, 0.0):
            raise APIError(400, f"{name} is not supported (only 0).", param=name, code="unsupported")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported.", param="logit_bias", code="unsupported")
    if body.logprobs not in (None, False, 0):
        raise APIError(400, "logprobs are not supported.", param="logprobs", code="unsupported")
    extra = dict(body.model_extra or {})
    unknown = sorted(set(extra) - _EXTRA_FIELDS)
    if "max_new_tokens" in unknown:
        raise APIError(400, f"unknown field 'max_new_tokens'; a request's token budget is {max_param}.",
                       param="max_new_tokens", code="unknown_field")
    if unknown:
        raise APIError(400, f"unknown field {unknown[0]!r}; s2d2's own fields are: {', '.join(sorted(_EXTRA_FIELDS))}.",
                       param=unknown[0], code="unknown_field")
    changes: dict[str, Any] = dict(extra)
    if max_tokens is not None:
        changes["max_new_tokens"] = max_tokens
    for name in ("temperature", "top_p", "seed"):
        if getattr(body, name) is not None:
            changes[name] = getattr(body, name)
    if body.stop is not None:
        stops = [body.stop] if isinstance(body.stop, str) else body.stop
        changes["stop"] = tuple(s for s in stops if s) or None
    for name in ("stop_token_ids",):
        if isinstance(changes.get(name), list):
            changes[name] = tuple(changes[name])
    try:
        return model.resolve_config(cfg.defaults, **changes)
    except S2D2Error as e:
        param = next((k for k in sorted(changes, key=len, reverse=True) if k in str(e)), None)
        if param == "max_new_tokens":
            raise APIError(400, str(e).replace("max_new_tokens", max_param), param=max_param,
                           code="invalid_value") from None
        raise APIError(400, str(e), param=param, code="invalid_value") from None


def encode_prompt(model: Model, prompt: str | list[int], cfg: DecodeConfig, index: int | None) -> list[int]:
    """A prompt's token ids; a prompt the model cannot take is a 400 naming it (by index when there are several)."""
    try:
        return model.encode_prompt(prompt, cfg)
    except S2D2Error as e:
        where = f"prompt {index}: " if index is not None else ""
        message = where + str(e).replace("max_new_tokens", "max_tokens")  # the request's name for it
        raise APIError(400, message, param="prompt" if index is None else f"prompt.{index}",
                       code="invalid_prompt") from None


def chat_message(m: ChatMessage, index: int) -> dict[str, str]:
    """A chat message as the template takes it: text parts joined; ``developer`` is OpenAI's newer ``system``."""
    if isinstance(m.content, list):
        parts = []
        for part in m.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"message {index}: only text content parts are supported.",
                               param=f"messages.{index}.content", code="unsupported")
            parts.append(part["text"])
        content = "".join(parts)
    else:
        content = m.content
    return {"role": "system" if m.role == "developer" else m.role, "content": content}


# ------------------------------------------------------------------------------------------------ response fields
def usage(prompt_ids: list[list[int]], generations: list[Generation]) -> dict[str, int]:
    """OpenAI's usage: each prompt counted once (whatever ``n``), every choice's generated tokens."""
    prompt = sum(len(ids) for ids in prompt_ids)
    completion = sum(len(g.token_ids) for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def total_stats(generations: list[Generation]) -> dict[str, Any]:
    """The ``s2d2`` object of a response: its choices' decode stats summed."""
    return DecodeStats.total([g.stats for g in generations]).to_dict() if generations else DecodeStats().to_dict()


def trace_with_texts(model: Model, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trace events with each commit's token text (for the playground and any client that shows them)."""
    return [{**e, "commits": [{**c, "text": model.decode([c["token"]])} for c in e["commits"]]}
            if e.get("commits") else e for e in events]
