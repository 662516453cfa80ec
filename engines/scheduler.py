"""In-flight (continuous) batching over a `Runtime`, for every backend.

A bounded queue feeds one engine loop. Between decode steps the loop prefills the waiting requests
together (each exiting at its own layer, as `Runtime.prefill` does), writes their caches into free
slots of the running batch's cache (`KVCache.insert`: every segment keeps its own lengths; the
running rows are not copied), runs one decode step for every running request, and removes a
finished request at once (`KVCache.remove` frees its slot). Each request has its own sampling
settings and RNG, so it gets the tokens it would get alone. A full queue refuses new requests; a
request whose prefill fails fails alone (the batch is retried one by one).

    scheduler = Scheduler(runtime, max_batch=8, max_queue=64).start()
    request = scheduler.submit(prompt, SamplingParams(max_tokens=32))
    for event in request: ...          # or: async for event in request.stream()
    scheduler.stop()
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
import math
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from engines.core.errors import DyVTEError
from engines.core.prompt import Prompt
from engines.kv_cache import KVCache
from engines.orchestrator import Generation, Runtime
from engines.policy import ExitPolicy, GenerationConfig, TokenSampler


class QueueFull(DyVTEError):
    """The scheduler's queue is full: the caller should retry later (HTTP 429/503)."""


@dataclass(frozen=True)
class SamplingParams:
    """Per request: `temperature` 0 is greedy; `stop` strings end the answer (not included)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise DyVTEError("max_tokens must be an integer of at least 1")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 100):
            raise DyVTEError("temperature must be a number in [0, 100]")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise DyVTEError("top_p must be in (0, 1]")
        if not 0 <= self.seed < 2**63:
            raise DyVTEError("seed must be in 0 .. 2**63 - 1")

    def generation_config(self) -> GenerationConfig:
        sample = self.temperature > 0
        return GenerationConfig(max_new_tokens=self.max_tokens, do_sample=sample,
                                temperature=self.temperature if sample else 1.0, top_p=self.top_p, seed=self.seed)


@dataclass
class Event:
    """`token` (one generated token and the text it adds), `done` (the final result) or `error`."""

    kind: str
    token_id: int | None = None
    text: str = ""
    result: "RequestResult | None" = None
    error: str | None = None
    status: int = 500  # of an error: 400 the request's own fault (bad image, ...), 503 shutting down, 500 a bug


@dataclass
class RequestResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # stop | length | cancelled
    exit_layer: int | None
    num_layers: int
    visual_tokens: int
    visual_tokens_dropped: int
    prompt_tokens: int
    timings_ms: dict[str, float] = field(default_factory=dict)  # queue, prefill, first_token, decode, total


class _Channel:
    """Events from the engine thread to one consumer, blocking or asyncio."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async: asyncio.Queue | None = None
        try:
            self._loop = asyncio.get_running_loop()
            self._async = asyncio.Queue()
        except RuntimeError:
            pass

    def put(self, event: Event) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, event)
                return
            except RuntimeError:  # the consumer's loop is gone
                return
        self._queue.put(event)

    def get(self, timeout: float | None = None) -> Event:
        if self._loop is not None:
            raise RuntimeError("this request was submitted from an event loop: use `async for ... in stream()`")
        return self._queue.get(timeout=timeout)

    async def aget(self) -> Event:
        if self._async is None:
            return await asyncio.to_thread(self._queue.get)
        return await self._async.get()


