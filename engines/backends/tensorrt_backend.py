"""TensorRT backend: the package's engines run on torch CUDA tensors, addressed in place.

One execution context per optimisation profile, so switching between prefill before the exit,
prefill after it and decode is choosing a context, not re-selecting a profile. Every context
shares one scratch buffer: all graphs run one after another on the backend's stream, under a lock.
Inputs are bound by their data pointers and outputs preallocated from the shapes the manifest's
axes imply, as the ONNX Runtime backend does, so hidden states and caches never leave the GPU.

Not done: CUDA-graph capture of decode steps. The caches are preallocated and written in place now
(engines/kv_cache.py), but their capacity grows in steps of 64 slots and the batch changes as
requests join and leave, so a captured graph would be needed per (batch, capacity) pair.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from engines.backends.base import PackageBackend
from engines.backends.tensorrt_build import (
    REBUILD_HINT, SKIPPED_ROLES, choose_profile, describe, import_tensorrt, last_errors, machine_identity,
    trt_logger,
)
from engines.core.errors import DyVTEError
from engines.core.manifest import Manifest

ALIGNMENT = 256  # TensorRT wants every tensor address aligned to 256 bytes


def select_build(manifest: Manifest, identity: dict, precision: str | None = None) -> str:
    """The key of the package's engine build made for this machine, or a DyVTEError saying what
    the engines were built for. `precision` None prefers the package's precision."""
    builds = manifest.tensorrt.builds
    want = precision or manifest.precision.name
    if not builds:
        raise DyVTEError(f"this package has no TensorRT engines; build them on this machine "
                         f"({describe(identity)}) with python -m engines build PACKAGE")
    here = {k: b for k, b in builds.items() if b.matches(identity)}
    for key, build in sorted(here.items()):
        if build.precision == want:
            return key
    if precision is None and len(here) == 1:
        return next(iter(here))
    found = "; ".join(describe(b.identity(), b.precision) for _, b in sorted(builds.items()))
    raise DyVTEError(f"engines were built for {found}, this machine is {describe(identity, want)}; {REBUILD_HINT}")


def bind_axes(specs, shapes: dict[str, tuple]) -> dict[str, int]:
    """Sizes of the symbolic axes given the inputs' shapes; a DyVTEError when inputs disagree."""
    sizes: dict[str, int] = {}
    for spec in specs:
        shape = shapes.get(spec.name)
        if shape is None:
            raise DyVTEError(f"missing input {spec.name}")
        if len(shape) != len(spec.shape):
            raise DyVTEError(f"input {spec.name} has shape {tuple(shape)}, expected rank {len(spec.shape)}")
        for want, got in zip(spec.shape, shape):
            if isinstance(want, int):
                if want != got:
                    raise DyVTEError(f"input {spec.name} has shape {tuple(shape)}, expected {list(spec.shape)}")
            elif sizes.setdefault(want, int(got)) != got:
                raise DyVTEError(f"axis {want} is {sizes[want]} in one input and {got} in {spec.name}")
    return sizes


def resolve_shape(spec_shape: list, sizes: dict[str, int]) -> tuple[int, ...]:
    try:
        return tuple(d if isinstance(d, int) else sizes[d] for d in spec_shape)
    except KeyError as exc:
        raise DyVTEError(f"cannot size output axis {exc.args[0]!r} from the inputs") from None


def _torch_dtypes(trt) -> dict:
    names = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
             "INT32": torch.int32, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
    return {getattr(trt.DataType, n): t for n, t in names.items() if hasattr(trt.DataType, n)}


