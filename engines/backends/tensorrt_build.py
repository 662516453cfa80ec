"""Building TensorRT engines from a package's ONNX graphs (needs an NVIDIA GPU and TensorRT 10+).

One engine per graph. A decoder segment's engine holds three optimisation profiles over one copy
of its weights: prefill before the exit (image + text), prefill after it (text only) and decode
(one token on a cache), so each mode runs kernels tuned for its shapes. An engine only runs on the
GPU model and TensorRT version it was built with: engines go to `engines/<key>/<graph>.plan`, and
the manifest's `tensorrt` slot records the key, every profile's axis ranges and each file's sha256.

Everything here except `build_engines` and its helpers marked "needs TensorRT" is plain Python on
manifests, so the profile and cache-key logic is tested without a GPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engines.backends.base import PHASES
from engines.core.errors import DyVTEError
from engines.core.manifest import (
    EngineBuild, EngineEntry, FileInfo, GraphEntry, Limits, Manifest, Profile, TensorRTSection, sha256_file,
)

DEFAULT_MAX_BATCH = 8  # parity runs its 8 samples as one batch
DEFAULT_MAX_TEXT = 512
DEFAULT_WORKSPACE_GB = 8.0
TYPICAL_TEXT = 64  # text tokens of a typical prompt: the shape profiles are tuned for
MIN_TENSORRT_MAJOR = 10  # int64 inputs, named-tensor execution API
REBUILD_HINT = "rebuild with python -m engines build PACKAGE"
PROFILE_NAMES = PHASES  # a decoder engine has one profile per phase the orchestrator names
# The fused decode graph is ONNX Runtime's: the TensorRT backend decodes segment by segment with each
# segment engine's decode profile (fusing it would need per-segment past-length profiles).
SKIPPED_ROLES = ("decode",)


# ---------------------------------------------------------------- environment


def environment_problem() -> str | None:
    """Why TensorRT cannot run on this machine, or None when it can."""
    import torch

    if not torch.cuda.is_available():
        cuda = torch.version.cuda
        build = "a CPU-only torch build" if cuda is None else f"torch built for CUDA {cuda}"
        return f"no CUDA GPU on this machine (TensorRT needs an NVIDIA GPU and driver; this is {build})"
    try:
        import tensorrt as trt
    except ImportError:
        return "the tensorrt package is not installed (pip install '.[gpu]')"
    except Exception as exc:  # the wheel is there but its CUDA libraries do not load
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"the tensorrt package cannot load its libraries: {detail}"
    major = _major(trt.__version__)
    if major < MIN_TENSORRT_MAJOR:
        return f"TensorRT {trt.__version__} is too old: this tool needs TensorRT {MIN_TENSORRT_MAJOR} or newer"
    return None


def import_tensorrt(doing: str):
    """The tensorrt module, or a DyVTEError saying why it cannot be used for `doing`."""
    problem = environment_problem()
    if problem:
        raise DyVTEError(f"{doing}: {problem}")
    import tensorrt

    return tensorrt


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def machine_identity() -> dict:
    """What an engine is tied to: the GPU model (name + compute capability) and TensorRT's version."""
    import tensorrt as trt
    import torch

    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}",
            "tensorrt": trt.__version__}


