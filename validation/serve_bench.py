"""`python -m validation serve-bench`: the served package under load, side by side.

One Ray instance, one Serve application redeployed per contender: in-flight batching (the
default), one request at a time (`batching: False`), and in-flight batching with the exit off
(`exit_policy: none`). At each concurrency (1, 4, 16, 64 clients) it sends greedy chat requests
with images of the synthetic task and reports requests/s, generated tokens/s and p50/p99 latency;
at concurrency 1 it also reports the HTTP + Ray overhead per request (client latency minus the
runtime's own submit-to-finish time, from the response's `dyvte` object).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

CONTENDERS = {
    "in-flight": {},
    "one-at-a-time": {"batching": False},
    "in-flight, exit off": {"exit_policy": "none"},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--package", help="an exported package (default: --model, exported to a temp dir)")
    parser.add_argument("--model", default="builtin", choices=("builtin", "preset"),
                        help="builtin: the built-in VILA (one-word answers, then end of sequence); preset: the tiny "
                             "seeded VILA preset (random weights: it runs to --max-tokens, decode-heavy)")
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level (at least the level)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per graph in the replica")
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--serve-defaults", action="store_true",
                        help="Ray Serve's own defaults instead of engines.serve.app.SERVE_ENV (the comparison)")
    parser.add_argument("--json", help="also write the results here")


def _png_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _requests(n: int, max_tokens: int, model: str) -> list[dict]:
    from exporter.data.synthetic import labelled_sample

    bodies = []
    for i in range(n):
        sample = labelled_sample("eval", i)[0]
        content = [{"type": "image_url", "image_url": {"url": _png_url(sample.image)}},
                   {"type": "text", "text": sample.question}]
        bodies.append({"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
                       "max_tokens": max_tokens})
    return bodies


async def _load(url: str, bodies: list[dict], concurrency: int) -> dict:
    import asyncio

    import httpx

    latencies, own, tokens, errors = [], [], 0, 0
    queue = list(bodies)

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        async def client():
            nonlocal tokens, errors
            while queue:
                body = queue.pop()
                t0 = time.perf_counter()
                r = await http.post(f"{url}/v1/chat/completions", json=body)
                latencies.append(1e3 * (time.perf_counter() - t0))
                if r.status_code != 200:
                    errors += 1
                    continue
                data = r.json()
                tokens += data["usage"]["completion_tokens"]
                own.append(data["choices"][0]["dyvte"]["total_ms"])

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {
        "concurrency": concurrency, "requests": len(bodies), "errors": errors, "wall_s": wall,
        "requests_per_s": len(bodies) / wall, "tokens_per_s": tokens / wall,
        "p50_ms": statistics.median(latencies), "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "runtime_ms_p50": statistics.median(own) if own else float("nan"),
    }


def server_timing(header: str) -> dict[str, float]:
    """A `Server-Timing` header (`name;dur=ms, ...`) as {name: ms}."""
    out = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            out[name] = float(rest[4:])
    return out


def _overhead(url: str, bodies: list[dict]) -> dict:
    """Concurrency 1, request by request: client latency minus the runtime's own time, and where
    the rest goes (the replica's `Server-Timing`: outside = client latency minus the replica's time)."""
    import httpx

    diffs, own, lat, parts = [], [], [], {}
    with httpx.Client(timeout=300) as http:
        http.post(f"{url}/v1/chat/completions", json=bodies[0])  # connection + warm-up
        health = []
        for _ in range(32):
            t0 = time.perf_counter()
            http.get(f"{url}/health")
            health.append(1e3 * (time.perf_counter() - t0))
        for body in bodies:
            t0 = time.perf_counter()
            r = http.post(f"{url}/v1/chat/completions", json=body)
            ms = 1e3 * (time.perf_counter() - t0)
            total = r.json()["choices"][0]["dyvte"]["total_ms"]
            diffs.append(ms - total)
            own.append(total)
            lat.append(ms)
            timing = server_timing(r.headers.get("server-timing", ""))
            if "replica" in timing:
                timing["outside"] = ms - timing["replica"]
            for name, value in timing.items():
                parts.setdefault(name, []).append(value)
    return {"latency_ms_p50": statistics.median(lat), "runtime_ms_p50": statistics.median(own),
            "overhead_ms_p50": statistics.median(diffs), "overhead_ms_p90": sorted(diffs)[int(0.9 * len(diffs))],
            "health_ms_p50": statistics.median(health),
            "parts_ms_p50": {name: statistics.median(values) for name, values in parts.items()}}


def _batch_sizes(url: str) -> tuple[dict, dict]:
    """The replica's counters (one replica): decode steps per batch size, prefills per request count."""
    import httpx

    health = httpx.get(f"{url}/health", timeout=30).json()
    return ({int(k): v for k, v in health["batch_sizes"].items()},
            {int(k): v for k, v in health["prefill_sizes"].items()})


def _mean_since(now: dict, before: dict) -> float:
    diff = {k: v - before.get(k, 0) for k, v in now.items()}
    n = sum(diff.values())
    return sum(k * v for k, v in diff.items()) / n if n else float("nan")


