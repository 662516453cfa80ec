"""The Ray Serve application: one replica = one loaded package `Runtime` + its `Scheduler` engine
loop, behind a FastAPI ingress that speaks OpenAI's chat-completions API.

Ray Serve does the HTTP proxying, the routing between replicas, the replica lifecycle, the
back-pressure (`max_ongoing_requests`, `max_queued_requests`: both bounded, so nothing buffers
without limit) and the metrics export; this module only maps requests onto the scheduler.

    serve run deploy/serve_config.yaml          # import_path: engines.serve.app:build_app
    python -m engines serve exports/vila        # the same application, one command
"""


import asyncio
import hmac
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from engines.core.errors import DyVTEError
from engines.scheduler import QueueFull, SamplingParams, Scheduler
from engines.serve.images import ImageLimits, load_image_url
from engines.serve.protocol import (APIError, ChatRequest, completion, completion_id, error_body, sse_stream,
                                    validation_error)

BACKENDS = ("onnxruntime", "tensorrt")

# Ray Serve settings that Serve reads from the environment of its processes (proxy, replicas) when
# they start, so they must be in the environment before Ray starts (`ray start` on a cluster, the
# pods' env in deploy/rayservice.yaml). Measured on the 2-CPU machine at concurrency 1 (README
# "Serving"): the proxy's hop to the replica over gRPC instead of a Ray actor call takes ~4 ms off
# each request (client latency outside the replica 10 -> 6 ms); access-log lines are buffered
# instead of flushed one by one. Both are among the settings of Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED.
SERVE_ENV = {
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
}


def apply_serve_env(environ=None) -> dict:
    """`SERVE_ENV` into `environ` (default `os.environ`) where not set already; the values in force."""
    environ = os.environ if environ is None else environ
    for name, value in SERVE_ENV.items():
        environ.setdefault(name, value)
    return {name: environ[name] for name in SERVE_ENV}
DEVICES = ("cpu", "cuda", "tensorrt")


@dataclass
class ServeSettings:
    """Everything a replica needs; plain values (the `args` of a Serve config file)."""

    package: str
    backend: str = "onnxruntime"
    device: str = "cpu"
    replicas: int = 1
    max_batch: int = 8
    max_queue: int = 64
    token_budget: int | None = None
    batching: bool = True  # False: one request at a time (the benchmark's baseline)
    exit_policy: str | None = None  # default: dynamic when the package has routers, else none
    api_key: str | None = None
    model_name: str | None = None  # default: the package folder's name
    threads: int | None = None  # ONNX Runtime intra-op threads per graph (and torch's) in a replica
    num_cpus: float = 1.0  # Ray CPUs reserved per replica (on GPU machines each replica takes one GPU)
    default_max_tokens: int = 256
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 4096 * 4096
    fetch_timeout_s: float = 10.0
    allow_fetch: bool = True

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise DyVTEError(f"backend {self.backend!r}: a served package runs on {' or '.join(BACKENDS)}")
        if self.device not in DEVICES:
            raise DyVTEError(f"device {self.device!r}: choose from {', '.join(DEVICES)}")
        for name in ("replicas", "max_batch", "max_queue", "default_max_tokens", "max_image_bytes",
                     "max_image_pixels"):
            if int(getattr(self, name)) < 1:
                raise DyVTEError(f"{name} must be at least 1")
        if not Path(self.package).is_dir():
            raise DyVTEError(f"package folder not found: {self.package}")
        self.model_name = self.model_name or Path(self.package).resolve().name

    @classmethod
    def from_args(cls, args: dict):
        known = {f.name for f in fields(cls)}
        unknown = set(args) - known
        if unknown:
            raise DyVTEError(f"unknown serve settings: {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
        return cls(**args)

    @property
    def gpu(self) -> bool:
        return self.device != "cpu" or self.backend == "tensorrt"


api = FastAPI(title="DyVTE package server", docs_url=None, redoc_url=None)


@api.exception_handler(APIError)
async def _api_error(_request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(RequestValidationError)
async def _request_invalid(_request, exc: RequestValidationError):
    error = validation_error(exc, list(exc.errors()))
    return JSONResponse(error.body(), status_code=error.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request, exc: StarletteHTTPException):
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)


class Metrics:
    """Prometheus metrics through Ray (exported with Ray's own on each node's metrics port)."""

    def __init__(self, num_layers: int, model: str):
        from ray.serve import metrics

        tags = {"model": model}
        self.exit_layer = metrics.Histogram(
            "dyvte_exit_layer", "layer after which a request's visual tokens exited (num_layers: no exit)",
            boundaries=[i + 0.5 for i in range(max(num_layers - 1, 1))], tag_keys=("model",))
        self.queue_depth = metrics.Gauge("dyvte_queue_depth", "requests waiting in the replica's scheduler",
                                         tag_keys=("model",))
        self.batch_size = metrics.Histogram("dyvte_batch_size", "requests in a decode step",
                                            boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("model",))
        self.ttft = metrics.Histogram("dyvte_time_to_first_token_ms", "submit to first generated token (ms)",
                                      boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000],
                                      tag_keys=("model",))
        self.tokens_per_s = metrics.Histogram("dyvte_generated_tokens_per_second", "a request's decode speed",
                                              boundaries=[1, 5, 10, 25, 50, 100, 250, 500, 1000],
                                              tag_keys=("model",))
        self.tokens = metrics.Counter("dyvte_generated_tokens", "generated tokens (rate: tokens/s)",
                                      tag_keys=("model",))
        self.requests = metrics.Counter("dyvte_requests", "finished requests", tag_keys=("model", "finish_reason"))
        for m in (self.exit_layer, self.queue_depth, self.batch_size, self.ttft, self.tokens_per_s, self.tokens):
            m.set_default_tags(dict(tags))  # (Serve adds its own tags into the dict)
        self.model, self.num_layers = model, num_layers
        self.queue_depth.set(0)  # recorded from the start, not only once a request has queued

    def observe(self, name: str, value) -> None:  # the scheduler's observer (engine thread)
        if name == "queue_depth":
            self.queue_depth.set(value)
        elif name == "batch_size":
            self.batch_size.observe(value)
        elif name == "finished":
            self.exit_layer.observe(self.num_layers if value.exit_layer is None else value.exit_layer)
            n = len(value.token_ids)
            if n:
                self.tokens.inc(n)
                self.ttft.observe(value.timings_ms["first_token"])
                decode_s = value.timings_ms["decode"] / 1e3
                if decode_s > 0:
                    self.tokens_per_s.observe(n / decode_s)
            self.requests.inc(1, tags={"model": self.model, "finish_reason": value.finish_reason})


