"""The served package: one real Ray Serve application (two replicas) on 127.0.0.1 over the tiny VILA
package, talked to with the openai client and raw HTTP. Answers (greedy, streamed or not) equal
`python -m engines run` / `Runtime.generate` on the same image and question; 32 concurrent clients
each get exactly their solo answer; every bad request gets its 4xx and the server keeps answering."""

import asyncio
import base64
import io
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import TARGET_EXITS, sample_pairs
from engines.policy import GenerationConfig

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key"
MODEL = "vila"
MAX_IMAGE_BYTES = 300_000
MAX_IMAGE_PIXELS = 512 * 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def user(question: str, url: str | None = None, *extra_parts) -> list[dict]:
    parts = ([{"type": "image_url", "image_url": {"url": url}}] if url else []) + \
        [{"type": "text", "text": question}] + list(extra_parts)
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def server(vila_package):
    """The application of `build_app` on a Ray instance this module starts and stops."""
    import ray
    from ray import serve

    from engines.serve.app import SERVE_ENV, apply_serve_env, build_app

    # Ray's workers (the replicas) import this checkout; metrics reach the exporter every second;
    # Serve runs with the settings `python -m engines serve` gives it (SERVE_ENV)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_metrics_report_interval_ms", *SERVE_ENV)}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), saved["PYTHONPATH"]) if p)
    os.environ["RAY_metrics_report_interval_ms"] = "1000"
    apply_serve_env()
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             namespace="dyvte-test")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({
            "package": str(vila_package), "replicas": 2, "max_batch": 8, "max_queue": 64, "api_key": KEY,
            "threads": 1, "num_cpus": 0.5, "max_image_bytes": MAX_IMAGE_BYTES, "max_image_pixels": MAX_IMAGE_PIXELS,
            "fetch_timeout_s": 5.0}), name="dyvte-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def runtime(vila_package):
    from engines.load import open_package

    return open_package(vila_package)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def solo(runtime, question, image, max_tokens):
    """The greedy answer of the runtime alone: (text, generated ids, exit layer)."""
    (r,) = runtime.generate([runtime.prepare(question, image)], "dynamic", GenerationConfig(max_new_tokens=max_tokens))
    return r.text, r.generated_ids, r.exit_layer


def post(server, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{server}/v1/chat/completions", content=body, headers=headers, timeout=60, **kw)
    return httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers, timeout=60, **kw)


# ---------------------------------------------------------------------- answers


def test_health_is_open_and_models_lists_the_package(server):
    seen = set()
    for _ in range(16):
        r = httpx.get(f"{server}/health", timeout=30)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        seen.add(r.json()["replica"])
    assert len(seen) == 2  # both replicas answer
    models = httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert [m["id"] for m in models["data"]] == [MODEL]


def test_openai_client_answer_equals_engines_run(client, vila_package, tmp_path, capsys):
    from engines.cli import main

    question, image = sample_pairs([0])[0]
    path = tmp_path / "image.png"
    image.save(path)
    assert main(["run", str(vila_package), "--image", str(path), "--prompt", question, "--max-new-tokens", "6",
                 "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    response = client.chat.completions.create(model=MODEL, messages=user(question, data_url(path.read_bytes())),
                                              temperature=0, max_tokens=6)
    (choice,) = response.choices
    assert choice.message.content == cli["text"]
    assert choice.finish_reason == ("length" if len(cli["generated_ids"]) == 6 else "stop")
    assert response.usage.completion_tokens == len(cli["generated_ids"])
    assert response.usage.prompt_tokens == len(cli["input_ids"])
    dyvte = choice.model_extra["dyvte"]
    assert dyvte["exit_layer"] == cli["exit_layer"] == TARGET_EXITS[0]
    assert dyvte["visual_tokens_dropped"] == dyvte["visual_tokens"] == 25 and dyvte["num_layers"] == 4
    assert dyvte["total_ms"] >= dyvte["first_token_ms"] >= dyvte["prefill_ms"] > 0 and dyvte["queue_ms"] >= 0


def test_an_answer_says_where_its_time_went_in_server_timing(server):
    """`Server-Timing` splits the replica's time (parse, image, prepare, engine = dyvte.total_ms,
    wake, respond); /health counts decode steps per batch size."""
    question, image = sample_pairs([5])[0]
    r = post(server, {"model": MODEL, "messages": user(question, data_url(png_bytes(image))), "temperature": 0,
                      "max_tokens": 4})
    assert r.status_code == 200
    from validation.serve_bench import server_timing

    timing = server_timing(r.headers["server-timing"])
    assert set(timing) == {"parse", "image", "prepare", "engine", "wake", "respond", "replica"}
    assert all(v >= 0 for v in timing.values()) and timing["image"] > 0 and timing["prepare"] > 0
    assert abs(timing["engine"] - r.json()["choices"][0]["dyvte"]["total_ms"]) < 2.0
    parts = sum(v for k, v in timing.items() if k != "replica")
    assert parts <= timing["replica"] + 0.01 and timing["replica"] - parts < 5.0  # (the gaps: awaits, the submit)
    replicas = {}
    for _ in range(16):  # (two replicas: the one that answered reports it)
        health = httpx.get(f"{server}/health", timeout=30).json()
        replicas[health["replica"]] = health
    assert any(sum(h["batch_sizes"].values()) >= 3 and sum(h["prefill_sizes"].values()) >= 1
               for h in replicas.values()), replicas


def test_streamed_answer_equals_the_runtime_and_ends_with_done(client, server, runtime):
    question, image = sample_pairs([3])[0]
    text, ids, exit_layer = solo(runtime, question, image, 7)
    messages = user(question, data_url(png_bytes(image)))
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=7,
                                                 stream=True, stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].model_extra["dyvte"]["exit_layer"] == exit_layer == TARGET_EXITS[3]
    assert chunks[-1].usage.completion_tokens == len(ids)
    # raw HTTP: server-sent events, the last one `data: [DONE]`
    body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 7, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == text


