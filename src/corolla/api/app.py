"""The OpenAI-compatible HTTP app: /v1/models, /v1/chat/completions and /v1/completions, streamed as server-sent
events when asked. Each request runs its own inference session on the app's event loop; errors have OpenAI's
shape (``{"error": {"message", "type", "param", "code"}}``) and status codes."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from corolla import __version__
from corolla.api.completions import ChoiceDelta, Completion
from corolla.api.config import ApiConfig
from corolla.api.schemas import ChatCompletionRequest, CompletionRequest, _Request
from corolla.api.served_models import ServedModel
from corolla.client.sampling import SamplingParams
from corolla.errors import CorollaError, MissingBlocksError
from corolla.log import get_logger

logger = get_logger(__name__)


class ApiError(Exception):
    """An error to answer with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def create_app(config: ApiConfig, models: dict[str, ServedModel]) -> FastAPI:
    """The app for ``models`` (already connected to their swarms)."""
    app = FastAPI(title="corolla", version=__version__, summary="OpenAI-compatible API of a corolla swarm")
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"], allow_headers=["*"]
        )
    _add_error_handlers(app)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if config.api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
                return ApiError(
                    401, "Missing or incorrect API key: send the header 'Authorization: Bearer KEY'.",
                    code="invalid_api_key",
                ).response()  # fmt: skip
        return await call_next(request)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_card(served) for served in models.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict:
        return _model_card(_find(models, name))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        served = _find(models, body.model)
        if not served.has_chat_template:
            raise ApiError(400, f"Model {served.name} has no chat template; use /v1/completions.", param="model")
        try:
            messages = [{"role": _role(m.role), "content": m.text()} for m in body.messages]
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        prompt = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        return await _respond(config, served, body, list(prompt["input_ids"]), chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        served = _find(models, body.model)
        prompt_ids = served.tokenizer(body.prompt)["input_ids"]
        if not prompt_ids:
            raise ApiError(400, "The prompt is empty.", param="prompt")
        echo = body.prompt if body.echo else ""
        return await _respond(config, served, body, list(prompt_ids), chat=False, echo=echo)

    return app


def _model_card(served: ServedModel) -> dict:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "corolla"}


def _find(models: dict[str, ServedModel], name: str) -> ServedModel:
    if name not in models:
        known = ", ".join(models) or "none"
        raise ApiError(
            404, f"The model {name!r} does not exist or is not served here; models: {known}.",
            param="model", code="model_not_found",
        )  # fmt: skip
    return models[name]


def _role(role: str) -> str:
    return "system" if role == "developer" else role


