"""The FastAPI application of `hwr serve`: JSON API (v1), health, metrics and the draw-a-digit page.

Each image goes through `characters` (hwr_dist.data.preprocess), the function `hwr predict` reads
files with, on a small thread pool off the event loop; the characters of requests that arrive
together then share one forward pass (batcher.py), and each answer is built by `answer`
(hwr_dist.commands.predict), so both commands give the same answer for the same image.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from hwr_dist.data.preprocess import MAX_MEGAPIXELS, ImageTooLarge, characters, decode_image
from hwr_dist.errors import HwrError
from hwr_dist.commands.predict import answer
from hwr_dist.serve import schemas
from hwr_dist.serve.batcher import Batcher
from hwr_dist.serve.metrics import CONTENT_TYPE, Metrics
from hwr_dist.serve.model import ServedModel, load_model
from hwr_dist.serve.uploads import ApiError, Limits, read_images

API_VERSION = "1"
STATIC = Path(__file__).parent / "static"
SETTINGS_ENV = "HWR_SERVE_SETTINGS"  # create_app's arguments as JSON, for `--workers N` (uvicorn's factory)
KNOWN_PATHS = {"/", "/healthz", "/metrics", "/v1/model", "/v1/predict", "/v1/predict/batch", "/openapi.json"}
# The page loads only what this server serves; data: and blob: carry the canvas and upload previews.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
SINGLE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}}}}}
BATCH_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}


def create_app(model_path: str | Path, max_batch: int = 64, max_wait_ms: float = 5.0, *, limits: Limits = Limits(),
               preprocess_threads: int = 2, inference_threads: int | None = None) -> FastAPI:
    """Load the model now (a bad file fails here, before a port is bound) and build the app.
    `inference_threads` is for ONNX Runtime; `hwr serve` sets PyTorch's process-wide (`set_threads`)."""
    if max_batch < 1 or max_wait_ms < 0:
        raise HwrError(f"--max-batch must be at least 1 and --max-wait-ms at least 0 (got {max_batch}, {max_wait_ms})")
    service = Service(load_model(model_path, inference_threads), limits, max_batch, max_wait_ms, preprocess_threads)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await service.start()
        yield
        await service.stop()  # uvicorn gets here once in-flight requests are answered (SIGTERM drains them)

    # FastAPI's /docs and /redoc pages load their scripts from a CDN: off, so that nothing the server
    # offers needs the internet. The schema itself is at /openapi.json.
    app = FastAPI(title="hwr serve", version=API_VERSION, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Handwritten character recognition with a trained hwr-dist model. Images go "
                              "through the same MNIST-style preprocessing as `hwr predict`. Errors are "
                              '`{"error": "..."}` with a 4xx status.')
    app.state.hwr = service
    app.add_middleware(_Observe, metrics=service.metrics)
    _error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(router)
    return app


class Service:
    """The model, the preprocessing pool and the batcher behind one app."""

    def __init__(self, served: ServedModel, limits: Limits, max_batch: int, max_wait_ms: float, threads: int):
        self.served, self.limits, self.threads = served, limits, threads
        self.max_batch, self.max_wait_ms = max_batch, max_wait_ms
        self.metrics = Metrics(served.id)
        self.page = (STATIC / "index.html").read_text()
        self.pool: ThreadPoolExecutor | None = None
        self.batcher: Batcher | None = None

    async def start(self) -> None:
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="hwr-preprocess")
        self.batcher = Batcher(self.served.probabilities, self.max_batch, self.max_wait_ms, self.metrics.observe_batch)
        await self.batcher.start()
        # torch, FastAPI and the model live as long as the server: out of every later collection. Scanning
        # them took 100-200 ms, with the event loop stopped, in each full collection under load (the p99).
        gc.collect()
        gc.freeze()

    async def stop(self) -> None:
        await self.batcher.stop()
        self.pool.shutdown(wait=True)
        print(f"hwr serve: stopped; answered {self.metrics.answered()} API requests, "
              f"{self.metrics.in_flight} in flight", file=sys.stderr, flush=True)

    async def recognise(self, request: Request, top_k: int, segment: bool, include_input: bool, batch: bool):
        """Answers for the request's images, and the time taken in ms."""
        started = time.perf_counter()
        images = await read_images(request, self.limits, batch)
        loop = asyncio.get_running_loop()
        if self.served.read_line is not None:  # a sequence model reads each image as one line, whatever `segment`
            jobs = [loop.run_in_executor(self.pool, read_number, self.served, data, name, include_input)
                    for name, data in images]
            return list(await asyncio.gather(*jobs)), round((time.perf_counter() - started) * 1000, 2)
        self.batcher.announce()
        try:
            jobs = [loop.run_in_executor(self.pool, prepare, data, segment, name) for name, data in images]
            chars = [await jobs[0]] if len(jobs) == 1 else await asyncio.gather(*jobs)
        except BaseException:
            self.batcher.withdraw()
            raise
        probs = await self.batcher.submit(chars[0] if len(chars) == 1 else torch.cat(chars))
        results, start = [], 0
        for c in chars:
            item = answer(probs[start:start + len(c)], self.served.classes, top_k, segment)
            if include_input:
                item["input"] = [png_data_url(x) for x in c]
            results.append(item)
            start += len(c)
        return results, round((time.perf_counter() - started) * 1000, 2)

    def model_info(self) -> dict:
        s = self.served
        return {"id": s.id, "architecture": s.architecture, "format": s.format, "file": s.file, "classes": s.classes,
                "input": {**s.input, **self.limits.describe(), "max_megapixels": MAX_MEGAPIXELS},
                "training": s.training, "quantization": s.quantization,
                "batching": {"max_batch": self.max_batch, "max_wait_ms": self.max_wait_ms}}