def engine_key(identity: dict, precision: str) -> str:
    """Folder name of one engine build: `NVIDIA-H100-80GB-HBM3_sm90_trt10.3.0.26_fp16`."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", identity["gpu"]).strip("-") or "gpu"
    sm = identity["compute_capability"].replace(".", "")
    version = re.sub(r"[^A-Za-z0-9.]+", "-", identity["tensorrt"])
    return f"{gpu}_sm{sm}_trt{version}_{precision}"


def describe(identity: dict, precision: str | None = None) -> str:
    text = (f"{identity.get('gpu', '?')} (compute capability {identity.get('compute_capability', '?')}), "
            f"TensorRT {identity.get('tensorrt', '?')}")
    return f"{text}, {precision}" if precision else text


# ---------------------------------------------------------------- shape limits and profiles


def max_tiles_of(package: Path) -> int:
    """Most tiles one image can become: `crop_to_patches` processors (InternVL) give up to
    `max_patches` tiles plus a thumbnail; every other processor gives one."""
    config_path = Path(package) / "processor" / "image_processor" / "preprocessor_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return 1
    if config.get("crop_to_patches"):
        patches = int(config.get("max_patches") or 1)
        return patches + 1 if patches > 1 else 1
    return 1


def limits_for(manifest: Manifest, max_batch: int, max_text: int, max_tiles: int,
               max_context: int | None = None) -> Limits:
    positions = manifest.shape.max_positions
    context = min(positions, max_context) if max_context else positions
    for name, value in (("max_batch", max_batch), ("max_text", max_text), ("max_tiles", max_tiles),
                        ("context", context)):
        if int(value) < 1:
            raise DyVTEError(f"{name} must be at least 1 (got {value})")
    limits = Limits(int(max_batch), int(max_text), int(max_tiles),
                    int(manifest.architecture.visual_tokens_per_tile), int(context))
    if limits.visual_tokens + 1 > limits.context:
        raise DyVTEError(f"a context of {limits.context} positions cannot hold one image "
                         f"({limits.visual_tokens} visual tokens) and a text token")
    return limits


def _range(lo: int, opt: int, hi: int) -> tuple[int, int, int]:
    return (lo, min(max(opt, lo), hi), hi)


def graph_profiles(graph: GraphEntry, limits: Limits) -> list[Profile]:
    """The optimisation profiles of one package graph (a manifest `GraphEntry`)."""
    L = limits
    batch = _range(1, 1, L.max_batch)
    typical = min(TYPICAL_TEXT, L.max_text)
    role = graph.role
    if role == "vision":
        profiles = [Profile("images", {"tiles": _range(1, L.max_tiles, L.max_batch * L.max_tiles)})]
    elif role == "embed":  # the whole prompt at prefill, one token per decode step (the hot path)
        profiles = [Profile("all", {"batch": batch, "seq": _range(1, 1, L.prefill)})]
    elif role == "hypernet":  # asked at prefill, on the sequence with the image
        profiles = [Profile("prefill", {"batch": batch, "seq": _range(1, L.visual_tokens + typical, L.prefill)})]
    elif role == "lm_head":  # the orchestrator asks for the last position only
        profiles = [Profile("all", {"batch": batch, "seq": _range(1, 1, L.prefill)})]
    elif role == "decoder":
        profiles = _decoder_profiles(L, batch, typical)
    else:
        raise DyVTEError(f"graph {graph.name} has role {role!r}, which has no TensorRT profiles")
    _check_axes(graph, profiles)
    return profiles


def _decoder_profiles(L: Limits, batch, typical: int) -> list[Profile]:
    # total_seq = past_seq + seq must hold at min, opt and max alike: TensorRT checks every one.
    def prefill(name, lo, opt, hi):
        seq = _range(lo, opt, hi)
        return Profile(name, {"batch": batch, "seq": seq, "past_seq": (0, 0, 0), "total_seq": seq})

    past = _range(1, L.visual_tokens + typical, L.context - 1)
    return [
        prefill("pre_exit", L.visual_tokens + 1, L.visual_tokens + typical, L.prefill),
        prefill("post_exit", 1, typical, L.text_only),
        Profile("decode", {"batch": batch, "seq": (1, 1, 1), "past_seq": past,
                           "total_seq": tuple(p + 1 for p in past)}),
    ]


def _check_axes(graph: GraphEntry, profiles: list[Profile]) -> None:
    for spec in graph.inputs:
        for d in spec.shape:
            if isinstance(d, str) and any(d not in p.axes for p in profiles):
                raise DyVTEError(f"graph {graph.name} input {spec.name} has an axis {d!r} that the "
                                 "TensorRT profiles do not cover (a package from another version?)")


def choose_profile(graph_name: str, profiles: list[Profile], sizes: dict, preferred: str | None = None) -> int:
    """Index of the profile for these axis sizes: the preferred one when it takes them, else the
    first that does; a DyVTEError naming the built ranges when none does."""
    order = sorted(range(len(profiles)), key=lambda i: profiles[i].name != preferred)
    for i in order:
        if profiles[i].contains(sizes):
            return i
    asked = ", ".join(f"{k} {v}" for k, v in sizes.items())
    built = "; ".join(p.summary() for p in profiles)
    raise DyVTEError(
        f"the TensorRT engine of {graph_name} takes no input of {asked} (built for {built}): the prompt is "
        "longer, or the batch larger, than the engines were built for; rebuild them with larger limits "
        "(engines.backends.tensorrt_build.build_engines(PACKAGE, max_text=..., max_batch=...))"
    )


# ---------------------------------------------------------------- manifest


def record_engines(package: Path, manifest: Manifest, key: str, build: EngineBuild,
                   entries: list[EngineEntry]) -> Manifest:
    """Put one build into the manifest's `tensorrt` section and `files`, and save it (atomically,
    re-signed). Only engine entries change in `files`: the rest keeps the checksums of the export."""
    package = Path(package)
    slot = manifest.tensorrt
    engines = [e for e in slot.engines if e.key != key and (package / e.file).is_file()] + list(entries)
    builds = {k: b for k, b in {**slot.builds, key: build}.items() if any(e.key == k for e in engines)}
    manifest.tensorrt = TensorRTSection(builds, engines, f"built for {', '.join(sorted(builds))}")
    prefix = f"engines/{key}/"
    files = {rel: info for rel, info in manifest.files.items()
             if not rel.startswith(prefix) and (package / rel).is_file()}
    for e in entries:
        files[e.file] = FileInfo(e.sha256, e.bytes)
    manifest.files = dict(sorted(files.items()))
    manifest.save(package, files=False)
    return manifest


# ---------------------------------------------------------------- building (needs TensorRT)


def resolve_typing(trt, typing: str | None, package_precision: str, precision: str) -> str:
    """`strong`: TensorRT keeps the graph's own types (an fp16 package keeps the float32 islands the
    exporter left in, e.g. RMSNorm's statistics); `weak` lets the FP16 flag lower an fp32 graph.
    TensorRT 11 builds only strongly typed networks (it has no FP16 flag)."""
    weak_possible = hasattr(trt.BuilderFlag, "FP16")
    if typing is None:
        typing = "weak" if precision != package_precision else "strong"
    if typing not in ("strong", "weak"):
        raise DyVTEError(f"unknown network typing {typing!r}; choose strong or weak")
    if typing == "weak" and not weak_possible:
        raise DyVTEError(
            f"TensorRT {trt.__version__} builds strongly typed networks only, so engines keep the graphs' "
            f"precision ({package_precision}); for fp16 engines export an fp16 package "
            "(python export.py --precision fp16)"
        )
    if typing == "strong" and precision != package_precision:
        raise DyVTEError(f"a strongly typed build keeps the package's {package_precision}; "
                         f"{precision} engines need typing='weak'")
    return typing


_LOGGER = None


def trt_logger(trt):
    """One logger for the process (TensorRT expects the same one for every builder and runtime);
    it keeps the latest errors so that DyVTEErrors can quote them."""
    global _LOGGER
    if _LOGGER is None:
        class _Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: list[str] = []
                self.verbose = False

            def log(self, severity, msg):
                if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                    self.errors = (self.errors + [str(msg)])[-20:]
                elif self.verbose and severity == trt.ILogger.WARNING:
                    print(f"tensorrt: {msg}", file=sys.stderr)

        _LOGGER = _Logger()
    return _LOGGER


def _last_errors(logger, count: int = 3) -> str:
    return " | ".join(logger.errors[-count:]) or "no error message from TensorRT"


def last_errors() -> str:
    """The latest errors TensorRT logged in this process (for error messages)."""
    return _last_errors(_LOGGER) if _LOGGER is not None else "no error message from TensorRT"


def _parser_errors(parser) -> str:
    errors = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        try:
            where = f"node {e.node_name() or e.node()} ({e.node_operator()})" if e.node() >= 0 else "graph"
            errors.append(f"{where}: {e.desc()}")
        except AttributeError:
            errors.append(str(e))
    shown = "; ".join(errors[:5])
    return shown + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "") if errors else "no details"


@dataclass
class BuildOptions:
    precision: str
    typing: str
    workspace_bytes: int
    optimization_level: int | None


def device_memory(trt, logger, plan, profiles: list[Profile]) -> dict[str, int]:
    """Scratch (activation) bytes each profile of a serialized engine needs, as TensorRT reports
    them (weights are counted by the engine file's size)."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        return {}
    out = {}
    for index, profile in enumerate(profiles):
        if hasattr(engine, "get_device_memory_size_for_profile_v2"):
            out[profile.name] = int(engine.get_device_memory_size_for_profile_v2(index))
        elif hasattr(engine, "device_memory_size_v2"):
            out[profile.name] = int(engine.device_memory_size_v2)
    return out


def _build_engine(trt, builder, logger, path: Path, graph: GraphEntry, profiles: list[Profile], options: BuildOptions,
                  timing: bytes) -> tuple[object, bytes]:
    """One serialized engine (needs TensorRT). Returns it with the timing cache grown by its build:
    segments of one model share layer shapes, so later segments reuse the first one's timings."""
    flags = 0
    if options.typing == "strong":
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # From the file, not from bytes: the parser finds the external weights next to it.
    if not parser.parse_from_file(str(path)):
        raise DyVTEError(f"TensorRT cannot parse {graph.file}: {_parser_errors(parser)}")
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    if options.typing == "weak" and options.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    if options.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 matmuls would miss fp32 parity by ~1e-3
    if options.optimization_level is not None:
        config.builder_optimization_level = options.optimization_level
    cache = config.create_timing_cache(timing)
    config.set_timing_cache(cache, False)
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.input_shapes(graph.inputs).items():
            tensor = inputs.get(name)
            if tensor is None:
                raise DyVTEError(f"{graph.file} has no input {name!r} although the manifest lists it")
            if tensor.is_shape_tensor:
                raise DyVTEError(f"{graph.file}: input {name} is a shape tensor, "
                                 "which this builder does not support")
            try:
                trt_profile.set_shape(name, lo, opt, hi)
            except RuntimeError as exc:
                raise DyVTEError(f"{graph.file}: TensorRT rejects profile {profile.name} for input {name} "
                                 f"(min {lo}, opt {opt}, max {hi}; graph dims {tuple(tensor.shape)}): {exc}"
                                 ) from None
        if config.add_optimization_profile(trt_profile) < 0:
            raise DyVTEError(f"{graph.file}: TensorRT rejects optimisation profile {profile.summary()}")
    logger.errors = []
    try:
        plan = builder.build_serialized_network(network, config)
    except Exception as exc:  # e.g. out of memory raised through the bindings
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DyVTEError(f"TensorRT could not build the engine of {graph.name}: {detail}") from None
    if plan is None:
        raise DyVTEError(f"TensorRT could not build the engine of {graph.name}: {_last_errors(logger)}")
    return plan, bytes(memoryview(cache.serialize()))


def build_engines(package, max_batch: int = DEFAULT_MAX_BATCH, max_text: int = DEFAULT_MAX_TEXT,
                  precision: str | None = None, workspace_gb: float = DEFAULT_WORKSPACE_GB, *,
                  max_tiles: int | None = None, max_context: int | None = None, typing: str | None = None,
                  optimization_level: int | None = None, progress: bool = True, verify: bool = True,
                  verbose: bool = False) -> list[EngineEntry]:
    """Build one engine per graph of `package` for this GPU and record them in its manifest.

    `precision` defaults to the package's; `precision="fp16"` on an fp32 package lowers it with
    TensorRT's FP16 flag (TensorRT 10 only). Returns the manifest's engine entries of this build."""
    from tqdm import tqdm

    package = Path(package)
    trt = import_tensorrt(f"cannot build TensorRT engines for {package}")
    manifest = Manifest.load(package, verify=verify)
    package_precision = manifest.precision.name
    precision = precision or package_precision
    quant = manifest.quantization
    if quant is not None and not quant.tensorrt:
        raise DyVTEError(f"the {package_precision} package's graphs use ONNX Runtime's {quant.format} operator, which "
                         "TensorRT cannot parse; for TensorRT export --precision int4 (blocked DequantizeLinear), "
                         "fp16 or fp32")
    allowed = ("fp32", "fp16") if quant is None else (package_precision,)  # quantized: built strongly typed
    if precision not in allowed:
        raise DyVTEError(f"unknown precision {precision!r} for this package; choose {' or '.join(allowed)}")
    if package_precision == "fp16" and precision == "fp32":
        raise DyVTEError("an fp16 package cannot give fp32 engines; export it with --precision fp32")
    typing = resolve_typing(trt, typing, package_precision, precision)
    limits = limits_for(manifest, max_batch, max_text, max_tiles or max_tiles_of(package), max_context)
    identity = machine_identity()
    key = engine_key(identity, precision)
    options = BuildOptions(precision, typing, int(workspace_gb * 2**30), optimization_level)
    logger = trt_logger(trt)
    logger.verbose = verbose
    builder = trt.Builder(logger)
    folder = package / "engines"
    tmp = folder / f".{key}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.perf_counter()
    entries, timing = [], b""
    graphs = [g for g in manifest.graphs if g.role not in SKIPPED_ROLES]
    bar = tqdm(graphs, desc="tensorrt", unit="engine", disable=not progress, file=sys.stderr)
    try:
        for graph in bar:
            bar.set_description(f"tensorrt {graph.name}")
            profiles = graph_profiles(graph, limits)
            t0 = time.perf_counter()
            plan, timing = _build_engine(trt, builder, logger, manifest.resolve(package, graph.file), graph,
                                         profiles, options, timing)
            path = tmp / f"{graph.name}.plan"
            with open(path, "wb") as f:
                f.write(memoryview(plan))
            memory = device_memory(trt, logger, plan, profiles)
            del plan
            entries.append(EngineEntry(
                key=key, graph=graph.name, file=f"engines/{key}/{path.name}", sha256=sha256_file(path),
                bytes=path.stat().st_size, profiles=profiles, seconds=round(time.perf_counter() - t0, 2),
                device_memory=memory))
        bar.close()
        final = folder / key
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    build = EngineBuild(identity["gpu"], identity["compute_capability"], identity["tensorrt"], precision, limits,
                        typing, workspace_gb, optimization_level, round(time.perf_counter() - started, 1),
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    record_engines(package, manifest, key, build, entries)
    if progress:
        total = sum(e.bytes for e in entries) / 2**20
        print(f"tensorrt engines written: {folder / key} ({len(entries)} engines, {total:.1f} MiB, "
              f"{build.seconds:.0f} s)", file=sys.stderr)
    return entries