async def _respond(
    config: ApiConfig, served: ServedModel, body: _Request, prompt_ids: list[int], *, chat: bool, echo: str = ""
):
    if body.n > config.max_choices:
        raise ApiError(400, f"n must be at most {config.max_choices} on this server, got {body.n}.", param="n")
    room = served.context_length - len(prompt_ids)
    limit = body.token_limit if body.token_limit is not None else min(config.default_max_tokens, room)
    if limit > room:
        raise ApiError(
            400,
            f"This model's maximum context length is {served.context_length} tokens; the prompt has "
            f"{len(prompt_ids)} and max_tokens asks for {limit} more. Lower max_tokens or shorten the prompt.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    params = SamplingParams(
        temperature=body.temperature, top_p=body.top_p,
        frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
    )  # fmt: skip
    completion = Completion(
        served, prompt_ids, max_new_tokens=limit, params=params, n=body.n, stop=body.stop_sequences, seed=body.seed,
        lookup_tokens=config.prompt_lookup_tokens,
    )  # fmt: skip
    kind = _ChatFormat() if chat else _TextFormat(echo)
    completion.response_id = kind.id_prefix + secrets.token_hex(12)
    deltas = completion.deltas()
    try:
        first = await anext(deltas, [])  # the prompt's step: a swarm that cannot serve it gets a proper status
        if body.stream:
            events = _events(kind, completion, first, deltas, include_usage=body.include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts, reasons = [""] * body.n, [None] * body.n
        _apply(first, texts, reasons)
        async for changed in deltas:
            _apply(changed, texts, reasons)
    except Exception as e:
        await deltas.aclose()
        raise _swarm_error(e) from e
    except BaseException:
        await deltas.aclose()
        raise
    await deltas.aclose()
    return kind.response(completion, [echo + t for t in texts], reasons)


def _apply(changed: list[ChoiceDelta], texts: list[str], reasons: list) -> None:
    for delta in changed:
        texts[delta.index] += delta.text
        reasons[delta.index] = delta.finish_reason or reasons[delta.index]


def _swarm_error(e: Exception) -> Exception:
    """What a failure of the generation becomes for the HTTP client."""
    if isinstance(e, MissingBlocksError):
        ranges = ", ".join(f"{a}:{b}" for a, b in e.missing)
        return ApiError(
            503, f"The swarm cannot serve this model now: no server holds blocks {ranges}. {e}",
            type="server_error", code="blocks_missing",
        )  # fmt: skip
    if isinstance(e, CorollaError | TimeoutError | ConnectionError):
        return ApiError(503, f"The swarm failed to serve the request: {e}", type="server_error", code="swarm_error")
    return e


class _ChatFormat:
    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def first_delta(self, index: int) -> dict:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, delta: ChoiceDelta) -> dict:
        content = {"content": delta.text} if delta.text else {}
        return {"index": delta.index, "delta": content, "logprobs": None, "finish_reason": delta.finish_reason}

    def response(self, completion: Completion, texts: list[str], reasons: list) -> dict:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": reasons[i],
            }
            for i, text in enumerate(texts)
        ]
        return _envelope(self.object, completion) | {"choices": choices, "usage": _usage(completion)}


class _TextFormat:
    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, echo: str = ""):
        self.echo = echo

    def first_delta(self, index: int) -> dict | None:
        if not self.echo:
            return None
        return {"index": index, "text": self.echo, "logprobs": None, "finish_reason": None}

    def delta(self, delta: ChoiceDelta) -> dict:
        return {"index": delta.index, "text": delta.text, "logprobs": None, "finish_reason": delta.finish_reason}

    def response(self, completion: Completion, texts: list[str], reasons: list) -> dict:
        choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": reasons[i]} for i, text in enumerate(texts)
        ]
        return _envelope(self.object, completion) | {"choices": choices, "usage": _usage(completion)}


def _envelope(object_name: str, completion: Completion) -> dict:
    return {
        "id": completion.response_id,
        "object": object_name,
        "created": completion.created,
        "model": completion.served.name,
        "system_fingerprint": None,
    }


def _usage(completion: Completion) -> dict:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


async def _events(
    kind, completion: Completion, first: list[ChoiceDelta], rest: AsyncIterator[list[ChoiceDelta]], *, include_usage
) -> AsyncIterator[str]:
    """Server-sent events: a chunk per step with text, a last chunk per choice with its finish reason, the usage
    chunk if asked, then ``[DONE]``. A failure after the first step ends the stream with an error event."""

    def chunk(choices: list[dict]) -> str:
        body = _envelope(kind.chunk_object, completion) | {"choices": choices}
        if include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    try:
        opening = [kind.first_delta(i) for i in range(completion.n)]
        if any(opening):
            yield chunk([c for c in opening if c])
        if first:
            yield chunk([kind.delta(d) for d in first])
        async for changed in rest:
            if changed:
                yield chunk([kind.delta(d) for d in changed])
    except Exception as e:
        error = _swarm_error(e)
        logger.warning("A stream failed after it started: %s", e)
        body = error.body() if isinstance(error, ApiError) else ApiError(500, str(e), type="server_error").body()
        yield f"data: {json.dumps(body)}\n\n"
        return
    finally:
        await rest.aclose()
    if include_usage:
        body = _envelope(kind.chunk_object, completion) | {"choices": [], "usage": _usage(completion)}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            message, param = "The request body is not valid JSON.", None
        elif param:
            message = f"{param}: {message}"
        return ApiError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {e.detail}"
        return ApiError(e.status_code, message, type="invalid_request_error").response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        logger.exception("Request %s %s failed", request.method, request.url.path)
        return ApiError(500, f"Internal error: {type(e).__name__}: {e}", type="server_error").response()