def _service(request: Request) -> Service:
    return request.app.state.hwr


router = APIRouter()
TOP_K = Query(3, ge=1, le=1000, description="classes to return per image (or per character)")
SEGMENT = Query(False, description="number mode: read a row of characters (as `hwr predict --segment`)")
INPUT = Query(False, description="also return the 28x28 image(s) the model received, as PNG data URLs")


@router.post("/v1/predict", response_model=schemas.PredictResponse, responses=schemas.ERRORS,
             openapi_extra=SINGLE_BODY, summary="Recognise one image")
async def predict(request: Request, top_k: int = TOP_K, segment: bool = SEGMENT, include_input: bool = INPUT):
    """One image: a multipart file part named `file`, or the raw bytes with an `image/*` content type."""
    service = _service(request)
    results, ms = await service.recognise(request, top_k, segment, include_input, batch=False)
    return JSONResponse({"model_id": service.served.id, **results[0], "time_ms": ms})


@router.post("/v1/predict/batch", response_model=schemas.BatchResponse, responses=schemas.ERRORS,
             openapi_extra=BATCH_BODY, summary="Recognise several images")
async def predict_batch(request: Request, top_k: int = TOP_K, segment: bool = SEGMENT, include_input: bool = INPUT):
    """Up to `input.max_images_per_batch` images (see `GET /v1/model`), each a multipart file part named
    `files`. One unreadable image fails the whole request, naming the image."""
    service = _service(request)
    results, ms = await service.recognise(request, top_k, segment, include_input, batch=True)
    return JSONResponse({"model_id": service.served.id, "time_ms": ms, "results": results})


@router.get("/v1/model", response_model=schemas.ModelInfo, summary="The model and its input contract")
async def model_info(request: Request):
    return JSONResponse(_service(request).model_info())


@router.get("/healthz", response_model=schemas.Health, summary="Liveness")
async def healthz(request: Request):
    return JSONResponse({"status": "ok", "model_id": _service(request).served.id})


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics (text format 0.0.4)")
async def prometheus(request: Request):
    return PlainTextResponse(_service(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/", response_class=HTMLResponse, summary="The draw-a-digit page")
async def index(request: Request):
    return HTMLResponse(_service(request).page, headers={"Content-Security-Policy": PAGE_CSP,
                                                         "Cache-Control": "no-cache"})


def decode(data: bytes, name: str) -> Image.Image:
    try:
        return decode_image(data, name)
    except ImageTooLarge as e:
        raise ApiError(413, str(e)) from None
    except HwrError as e:
        raise ApiError(400, str(e)) from None
    except Exception as e:  # noqa: BLE001 - a decoder failing in a way PIL does not document is a bad image too
        raise ApiError(400, f"{name} could not be decoded ({type(e).__name__}); send a PNG or JPEG") from None


def prepare(data: bytes, segment: bool, name: str) -> torch.Tensor:
    """Decode and preprocess one image (on the preprocessing pool): uint8 [K, 28, 28]."""
    img = decode(data, name)
    try:
        return characters(img, segment, name)
    except HwrError as e:  # decoded, but nothing to read: no ink, no characters
        raise ApiError(422, str(e)) from None


def read_number(served: ServedModel, data: bytes, name: str, include_input: bool) -> dict:
    """A sequence model's answer for one image (on the pool: lines differ in width, so they are not batched)."""
    from hwr_dist.data.preprocess import line_image

    img = decode(data, name)
    try:
        line = line_image(img, served.layout, name)
    except HwrError as e:  # decoded, but nothing to read
        raise ApiError(422, str(e)) from None
    read = served.read_line(line)
    item = {"prediction": read["text"], "probability": read["probability"], "top": None}
    if include_input:
        item["input"] = [png_data_url(line)]
    return item


def png_data_url(image: torch.Tensor) -> str:
    buf = io.BytesIO()
    Image.fromarray(image.numpy()).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def set_threads(n: int) -> None:
    """Intra-op threads for the forward pass, for the whole process. One by default (see `hwr serve`)."""
    torch.set_num_threads(n)


def app_from_env() -> FastAPI:
    """uvicorn's factory for `--workers N`: each worker process builds its own app (and model)."""
    settings = json.loads(os.environ[SETTINGS_ENV])
    set_threads(settings["threads"])
    return create_app(settings["model"], settings["max_batch"], settings["max_wait_ms"],
                      inference_threads=settings["threads"])


def _error_handlers(app: FastAPI) -> None:
    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(_request, e: ApiError):
        return error(e.status, e.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        detail = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        if e.status_code == 404:
            detail = f"no such path: {request.url.path}; the API is described at /openapi.json"
        return error(e.status_code, detail, getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(_request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ())[1:]) or 'request'}: {err.get('msg')}"
                             for err in e.errors())
        return error(422, f"bad parameter ({problems})")

    @app.exception_handler(Exception)
    async def internal(_request, e: Exception):
        return error(500, f"internal error ({type(e).__name__}); the server keeps running")


class _Observe:
    """Counts every HTTP request by path and status, and its latency (pure ASGI: cheap, streams untouched)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def observe(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight += 1
        try:
            await self.app(scope, receive, observe)
        finally:
            self.metrics.in_flight -= 1
            path = scope["path"]
            label = path if path in KNOWN_PATHS else ("/static" if path.startswith("/static/") else "other")
            self.metrics.observe_request(label, status, time.perf_counter() - started)