def test_32_concurrent_clients_each_get_their_solo_answer(server, runtime):
    pairs = sample_pairs(range(6))
    cases = []
    for i in range(32):
        question, image = pairs[i % 6]
        if i % 4 == 3:
            image = None  # text only
        cases.append((question, image, 1 + (i * 5) % 9))
    expected = [solo(runtime, q, img, n) for q, img, n in cases]
    urls = {id(img): data_url(png_bytes(img)) for _, img, _ in cases if img is not None}

    async def run_all():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as http:
            async def one(question, image, n):
                body = {"model": MODEL, "messages": user(question, urls[id(image)] if image else None),
                        "temperature": 0, "max_tokens": n}
                return await http.post(f"{server}/v1/chat/completions", json=body,
                                       headers={"Authorization": f"Bearer {KEY}"})
            return await asyncio.gather(*(one(*c) for c in cases))

    responses = asyncio.run(run_all())
    assert [r.status_code for r in responses] == [200] * 32
    bodies = [r.json() for r in responses]
    assert len({b["id"] for b in bodies}) == 32  # none duplicated
    for i, (body, (text, ids, exit_layer)) in enumerate(zip(bodies, expected)):
        choice = body["choices"][0]
        assert choice["message"]["content"] == text, f"client {i}"
        assert body["usage"]["completion_tokens"] == len(ids), f"client {i}"
        assert choice["dyvte"]["exit_layer"] == exit_layer, f"client {i}"
        assert choice["dyvte"]["visual_tokens_dropped"] == (0 if exit_layer is None else 25)


@pytest.mark.parametrize("image_turn", [0, 1])
def test_a_multi_turn_conversation_equals_the_runtime_on_its_chat_prompt(server, client, runtime, image_turn):
    """system + user + assistant + user, the image in the first or the last user turn ('developer'
    is OpenAI's newer 'system'): the answer, streamed and not, is `Runtime.generate` on
    `Runtime.prepare_chat` of the same turns (greedy), and its prompt is not the last turn's alone."""
    from engines.core.prompt import Turn

    question, image = sample_pairs([2 + image_turn])[0]
    url = data_url(png_bytes(image))
    texts = ["look at this.", question]
    messages = [{"role": "developer" if image_turn else "system", "content": "answer in one word."}]
    messages += user(texts[0], url if image_turn == 0 else None)
    messages += [{"role": "assistant", "content": [{"type": "text", "text": "i see."}]}]
    messages += user(texts[1], url if image_turn == 1 else None)
    turns = [Turn("system", "answer in one word."), Turn("user", texts[0], image_turn == 0),
             Turn("assistant", "i see."), Turn("user", texts[1], image_turn == 1)]
    prompt = runtime.prepare_chat(turns, image)
    assert prompt.input_ids != runtime.prepare(texts[1], image).input_ids
    (expected,) = runtime.generate([prompt], "dynamic", GenerationConfig(max_new_tokens=6))
    response = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6)
    assert response.choices[0].message.content == expected.text
    assert response.usage.prompt_tokens == len(prompt.input_ids)
    assert response.choices[0].model_extra["dyvte"]["exit_layer"] == expected.exit_layer
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text