class Request:
    """A submitted request: iterate it (or `stream()` it) for its events, `cancel()` to drop it."""

    _ids = itertools.count()

    def __init__(self, prompt: Prompt, params: SamplingParams, tokens: bool = True):
        self.id = next(self._ids)
        self.prompt = prompt
        self.params = params
        self.tokens = tokens  # False: only the final event (no per-token wake-ups of the consumer)
        self.channel = _Channel()
        self.cancelled = False
        self.submitted = time.perf_counter()
        # engine-thread state
        self.generation = Generation(list(prompt.input_ids), prompt.visual_span)
        self.sampler = TokenSampler(params.generation_config(), 1)
        self.next_token: int | None = None
        self.text = ""
        self.sent = 0  # characters of `text` already streamed
        self.times: dict[str, float] = {}
        self.finished: float | None = None  # perf_counter when the engine thread sent the final event

    def cancel(self) -> None:
        self.cancelled = True

    def __iter__(self):
        while True:
            event = self.channel.get()
            yield event
            if event.kind != "token":
                return

    async def stream(self):
        while True:
            event = await self.channel.aget()
            yield event
            if event.kind != "token":
                return

    def result(self) -> RequestResult:
        """Block until the request ends; its result, or a DyVTEError with its error."""
        for event in self:
            if event.kind == "error":
                raise DyVTEError(event.error)
            if event.kind == "done":
                return event.result
        raise RuntimeError("the request's event stream ended without a result")