class _Engine:
    """One deserialized engine with a context per profile (needs TensorRT and a GPU)."""

    def __init__(self, trt, runtime, path: Path, graph, profiles: list, stream: torch.cuda.Stream):
        self.name = graph.name
        self.graph = graph
        self.profiles = profiles
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise DyVTEError(f"TensorRT cannot load {path.name} ({_errors()}); {REBUILD_HINT}")
        self.inputs = [t.name for t in graph.inputs]
        self.dynamic = [t.name for t in graph.inputs if any(isinstance(d, str) for d in t.shape)]
        self.outputs = [t.name for t in graph.outputs]
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        if names != set(self.inputs) | set(self.outputs):
            raise DyVTEError(f"engine {path.name} has tensors {sorted(names)}, the manifest lists "
                             f"{sorted(self.inputs + self.outputs)}; {REBUILD_HINT}")
        dtypes = _torch_dtypes(trt)
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        self._check_profiles(path)
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.contexts = []
        for index in range(len(profiles)):
            context = self.engine.create_execution_context(strategy)
            if context is None:
                raise DyVTEError(f"TensorRT cannot create an execution context for {path.name}: {_errors()}")
            if not context.set_optimization_profile_async(index, stream.cuda_stream):
                raise DyVTEError(f"TensorRT cannot select profile {profiles[index].name} of {path.name}: {_errors()}")
            self.contexts.append(context)
        self.checked: set[int] = set()

    def _check_profiles(self, path: Path) -> None:
        """The engine's own profile shapes must be the manifest's: they choose the contexts."""
        if self.engine.num_optimization_profiles != len(self.profiles):
            raise DyVTEError(f"engine {path.name} has {self.engine.num_optimization_profiles} profiles, the "
                             f"manifest {len(self.profiles)}; {REBUILD_HINT}")
        for index, profile in enumerate(self.profiles):
            for name, want in profile.input_shapes(self.graph.inputs).items():
                got = tuple(tuple(d) for d in self.engine.get_tensor_profile_shape(name, index))
                if got != want:
                    raise DyVTEError(f"engine {path.name} profile {profile.name} gives {name} {got}, the manifest "
                                     f"{want}; {REBUILD_HINT}")

    def scratch_bytes(self) -> int:
        sizes = []
        for index in range(len(self.profiles)):
            if hasattr(self.engine, "get_device_memory_size_for_profile_v2"):
                sizes.append(self.engine.get_device_memory_size_for_profile_v2(index))
            elif hasattr(self.engine, "device_memory_size_v2"):
                sizes.append(self.engine.device_memory_size_v2)
            else:
                sizes.append(self.engine.device_memory_size)
        return int(max(sizes))

    def use_scratch(self, buffer: torch.Tensor) -> None:
        for context in self.contexts:
            if hasattr(context, "set_device_memory"):
                context.set_device_memory(buffer.data_ptr(), buffer.numel())
            else:
                context.device_memory = buffer.data_ptr()

    def enqueue(self, index: int, inputs: dict, outputs: dict, stream: torch.cuda.Stream, dummy: int) -> None:
        context = self.contexts[index]
        for name in self.dynamic:
            if not context.set_input_shape(name, tuple(inputs[name].shape)):
                raise DyVTEError(f"TensorRT rejects shape {tuple(inputs[name].shape)} for {self.name}.{name}: "
                                 f"{_errors()}")
        for name, tensor in inputs.items():
            context.set_tensor_address(name, tensor.data_ptr() if tensor.numel() else dummy)  # empty: past at prefill
        for name, tensor in outputs.items():
            context.set_tensor_address(name, tensor.data_ptr())
        if index not in self.checked:  # our output shapes against TensorRT's, once per profile
            for name, tensor in outputs.items():
                got = tuple(context.get_tensor_shape(name))
                if got != tuple(tensor.shape):
                    raise DyVTEError(f"{self.name}: TensorRT gives {name} the shape {got}, the manifest's axes "
                                     f"{tuple(tensor.shape)}")
            self.checked.add(index)
        if not context.execute_async_v3(stream.cuda_stream):
            raise DyVTEError(f"TensorRT failed to run {self.name} (profile {self.profiles[index].name}): {_errors()}")


def _errors() -> str:
    return last_errors()