def test_an_image_url_is_fetched_over_http(server, runtime):
    question, image = sample_pairs([1])[0]
    payload = png_bytes(image)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path == "/image.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        r = post(server, {"model": MODEL, "messages": user(question, f"{base}/image.png"), "temperature": 0,
                          "max_tokens": 5})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == solo(runtime, question, image, 5)[0]
        missing = post(server, {"model": MODEL, "messages": user(question, f"{base}/nope.png")})
        assert missing.status_code == 400 and "HTTP 404" in missing.json()["error"]["message"]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_seeded_sampling_and_stop_strings_follow_the_runtime(server, runtime):
    """temperature/top_p/seed give the runtime's own sampled tokens for that seed; a stop string
    cuts the answer before it with finish_reason stop."""
    question, image = sample_pairs([2])[0]
    url = data_url(png_bytes(image))
    config = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, seed=7)
    (sampled,) = runtime.generate([runtime.prepare(question, image)], "dynamic", config)
    r = post(server, {"model": MODEL, "messages": user(question, url), "max_tokens": 8, "temperature": 0.8,
                      "top_p": 0.9, "seed": 7})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == sampled.text
    full = solo(runtime, question, image, 8)[0]
    words = full.split()
    assert len(words) >= 2, full
    cut = post(server, {"model": MODEL, "messages": user(question, url), "max_tokens": 8, "temperature": 0,
                        "stop": [words[1]]}).json()["choices"][0]
    assert cut["message"]["content"] == full[:full.find(words[1])] and cut["finish_reason"] == "stop"


def test_a_full_replica_refuses_instead_of_buffering(server, vila_package, runtime):
    """A second application, one replica with room for one running and one waiting request: a
    burst of 12 gets some answers (each its solo answer) and refusals (429 from the scheduler's
    queue or 503 from Serve's bounded router queue), nothing lost; afterwards it answers again."""
    from ray import serve

    from engines.serve.app import build_app

    serve.run(build_app({"package": str(vila_package), "replicas": 1, "max_batch": 1, "max_queue": 1,
                         "threads": 1, "num_cpus": 0.5, "model_name": "tight"}), name="tight", route_prefix="/tight")
    try:
        question, image = sample_pairs([1])[0]
        body = {"model": "tight", "messages": user(question, data_url(png_bytes(image))), "temperature": 0,
                "max_tokens": 24}

        async def burst():
            async with httpx.AsyncClient(timeout=120) as http:
                return await asyncio.gather(*(http.post(f"{server}/tight/v1/chat/completions", json=body)
                                              for _ in range(12)))

        codes = [r.status_code for r in asyncio.run(burst())]
        answered = codes.count(200)
        assert answered >= 1 and answered + codes.count(429) + codes.count(503) == 12, codes
        assert answered < 12, codes  # refused, not buffered
        expected = solo(runtime, question, image, 24)[0]
        again = httpx.post(f"{server}/tight/v1/chat/completions", json=body, timeout=60)
        assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] == expected
    finally:
        serve.delete("tight")


# ---------------------------------------------------------------------- bad requests


