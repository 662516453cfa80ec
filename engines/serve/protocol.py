"""The OpenAI chat-completions contract as this server speaks it: the request schema (pydantic),
OpenAI-style error bodies, and the response / `chat.completion.chunk` bodies.

A request's `messages` (system / developer, user and assistant turns) become the package's own
chat prompt (`Runtime.prepare_chat`): each message's `content` is a string or a list of `text` and
`image_url` parts (text parts joined by newlines); the one image a package takes may be in any
user turn.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engines.core.prompt import Turn
from engines.scheduler import RequestResult


class APIError(Exception):
    """An error answered as OpenAI does: HTTP `status` and `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error(exc: ValidationError | Exception, errors: list[dict] | None = None) -> APIError:
    """A pydantic / FastAPI validation failure as one 400 naming the first bad field."""
    errors = errors if errors is not None else exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    # a union field reports one error per branch (`content.str`, `content.list[...]`): an unknown
    # part's tag error says most; otherwise the first error, without the branch names
    tagged = [e for e in errors if e.get("type") == "union_tag_invalid"]
    first = tagged[0] if tagged else errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_branch(p)]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg', '')}", code="json_invalid")
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "union_tag_invalid" or "does not match any of the expected tags" in message:
        message = "unknown content part type: only 'text' and 'image_url' parts are supported"
    elif first.get("type") == "missing" and param == "messages":
        message = "'messages' is required"
    return APIError(400, f"{param}: {message}" if param else message, param=param)


def _is_branch(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part)


# ---------------------------------------------------------------------- request


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[Part] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields this server reads; other OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, "stop: at most 4 stop sequences", param="stop")
        return tuple(s for s in stops if s)

    def conversation(self) -> tuple[list[Turn], list[tuple[str, ImageURL]]]:
        """(turns, [(param, image URL)]) of the messages; `developer` is OpenAI's newer `system`."""
        turns, images = [], []
        for i, message in enumerate(self.messages):
            role = "system" if message.role == "developer" else message.role
            content = message.content
            if content is None:
                raise APIError(400, f"messages[{i}].content is required", param=f"messages.{i}.content")
            if isinstance(content, str):
                turns.append(Turn(role, content))
                continue
            urls = [p.image_url for p in content if isinstance(p, ImagePart)]
            if urls and role != "user":
                raise APIError(400, f"messages[{i}]: images can only be in user messages, not in a {role!r} "
                                    "message", param=f"messages.{i}.content")
            images += [(f"messages.{i}.content.image_url", url) for url in urls]
            turns.append(Turn(role, "\n".join(p.text for p in content if isinstance(p, TextPart)), bool(urls)))
        return turns, images


# ---------------------------------------------------------------------- responses


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def dyvte_info(result: RequestResult) -> dict:
    """The per-choice `dyvte` object: where the visual tokens exited and where the time went."""
    t = result.timings_ms
    return {
        "exit_layer": result.exit_layer,
        "num_layers": result.num_layers,
        "visual_tokens": result.visual_tokens,
        "visual_tokens_dropped": result.visual_tokens_dropped,
        "queue_ms": t.get("queue"),
        "first_token_ms": t.get("first_token"),
        "prefill_ms": t.get("prefill"),
        "decode_ms": t.get("decode"),
        "total_ms": t.get("total"),
    }


def usage(result: RequestResult) -> dict:
    n = len(result.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n, "total_tokens": result.prompt_tokens + n}


def finish_reason(result: RequestResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def completion(cid: str, model: str, result: RequestResult) -> dict:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": finish_reason(result), "logprobs": None, "dyvte": dyvte_info(result)}],
        "usage": usage(result),
    }


def chunk(cid: str, model: str, created: int, delta: dict | None = None, result: RequestResult | None = None,
          include_usage: bool = False) -> dict:
    choice = {"index": 0, "delta": delta or {}, "finish_reason": None, "logprobs": None}
    if result is not None:
        choice.update(finish_reason=finish_reason(result), dyvte=dyvte_info(result))
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    if include_usage:
        body["usage"] = None
    return body


def usage_chunk(cid: str, model: str, created: int, result: RequestResult) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage(result)}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def sse_stream(events, cid: str, model: str, include_usage: bool = False):
    """A scheduler request's events (`async for`) as SSE `chat.completion.chunk` lines, ending in
    `data: [DONE]`; an error after the stream began ends it with an error event (never silently)."""
    created = int(time.time())
    yield sse(chunk(cid, model, created, {"role": "assistant", "content": ""}, include_usage=include_usage))
    try:
        async for event in events:
            if event.kind == "token":
                if event.text:
                    yield sse(chunk(cid, model, created, {"content": event.text}, include_usage=include_usage))
            elif event.kind == "done":
                yield sse(chunk(cid, model, created, result=event.result, include_usage=include_usage))
                if include_usage:
                    yield sse(usage_chunk(cid, model, created, event.result))
                break
            else:
                yield sse(error_body(event.error or "generation failed", "server_error"))
                break
        else:
            yield sse(error_body("the generation ended without a result", "server_error"))
    except Exception as exc:  # noqa: BLE001 - the client must learn that its stream broke
        yield sse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"))
    yield sse("[DONE]")
