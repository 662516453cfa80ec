"""`python -m validation export-bench`: export a LLaVA-1.5-7B-shaped model and report peak memory.

The model is built on the meta device (no memory), its vision tower and rotary tables made real,
and every other weight is created only while the graph that holds it is exported, then dropped:
the export streams graph by graph, as it would from a checkpoint too big to hold twice. Weights
are random but deterministic per parameter name, so `materialize_all` can rebuild the very same
model as a PyTorch reference on a machine with the memory for it.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch
from torch import nn

from engines.core.errors import DyVTEError

SHAPES = {"llava-7b": ("llava", "llava-1.5-7b"), "tiny": ("llava", "tiny")}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
PRECISIONS = ("fp32", "fp16", "int8", "int4")


def source_precision(precision: str) -> str:
    """The float precision of the (random) weights a package of `precision` is exported from:
    int8/int4 packages quantize the published fp16 weights."""
    return precision if precision in DTYPES else "fp16"


# family -> preset of the published shape, and the same proportions at 1/4 width
CHECKPOINT_SHAPES = {
    "llava": {"7b": "llava-1.5-7b", "small": "llava-small"},
    "internvl": {"7b": "internvl-8b", "small": "internvl-small"},
    "eagle": {"7b": "eagle-x5-7b", "small": "eagle-small"},
    "vila": {"7b": "vila1.5-7b", "small": "vila-small"},
}
SHARD_BYTES = 2**30


def add_arguments(parser) -> None:
    parser.add_argument("--family", choices=sorted(CHECKPOINT_SHAPES),
                        help="write a random checkpoint of this family's published shape and layout, export it "
                             "streamed with validation (default mode: llava)")
    parser.add_argument("--size", default="7b", choices=("7b", "small"), help="with --family: the shape")
    parser.add_argument("--workdir", help="with --family: folder for the checkpoint and package "
                        "(default /tmp/export-bench-FAMILY; deleted afterwards unless --keep)")
    parser.add_argument("--keep", action="store_true", help="with --family: keep the checkpoint and package")
    parser.add_argument("--samples", type=int, default=1, help="with --family: validation samples")
    parser.add_argument("--no-validate", action="store_true", help="with --family: export only")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="no checkpoint: a meta-device model of this shape")
    parser.add_argument("--output", default="exports/llava-7b-random", help="with --shape: package directory")
    parser.add_argument("--precision", default="fp16", choices=PRECISIONS,
                        help="package precision; int8/int4 quantize fp16 random weights (default fp16)")
    parser.add_argument("--quant-block", type=int, help="int8/int4: weights per scale (default int8 32, int4 16)")
    parser.add_argument("--exit-window", help="START:END (default: every layer)")
    parser.add_argument("--json", help="also write the figures to this file")


def _init_tensor(name: str, shape, dtype, seed: int) -> torch.Tensor:
    """Deterministic values for parameter `name`: norms 1, biases 0, other weights N(0, 0.02)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(shape, dtype=dtype)
    if "norm" in name and leaf == "weight":
        return torch.ones(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()) ^ seed)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def tag_parameters(model: nn.Module) -> None:
    """Remember each parameter's name in the full model (graphs see them under other names)."""
    for name, p in model.named_parameters():
        p._dyvte_name = name


def random_weights(seed: int = 0):
    """A `materialize` hook for `export_onnx`: real tensors while a graph exports, meta after."""
    from exporter.streaming import materializer

    return materializer(lambda name, p: _init_tensor(getattr(p, "_dyvte_name", name), p.shape, p.dtype, seed))


