"""GPU acceptance: TensorRT engines, parity and latency on this machine's GPU, in one run.

    python -m validation.gpu_acceptance --json OUT.json --text OUT.txt [--steps vila,llava-7b] [--quick]

Steps (each timed; one failing does not stop the next):
- `vila`: `python export.py --model vila --backend all` (ONNX export, TensorRT engines, parity of
  ONNX Runtime and TensorRT against PyTorch with latency with and without the exit), read back from
  the package's report;
- `llava-7b`: a LLaVA-1.5-7B-shaped model with random weights exported in fp16
  (`validation.export_bench.export_random`), its engines built, then the same parity and latency.
On a machine without an NVIDIA GPU it writes "skipped: no GPU" and exits 0. Exit status otherwise:
0 all parity passed, 1 a parity check failed, 2 a step could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("vila", "llava-7b")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m validation.gpu_acceptance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="write the figures here (JSON)")
    p.add_argument("--text", required=True, help="write the summary here (text)")
    p.add_argument("--workdir", default=str(ROOT / "exports" / "gpu-acceptance"), help="packages go here")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, from {', '.join(STEPS)}")
    p.add_argument("--quick", action="store_true",
                   help="fit a short GPU lease: 7B parity on TensorRT only, 2 samples, 4 new tokens, 2 repeats")
    p.add_argument("--llava-backends", default="onnxruntime,tensorrt",
                   help="backends compared with PyTorch on the 7B model (ONNX Runtime runs it on the CPU: slow)")
    p.add_argument("--count", type=int, default=4, help="7B parity samples (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--speed-repeats", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-text", type=int, default=512)
    p.add_argument("--optimization-level", type=int, help="TensorRT builder optimisation level (0-5; default 3)")
    p.add_argument("--reference-device", default="cuda", choices=("cuda", "cpu"),
                   help="where the 7B PyTorch reference runs (default cuda)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds allowed to the vila export command")
    return p


# ---------------------------------------------------------------- environment


def nvidia_hardware() -> list[str]:
    """GPUs the driver reports (nvidia-smi -L), or device nodes when nvidia-smi is absent."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
            if out.returncode == 0:
                return [line for line in out.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return sorted(str(p) for p in Path("/dev").glob("nvidia[0-9]*"))


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "nvidia": nvidia_hardware()}
    if env["cuda_available"]:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
    for module in ("tensorrt", "onnxruntime"):
        try:
            env[module] = __import__(module).__version__
        except Exception as exc:  # not installed, or its libraries do not load
            env[module] = None
            env[f"{module}_error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    try:
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception:
        pass
    return env


def gpu_verdict(env: dict) -> tuple[str, str | None]:
    """("run", None), ("skip", why) on a machine without a GPU, or ("error", why) on a GPU
    machine that cannot run the check (CPU-only torch, no tensorrt)."""
    from engines.backends.tensorrt_build import environment_problem

    if not env["cuda_available"]:
        if env["nvidia"]:
            return "error", (f"this machine has an NVIDIA GPU ({env['nvidia'][0]}) but torch {env['torch']} "
                             "cannot use it (a CPU-only build, or a driver mismatch): install a CUDA build of torch")
        return "skip", "no GPU (torch.cuda.is_available() is False and the driver reports no NVIDIA GPU)"
    problem = environment_problem()
    return ("error", problem) if problem else ("run", None)


# ---------------------------------------------------------------- summaries


def parity_figures(report: dict) -> dict:
    """The figures of a parity report worth keeping side by side."""
    out = {"passed": report.get("passed"), "samples": report.get("samples"), "precision": report.get("precision"),
           "reference_exit_layers": (report.get("reference") or {}).get("exit_layers"), "backends": {}}
    for name, b in (report.get("backends") or {}).items():
        if b.get("skipped"):
            out["backends"][name] = {"skipped": b["skipped"]}
            continue
        out["backends"][name] = {k: b.get(k) for k in (
            "passed", "checks", "logits_max_abs_diff", "logits_min_cosine", "exit_layer_agreement",
            "token_agreement", "failed_stages", "exit_layers", "seconds")}
        out["backends"][name]["near_ties"] = len(b.get("near_ties") or [])
    out["speed"] = report.get("speed") or {}
    return out


def engine_figures(manifest) -> dict:
    slot = manifest.tensorrt
    out = {}
    for key, build in slot.builds.items():
        engines = slot.engines_of(key)
        out[key] = {"seconds": build.seconds, "limits": build.limits.to_dict(), "typing": build.typing,
                    "engines": len(engines), "gib": round(sum(e.bytes for e in engines) / 2**30, 3),
                    "device_memory": {e.graph: e.device_memory for e in engines},
                    "slowest": max(((e.graph, e.seconds) for e in engines), key=lambda x: x[1], default=None)}
    return out


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join((text or "").splitlines()[-lines:])


# ---------------------------------------------------------------- steps


def run_streamed(cmd: list[str], timeout: int) -> tuple[int, str]:
    """Run `cmd` in the repository, echoing its output as it comes; (exit status, output)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    lines = []
    try:
        for line in proc.stdout:
            print(f"  | {line}", end="", flush=True)
            lines.append(line)
        returncode = proc.wait()
    finally:
        timer.cancel()
    if returncode < 0 and not timer.is_alive():
        lines.append(f"killed after {timeout} s\n")
    return returncode, "".join(lines)


def step_vila(args, work: Path) -> dict:
    package = work / "vila"
    cmd = [sys.executable, "export.py", "--model", "vila", "--backend", "all", "--output", str(package),
           "--no-progress"]
    t0 = time.perf_counter()
    returncode, output = run_streamed(cmd, args.timeout)
    result = {"command": " ".join(cmd[1:]), "returncode": returncode,
              "seconds": round(time.perf_counter() - t0, 1), "output_tail": _tail(output)}
    report_path = package / "report" / "parity.json"
    if returncode not in (0, 1) or not report_path.is_file():
        result["error"] = f"export.py exited {returncode} without a parity report"
        return result
    from engines.core.manifest import Manifest

    manifest = Manifest.load(package, verify=False)
    result["export_seconds"] = manifest.export.seconds
    result["tensorrt_builds"] = engine_figures(manifest)
    result["parity"] = parity_figures(json.loads(report_path.read_text()))
    return result


def reference_model(shape: str, precision: str, device: str):
    """The random model a package was exported from, for the PyTorch reference: export_random
    streams its weights and keeps none, so it is rebuilt from the same per-name seeds (seed 0).
    None (parity then rebuilds from the manifest) if export_bench cannot do that."""
    from validation import export_bench

    if not (hasattr(export_bench, "skeleton") and hasattr(export_bench, "materialize_all")):
        return None
    model = export_bench.materialize_all(export_bench.skeleton(shape, precision, 0), 0)
    return model.to(device) if device != "cpu" else model


def step_llava(args, work: Path) -> dict:
    import torch

    from engines.backends.tensorrt_build import build_engines
    from validation.export_bench import export_random
    from validation.parity import validate_package

    result: dict = {}
    t0 = time.perf_counter()
    package = Path(export_random(shape="llava-7b", output=work / "llava-7b", precision="fp16"))
    result["export_seconds"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    build_engines(package, max_batch=args.max_batch, max_text=args.max_text,
                  optimization_level=args.optimization_level)
    result["build_seconds"] = round(time.perf_counter() - t0, 1)
    from engines.core.manifest import Manifest

    manifest = Manifest.load(package, verify=False)
    result["tensorrt_builds"] = engine_figures(manifest)
    t0 = time.perf_counter()
    model = reference_model("llava-7b", "fp16", args.reference_device)
    result["reference_seconds"] = round(time.perf_counter() - t0, 1)
    backends = tuple(b for b in args.llava_backends.split(",") if b)
    t0 = time.perf_counter()
    report = validate_package(package, model=model, backends=backends, count=args.count,
                              max_new_tokens=args.max_new_tokens, speed_repeats=args.speed_repeats)
    result["parity_seconds"] = round(time.perf_counter() - t0, 1)
    result["parity"] = parity_figures(report.data)
    result["summary"] = report.summary()
    del model
    torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------- report


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def summary_text(data: dict) -> str:
    env = data.get("environment") or {}
    lines = [f"GPU acceptance: {data['status']}" + (f" ({data['reason']})" if data.get("reason") else "")]
    if env.get("gpu"):
        lines.append(f"  {env['gpu']} (sm {env.get('compute_capability')}, {env.get('gpu_memory_gib')} GiB), torch "
                     f"{env.get('torch')}, TensorRT {env.get('tensorrt')}, onnxruntime {env.get('onnxruntime')}")
    for name, step in (data.get("steps") or {}).items():
        lines.append(f"[{name}] {step.get('status')} in {_fmt(step.get('wall_seconds'), '.0f')} s")
        if step.get("error"):
            lines.append(f"  error: {step['error']}")
        for key, b in (step.get("tensorrt_builds") or {}).items():
            lines.append(f"  engines {key}: {b['engines']} in {_fmt(b['seconds'], '.0f')} s, {b['gib']} GiB, "
                         f"slowest {b['slowest']}")
        parity = step.get("parity") or {}
        for backend, b in (parity.get("backends") or {}).items():
            if "skipped" in b:
                lines.append(f"  {backend:12s} skipped: {b['skipped']}")
                continue
            stages = b.get("failed_stages")
            lines.append(f"  {backend:12s} {'pass' if b['passed'] else 'FAIL'}  logits max|diff| "
                         f"{_fmt(b['logits_max_abs_diff'], '.2e')}  exits {_fmt(b['exit_layer_agreement'], '.0%')}  "
                         f"tokens {_fmt(b['token_agreement'], '.0%')}  near ties {b['near_ties']}"
                         + (f"  stages over threshold: {', '.join(stages)}" if stages else ""))
        speed = parity.get("speed") or {}
        if speed:
            lines.append(f"  latency, exit after layer {speed.get('exit_layer')} "
                         f"({speed.get('visual_tokens')} visual, {speed.get('text_tokens')} text tokens):")
        for runner in ("pytorch", "onnxruntime", "tensorrt"):
            s = speed.get(runner)
            if isinstance(s, dict):
                lines.append(
                    f"    {runner:12s} prefill {_fmt(s.get('prefill_ms_none'))} ms -> "
                    f"{_fmt(s.get('prefill_ms_exit'))} ms "
                    f"(x{_fmt(s.get('prefill_speedup'))}), decode {_fmt(s.get('decode_ms_per_token_none'))} -> "
                    f"{_fmt(s.get('decode_ms_per_token_exit'))} ms/token")
    return "\n".join(lines) + "\n"


def write(args, data: dict, show: bool = True) -> None:
    for path, text in ((args.json, json.dumps(data, indent=2, default=str)), (args.text, summary_text(data))):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    if show:
        print(summary_text(data), end="")
        print(f"figures: {args.json}\nsummary: {args.text}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    unknown = set(steps) - set(STEPS)
    if unknown:
        print(f"error: unknown steps {', '.join(sorted(unknown))}; choose from {', '.join(STEPS)}", file=sys.stderr)
        return 2
    if args.quick:
        args.llava_backends, args.count, args.max_new_tokens, args.speed_repeats = "tensorrt", 2, 4, 2
    started = time.perf_counter()
    env = environment()
    verdict, reason = gpu_verdict(env)
    data = {"status": {"run": "running", "skip": "skipped", "error": "error"}[verdict], "reason": reason,
            "environment": env, "steps": {}}
    if verdict == "skip":
        print(f"skipped: {reason}")
        write(args, data)
        return 0
    if verdict == "error":
        print(f"error: {reason}", file=sys.stderr)
        write(args, data)
        return 2
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    runners = {"vila": step_vila, "llava-7b": step_llava}
    for name in steps:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            step = runners[name](args, work)
        except Exception as exc:  # record and go on: the next step may still run
            step = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        step["wall_seconds"] = round(time.perf_counter() - t0, 1)
        passed = (step.get("parity") or {}).get("passed")
        step["status"] = "error" if step.get("error") else ("passed" if passed else "failed")
        data["steps"][name] = step
        write(args, {**data, "status": "running"}, show=False)  # what is done survives a lease that runs out
        print(f"== {name}: {step['status']} in {step['wall_seconds']:.0f} s", flush=True)
    statuses = [s["status"] for s in data["steps"].values()]
    data["status"] = "error" if "error" in statuses else ("failed" if "failed" in statuses else "passed")
    data["seconds"] = round(time.perf_counter() - started, 1)
    write(args, data)
    return {"passed": 0, "failed": 1, "error": 2}[data["status"]]


if __name__ == "__main__":
    sys.exit(main())