class TensorRTBackend(PackageBackend):
    def __init__(self, package: Path, manifest: Manifest, precision: str | None = None, identity: dict | None = None):
        trt = import_tensorrt("cannot run the TensorRT backend")
        super().__init__(package, manifest)
        self.key = select_build(manifest, identity or machine_identity(), precision)
        build = manifest.tensorrt.builds[self.key]
        self.limits = build.limits
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self._lock = threading.Lock()
        logger = trt_logger(trt)
        self._runtime = trt.Runtime(logger)
        graphs = {g.name: g for g in manifest.graphs if g.role not in SKIPPED_ROLES}
        entries = manifest.tensorrt.engines_of(self.key)
        missing = set(graphs) - {e.graph for e in entries}
        if missing:
            raise DyVTEError(f"the {self.key} build has no engines for {', '.join(sorted(missing))}; {REBUILD_HINT}")
        self.engines: dict[str, _Engine] = {}
        for e in entries:
            path = manifest.resolve(self.package, e.file)
            if not path.is_file():
                raise DyVTEError(f"engine file missing: {e.file}; {REBUILD_HINT}")
            self.engines[e.graph] = _Engine(trt, self._runtime, path, graphs[e.graph], e.profiles, self.stream)
        scratch = max(engine.scratch_bytes() for engine in self.engines.values())
        self._scratch = torch.empty(max(scratch, ALIGNMENT), dtype=torch.uint8, device=self.device)
        for engine in self.engines.values():
            engine.use_scratch(self._scratch)
        self._dummy = torch.zeros(ALIGNMENT, dtype=torch.uint8, device=self.device)
        self._layers = {}
        self.stream.synchronize()
        # Float inputs/outputs are the engines' own types (fp32 I/O for an fp16 build of an fp32 package).
        self.dtype = self.engines["embed"].dtypes[self.names.inputs_embeds]

    # ------------------------------------------------------------------ binding

    def _prepare(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        tensor = tensor.to(device=self.device, dtype=dtype).contiguous()
        if tensor.numel() and tensor.data_ptr() % ALIGNMENT:
            tensor = tensor.clone()  # a view into another tensor (e.g. its last position)
        return tensor

    def _run(self, name: str, inputs: dict[str, torch.Tensor], extra_axes: dict | None = None,
             phase: str | None = None) -> list[torch.Tensor]:
        """Run engine `name` in the profile of `phase` (decoder segments: the orchestrator's phase),
        or in the first profile that takes the inputs' shapes."""
        engine = self.engines[name]
        tensors = {k: self._prepare(v, engine.dtypes[k]) for k, v in inputs.items()}
        sizes = bind_axes(engine.graph.inputs, {k: tuple(t.shape) for k, t in tensors.items()})
        index = choose_profile(name, engine.profiles, sizes, phase)
        sizes.update(extra_axes or {})
        outputs = {o.name: torch.empty(resolve_shape(o.shape, sizes), dtype=engine.dtypes[o.name],
                                       device=self.device) for o in engine.graph.outputs}
        with self._lock:
            current = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(current)  # inputs were written on the caller's stream
            engine.enqueue(index, tensors, outputs, self.stream, self._dummy.data_ptr())
            current.wait_stream(self.stream)  # and the caller reads the outputs on it
        return [outputs[n] for n in engine.outputs]

    # ------------------------------------------------------------------ Backend protocol

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        (out,) = self._run("vision", {self.names.pixel_values: pixel_values}, {"visual_tokens": self.visual_per_tile})
        return out

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        (out,) = self._run("embed", {self.names.input_ids: input_ids})
        return out

    def run_segment(self, index, hidden, position_ids, key_mask, past, phase):
        n = self.names
        start, end = self.segments[index]
        inputs = {n.hidden_in: hidden, n.position_ids: position_ids, n.attention_mask: key_mask}
        for layer, kv in zip(range(start, end), past):
            inputs.update(zip(n.past(layer), kv))
        out = self._run(self.segment_graphs[index], inputs, phase=phase)
        return out[0], [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(end - start)]

    def router_logits(self, layer: int, hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if layer not in self._layers:
            self._layers[layer] = torch.tensor([layer], dtype=torch.int64, device=self.device)
        n = self.names
        inputs = {n.hidden_in: hidden, n.text_weights: weights, n.router_layer: self._layers[layer]}
        (out,) = self._run("hypernet", inputs)
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        (out,) = self._run("lm_head", {self.names.hidden_in: hidden})
        return out