def materialize_all(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every meta parameter made real with the same values the streamed export used."""
    from exporter.streaming import swap_parameter

    for name, p in list(model.named_parameters()):
        if p.is_meta:
            swap_parameter(model, name, _init_tensor(getattr(p, "_dyvte_name", name), p.shape, p.dtype, seed), p)
    return model


def skeleton(shape: str = "llava-7b", precision: str = "fp16", seed: int = 0):
    """The model with all decoder/embedding/head/router weights on the meta device."""
    from exporter.dyvte.router import Routers
    from exporter.models import get_family

    family, preset = SHAPES[shape]
    dtype = DTYPES[source_precision(precision)]
    with torch.device("meta"):
        model = get_family(family).preset(seed=seed, name=preset)
        s = model.shape
        model.routers = Routers(s.num_layers, s.hidden_size)
    model.to(dtype)
    tag_parameters(model)
    # Small or buffer-holding parts are made real now: the vision tower (its position ids are a
    # buffer) and the rotary tables.
    materialize_all(model.vision, seed)
    for name, buffer in model.vision.named_buffers():
        if name.endswith("position_ids"):
            owner_name, _, leaf = name.rpartition(".")
            owner = model.vision.get_submodule(owner_name)
            owner.register_buffer(leaf, torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)
    rotary = model.decoder.rotary_emb
    real_rotary = type(rotary)(rotary.config)
    model.decoder.rotary_emb = real_rotary
    return model


def export_random(shape: str = "llava-7b", output: str | Path = "exports/llava-7b-random",
                  precision: str = "fp16", exit_window: str | None = None, seed: int = 0,
                  quant_block: int | None = None) -> Path:
    """Export the random model of `shape` streaming its weights; returns the package path."""
    from exporter.package import export_onnx
    from exporter.plan import SplitPlan

    model = skeleton(shape, precision, seed)
    plan = SplitPlan.parse(exit_window, model.shape.num_layers)
    source = {"family": SHAPES[shape][0], "random_shape": shape, "seed": seed}
    return export_onnx(model, output, precision, plan, materialize=random_weights(seed), source=source,
                       quant_block=quant_block)


# ----------------------------------------------------------------------------- random checkpoints


def _write_layout(family: str, preset: str, folder: Path, precision: str, seed: int = 0) -> dict:
    """The random checkpoint, written in the family's published layout; runs in a child process (its
    memory is the writing's, not the export's). Returns the weight bytes written."""
    from safetensors.torch import save_file

    from exporter.models import get_family

    torch.set_num_threads(1)
    dtype = DTYPES[precision]
    with torch.device("meta"):
        model = get_family(family).preset(seed=seed, name=preset)
    parts = model.native
    parts.save_files(folder)
    total = 0
    pool = _pool(dtype, seed)
    for sub, tensors in parts.published_weights().items():
        target = folder / sub if sub else folder
        target.mkdir(parents=True, exist_ok=True)
        shards, size = [[]], 0
        for key, meta in tensors.items():
            nbytes = meta.numel() * dtype.itemsize
            if shards[-1] and size + nbytes > SHARD_BYTES:
                shards.append([])
                size = 0
            shards[-1].append(key)
            size += nbytes
        weight_map = {}
        for i, keys in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            data = {k: _window(pool, k, tensors[k].shape) for k in keys}
            save_file(data, str(target / name), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in data.values())
            weight_map.update({k: name for k in keys})
            del data
        (target / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(tensors[k].numel() * dtype.itemsize for k in tensors)},
             "weight_map": weight_map}, indent=2))
    return total


POOL_ELEMENTS = 2**28  # the checkpoint writer's random values: one pool, each tensor a window of it


def _pool(dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(POOL_ELEMENTS, generator=generator) * 0.02).to(dtype)


def _window(pool: torch.Tensor, key: str, shape) -> torch.Tensor:
    """Values for checkpoint tensor `key`: norms 1, biases 0, others a window of the pool at an offset
    given by the key (distinct tensors stay distinct, so nothing is stored once by accident)."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(shape, dtype=pool.dtype)
    if "norm" in key and leaf == "weight":
        return torch.ones(shape, dtype=pool.dtype)
    n = 1
    for d in shape:
        n *= d
    start = zlib.crc32(key.encode()) % (POOL_ELEMENTS - min(n, POOL_ELEMENTS - 1))
    if n <= POOL_ELEMENTS - start:
        return pool[start:start + n].reshape(shape).clone()
    return pool.roll(-start).repeat(-(-n // POOL_ELEMENTS))[:n].reshape(shape)


def _child(queue, *args):
    try:
        queue.put(("ok", _write_layout(*args)))
    except BaseException as exc:  # reported to the parent
        queue.put(("error", repr(exc)))


def write_checkpoint(family: str, size: str, folder: Path, precision: str = "fp16") -> int:
    """Write the random checkpoint in a spawned child process; returns its weight bytes."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child, args=(queue, family, CHECKPOINT_SHAPES[family][size], folder, precision))
    child.start()
    status, value = queue.get()
    child.join()
    if status != "ok":
        raise RuntimeError(f"writing the checkpoint failed: {value}")
    return value


def _peak_rss_gib(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 2**20  # kB on Linux


def _stage_peak_gib(reset: bool = False) -> float | None:
    """This process's peak RSS since the last reset (Linux VmHWM; writing 5 to clear_refs resets it)."""
    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
            return None
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 2**20
    except (OSError, StopIteration):
        return None


def run_family(args) -> int:
    """Write, load lazily, export streamed, validate on memory-mapped weights; print the figures."""
    from engines.core.manifest import Manifest
    from exporter.models import load_model
    from exporter.package import export_onnx
    from exporter.plan import SplitPlan
    from exporter.streaming import checkpoint_folders, choose_streaming, stream_weights
    from validation.parity import validate_package

    work = Path(args.workdir or f"/tmp/export-bench-{args.family}")
    checkpoint, output = work / "checkpoint", work / "package"
    shutil.rmtree(work, ignore_errors=True)
    stages = {}
    try:
        start = time.perf_counter()
        weights = write_checkpoint(args.family, args.size, checkpoint, source_precision(args.precision))
        stages["write"] = time.perf_counter() - start
        stream, why = choose_streaming(checkpoint_folders(checkpoint), True)
        start = time.perf_counter()
        model = load_model(args.family, checkpoint, lazy=stream, dtype=DTYPES[source_precision(args.precision)])
        stages["load"] = time.perf_counter() - start
        start = time.perf_counter()
        plan = SplitPlan.parse(args.exit_window, model.shape.num_layers)
        source = {"family": args.family, "checkpoint": str(checkpoint), "routers": None}
        package = export_onnx(model, output, args.precision, plan, progress=False, source=source,
                              materialize=stream_weights, quant_block=args.quant_block)
        stages["export"] = time.perf_counter() - start
        export_rss = _peak_rss_gib()
        print(f"exported in {stages['export']:.0f} s (write {stages['write']:.0f} s, load {stages['load']:.1f} s), "
              f"peak RSS so far {export_rss:.2f} GiB", file=sys.stderr, flush=True)
        if args.no_validate:
            manifest = Manifest.load(package, verify=False)
            print(f"export-bench {CHECKPOINT_SHAPES[args.family][args.size]} ({args.precision}, no validation): "
                  f"checkpoint {weights / 2**30:.2f} GiB, peak RSS {export_rss:.2f} GiB (writing, a child: "
                  f"{_peak_rss_gib(resource.RUSAGE_CHILDREN):.2f} GiB), package {manifest.package_bytes / 2**30:.2f} "
                  f"GiB for {manifest.weights.parameter_bytes / 2**30:.2f} GiB of weights "
                  f"({manifest.package_bytes / manifest.weights.parameter_bytes:.4f}x); seconds: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))
            return 0
        # one report; the peak of each runner's part read as it ends (VmHWM reset in between)
        peaks, marks = {}, [time.perf_counter()]

        def on_stage(name):
            peaks[name] = _stage_peak_gib()
            stages[{"pytorch": "reference"}.get(name, name)] = time.perf_counter() - marks[-1]
            marks.append(time.perf_counter())
            _stage_peak_gib(reset=True)

        _stage_peak_gib(reset=True)
        report = validate_package(package, model=model, count=args.samples, max_new_tokens=2, speed_repeats=0,
                                  backends=("onnxruntime",), progress=False, on_stage=on_stage)
        reference_rss, validate_rss = peaks.get("pytorch"), peaks.get("onnxruntime")
        low = report.data.get("low_memory") or {}
        manifest = Manifest.load(package, verify=False)
        figures = {
            "family": args.family, "shape": CHECKPOINT_SHAPES[args.family][args.size], "precision": args.precision,
            "checkpoint_gib": weights / 2**30,
            "parameters": sum(p.numel() for p in model.parameters()),
            # VmHWM resets lower ru_maxrss too: the whole run's peak is the largest of the parts'
            "peak_rss_gib": max(x for x in (_peak_rss_gib(), export_rss, reference_rss, validate_rss) if x),
            "peak_rss_export_gib": export_rss,
            "peak_rss_reference_gib": reference_rss, "peak_rss_onnxruntime_gib": validate_rss,
            "onnxruntime_graph_by_graph": bool(low.get("on")),
            "peak_rss_write_gib": _peak_rss_gib(resource.RUSAGE_CHILDREN),
            "package_gib": manifest.package_bytes / 2**30,
            "weights_gib": manifest.weights.parameter_bytes / 2**30,
            "parity_passed": report.passed, "stage_seconds": {k: round(v, 1) for k, v in stages.items()},
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"export-bench {figures['shape']} ({args.precision}, {figures['parameters'] / 1e9:.2f}B parameters, "
          f"checkpoint {figures['checkpoint_gib']:.2f} GiB; streaming: {why})\n"
          f"  peak RSS {figures['peak_rss_gib']:.2f} GiB for export + validation "
          f"(export {export_rss:.2f} GiB; the report's PyTorch reference on lazy weights {reference_rss or 0:.2f} GiB; "
          f"its ONNX Runtime side{' graph by graph' if low.get('on') else ''} {validate_rss or 0:.2f} GiB; "
          f"writing the checkpoint, a child, "
          f"{figures['peak_rss_write_gib']:.2f} GiB)\n"
          f"  package {figures['package_gib']:.2f} GiB for {figures['weights_gib']:.2f} GiB of weights "
          f"({figures['package_gib'] / figures['weights_gib']:.4f}x); parity {'PASSED' if report.passed else 'FAILED'}\n"
          f"  seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if report.passed else 1


def stored_bytes_by_role(package: Path) -> dict[str, int]:
    """Bytes of `graphs/weights.bin` per graph role, each stored tensor counted once (at the first
    graph in manifest order that names it): what the package's size is made of."""
    import onnx

    from engines.core.manifest import Manifest

    manifest = Manifest.load(package, verify=False)
    seen: set = set()
    out: dict[str, int] = {}
    for g in manifest.graphs:
        model = onnx.load(str(manifest.resolve(package, g.file)), load_external_data=False)
        for t in model.graph.initializer:
            info = {e.key: e.value for e in t.external_data}
            if "length" not in info:
                continue
            key = (info.get("location"), info.get("offset"), info["length"])
            if key not in seen:
                seen.add(key)
                out[g.role] = out.get(g.role, 0) + int(info["length"])
    return out


def run(args) -> int:
    from engines.core.manifest import Manifest

    if args.shape is None:
        args.family = args.family or "llava"
    if args.family is not None:
        if args.shape is not None:
            raise DyVTEError("give --family (a random checkpoint) or --shape (no checkpoint), not both")
        return run_family(args)
    start = time.perf_counter()
    package = export_random(args.shape, args.output, args.precision, args.exit_window, quant_block=args.quant_block)
    manifest = Manifest.load(package, verify=False)
    size = manifest.package_bytes
    by_role = stored_bytes_by_role(package)
    figures = {
        "shape": args.shape,
        "precision": args.precision,
        "package": str(package),
        "peak_rss_gib": manifest.export.peak_rss_mb / 1024,
        "export_seconds": manifest.export.seconds,
        "wall_seconds": time.perf_counter() - start,
        "package_gib": size / 2**30,
        "weights_gib": manifest.weights.parameter_bytes / 2**30,
        "stored_gib_by_role": {role: b / 2**30 for role, b in by_role.items()},
    }
    print(f"exported {args.shape} ({args.precision}) to {package}\n"
          f"  peak RSS {figures['peak_rss_gib']:.2f} GiB, export {figures['export_seconds']:.0f} s, "
          f"package {figures['package_gib']:.2f} GiB for {figures['weights_gib']:.2f} GiB of weights "
          f"({figures['package_gib'] / figures['weights_gib']:.3f}x)\n"
          f"  weights.bin by graph role (each stored tensor counted once, at its first graph): "
          + ", ".join(f"{role} {gib:.2f} GiB" for role, gib in figures["stored_gib_by_role"].items()),
          file=sys.stdout)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0