class Scheduler:
    """The engine loop of one runtime (one replica). `max_batch`: most requests decoding at once;
    `max_queue`: most waiting; `token_budget`: most prompt + max_tokens positions held by the
    running batch (None: the batch size alone bounds it)."""

    def __init__(self, runtime: Runtime, policy: str | ExitPolicy = "dynamic", max_batch: int = 8,
                 max_queue: int = 64, token_budget: int | None = None, batching: bool = True):
        if max_batch < 1 or max_queue < 1:
            raise DyVTEError("max_batch and max_queue must be at least 1")
        self.runtime = runtime
        self.policy = ExitPolicy.parse(policy) if isinstance(policy, str) else policy
        self.max_batch = max_batch if batching else 1
        self.max_queue = max_queue
        self.token_budget = token_budget
        self.waiting: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.running: list[Request] = []
        self.cache: KVCache | None = None
        self.positions: torch.Tensor | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # counters only (a long-running server): decode steps per batch size, prefills per request count
        self.stats = {"steps": 0, "batch_sizes": Counter(), "prefills": 0, "prefill_sizes": Counter()}
        self.observers: list = []  # callables(name, value): metrics hooks (queue depth, batch size, ...)
        # queue depth is re-reported this often even when it does not change (a gauge exporter may
        # export a value only once after it is set: Ray's does)
        self.depth_interval_s = 1.0
        self._depth_at = -math.inf
        stops = runtime.processor.eos_token_ids or []
        self._eos = set(stops)

    # ------------------------------------------------------------------ public

    def start(self) -> "Scheduler":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dyvte-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for request in self.running + self._drain():
            request.channel.put(Event("error", error="the server is shutting down", status=503))
        self.running, self.cache = [], None

    def submit(self, prompt: Prompt, params: SamplingParams | None = None, tokens: bool = True) -> Request:
        """Queue a request; DyVTEError when it cannot run (too long for the context, ...),
        QueueFull when the queue is full. `tokens=False`: no `token` events, only the final one."""
        params = params or SamplingParams()
        self.runtime.check([prompt], self.policy, params.max_tokens)
        if self.token_budget and len(prompt.input_ids) + params.max_tokens > self.token_budget:
            raise DyVTEError(f"the prompt ({len(prompt.input_ids)} tokens) with max_tokens {params.max_tokens} "
                             f"exceeds this server's token budget of {self.token_budget}")
        if self._stop.is_set():
            raise DyVTEError("the server is shutting down")
        request = Request(prompt, params, tokens)
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later") from None
        self._notify("queue_depth", self.waiting.qsize())
        self._wake.set()
        return request

    @property
    def queue_depth(self) -> int:
        return self.waiting.qsize()

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                if now - self._depth_at >= self.depth_interval_s:
                    self._depth_at = now
                    self._notify("queue_depth", self.waiting.qsize())
                self._admit()
                if self.running:
                    self._step()
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
            except Exception as exc:  # an engine bug must not leave clients waiting for ever
                message = f"internal error in the engine loop: {type(exc).__name__}: {exc}"
                for request in self.running:
                    request.channel.put(Event("error", error=message))
                self.running, self.cache, self.positions = [], None, None

    def _drain(self) -> list[Request]:
        out = []
        while True:
            try:
                out.append(self.waiting.get_nowait())
            except queue.Empty:
                return out

    def _held_tokens(self, requests) -> int:
        return sum(len(r.prompt.input_ids) + r.params.max_tokens for r in requests)

    def _take(self) -> list[Request]:
        """Waiting requests that fit beside the running ones (batch size and token budget)."""
        taken = []
        held = self._held_tokens(self.running)
        while len(self.running) + len(taken) < self.max_batch:
            try:
                request = self.waiting.queue[0]
            except IndexError:
                break
            need = len(request.prompt.input_ids) + request.params.max_tokens
            if self.token_budget and (taken or self.running) and held + need > self.token_budget:
                break
            taken.append(self.waiting.get_nowait())
            held += need
        for request in taken:
            if request.cancelled:  # cancelled while it waited: told so, never prefilled
                self._finish(request, "cancelled")
        return [r for r in taken if not r.cancelled]

    def _admit(self) -> None:
        new = self._take()
        if not new:
            return
        self._notify("queue_depth", self.waiting.qsize())
        try:
            batches = [self._prefill(new)]
        except Exception:  # noqa: BLE001 - find the one that fails
            batches = []
            for request in new:  # a request that fails, fails alone
                try:
                    batches.append(self._prefill([request]))
                except DyVTEError as exc:
                    request.channel.put(Event("error", error=str(exc), status=400))
                except Exception as exc:  # noqa: BLE001 - a bug, but only this request's
                    request.channel.put(Event("error", error=f"internal error in prefill: {type(exc).__name__}: {exc}"))
        for requests, batch in batches:
            self._join(requests, batch)

    def _prefill(self, requests: list[Request]):
        t0 = time.perf_counter()
        reserve = max(r.params.max_tokens for r in requests)
        batch = self.runtime.prefill([r.prompt for r in requests], self.policy, [r.generation for r in requests],
                                     reserve=reserve)
        t1 = time.perf_counter()
        self.stats["prefills"] += 1
        self.stats["prefill_sizes"][len(requests)] += 1
        for request in requests:
            request.times.update(prefill_start=t0, prefill_end=t1)
        return requests, batch

    def _join(self, requests: list[Request], batch) -> None:
        """Sample each new request's first token; write the caches of those that go on into free
        slots of the running batch's cache (the running rows are not copied)."""
        firsts = _tokens(requests, batch.logits)
        going = [i for i, r in enumerate(requests) if self._accept(r, firsts[i])]
        if not going:
            return
        joined = self.running + [requests[i] for i in going]
        reserve = max(r.params.max_tokens - len(r.generation.generated_ids) for r in joined)
        if self.cache is None:
            self.cache = batch.new_cache(going, reserve, max_slots=self.max_batch)
            self.positions = batch.positions[going].clone()
        else:
            self.cache.insert([batch.rows[i] for i in going], reserve)
            self.positions = torch.cat([self.positions, batch.positions[going]])
        self.running = joined

    def _step(self) -> None:
        alive = [not r.cancelled for r in self.running]
        if not all(alive):
            self._remove([i for i, a in enumerate(alive) if not a], "cancelled")
            if not self.running:
                return
        self.stats["steps"] += 1
        self.stats["batch_sizes"][len(self.running)] += 1
        self._notify("batch_size", len(self.running))
        tokens = [r.next_token for r in self.running]
        logits = self.runtime.decode_step(self.cache, tokens, self.positions)
        self.positions = self.positions + 1
        chosen = _tokens(self.running, logits)
        finished = [i for i, request in enumerate(self.running) if not self._accept(request, chosen[i])]
        if finished:
            self._remove(finished, None)

    def _remove(self, rows: list[int], reason: str | None) -> None:
        if reason:
            for i in rows:
                self._finish(self.running[i], reason)
        if len(rows) == len(self.running):
            self.running, self.cache, self.positions = [], None, None
            return
        gone = set(rows)
        reserve = max(r.params.max_tokens - len(r.generation.generated_ids)
                      for i, r in enumerate(self.running) if i not in gone)
        order = self.cache.remove(rows, reserve=max(reserve, 1))
        self.positions = self.positions[order]
        self.running = [self.running[i] for i in order]

    # ------------------------------------------------------------------ tokens

    def _accept(self, request: Request, token: int) -> bool:
        """Record a sampled token; False when the request is finished (and told so)."""
        now = time.perf_counter()
        if token in self._eos:
            self._finish(request, "stop")
            return False
        gen = request.generation
        gen.generated_ids.append(token)
        request.times.setdefault("first_token", now)
        if not request.tokens and not request.params.stop:  # nobody reads the text before the end
            if len(gen.generated_ids) >= request.params.max_tokens:
                self._finish(request, "length")
                return False
            request.next_token = token
            return True
        text = self.runtime.processor.decode(gen.generated_ids)
        stop_at = _first_stop(text, request.params.stop)
        if stop_at is not None:
            request.text = text[:stop_at]
            self._send(request, token)
            self._finish(request, "stop")
            return False
        request.text = text
        self._send(request, token, hold=_held_back(text, request.params.stop))
        if len(gen.generated_ids) >= request.params.max_tokens:
            self._finish(request, "length")
            return False
        request.next_token = token
        return True

    def _send(self, request: Request, token: int, hold: int = 0) -> None:
        upto = len(request.text) - hold
        delta = request.text[request.sent:upto] if upto > request.sent else ""
        request.sent = max(request.sent, upto)
        if request.tokens:
            request.channel.put(Event("token", token_id=token, text=delta))

    def _finish(self, request: Request, reason: str) -> None:
        end = time.perf_counter()
        t = request.times
        if not request.tokens and not request.params.stop:  # decoded once, here (see `_accept`)
            request.text = self.runtime.processor.decode(request.generation.generated_ids)
        if request.sent < len(request.text):  # text held back for a stop string that never came
            if request.tokens:
                request.channel.put(Event("token", text=request.text[request.sent:]))
            request.sent = len(request.text)
        gen = request.generation
        visual = request.prompt.num_visual
        timings = {
            "queue": 1e3 * (t.get("prefill_start", end) - request.submitted),
            "prefill": 1e3 * (t.get("prefill_end", end) - t.get("prefill_start", end)),
            "first_token": 1e3 * (t.get("first_token", end) - request.submitted),
            "decode": 1e3 * (end - t.get("prefill_end", end)),
            "total": 1e3 * (end - request.submitted),
        }
        result = RequestResult(
            text=request.text, token_ids=list(gen.generated_ids), finish_reason=reason, exit_layer=gen.exit_layer,
            num_layers=self.runtime.backend.shape.num_layers, visual_tokens=visual,
            visual_tokens_dropped=visual if gen.exit_layer is not None else 0,
            prompt_tokens=len(request.prompt.input_ids), timings_ms={k: round(v, 3) for k, v in timings.items()})
        self._notify("finished", result)
        request.finished = time.perf_counter()
        request.channel.put(Event("done", result=result))

    def _notify(self, name: str, value) -> None:
        for observer in self.observers:
            observer(name, value)


def _tokens(requests: list[Request], logits: torch.Tensor) -> list[int]:
    """Each request's next token from its row of `logits` [B, vocab]: one argmax over the batch
    for the greedy rows (what `TokenSampler` gives each of them alone), its own sampler (and RNG)
    for a sampled row."""
    logits = logits.float().cpu()
    greedy = logits.argmax(dim=-1).tolist()
    return [greedy[i] if not r.sampler.config.do_sample else int(r.sampler(logits[i:i + 1])[0])
            for i, r in enumerate(requests)]


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` that could begin a stop string (not streamed yet)."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold
