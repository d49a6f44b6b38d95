"""``mmcat serve``: a trained model (``RUN/best``) behind HTTP, for live listings.

    mmcat serve --model RUN/best --port 8000
    curl -F image=@shoe.jpg -F title="Trail runner" http://127.0.0.1:8000/predict

Everything goes through :class:`mmcat.classifier.Classifier`: ``preprocessor.product`` turns an upload into a
:class:`~mmcat.classifier.Prepared` (CPU decode, in a thread pool) and ``predict_prepared`` runs one forward pass for
a batch (in one inference thread), so the server, ``mmcat predict`` and the Python API give the same answers.

Micro-batching: every product goes into one asyncio queue; a background task takes the first, keeps collecting
until ``max_batch`` products or ``max_wait_ms`` after the first, and runs them in ONE ``predict_prepared`` call off
the event loop (the largest ``top_k`` of the batch; each request's own ``top_k`` / ``min_score`` applied after).
``max_batch=1`` turns it off.

The server is strict where the Python API is lenient: an uploaded photo that cannot be used is the client's error
(4xx), even when text would have been enough, because a caller that sent a photo expects it to count. Limits are
enforced before the work: the body size while it arrives (a pure ASGI guard that checks Content-Length up front and
counts the bytes of a chunked upload), the pixel count from the image header before decoding.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import signal
import socket
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Awaitable, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from mmcat.classifier import Classifier, Prediction, Prepared

log = logging.getLogger("uvicorn.error")  # uvicorn configures it: our lines print like its own

MAX_IMAGE_BYTES = 10_000_000
MAX_BATCH = 32
MAX_WAIT_MS = 5.0
MAX_REQUEST_BYTES = 64_000_000  # a /predict/batch body (base64 photos); /predict: one photo + FORM_OVERHEAD
MAX_ITEMS = 256  # products per /predict/batch request
FORM_OVERHEAD = 1 << 20  # multipart framing, title, description and attributes around the photo of a /predict
LATENCY_WINDOW = 10_000  # the latency percentiles are over the last this many predict requests
FORM_FIELDS = ("image", "title", "description", "attributes", "min_score", "top_k")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
JSON_TYPES = ("application/json",)
LIMIT_FLAGS = {"/predict": "--max-image-bytes plus 1 MiB for the form fields", "/predict/batch": "--max-request-bytes"}
TOO_LARGE = ("image_too_large", "image_file_too_large")  # ImageError reasons answered 413; the others are 400


# --------------------------------------------------------------------------------------------------- schemas
class LabelScore(BaseModel):
    label: str
    score: float


class PredictionOut(BaseModel):
    label: Optional[str] = Field(description="the predicted category; null when abstain")
    score: float = Field(description="calibrated probability of the best label")
    top_k: List[LabelScore]
    modalities: str = Field(description="inputs used: fused, image_only, text_only, ...")
    abstain: bool = Field(description="score under min_score: no label forced")
    warnings: List[str]


class BatchItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_b64: Optional[str] = Field(None, description="the photo file (JPEG, PNG, WebP...), base64")
    title: Optional[str] = None
    description: Optional[str] = None
    attributes: Optional[Dict[str, Any]] = Field(None, description='e.g. {"brand": "Acme", "price": 12.5}')


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: List[BatchItem] = Field(min_length=1)
    min_score: Optional[float] = Field(None, ge=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=1)


class BatchResponse(BaseModel):
    predictions: List[PredictionOut]


# ----------------------------------------------------------------------------------------------------- metrics
class Stats:
    """Counters for ``GET /metrics``; only touched from the event loop thread, so no locks."""

    def __init__(self) -> None:
        self.started = time.time()
        self.by_status: Counter = Counter()
        self.latency: Deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.batch_sizes: Counter = Counter()
        self.items = 0

    def request(self, status: int, seconds: Optional[float]) -> None:
        self.by_status[str(status)] += 1
        if seconds is not None:
            self.latency.append(seconds)

    def batch(self, size: int) -> None:
        self.batch_sizes[size] += 1
        self.items += size

    def as_dict(self) -> Dict[str, Any]:
        import numpy as np

        lat = np.asarray(self.latency) * 1000.0
        p50, p95 = (float(np.percentile(lat, 50)), float(np.percentile(lat, 95))) if lat.size else (None, None)
        batches = sum(self.batch_sizes.values())
        return {"uptime_s": round(time.time() - self.started, 1),
                "requests": {"total": sum(self.by_status.values()), "by_status": dict(self.by_status)},
                "latency_ms": {"p50": p50, "p95": p95, "over_last": int(lat.size)},
                "batches": {"count": batches, "mean_size": self.items / batches if batches else None,
                            "histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())}},
                "items_predicted": self.items}


# ------------------------------------------------------------------------------------------------ micro-batching
@dataclass
class _Job:
    prepared: Prepared
    top_k: int
    min_score: Optional[float]
    future: asyncio.Future


def _with_options(p: Prediction, top_k: int, min_score: Optional[float]) -> Prediction:
    """A request's own top_k and min_score on a prediction made with the batch's largest top_k and no threshold
    (the rule of ``Classifier.predict_prepared``: abstain when the best score is under min_score)."""
    abstain = min_score is not None and p.score < min_score
    return replace(p, label=None if abstain else p.label, top_k=p.top_k[:top_k], abstain=abstain)


class Arrivals:
    """Predict requests accepted whose products are not queued yet (body arriving, photo decoding). The batcher
    waits for more products only while some are on their way, so a lone request is not held back for nothing."""

    KEY = "mmcat.arriving"  # set in the request's scope while it counts

    def __init__(self) -> None:
        self.count = 0

    def start(self, scope: Dict[str, Any]) -> None:
        self.count += 1
        scope[self.KEY] = True

    def done(self, scope: Dict[str, Any]) -> None:
        if scope.pop(self.KEY, False):
            self.count -= 1


class MicroBatcher:
    """One queue, one collecting task, one inference thread: concurrent products share a forward pass."""

    def __init__(self, clf: Classifier, max_batch: int, max_wait_ms: float, stats: Stats) -> None:
        self.clf, self.max_batch, self.max_wait, self.stats = clf, int(max_batch), float(max_wait_ms) / 1000.0, stats
        self.arrivals = Arrivals()
        self.queue: Optional[asyncio.Queue] = None
        self.task: Optional[asyncio.Task] = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="mmcat-infer")  # one forward at a time

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run(), name="mmcat-micro-batcher")

    @property
    def alive(self) -> bool:
        return self.task is not None and not self.task.done()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with suppress(asyncio.CancelledError):
                await self.task
        while self.queue is not None and not self.queue.empty():  # nothing is left waiting for ever
            job = self.queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(HTTPException(503, "the server is shutting down"))
        self.executor.shutdown(wait=True)

    async def predict(self, scope: Dict[str, Any], prepared: Sequence[Prepared], top_k: int,
                      min_score: Optional[float]) -> List[Prediction]:
        """The predictions of one request's products (``scope``: the request's, no longer arriving once queued)."""
        self.arrivals.done(scope)
        if not self.alive:
            raise HTTPException(503, "the prediction worker is not running")
        loop = asyncio.get_running_loop()
        jobs = [_Job(p, top_k, min_score, loop.create_future()) for p in prepared]
        for job in jobs:
            self.queue.put_nowait(job)
        return list(await asyncio.gather(*(job.future for job in jobs)))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [job for job in await self._collect() if not job.future.done()]  # done: its client went away
            if not batch:
                continue
            try:
                predictions = await loop.run_in_executor(self.executor, self._forward, batch)
            except Exception as exc:  # a failed forward fails its requests (500), not the server
                log.exception("mmcat serve: prediction failed for a batch of %d", len(batch))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self.stats.batch(len(batch))
            for job, p in zip(batch, predictions):
                if not job.future.done():
                    job.future.set_result(p)

    async def _collect(self) -> List[_Job]:
        """The first waiting job, then more until max_batch, or max_wait after the first, or nothing else is on its
        way (a request alone is not held back: at concurrency 1 batching costs no latency)."""
        batch = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0 or not self.arrivals.count:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    def _forward(self, batch: Sequence[_Job]) -> List[Prediction]:  # in the inference thread
        top_k = max(job.top_k for job in batch)
        predictions = self.clf.predict_prepared([job.prepared for job in batch], top_k=top_k)
        return [_with_options(p, job.top_k, job.min_score) for p, job in zip(predictions, batch)]


# ------------------------------------------------------------------------------------------------- request guard
class BodyTooLarge(HTTPException):
    """Raised from ``receive`` while the body arrives; an HTTPException so that FastAPI's body parsing lets it
    through and the app answers it as JSON."""

    def __init__(self, detail: str) -> None:
        super().__init__(413, detail)


async def _send_json(send: Callable[[Dict[str, Any]], Awaitable[None]], status: int, detail: str) -> None:
    response = JSONResponse({"detail": detail}, status_code=status)
    await response({"type": "http"}, _no_body, send)


async def _no_body() -> Dict[str, Any]:  # pragma: no cover - JSONResponse does not read the request
    return {"type": "http.disconnect"}


def _header(scope: Dict[str, Any], name: bytes) -> str:
    """A request header's value ('' when absent); ASGI gives the names lower-cased."""
    return next((v.decode("latin-1") for k, v in scope["headers"] if k == name), "")


class RequestGuard:
    """Pure ASGI middleware in front of the app: refuses a POST with the wrong content type (415) or a body over
    its route's limit (413) without reading it -- Content-Length checked up front, the bytes of a chunked upload
    counted as they arrive -- and counts every request for ``/metrics``."""

    def __init__(self, app: Any, limits: Mapping[str, int], content_types: Mapping[str, Tuple[str, ...]],
                 stats: Stats, arrivals: Arrivals) -> None:
        self.app, self.limits, self.types, self.stats = app, dict(limits), dict(content_types), stats
        self.arrivals = arrivals

    async def __call__(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        timed = scope["path"] in self.limits and scope["method"] == "POST"  # a predict request
        if timed:
            self.arrivals.start(scope)

        async def send_counted(message: Dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_counted)
        finally:
            self.arrivals.done(scope)
            self.stats.request(status[0], time.perf_counter() - start if timed else None)

    async def _guarded(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        path = scope["path"]
        if scope["method"] != "POST" or path not in self.limits:
            return await self.app(scope, receive, send)
        limit = self.limits[path]
        ctype = _header(scope, b"content-type").split(";")[0].strip().lower()
        if ctype not in self.types[path]:
            return await _send_json(send, 415, f"{path} takes {' or '.join(self.types[path])}, not "
                                               f"{ctype or 'a body without Content-Type'}")
        length = _header(scope, b"content-length").strip()
        if length.isdigit() and int(length) > limit:
            return await _send_json(send, 413, f"request body of {int(length)} bytes is over the {limit} bytes "
                                               f"{path} accepts ({LIMIT_FLAGS[path]})")
        received = 0

        async def limited_receive() -> Dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(f"request body over the {limit} bytes {path} accepts ({LIMIT_FLAGS[path]}; "
                                       f"stopped reading at {received} bytes)")
            return message

        started = [False]

        async def send_started(message: Dict[str, Any]) -> None:
            started[0] = started[0] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, send_started)
        except BodyTooLarge as exc:  # raised outside FastAPI's handlers (a route that reads the body itself)
            if started[0]:
                raise
            await _send_json(send, 413, exc.detail)


# ------------------------------------------------------------------------------------------------ the service
class _Service:
    """What the routes share: the classifier, the decode pool, the batcher, the limits, the counters."""

    def __init__(self, clf: Classifier, max_batch: int, max_wait_ms: float, max_image_bytes: int, top_k: int,
                 min_score: Optional[float], decode_threads: int) -> None:
        self.clf, self.max_image_bytes, self.top_k, self.min_score = clf, int(max_image_bytes), top_k, min_score
        self.stats = Stats()
        self.batcher = MicroBatcher(clf, max_batch, max_wait_ms, self.stats)
        self.decode = ThreadPoolExecutor(decode_threads, thread_name_prefix="mmcat-decode")

    async def prepare(self, product: Dict[str, Any], where: str = "") -> Prepared:
        return await asyncio.get_running_loop().run_in_executor(self.decode, self._prepare, product, where)

    def _prepare(self, product: Dict[str, Any], where: str) -> Prepared:  # in a decode thread
        image = product.get("image")
        if isinstance(image, str):  # a /predict/batch item: base64 of the photo file
            try:
                image = product["image"] = base64.b64decode(image, validate=True)
            except (binascii.Error, ValueError):
                raise HTTPException(400, _at(f"{where}.image_b64", "not valid base64")) from None
        if image is not None and len(image) > self.max_image_bytes:
            raise HTTPException(413, _at(where, f"image of {len(image)} bytes is over the {self.max_image_bytes} "
                                                f"bytes limit (--max-image-bytes)"))
        prepared = self.clf.preprocessor.product(**product)
        if image is not None and prepared.pixels is None:
            raise self._image_refused(image, prepared, where)
        if prepared.error:
            raise HTTPException(422, _at(where, prepared.error))
        return prepared

    def _image_refused(self, image: bytes, prepared: Prepared, where: str) -> HTTPException:
        """The photo's ImageError, as a 4xx. Only on this error path is the photo read a second time, by the
        same decoder, to get the reason code (Prepared keeps it only as warning text)."""
        from mmcat.pack.images import ImageError

        try:
            self.clf.preprocessor.photo(image)
        except ImageError as exc:
            return HTTPException(413 if exc.reason in TOO_LARGE else 400, _at(where, f"image not usable: {exc}"))
        return HTTPException(400, _at(where, "; ".join(prepared.warnings) or "image not usable"))

    def options(self, top_k: Optional[int], min_score: Optional[float]) -> Tuple[int, Optional[float]]:
        return (self.top_k if top_k is None else top_k), (self.min_score if min_score is None else min_score)

    def health(self) -> Tuple[int, Dict[str, Any]]:
        ok = self.batcher.alive
        return (200 if ok else 503), {
            "status": "ok" if ok else "prediction worker stopped", "model_loaded": True,
            "model": str(self.clf.artifact.path), "version": self.clf.version, "device": str(self.clf.device),
            "labels": len(self.clf.labels), "modalities": self.clf.modalities,
            "max_batch": self.batcher.max_batch, "max_wait_ms": self.batcher.max_wait * 1000.0,
            "max_image_bytes": self.max_image_bytes}


def _at(where: str, msg: str) -> str:
    """``msg`` about the product at ``where`` (``items[3]`` of a batch; nothing for /predict's one product)."""
    return f"{where}: {msg}" if where else msg


def _describe(err: Mapping[str, Any]) -> str:
    """One pydantic error as ``items[0].img: unknown field`` (FastAPI's default detail is a list of dicts)."""
    where = ""
    loc = list(err.get("loc", ()))
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    msg = "unknown field" if err.get("type") == "extra_forbidden" else str(err.get("msg", "invalid"))
    if err.get("type") == "json_invalid":
        return f"the body is not valid JSON ({err.get('ctx', {}).get('error', msg)})"
    return f"{where or 'body'}: {msg}"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    status = 400 if any(e.get("type") == "json_invalid" for e in errors) else 422
    return JSONResponse({"detail": "; ".join(_describe(e) for e in errors)}, status_code=status)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)


