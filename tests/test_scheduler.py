"""In-flight batching: requests that arrive while others decode join the running batch, and every
request still gets exactly what it gets alone (tokens and exit layer), greedy or sampled."""

import time

import pytest
import torch

from conftest import TARGET_EXITS, sample_prompts
from engines.backends.torch_backend import TorchBackend
from engines.core.errors import DyVTEError
from engines.orchestrator import Runtime
from engines.scheduler import QueueFull, SamplingParams, Scheduler

MAX_TOKENS = [6, 3, 8, 5, 7, 4]


@pytest.fixture(scope="module")
def runtime(vila_exit_model):
    return Runtime(TorchBackend(vila_exit_model), vila_exit_model.processor)


@pytest.fixture(scope="module")
def prompts(runtime):
    return sample_prompts(runtime) + [runtime.prepare("how many stars are there?")]  # one without an image


def solo(runtime, prompt, params: SamplingParams):
    (r,) = runtime.generate([prompt], "dynamic", params.generation_config())
    return r.generated_ids, r.exit_layer


@pytest.fixture
def scheduler(runtime):
    s = Scheduler(runtime, max_batch=4, max_queue=8).start()
    yield s
    s.stop()


def test_requests_arriving_during_decode_join_and_equal_their_solo_runs(runtime, prompts, scheduler):
    params = [SamplingParams(max_tokens=MAX_TOKENS[i % 6], temperature=0.7 if i % 3 == 2 else 0.0, seed=i)
              for i in range(len(prompts))]
    first = [scheduler.submit(prompts[i], params[i]) for i in range(2)]
    events = iter(first[0])
    assert next(events).kind == "token"  # request 0 is decoding now
    later = [scheduler.submit(prompts[i], params[i]) for i in range(2, len(prompts))]
    results = [r.result() for r in first + later]
    for i, (prompt, p, result) in enumerate(zip(prompts, params, results)):
        tokens, exit_layer = solo(runtime, prompt, p)
        assert result.token_ids == tokens, f"request {i}"
        assert result.exit_layer == exit_layer, f"request {i}"
        assert result.finish_reason in ("length", "stop")
    assert [r.exit_layer for r in results[:6]] == TARGET_EXITS
    assert results[2].visual_tokens_dropped == 0 and results[0].visual_tokens_dropped == prompts[0].num_visual
    assert max(scheduler.stats["batch_sizes"]) > 1  # they really ran together
    assert scheduler.stats["prefills"] < len(prompts)  # and some were prefilled together
    assert max(scheduler.stats["prefill_sizes"]) > 1
    assert sum(scheduler.stats["prefill_sizes"].values()) == scheduler.stats["prefills"]


def test_a_request_without_token_events_gets_only_its_result(runtime, prompts, scheduler):
    """`tokens=False` (the server's non-streamed answers): one `done` event, the same result."""
    streamed = scheduler.submit(prompts[3], SamplingParams(max_tokens=6)).result()
    quiet = scheduler.submit(prompts[3], SamplingParams(max_tokens=6), tokens=False)
    events = list(quiet)
    assert [e.kind for e in events] == ["done"]
    assert events[0].result.token_ids == streamed.token_ids and events[0].result.text == streamed.text
    assert quiet.finished is not None and quiet.finished >= quiet.submitted


def test_streamed_text_adds_up_to_the_answer_and_timings_are_reported(runtime, prompts, scheduler):
    request = scheduler.submit(prompts[0], SamplingParams(max_tokens=5))
    events = list(request)
    assert [e.kind for e in events][-1] == "done"
    result = events[-1].result
    assert "".join(e.text for e in events[:-1]) == result.text == runtime.processor.decode(result.token_ids)
    assert set(result.timings_ms) == {"queue", "prefill", "first_token", "decode", "total"}
    assert result.timings_ms["total"] >= result.timings_ms["first_token"] > 0


def test_stop_string_ends_the_answer_before_it(runtime, prompts, scheduler):
    full = scheduler.submit(prompts[3], SamplingParams(max_tokens=8)).result()
    words = full.text.split()
    assert len(words) >= 2, full.text
    stop = words[1]
    cut = scheduler.submit(prompts[3], SamplingParams(max_tokens=8, stop=(stop,))).result()
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.find(stop)]