# (above the deployment: Serve pickles the class where it is decorated, with the globals that exist then)
def _event_error(event) -> JSONResponse:
    kind = {400: "invalid_request_error", 503: "service_unavailable"}.get(event.status, "server_error")
    return JSONResponse(error_body(event.error or "generation failed", kind), status_code=event.status)


def _server_timing(marks: dict, pending) -> str:
    """The replica's side of a request as a `Server-Timing` header (ms): parse (auth + JSON),
    image (decode), prepare (the package's processor: prompt + pixels), engine (submit to the final
    event, the `dyvte.total_ms`), wake (the engine thread's final event to this handler), respond
    (building the body)."""
    end = time.perf_counter()
    finished = pending.finished or marks["woken"]
    parts = {"parse": marks["parsed"] - marks["entry"], "image": marks["image"] - marks["parsed"],
             "prepare": marks["prepared"] - marks["image"], "engine": finished - pending.submitted,
             "wake": marks["woken"] - finished, "respond": end - marks["woken"],
             "replica": end - marks["entry"]}
    return ", ".join(f"{name};dur={1e3 * value:.3f}" for name, value in parts.items())


async def _prepend(first, rest):
    yield first
    async for event in rest:
        yield event


async def _guarded(events, pending, cid, model, include_usage):
    """The SSE stream; a client that disconnects cancels its request."""
    try:
        async for line in sse_stream(events, cid, model, include_usage):
            yield line
    finally:
        pending.cancel()


