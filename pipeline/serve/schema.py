"""What a client sends and what it gets back when something is wrong: the chat-completions request (pydantic
models, strict on the fields we honour, blind to the others as OpenAI is), errors in OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`), and `escape`, which makes client text safe to show in a log
line or an error message. No FastAPI and no torch here: the engine and the HTTP layer both build on it.

`FeedbackRequest` is the body of `POST /v1/feedback` (a thumb or a preference on a recorded answer): unlike a chat
request it is our own format, so an unknown field is refused, and every error in it is a 400.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from feedback.traffic import MAX_COMMENT


class _Strict(BaseModel):
    # Unknown fields are ignored (OpenAI clients send many); known ones are strict: "5" is not 5,
    # true is not 1, NaN is not a temperature.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


def _unicode(text: str) -> str:
    """Text a tokenizer can take: JSON's \\ud800 escapes decode to lone surrogates, which are not Unicode text
    (the tokenizer raised, and the client got a plain-text 500)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"holds a lone surrogate (U+{ord(text[exc.start]):04X}) at character {exc.start}: not "
                         "valid Unicode text") from None
    return text


class TextPart(_Strict):
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _valid(cls, v: str) -> str:
        return _unicode(v)


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content")
    @classmethod
    def _valid(cls, v):
        return _unicode(v) if isinstance(v, str) else v

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # the range torch.manual_seed accepts
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None


class FeedbackRequest(BaseModel):
    """`{"id", "rating": "up"|"down"}` or `{"id", "preferred_over": OTHER_ID}`, optional `comment`; ids are the `id`
    of a chat completion this server answered."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(min_length=1, max_length=200)
    rating: Literal["up", "down"] | None = None
    preferred_over: str | None = Field(None, min_length=1, max_length=200)
    comment: str | None = Field(None, max_length=MAX_COMMENT)  # refused beyond, not cut short in the log

    @field_validator("id", "preferred_over", "comment")
    @classmethod
    def _valid(cls, v):
        return None if v is None else _unicode(v)

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.rating is None) == (self.preferred_over is None):
            raise ValueError("give either 'rating' ('up' or 'down') or 'preferred_over' (the id of another answer "
                             "to the same messages), not both and not neither")
        return self


# --------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


def validation_error(exc: ValidationError | Exception) -> APIError:
    """pydantic's list of errors -> one OpenAI-style message; `param` names the first bad field."""
    errors = exc.errors()
    # a union (content: text or parts) fails in every branch; a failed check of ours says most
    first = next((e for e in errors if e["type"] == "value_error"), errors[0])
    loc = ".".join(str(x) for x in first["loc"] if x != "body")
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    msg = first["msg"].removeprefix("Value error, ")
    return APIError(422, f"{loc or 'body'}: {msg}{more}", param=loc or None, code=first["type"])


def _json_object(body: bytes) -> dict:
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise APIError(400, f"the request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(obj).__name__}", code="invalid_json")
    return obj


def parse_chat_request(body: bytes) -> ChatRequest:
    """A request body -> ChatRequest, or the APIError that says what is wrong with it."""
    obj = _json_object(body)
    try:
        return ChatRequest.model_validate(obj)
    except ValidationError as exc:
        raise validation_error(exc) from None


def parse_feedback_request(body: bytes) -> FeedbackRequest:
    """A feedback body -> FeedbackRequest, or a 400 APIError that says what is wrong with it."""
    obj = _json_object(body)
    try:
        return FeedbackRequest.model_validate(obj)
    except ValidationError as exc:
        error = validation_error(exc)
        error.status = 400
        raise error from None


def escape(raw: bytes | str) -> str:
    """Printable ASCII only: control characters (\\r, \\n, \\x1b ...) become escapes, so a request
    cannot forge log lines or send terminal escape codes to whoever reads the log."""
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1")  # one character per byte, so every byte is shown
    return raw.encode("unicode_escape").decode("ascii").replace('"', '\\"')