def engine_only(package: str, levels: list[int], n: int, max_tokens: int, max_batch: int, threads: int) -> dict:
    """The same scheduler without HTTP or Ray: requests/s at each concurrency, in-flight vs one at a
    time, so the engine's own gain is apart from the server's per-request cost."""
    from concurrent.futures import ThreadPoolExecutor

    from engines.load import open_package
    from engines.scheduler import SamplingParams, Scheduler
    from exporter.data.synthetic import labelled_sample

    import torch

    torch.set_num_threads(threads)  # as a replica does (engines.serve.app.DyVTEServer)
    runtime = open_package(package, threads=threads)
    samples = [labelled_sample("eval", i)[0] for i in range(n)]
    prompts = [runtime.prepare(s.question, s.image) for s in samples]
    policy = "dynamic" if runtime.backend.router_layers else "none"
    out = {}
    for name, batching in (("in-flight", True), ("one-at-a-time", False)):
        scheduler = Scheduler(runtime, policy, max_batch=max_batch, max_queue=max(levels) + 8, batching=batching).start()
        try:
            rows = []
            for c in levels:
                todo = prompts[:max(n, c)]
                start = time.perf_counter()
                with ThreadPoolExecutor(c) as pool:
                    list(pool.map(lambda p: scheduler.submit(p, SamplingParams(max_tokens=max_tokens)).result(), todo))
                rows.append(len(todo) / (time.perf_counter() - start))
            out[name] = rows
        finally:
            scheduler.stop()
    return out


def run(args) -> int:
    import asyncio

    import ray
    from ray import serve

    from engines.core.errors import DyVTEError
    from engines.serve.app import apply_serve_env, build_app

    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        package = args.package
        if not package:
            from exporter.models import load_model
            from exporter.models.vila import Vila
            from exporter.package import export_onnx

            model = load_model("vila") if args.model == "builtin" else Vila().preset(seed=11)
            package = str(export_onnx(model, Path(tmp) / "vila", "fp32", progress=False))
        elif not Path(package).is_dir():
            raise DyVTEError(f"package folder not found: {package}")
        engine = engine_only(package, levels, max(args.requests, max(levels)), args.max_tokens, args.max_batch,
                             args.threads)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        env = {} if args.serve_defaults else apply_serve_env()
        print("Ray Serve environment: " + (", ".join(f"{k}={v}" for k, v in env.items()) or "Serve's defaults"),
              flush=True)
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        results: dict[str, list[dict]] = {}
        overhead = {}
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for name, extra in CONTENDERS.items():
                settings = {"package": package, "replicas": 1, "max_batch": args.max_batch,
                            "max_queue": max(levels) + 8, "threads": args.threads, "num_cpus": 1,
                            "model_name": "bench", **extra}
                serve.run(build_app(settings), name="bench", route_prefix="/")
                bodies = _requests(max(args.requests, max(levels)), args.max_tokens, "bench")
                asyncio.run(_load(url, bodies[:8], 4))  # warm-up
                if name == "in-flight":
                    overhead = _overhead(url, bodies[:32])
                results[name] = []
                for c in levels:
                    steps0, prefills0 = _batch_sizes(url)
                    row = asyncio.run(_load(url, bodies[:max(args.requests, c)], c))
                    steps1, prefills1 = _batch_sizes(url)
                    row["mean_batch"] = _mean_since(steps1, steps0)
                    row["mean_prefill"] = _mean_since(prefills1, prefills0)
                    results[name].append(row)
                    print(f"{name:>20} c={c:<3} {row['requests_per_s']:7.1f} req/s {row['tokens_per_s']:8.1f} tok/s "
                          f"p50 {row['p50_ms']:7.1f} ms p99 {row['p99_ms']:7.1f} ms errors {row['errors']} "
                          f"batch {row['mean_batch']:.1f} prefill {row['mean_prefill']:.1f}", flush=True)
                serve.delete("bench")
        finally:
            serve.shutdown()
            ray.shutdown()
    print()
    print(table(results, overhead, levels))
    print()
    print("engine only (the scheduler in-process, no HTTP / Ray), requests/s: " + "; ".join(
        f"c={c}: in-flight {a:.1f}, one at a time {b:.1f} ({a / b:.2f}x)"
        for c, a, b in zip(levels, engine["in-flight"], engine["one-at-a-time"])))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "overhead": overhead, "engine_only": engine},
                                              indent=2))
    return 0


def table(results: dict, overhead: dict, levels: list[int]) -> str:
    lines = ["| concurrency | contender | requests/s | tokens/s | p50 ms | p99 ms | vs one-at-a-time | mean decode batch "
             "| mean prefill batch |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {r["concurrency"]: r["requests_per_s"] for r in results.get("one-at-a-time", [])}
    for i, c in enumerate(levels):
        for name, rows in results.items():
            r = rows[i]
            ratio = r["requests_per_s"] / base[c] if base.get(c) else float("nan")
            lines.append(f"| {c} | {name} | {r['requests_per_s']:.1f} | {r['tokens_per_s']:.1f} | {r['p50_ms']:.1f} | "
                         f"{r['p99_ms']:.1f} | {ratio:.2f}x | {r.get('mean_batch', float('nan')):.1f} | "
                         f"{r.get('mean_prefill', float('nan')):.1f} |")
    if overhead:
        lines.append("")
        lines.append(f"concurrency 1, in-flight: client latency p50 {overhead['latency_ms_p50']:.1f} ms, the runtime's "
                     f"own time p50 {overhead['runtime_ms_p50']:.1f} ms, HTTP + Ray overhead p50 "
                     f"{overhead['overhead_ms_p50']:.1f} ms (p90 {overhead['overhead_ms_p90']:.1f} ms); GET /health "
                     f"{overhead['health_ms_p50']:.1f} ms")
        if overhead.get("parts_ms_p50"):
            lines.append("where it goes, p50 ms (Server-Timing; outside = latency minus the replica's time): " + ", ".join(
                f"{name} {value:.2f}" for name, value in overhead["parts_ms_p50"].items()))
    return "\n".join(lines)