@serve.deployment
@serve.ingress(api)
class DyVTEServer:
    def __init__(self, settings: dict):
        import torch

        from engines.load import open_package

        self.settings = s = ServeSettings(**settings)
        # torch only does the glue here (cache copies, sampling; the graphs run in ONNX Runtime /
        # TensorRT): its own thread pool next to ONNX Runtime's spinning threads made a 0.5 MB
        # zero-fill take 4.7 ms instead of 0.01 ms on two cores, so one thread unless told otherwise
        torch.set_num_threads(s.threads or 1)
        self.runtime = open_package(s.package, backend=s.backend, device=s.device, threads=s.threads)
        policy = s.exit_policy or ("dynamic" if self.runtime.backend.router_layers else "none")
        self.scheduler = Scheduler(self.runtime, policy, max_batch=s.max_batch, max_queue=s.max_queue,
                                   token_budget=s.token_budget, batching=s.batching)
        self.metrics = Metrics(self.runtime.backend.shape.num_layers, s.model_name)
        self.scheduler.observers.append(self.metrics.observe)
        self.scheduler.start()
        self.limits = ImageLimits(s.max_image_bytes, s.max_image_pixels, s.fetch_timeout_s, s.allow_fetch)
        self.context = self.runtime.backend.shape.max_positions
        self.created = int(time.time())
        self.replica = serve.get_replica_context().replica_tag
        self.api_key = s.api_key or os.environ.get("DYVTE_API_KEY") or None  # (a config's runtime_env)

    def __del__(self):
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.stop()

    def _authorize(self, request: Request) -> None:
        key = self.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           type="authentication_error", code="invalid_api_key")

    @api.get("/health")
    async def health(self):
        return {"status": "ok", "model": self.settings.model_name, "replica": self.replica,
                "queue_depth": self.scheduler.queue_depth,
                "running": len(self.scheduler.running), "exit_policy": str(self.scheduler.policy),
                # since the replica started: decode steps per batch size, prefills per number of requests
                "batch_sizes": dict(self.scheduler.stats["batch_sizes"]),
                "prefill_sizes": dict(self.scheduler.stats["prefill_sizes"])}

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.settings.model_name, "object": "model",
                                            "created": self.created, "owned_by": "dyvte"}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        marks = {"entry": time.perf_counter()}
        self._authorize(request)
        try:
            body = ChatRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise validation_error(exc) from None
        if body.model and body.model != self.settings.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves "
                                f"{self.settings.model_name!r}", type="not_found_error", param="model",
                           code="model_not_found")
        marks["parsed"] = time.perf_counter()
        pending = await self._submit(body, marks)
        cid = completion_id()
        if body.stream:
            events = pending.stream()
            try:
                first = await anext(events)
            except BaseException:
                pending.cancel()
                raise
            if first.kind == "error":  # failed before anything was sent: a plain error answer
                return _event_error(first)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_guarded(_prepend(first, events), pending, cid, self.settings.model_name,
                                              include_usage), media_type="text/event-stream")
        finished = False
        try:
            async for event in pending.stream():  # (no token events: submitted with tokens=False)
                if event.kind == "done":
                    finished = True
                    marks["woken"] = time.perf_counter()
                    # a JSONResponse, not a dict: FastAPI would walk a returned dict through jsonable_encoder
                    response = JSONResponse(completion(cid, self.settings.model_name, event.result))
                    response.headers["server-timing"] = _server_timing(marks, pending)
                    return response
                if event.kind == "error":
                    finished = True
                    return _event_error(event)
        finally:
            if not finished:  # the client went away: free its batch slot
                pending.cancel()
        raise RuntimeError("the request's event stream ended without a result")

    async def _submit(self, body: ChatRequest, marks: dict):
        turns, urls = body.conversation()
        if len(urls) > 1:
            raise APIError(400, f"this model takes at most 1 image per request (got {len(urls)})",
                           param=urls[1][0], code="too_many_images")
        image = await load_image_url(urls[0][1].url, self.limits, urls[0][0]) if urls else None
        marks["image"] = time.perf_counter()
        try:
            prompt = await asyncio.to_thread(self.runtime.prepare_chat, turns, image)
        except DyVTEError as exc:
            raise APIError(400, str(exc), param="messages") from None
        marks["prepared"] = time.perf_counter()
        room = self.context - len(prompt.input_ids)
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            if room < 1:
                raise APIError(400, f"the prompt has {len(prompt.input_ids)} tokens (with the image), which fills "
                                    f"the model's context of {self.context} positions",
                               code="context_length_exceeded")
            max_tokens = min(self.settings.default_max_tokens, room)
        seed = body.seed if body.seed is not None else random.getrandbits(63)
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                    seed=seed, stop=body.stops())
        except DyVTEError as exc:
            raise APIError(400, str(exc)) from None
        try:
            return self.scheduler.submit(prompt, params, tokens=bool(body.stream))
        except QueueFull as exc:
            raise APIError(429, str(exc), type="rate_limit_error", code="queue_full") from None
        except DyVTEError as exc:
            code = "context_length_exceeded" if "context" in str(exc) or "budget" in str(exc) else None
            raise APIError(400, str(exc), param="max_tokens" if code else None, code=code) from None


def build_app(args: dict) -> serve.Application:
    """The application builder (`import_path: engines.serve.app:build_app`; `args` = `ServeSettings`
    fields). On GPU devices each replica takes one GPU, so `replicas` = the number of GPUs."""
    s = ServeSettings.from_args(dict(args))
    actor = {"num_cpus": s.num_cpus}
    if s.gpu:
        actor["num_gpus"] = 1
    return DyVTEServer.options(
        num_replicas=s.replicas,
        ray_actor_options=actor,
        # in-flight: the scheduler's batch plus its queue; beyond that Serve's own bounded queue,
        # then 503 from the proxy (no unbounded buffering anywhere)
        max_ongoing_requests=s.max_batch + s.max_queue,
        max_queued_requests=s.max_queue,
    ).bind(asdict(s))