def test_a_failing_request_fails_alone(runtime, prompts, scheduler):
    bad = runtime.prepare("what color is the circle?", None)
    good = prompts[1]
    broken = type(good)(list(good.input_ids), good.visual_span, torch.cat([good.pixel_values] * 2))  # 2 tiles
    requests = [scheduler.submit(p, SamplingParams(max_tokens=3)) for p in (good, broken, bad)]
    assert requests[0].result().token_ids == solo(runtime, good, SamplingParams(max_tokens=3))[0]
    with pytest.raises(DyVTEError, match="visual tokens"):
        requests[1].result()
    assert requests[2].result().token_ids


def test_full_queue_and_impossible_requests_are_refused_at_submit(runtime, prompts):
    s = Scheduler(runtime, max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    s.submit(prompts[0], SamplingParams(max_tokens=2))
    s.submit(prompts[1], SamplingParams(max_tokens=2))
    with pytest.raises(QueueFull, match="queue is full"):
        s.submit(prompts[2], SamplingParams(max_tokens=2))
    with pytest.raises(DyVTEError, match="exceeds the model's context"):
        s.submit(prompts[0], SamplingParams(max_tokens=10_000))
    with pytest.raises(DyVTEError, match="temperature"):
        SamplingParams(temperature=float("nan"))
    s.stop()


def test_cancelled_request_leaves_the_batch(runtime, prompts, scheduler):
    long = scheduler.submit(prompts[0], SamplingParams(max_tokens=40))
    other = scheduler.submit(prompts[1], SamplingParams(max_tokens=6))
    next(iter(long))
    long.cancel()
    events = list(long)
    assert events[-1].kind == "done" and events[-1].result.finish_reason == "cancelled"
    assert len(events[-1].result.token_ids) < 40
    assert other.result().token_ids == solo(runtime, prompts[1], SamplingParams(max_tokens=6))[0]


def test_one_at_a_time_mode_gives_the_same_answers(runtime, prompts):
    s = Scheduler(runtime, max_batch=8, batching=False).start()
    try:
        reqs = [s.submit(p, SamplingParams(max_tokens=4)) for p in prompts[:3]]
        got = [r.result().token_ids for r in reqs]
    finally:
        s.stop()
    assert got == [solo(runtime, p, SamplingParams(max_tokens=4))[0] for p in prompts[:3]]
    assert max(s.stats["batch_sizes"]) == 1


def test_onnxruntime_package_batches_in_flight_like_its_solo_runs(vila_package, prompts):
    from engines.load import open_package

    runtime = open_package(vila_package)
    s = Scheduler(runtime, max_batch=4).start()
    try:
        first = s.submit(prompts[0], SamplingParams(max_tokens=6))
        next(iter(first))
        rest = [s.submit(p, SamplingParams(max_tokens=MAX_TOKENS[i])) for i, p in enumerate(prompts[1:6], 1)]
        results = [first.result()] + [r.result() for r in rest]
    finally:
        s.stop()
    for i, result in enumerate(results):
        tokens, exit_layer = solo(runtime, prompts[i], SamplingParams(max_tokens=MAX_TOKENS[i]))
        assert (result.token_ids, result.exit_layer) == (tokens, exit_layer), f"request {i}"
    assert max(s.stats["batch_sizes"]) > 1


def test_request_cancelled_while_waiting_is_told_and_never_prefilled(runtime, prompts):
    s = Scheduler(runtime, max_batch=2, max_queue=4)  # not started yet: the request waits
    waiting = s.submit(prompts[0], SamplingParams(max_tokens=3))
    waiting.cancel()
    s.start()
    try:
        events = list(waiting)
    finally:
        s.stop()
    assert [e.kind for e in events] == ["done"] and events[0].result.finish_reason == "cancelled"
    assert events[0].result.token_ids == [] and s.stats["prefills"] == 0


def test_an_internal_prefill_error_fails_only_its_request(runtime, prompts):
    """Not only user errors: a bug hit by one request's prefill (here a RuntimeError) fails that
    request with a 500-status error event, and the others of its batch are answered."""
    poisoned = prompts[2]

    class Flaky(Scheduler):
        def _prefill(self, requests):
            if any(r.prompt is poisoned for r in requests):
                raise RuntimeError("boom")
            return super()._prefill(requests)

    s = Flaky(runtime, max_batch=4, max_queue=8)
    requests = [s.submit(p, SamplingParams(max_tokens=3)) for p in prompts[:4]]
    s.start()
    try:
        outcomes = []
        for r in requests:
            events = list(r)
            outcomes.append(events[-1])
    finally:
        s.stop()
    assert outcomes[2].kind == "error" and outcomes[2].status == 500 and "boom" in outcomes[2].error
    for i in (0, 1, 3):
        assert outcomes[i].kind == "done"
        assert outcomes[i].result.token_ids == solo(runtime, prompts[i], SamplingParams(max_tokens=3))[0]


def test_queue_depth_is_re_reported_while_idle(runtime):
    """A gauge exporter may export a value once after it is set (Ray's does): the engine loop
    reports the queue depth every `depth_interval_s` even when nothing happens."""
    s = Scheduler(runtime, max_batch=2, max_queue=2)
    s.depth_interval_s = 0.1
    reports = []
    s.observers.append(lambda name, value: reports.append(value) if name == "queue_depth" else None)
    s.start()
    try:
        time.sleep(0.75)
    finally:
        s.stop()
    assert 4 <= len(reports) <= 12 and set(reports) == {0}, reports


def test_slot_cache_insert_remove_and_append_keep_every_rows_tokens():
    """The running cache in slots: rows inserted into free slots, removed (a live row moves into
    the freed slot), grown past its columns and shrunk again keep exactly their own tokens, and a
    step's masks/buffers are views of the live slots (no copy)."""
    from engines.kv_cache import GROW, KVCache

    gen = torch.Generator().manual_seed(0)
    ranges = [(0, 2), (2, 3)]  # two segments: rows of different lengths per segment (an exit)

    def row(n0, n1):
        return [(torch.randn(2, n, 4, generator=gen), torch.randn(2, n, 4, generator=gen)) for n in (n0, n0, n1)]

    expected = [row(5, 3), row(9, 9)]
    cache = KVCache.from_rows(expected, ranges, reserve=4, limit=500, max_slots=8)
    for step in range(GROW + 3):  # past the first buffer's columns: grows once
        if step == 2:
            more = [row(7, 2), row(1, 1), row(12, 4)]
            cache.insert(more, reserve=GROW)
            expected += more
        if step == 5:
            order = cache.remove([0, 2])
            assert sorted(order) == [1, 3, 4] and len(order) == 3
            expected = [expected[i] for i in order]
        masks, past = cache.step_inputs()
        assert [m.shape[0] for m in masks] == [len(expected)] * 2
        assert past[0][0].data_ptr() == cache.segments[0].keys[0].data_ptr()  # a view, not a copy
        new = [(torch.randn(len(expected), 2, 1, 4, generator=gen), torch.randn(len(expected), 2, 1, 4, generator=gen))
               for _ in range(3)]
        cache.append(new)
        expected = [[(torch.cat([k, new[l][0][b]], 1), torch.cat([v, new[l][1][b]], 1)) for l, (k, v) in enumerate(r)]
                    for b, r in enumerate(expected)]
    assert cache.segments[0].capacity > GROW
    for got, want in zip(cache.rows(), expected):
        for (gk, gv), (wk, wv) in zip(got, want):
            assert torch.equal(gk, wk) and torch.equal(gv, wv)
    for seg, (start, _) in zip(cache.segments, ranges):  # exactly the real tokens are unmasked
        for b, want in enumerate(expected):
            n = want[start][0].shape[1]
            assert seg.mask[b, :n].all() and not seg.mask[b, n:seg.capacity].any() and seg.mask[b, -1] == 1
    long, short = row(100, 100), row(3, 2)
    cache = KVCache.from_rows([long, short], ranges, reserve=1)
    assert cache.segments[0].capacity == 2 * GROW
    assert cache.remove([0]) == [1]  # the long row left: the buffers shrink to what the short one needs
    assert [s.capacity for s in cache.segments] == [GROW, GROW]
    assert all(torch.equal(g[0], w[0]) and torch.equal(g[1], w[1]) for g, w in zip(cache.rows()[0], short))