def bad_requests():
    question, image = sample_pairs([0])[0]
    good_url = data_url(png_bytes(image))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8))
    big_bytes = png_bytes(noise)
    assert len(big_bytes) > MAX_IMAGE_BYTES and 400 * 400 <= MAX_IMAGE_PIXELS
    huge = png_bytes(Image.new("RGB", (1000, 1000), (10, 20, 30)))
    assert len(huge) < MAX_IMAGE_BYTES
    ok = {"model": MODEL, "messages": user(question, good_url), "max_tokens": 2}
    return [
        ("malformed JSON", b'{"model": "vila", "messages": [', KEY, 400, "not valid JSON"),
        ("not an object", b'[1, 2]', KEY, 400, ""),
        ("text that is not Unicode", b'{"model": "vila", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
         KEY, 400, ""),
        ("no messages", {"model": MODEL}, KEY, 400, "messages"),
        ("empty messages", {"model": MODEL, "messages": []}, KEY, 400, "messages"),
        ("unknown content part", {"model": MODEL, "messages": user(question, None, {"type": "input_audio",
                                                                                   "input_audio": {}})},
         KEY, 400, "unknown content part"),
        ("two images", {"model": MODEL, "messages": user(question, good_url,
                                                         {"type": "image_url", "image_url": {"url": good_url}})},
         KEY, 400, "at most 1 image"),
        ("broken base64", {"model": MODEL, "messages": user(question, "data:image/png;base64,iVBO%%%%")},
         KEY, 400, "base64"),
        ("not an image", {"model": MODEL, "messages": user(question, data_url(b"just some text, not a picture"))},
         KEY, 400, "not an image"),
        ("over the byte limit", {"model": MODEL, "messages": user(question, data_url(big_bytes))},
         KEY, 400, "bytes"),
        ("over the pixel limit", {"model": MODEL, "messages": user(question, data_url(huge))},
         KEY, 400, "1000x1000"),
        ("not a data or http URL", {"model": MODEL, "messages": user(question, "file:///etc/passwd")},
         KEY, 400, "data: URL"),
        ("over the context", {**ok, "max_tokens": 100_000}, KEY, 400, "context"),
        ("unknown model", {**ok, "model": "gpt-4o"}, KEY, 404, "does not exist"),
        ("temperature out of range", {**ok, "temperature": 3}, KEY, 400, "temperature"),
        ("top_p out of range", {**ok, "top_p": 0}, KEY, 400, "top_p"),
        ("max_tokens zero", {**ok, "max_tokens": 0}, KEY, 400, "max_tokens"),
        ("negative seed", {**ok, "seed": -1}, KEY, 400, "seed"),
        ("n > 1", {**ok, "n": 2}, KEY, 400, "n"),
        ("too many stops", {**ok, "stop": ["a", "b", "c", "d", "e"]}, KEY, 400, "stop"),
        ("a tool message", {**ok, "messages": ok["messages"] + [{"role": "tool", "content": "42"}]},
         KEY, 400, "unsupported message role 'tool'"),
        ("ends with an assistant turn", {**ok, "messages": ok["messages"] + [{"role": "assistant", "content": "a"}]},
         KEY, 400, "end with a user message"),
        ("a system message after a user turn", {**ok, "messages": ok["messages"] + [
            {"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}, KEY, 400, "system messages"),
        ("an image in an assistant turn", {**ok, "messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": user("a", good_url)[0]["content"]},
            {"role": "user", "content": "q"}]}, KEY, 400, "only be in user messages"),
        ("images in two user turns", {**ok, "messages": user("a", good_url) + [{"role": "assistant", "content": "b"}]
                                      + user(question, good_url)}, KEY, 400, "at most 1 image"),
        ("an assistant turn without content", {**ok, "messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": None},
                                                                  {"role": "user", "content": "q"}]},
         KEY, 400, "content is required"),
        ("wrong API key", ok, "wrong-key", 401, "API key"),
        ("missing API key", ok, None, 401, "API key"),
    ]


def test_every_bad_request_gets_its_4xx_and_the_next_good_one_is_answered(server, runtime):
    question, image = sample_pairs([4])[0]
    good = {"model": MODEL, "messages": user(question, data_url(png_bytes(image))), "temperature": 0,
            "max_tokens": 3}
    expected = solo(runtime, question, image, 3)[0]
    for name, body, key, status, needle in bad_requests():
        r = post(server, body, key=key)
        assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and needle in error["message"], f"{name}: {error}"
        after = post(server, good)
        assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == expected, name


def test_openai_client_raises_its_typed_errors(client, server):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=user("hi"), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=100_000)
    from openai import OpenAI

    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()


