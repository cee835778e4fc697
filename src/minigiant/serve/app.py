"""An OpenAI-compatible HTTP API over one ``Engine`` (FastAPI): ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (both with ``stream``: server-sent events ending in ``data: [DONE]``), ``GET /health``.

What OpenAI clients send and we cannot honour is refused with a 400 in OpenAI's error shape, never silently
ignored: ``n`` > 1, tools, log-probabilities, frequency/presence penalties, ``echo``, ``suffix``. The ``model``
field is not checked (one model is served; its name comes back in every response), as in llama.cpp's server.
``response_format`` ``json_object`` or ``json_schema`` constrains the answer (``engine.py``).
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import MinigiantError
from .engine import Engine, Sampling


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def as_template_message(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class Common(BaseModel):
    """The request fields both endpoints share; unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1
    logprobs: bool | int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise MinigiantError("n must be 1: this server returns one choice per request")
        if self.logprobs:
            raise MinigiantError("logprobs are not supported by this server")
        if self.frequency_penalty or self.presence_penalty:
            raise MinigiantError("frequency_penalty and presence_penalty are not supported; the model's own repetition settings apply")

    def sampling(self, max_tokens: int | None, response_format: dict | None = None) -> Sampling:
        defaults = Sampling()
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return Sampling(max_tokens=max_tokens or defaults.max_tokens,
                        temperature=defaults.temperature if self.temperature is None else self.temperature,
                        top_p=defaults.top_p if self.top_p is None else self.top_p,
                        stop=stop, seed=self.seed, json=json_schema(response_format))


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: Any = None


class CompletionRequest(Common):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None


def json_schema(response_format: dict | None) -> dict | None:
    """``response_format`` → the schema the answer must match, or None for free text."""
    if not response_format or response_format.get("type", "text") == "text":
        return None
    if response_format.get("type") == "json_object":
        return {"type": "object"}
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise MinigiantError("response_format json_schema needs json_schema.schema, an object")
        return schema
    raise MinigiantError(f"response_format type must be text, json_object or json_schema, got {response_format.get('type')!r}")


def error_body(message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def create_app(engine: Engine):
    """The FastAPI application serving ``engine``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="minigiant", description=f"OpenAI-compatible API serving {engine.name}")

    @app.exception_handler(MinigiantError)
    async def bad_request(request: Request, error: MinigiantError):
        return JSONResponse(error_body(str(error)), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return JSONResponse(error_body(f"{where}: {first.get('msg')}" if where else str(first.get("msg"))), status_code=400)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": engine.name}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": engine.created, "owned_by": "minigiant"}]}

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest):
        request.refuse_unsupported()
        if request.tools:
            raise MinigiantError("tools are not supported by this server")
        sampling = request.sampling(request.max_completion_tokens or request.max_tokens, request.response_format)
        ids = engine.chat_ids([m.as_template_message() for m in request.messages])
        return respond(engine, request, ids, sampling, "chat.completion", "chatcmpl")

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        request.refuse_unsupported()
        if request.echo or request.suffix:
            raise MinigiantError("echo and suffix are not supported by this server")
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if len(prompts) != 1:
            raise MinigiantError("prompt must be one string: this server answers one prompt per request")
        return respond(engine, request, engine.text_ids(prompts[0]), request.sampling(request.max_tokens), "text_completion", "cmpl")

    def respond(engine: Engine, request: Common, ids: list[int], sampling: Sampling, kind: str, prefix: str):
        pieces = engine.stream(ids, sampling)
        first = next(pieces)  # errors (a prompt over the context, bad settings) surface here, before any byte is sent
        header = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": engine.name}
        chat = kind == "chat.completion"
        if not request.stream:
            answer, last = first.text, first
            for piece in pieces:
                answer, last = answer + piece.text, piece
            choice = {"index": 0, "message": {"role": "assistant", "content": answer}} if chat else {"index": 0, "text": answer, "logprobs": None}
            return {**header, "object": kind, "choices": [{**choice, "finish_reason": last.finish_reason}],
                    "usage": usage(last), "timings": timings(last)}

        def events():
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"

            def event(delta: dict | None, text: str | None, finish: str | None, **extra) -> str:
                choice = {"index": 0, "delta": delta} if chat else {"index": 0, "text": text, "logprobs": None}
                body = {**header, "object": chunk_kind, "choices": [{**choice, "finish_reason": finish}], **extra}
                return f"data: {json.dumps(body)}\n\n"

            if chat:
                yield event({"role": "assistant", "content": ""}, None, None)
            for piece in itertools.chain([first], pieces):
                if piece.text:
                    yield event({"content": piece.text}, piece.text, None)
                if piece.finish_reason:
                    yield event({}, "", piece.finish_reason, timings=timings(piece))
                    if (request.stream_options or {}).get("include_usage"):
                        yield f"data: {json.dumps({**header, 'object': chunk_kind, 'choices': [], 'usage': usage(piece)})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def usage(piece) -> dict:
    return {"prompt_tokens": piece.prompt_tokens, "completion_tokens": piece.completion_tokens,
            "total_tokens": piece.prompt_tokens + piece.completion_tokens}


def timings(piece) -> dict:
    """llama.cpp server's names: prompt processing ≈ time to the first token; decode speed after it."""
    return {"prompt_n": piece.prompt_tokens, "prompt_ms": round(1000 * (piece.seconds_to_first_token or 0.0), 1),
            "predicted_n": piece.completion_tokens, "predicted_per_second": round(piece.tokens_per_second or 0.0, 2)}
