"""`python -m engines serve PACKAGE`: start Ray (or join the cluster at $RAY_ADDRESS), deploy the
application of `engines.serve.app.build_app` and serve until interrupted."""

from __future__ import annotations

import argparse
import os
import time


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve a package: OpenAI-compatible chat endpoint on Ray Serve")
    p.add_argument("package", help="an exported package directory")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="replicas (one loaded runtime each; one per GPU)")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "tensorrt"),
                   help="onnxruntime execution provider")
    p.add_argument("--max-batch", type=int, default=8, help="most requests decoding together in a replica")
    p.add_argument("--max-queue", type=int, default=64, help="most requests waiting per replica (then 429/503)")
    p.add_argument("--token-budget", type=int, help="most prompt + max_tokens positions in a replica's batch")
    p.add_argument("--no-batching", action="store_true", help="one request at a time (a baseline)")
    p.add_argument("--exit-policy", help="dynamic | none | layer:K (default: dynamic if the package has routers)")
    p.add_argument("--api-key", default=os.environ.get("DYVTE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $DYVTE_API_KEY; none: open)")
    p.add_argument("--model-name", help="the model id clients send (default: the package folder's name)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads per graph in a replica (and torch's; default: ONNX Runtime's, torch 1)")
    p.add_argument("--no-fetch", action="store_true", help="refuse http(s) image URLs (data: URLs only)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs reserved per replica")
    p.add_argument("--ray-num-cpus", type=int, help="CPUs of the local Ray instance (when no cluster is given)")
    return p


def settings_of(args) -> dict:
    return {"package": args.package, "backend": args.backend, "device": args.device, "replicas": args.replicas,
            "max_batch": args.max_batch, "max_queue": args.max_queue, "token_budget": args.token_budget,
            "batching": not args.no_batching, "exit_policy": args.exit_policy, "api_key": args.api_key,
            "model_name": args.model_name, "threads": args.threads, "num_cpus": args.num_cpus,
            "allow_fetch": not args.no_fetch}


def serve_package(args) -> int:
    from engines.core.manifest import Manifest
    from engines.policy import ExitPolicy
    from engines.serve.app import ServeSettings, apply_serve_env, build_app

    settings = ServeSettings.from_args(settings_of(args))  # refuse bad flags before Ray starts
    Manifest.load(settings.package, verify=True)  # and a damaged package
    if settings.exit_policy:
        ExitPolicy.parse(settings.exit_policy)
    import ray
    from ray import serve

    if not os.environ.get("RAY_ADDRESS"):  # (a cluster's processes take theirs from `ray start`)
        apply_serve_env()
    ray.init(address=os.environ.get("RAY_ADDRESS"), num_cpus=args.ray_num_cpus, include_dashboard=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(settings_of(args)), name="dyvte", route_prefix="/")
        print(f"serving {settings.model_name!r} on http://{args.host}:{args.port}/v1 "
              f"({settings.replicas} replica(s)); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()