def test_prometheus_metrics_are_exported_through_ray(server):
    """The replicas' metrics (exit layers, batch sizes, time to first token, tokens) reach Ray's
    Prometheus endpoint; a burst of concurrent requests shows batches of more than one."""
    import ray

    async def burst():
        async with httpx.AsyncClient(timeout=120) as http:
            body = {"model": MODEL, "messages": user("how many stars are there?"), "temperature": 0, "max_tokens": 12}
            return await asyncio.gather(*(http.post(f"{server}/v1/chat/completions", json=body,
                                                    headers={"Authorization": f"Bearer {KEY}"}) for _ in range(24)))

    assert [r.status_code for r in asyncio.run(burst())] == [200] * 24

    # Ray exports asynchronously (and a gauge only after it is set: the replicas re-set the queue
    # depth every second): scrape until every metric has been seen and the batch sizes are in, or
    # the deadline; a metric that never shows up fails
    port = ray.nodes()[0]["MetricsExportPort"]
    names = ("ray_dyvte_exit_layer_bucket", "ray_dyvte_batch_size_sum", "ray_dyvte_time_to_first_token_ms_count",
             "ray_dyvte_generated_tokens_total", "ray_dyvte_queue_depth")
    deadline, seen, text = time.monotonic() + 90, set(), ""

    def complete(text):
        return seen == set(names) and _value(text, "ray_dyvte_batch_size_sum") > \
            _value(text, "ray_dyvte_batch_size_count") > 0 and _value(text, "ray_dyvte_generated_tokens_total") > 32

    while time.monotonic() < deadline:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        except httpx.HTTPError:  # the exporter not answering yet
            time.sleep(1)
            continue
        seen |= {n for n in names if n in text}
        if complete(text):
            break
        time.sleep(1)
    assert seen == set(names), sorted(set(names) - seen)
    assert _value(text, "ray_dyvte_batch_size_sum") > _value(text, "ray_dyvte_batch_size_count") > 0  # mean > 1
    assert _value(text, "ray_dyvte_generated_tokens_total") > 32


def test_a_client_that_drops_its_stream_cancels_its_request(server):
    """The replica notices the disconnect and frees the batch slot: the request ends as
    `cancelled` (Ray's metrics say so) instead of running to its max_tokens."""
    import ray

    body = {"model": MODEL, "messages": user("how many stars are there?"), "max_tokens": 400, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert next(r.iter_lines()).startswith("data: ")
    port = ray.nodes()[0]["MetricsExportPort"]
    deadline, cancelled = time.monotonic() + 30, 0.0
    while time.monotonic() < deadline and not cancelled:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        cancelled = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                        if line.startswith("ray_dyvte_requests_total{") and 'finish_reason="cancelled"' in line)
        time.sleep(1)
    assert cancelled >= 1


def _value(text: str, name: str) -> float:
    """Sum of a metric's samples over its label sets."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------------- the stream format alone


def test_a_stream_that_fails_midway_ends_with_an_error_event():
    from engines.scheduler import Event
    from engines.serve.protocol import sse_stream

    async def events():
        yield Event("token", token_id=5, text="one")
        yield Event("error", error="the server is shutting down", status=503)

    async def collect():
        return [line async for line in sse_stream(events(), "chatcmpl-x", MODEL)]

    lines = asyncio.run(collect())
    assert lines[-1] == "data: [DONE]\n\n"
    payloads = [json.loads(line[6:]) for line in lines[:-1]]
    assert payloads[1]["choices"][0]["delta"] == {"content": "one"}
    assert payloads[-1]["error"]["message"] == "the server is shutting down"
    assert not any(p.get("choices") and p["choices"][0]["finish_reason"] for p in payloads)  # never "finished"


# ---------------------------------------------------------------------- deployment files, CLI


def test_sample_configs_are_valid_serve_configs_for_the_app_builder(vila_package):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from engines.serve.app import ServeSettings, build_app

    serve_config = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    rayservice = yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())
    assert rayservice["kind"] == "RayService"
    # every pod runs a proxy: each container starts with the settings `python -m engines serve` applies
    from engines.serve.app import SERVE_ENV

    cluster = rayservice["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["template"]["spec"]["containers"]:
            assert {e["name"]: e["value"] for e in container.get("env", [])} == SERVE_ENV, container["name"]
    for config in (serve_config, yaml.safe_load(rayservice["spec"]["serveConfigV2"])):
        (app,) = ServeDeploySchema.model_validate(config).applications
        module, _, name = app.import_path.partition(":")
        assert (module, name) == ("engines.serve.app", "build_app")
        args = {**app.args, "package": str(vila_package)}  # the samples' /models path is not here
        assert ServeSettings.from_args(args).replicas == 2
        assert build_app(args) is not None


def test_serve_cli_refuses_bad_flags_in_one_line_before_starting_ray(capsys, tmp_path, vila_package):
    from engines.cli import main

    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"error: package folder not found: {tmp_path / 'nope'}"
    assert main(["serve", str(vila_package), "--max-batch", "0"]) == 2
    assert "max_batch must be at least 1" in capsys.readouterr().err
    assert main(["serve", str(vila_package), "--exit-policy", "sometimes"]) == 2
    assert "bad exit policy" in capsys.readouterr().err