def _attributes(text: Optional[str]) -> Optional[Dict[str, Any]]:
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise HTTPException(422, 'attributes: not JSON; send a JSON object, e.g. {"brand": "Acme"}') from None
    if not isinstance(value, dict):
        raise HTTPException(422, f"attributes: a JSON object is needed, not {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------------------- the app
def create_app(clf: Classifier, max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS,
               max_image_bytes: int = MAX_IMAGE_BYTES, *, max_request_bytes: int = MAX_REQUEST_BYTES,
               max_items: int = MAX_ITEMS, top_k: int = 3, min_score: Optional[float] = None,
               decode_threads: Optional[int] = None) -> FastAPI:
    """The FastAPI app serving ``clf``. ``max_batch``/``max_wait_ms``: micro-batching (1: off);
    ``max_image_bytes``: the largest photo; ``max_request_bytes``: the largest /predict/batch body; ``top_k`` /
    ``min_score``: defaults a request may override. Runs on any ASGI server; ``serve`` runs it on uvicorn."""
    if max_batch < 1 or max_wait_ms < 0 or max_image_bytes < 1 or top_k < 1 or max_items < 1:
        raise ValueError("max_batch, max_image_bytes, max_items and top_k must be >= 1, max_wait_ms >= 0")
    if min_score is not None and not 0.0 <= min_score <= 1.0:
        raise ValueError(f"min_score must be within [0, 1], got {min_score}")
    service = _Service(clf, max_batch, max_wait_ms, max_image_bytes, top_k, min_score,
                       decode_threads or min(4, os.cpu_count() or 1))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batcher.start()
        try:
            yield
        finally:
            await service.batcher.stop()
            service.decode.shutdown(wait=True)
            log.info("mmcat serve: stopped (%d products predicted)", service.stats.items)

    from mmcat import __version__

    app = FastAPI(title="mmcat", version=__version__, lifespan=lifespan,
                  description="Categorise products from a photo, a title / description and attributes.")
    app.state.mmcat = service
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(RequestGuard, limits={"/predict": max_image_bytes + FORM_OVERHEAD,
                                             "/predict/batch": int(max_request_bytes)},
                       content_types={"/predict": FORM_TYPES, "/predict/batch": JSON_TYPES}, stats=service.stats,
                       arrivals=service.batcher.arrivals)
    _add_routes(app, service, int(max_items))
    return app


def _add_routes(app: FastAPI, service: _Service, max_items: int) -> None:
    errors = {c: {"description": d} for c, d in (
        (400, "broken photo (not an image, truncated, bad base64) or malformed body"),
        (413, "body, photo file or photo pixel count over the limit"), (415, "wrong Content-Type"),
        (422, "nothing to predict from, unknown field, bad value"))}

    @app.post("/predict", response_model=PredictionOut, responses=errors,
              summary="one product (multipart form; urlencoded for text only)")
    async def predict(request: Request,
                      image: Optional[UploadFile] = File(None, description="the product photo"),
                      title: Optional[str] = Form(None), description: Optional[str] = Form(None),
                      attributes: Optional[str] = Form(None, description='a JSON object: {"brand": "Acme"}'),
                      min_score: Optional[float] = Form(None, ge=0.0, le=1.0),
                      top_k: Optional[int] = Form(None, ge=1)) -> Dict[str, Any]:
        form = await request.form()  # FastAPI has parsed it already: this is the same, cached, form
        unknown = sorted(set(form.keys()) - set(FORM_FIELDS))
        if unknown:
            raise HTTPException(422, f"unknown form field(s) {', '.join(unknown)}; /predict takes "
                                     f"{', '.join(FORM_FIELDS)}")
        repeated = sorted(k for k in set(form.keys()) if len(form.getlist(k)) > 1)
        if repeated:
            raise HTTPException(422, f"form field(s) {', '.join(repeated)} sent more than once (one product per "
                                     f"/predict; several: /predict/batch)")
        data = await image.read() if image is not None else None
        if data == b"" and not image.filename:  # an HTML form with no file chosen
            data = None
        product = {"image": data, "title": title, "description": description, "attributes": _attributes(attributes)}
        prepared = await service.prepare(product)
        [p] = await service.batcher.predict(request.scope, [prepared], *service.options(top_k, min_score))
        return p.as_dict()

    @app.post("/predict/batch", response_model=BatchResponse, responses=errors,
              summary="several products (JSON, photos base64); one request, micro-batched with the others")
    async def predict_batch(request: Request, body: BatchRequest) -> Dict[str, Any]:
        if len(body.items) > max_items:
            raise HTTPException(422, f"items: {len(body.items)} products, at most {max_items} per request")
        products = [{"image": item.image_b64, "title": item.title, "description": item.description,
                     "attributes": item.attributes} for item in body.items]
        results = await asyncio.gather(*(service.prepare(p, f"items[{i}]") for i, p in enumerate(products)),
                                       return_exceptions=True)
        for r in results:  # the first bad item (in order) answers for the request
            if isinstance(r, BaseException):
                raise r
        predictions = await service.batcher.predict(request.scope, results,
                                                    *service.options(body.top_k, body.min_score))
        return {"predictions": [p.as_dict() for p in predictions]}

    @app.get("/labels", summary="the categories, in the model's order")
    async def labels() -> Dict[str, List[str]]:
        return {"labels": list(service.clf.labels)}

    @app.get("/health", summary="model loaded, mmcat version, device, labels count, modalities")
    async def health() -> JSONResponse:
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics", summary="request counts by status, latency p50/p95, batch sizes, products predicted")
    async def metrics() -> Dict[str, Any]:
        out = service.stats.as_dict()
        out["queue"] = service.batcher.queue.qsize() if service.batcher.queue is not None else 0
        out["arriving"] = service.batcher.arrivals.count
        return out


# ---------------------------------------------------------------------------------------------- the command
def serve(model_dir: Union[str, Path], host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          max_image_bytes: int = MAX_IMAGE_BYTES, max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS,
          top_k: int = 3, min_score: Optional[float] = None, max_request_bytes: int = MAX_REQUEST_BYTES,
          log_level: str = "info", **app_options: Any) -> None:
    """Load ``model_dir`` and serve it with uvicorn until SIGINT / SIGTERM (then a graceful shutdown: requests in
    flight are answered, the batcher is cancelled, and this returns). The port is bound before the model loads, so
    a busy port fails at once, with one line."""
    import uvicorn

    _check_device(device)
    sock = _bind(host, port)
    try:
        clf = Classifier.load(model_dir, device=device, max_image_bytes=max_image_bytes)
        app = create_app(clf, max_batch, max_wait_ms, max_image_bytes, top_k=top_k, min_score=min_score,
                         max_request_bytes=max_request_bytes, **app_options)
        bound = sock.getsockname()
        print(f"mmcat serve: {model_dir} on http://{host}:{bound[1]} (device {clf.device}, {len(clf.labels)} labels, "
              f"{'+'.join(clf.modalities)}; micro-batches of up to {max_batch} within {max_wait_ms:g} ms)",
              flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=30))
        with _signals_end_cleanly(server):
            server.run(sockets=[sock])
    finally:
        sock.close()


def _check_device(device: str) -> None:
    import torch

    from mmcat.config import ConfigError

    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device}: not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is visible (use --device cpu or auto)")


def _bind(host: str, port: int) -> socket.socket:
    from mmcat.config import ConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; with proto 0 every
    # keep-alive response waits ~40 ms for a delayed ACK (Nagle)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class _signals_end_cleanly:
    """uvicorn turns SIGINT / SIGTERM into a graceful shutdown and then re-raises the signal with the handler that
    was there before it started. The handler put there only asks the server to stop (which covers a signal in the
    instant before uvicorn takes over), so the re-raise ends nothing and the command exits 0 after the clean
    shutdown instead of dying of the signal, as a service manager expects of a server it stopped."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def _stop(self, *_: Any) -> None:
        self.server.should_exit = True

    def __enter__(self) -> None:
        self.saved = {s: signal.signal(s, self._stop) for s in (signal.SIGINT, signal.SIGTERM)}

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.saved.items():
            signal.signal(s, handler)
