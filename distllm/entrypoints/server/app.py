"""The OpenAI-compatible FastAPI app around an AsyncLLMEngine, and a uvicorn runner.

`build_app(engine, served_model_names, api_key=None)` returns the app; `ServerThread` runs it
with uvicorn in a background thread (tests, notebooks); `distllm serve` runs it in the main
thread. fastapi, uvicorn and prometheus-client are imported only here (the `serve` extra).
"""


import hmac
import socket
import threading
import time
from typing import Any

from distllm.engine.async_llm_engine import AsyncLLMEngine
from distllm.entrypoints.server.errors import APIError, error_body, json_error, validation_message
from distllm.executor.base import EngineDeadError
from distllm.logger import init_logger

logger = init_logger(__name__)

_OPEN_PATHS = {"/health"}


class APIKeyMiddleware:
    """Pure ASGI middleware (keeps streaming intact): every route but /health needs the key."""

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or scope.get("path") in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        got = b""
        for k, v in scope.get("headers", ()):
            if k.lower() == b"authorization":
                got = v
                break
        if not hmac.compare_digest(got, self.expected):
            from fastapi.responses import JSONResponse

            resp = JSONResponse(error_body("Unauthorized: a valid 'Authorization: Bearer <api key>' header is "
                                           "required.", 401), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


def add_error_handlers(app: Any) -> None:
    """Errors in OpenAI's JSON shape; bad input is 400 (never 500), a dead engine 503."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return json_error(e.message, e.status, e.param, e.err_type)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        msg, param = validation_message(list(e.errors()))
        return json_error(msg, 400, param)

    @app.exception_handler(ValueError)
    async def _value_error(_: Request, e: ValueError) -> JSONResponse:
        return json_error(str(e), 400)

    @app.exception_handler(TypeError)
    async def _type_error(_: Request, e: TypeError) -> JSONResponse:
        return json_error(str(e), 400)

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, e: EngineDeadError) -> JSONResponse:
        msg = str(e)
        return json_error(msg if "dead" in msg else f"the engine is dead: {msg}", 503)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return json_error(str(e.detail), e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        logger.exception("internal error")
        return json_error(f"internal error: {e!r}", 500)


def build_app(
    engine: AsyncLLMEngine,
    served_model_names: list[str] | str | None = None,
    api_key: str | None = None,
    model_path: str | None = None,
) -> Any:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    from distllm.entrypoints.server.metrics import ServerMetrics
    from distllm.entrypoints.server.protocol import (
        ChatCompletionRequest,
        CompletionRequest,
        DetokenizeRequest,
        EmbeddingRequest,
        ModelCard,
        ModelList,
        RerankRequest,
        ScoreRequest,
        TokenizeRequest,
    )
    from distllm.entrypoints.server.serving_chat import OpenAIServingChat, render_chat
    from distllm.entrypoints.server.serving_completion import OpenAIServingCompletion
    from distllm.entrypoints.server.serving_pooling import OpenAIServingPooling

    if served_model_names is None:
        served_model_names = [model_path or engine.model_config.model]
    elif isinstance(served_model_names, str):
        served_model_names = [served_model_names]
    names = list(served_model_names)
    completion = OpenAIServingCompletion(engine, names, model_path)
    chat = OpenAIServingChat(engine, names, model_path)
    pooling = OpenAIServingPooling(engine, names, model_path)
    metrics = ServerMetrics(names[0])
    engine.step_listeners.append(metrics.on_step)

    app = FastAPI(title="distllm OpenAI-compatible server")
    app.state.engine = engine
    app.state.metrics = metrics
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    add_error_handlers(app)

    def respond(result: Any, count: bool = True) -> Any:
        if count:
            metrics.http_requests.inc()
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- routes -----------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        if engine.is_dead:
            return json_error(f"the engine is dead: {engine.dead_error}", 503)
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/models")
    async def list_models() -> Any:
        cards = [ModelCard(id=n, root=model_path or engine.model_config.model,
                           max_model_len=engine.model_config.max_model_len) for n in names]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.get("/version")
    async def version() -> Any:
        from distllm import __version__ as v  # noqa: PLC0415

        return {"version": v}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Any:
        return respond(await completion.create_completion(req, raw))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Any:
        return respond(await chat.create_chat_completion(req, raw))

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest, raw: Request) -> Any:
        return respond(await pooling.create_embedding(req, raw))

    for path in ("/score", "/v1/score"):
        @app.post(path)
        async def score(req: ScoreRequest, raw: Request) -> Any:
            return respond(await pooling.create_score(req, raw))

    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        @app.post(path)
        async def rerank(req: RerankRequest, raw: Request) -> Any:
            return respond(await pooling.create_rerank(req, raw))

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> Any:
        completion.check_model(req.model)
        tok = completion.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise APIError("pass exactly one of prompt or messages.", 400, param="prompt")
        if req.messages is not None:
            try:
                _, ids = render_chat(tok, req.messages, add_generation_prompt=req.add_generation_prompt)
            except ValueError as e:
                raise APIError(str(e), 400, param="messages") from e
        else:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": engine.model_config.max_model_len,
                               "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = tok.convert_ids_to_tokens(ids)
        return out

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> Any:
        completion.check_model(req.model)
        vocab = engine.model_config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(f"token id {bad[0]} is out of vocabulary (vocabulary size {vocab}).", 400, param="tokens")
        return {"prompt": completion.tokenizer.decode(req.tokens)}

    return app


# ---- running ------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def uvicorn_config(app: Any, host: str, port: int, log_level: str = "info") -> Any:
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5,
                          access_log=False, lifespan="off")


class ServerThread:
    """Run the app with uvicorn in a daemon thread on 127.0.0.1; `stop()` (or `with`) ends it."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning"):
        import uvicorn

        self.host = host
        self.port = port or free_port(host)
        self.server = uvicorn.Server(uvicorn_config(app, self.host, self.port, log_level))
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # not the main thread
        self.thread = threading.Thread(target=self.server.run, name="distllm-uvicorn", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread exited before it started")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError("the server did not start in time")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
