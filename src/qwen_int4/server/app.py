"""FastAPI app: routes, error bodies, and the background model load. The logic is in serving_*.py.

The server answers at once: the model loads in a thread started with the app, /health
says 503 until it is ready (200 after), and the model endpoints answer 503 meanwhile.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ..engine.async_engine import AsyncEngine
from ..engine.engine import EngineConfig, LLMEngine
from .chat_prompt import PromptError, build_chat_prompt
from .metrics import Metrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from .serving import ServingContext, ServingError
from .serving_chat import ChatServing
from .serving_completion import CompletionServing

log = logging.getLogger(__name__)
Loader = Callable[[], tuple[Any, Any]]  # () -> (QWenLMHeadModel, QWenTokenizer)
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health", "/metrics")


class ServerState:
    """Loading status and, once loaded, the engine and the endpoint objects."""

    def __init__(self, load: Loader, model_names: list[str], engine_config: EngineConfig) -> None:
        self._load = load
        self.model_names = model_names
        self.engine_config = engine_config
        self.metrics = Metrics()
        self.status = "loading"
        self.error: str | None = None
        self.ctx: ServingContext | None = None
        self.chat: ChatServing | None = None
        self.completion: CompletionServing | None = None

    def load(self) -> None:
        try:
            model, tokenizer = self._load()
            engine = LLMEngine(model, tokenizer, self.engine_config)
            log.info("KV cache: %d blocks of %d tokens; max_model_len %d", engine.pool.num_blocks,
                     self.engine_config.block_size, engine.max_model_len)
            self.ctx = ServingContext(AsyncEngine(engine), tokenizer, self.model_names, model.generation_config,
                                      self.metrics)
            self.chat, self.completion = ChatServing(self.ctx), CompletionServing(self.ctx)
            self.status = "ready"
        except Exception as exc:
            log.exception("loading the model failed")
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"

    def require(self) -> ServingContext:
        if self.status == "ready":
            return self.ctx
        message = "the model is still loading" if self.status == "loading" else f"the model failed to load: {self.error}"
        raise ServingError(message, status=503, type="service_unavailable")

    def shutdown(self) -> None:
        if self.ctx is not None:
            self.ctx.engine.shutdown()


class CountRequests:
    """ASGI middleware: count finished HTTP requests by route and status code."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_and_record(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            path = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.count_request(path, status)


def create_app(load: Loader, model_names: list[str], engine_config: EngineConfig | None = None) -> FastAPI:
    """The OpenAI-compatible app; `load` runs in a background thread when the app starts."""
    state = ServerState(load, model_names, engine_config or EngineConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load, name="qwen-int4-load", daemon=True).start()
        yield
        state.shutdown()

    app = FastAPI(title="qwen-int4", lifespan=lifespan)
    app.state.server = state
    app.add_middleware(CountRequests, metrics=state.metrics)

    @app.exception_handler(ServingError)
    async def serving_error(_: HTTPRequest, exc: ServingError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            message, param = f"malformed JSON body: {first.get('msg', '')}", None
        else:
            message, param = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}", ".".join(loc) or None
        return JSONResponse(ServingError(message, param=param).body(), status_code=400)

    @app.get("/health")
    async def health() -> Response:
        if state.status == "ready":
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": state.status, "error": state.error}, status_code=503)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        ctx = state.require()
        cards = [ModelCard(id=name, max_model_len=ctx.max_model_len) for name in state.model_names]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, http: HTTPRequest) -> Response:
        state.require()
        return _respond(await state.chat.create(req, http))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: HTTPRequest) -> Response:
        state.require()
        return _respond(await state.completion.create(req, http))

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> JSONResponse:
        ctx = state.require()
        if (req.prompt is None) == (req.messages is None):
            raise ServingError("give exactly one of prompt and messages", param="prompt")
        if req.prompt is not None:
            ids = ctx.tokenizer.encode(req.prompt)
        else:
            try:
                ids = build_chat_prompt(ctx.tokenizer, req.messages, None, ctx.generation_config.max_window_size).ids
            except PromptError as exc:
                raise ServingError(str(exc), param=exc.param) from None
        return JSONResponse(TokenizeResponse(tokens=ids, count=len(ids), max_model_len=ctx.max_model_len).model_dump())

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> JSONResponse:
        ctx = state.require()
        try:
            text = ctx.tokenizer.decode(req.tokens)
        except (ValueError, TypeError) as exc:
            raise ServingError(str(exc), param="tokens") from None
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        stats = state.ctx.engine.engine.stats() if state.ctx is not None else None
        text = state.metrics.render(state.model_names[0], stats)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app


def _respond(result: Response | dict) -> Response:
    return result if isinstance(result, Response) else JSONResponse(result)
