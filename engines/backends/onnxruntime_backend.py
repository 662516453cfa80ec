"""ONNX Runtime backend: one InferenceSession per package graph, driven through IO binding.

Inputs are bound straight from the orchestrator's torch tensors and outputs are written into
torch tensors allocated on the same device, so hidden states and KV caches never leave the device
they live on (CPU here; CUDA with the CUDA/TensorRT execution providers).

Memory (issue 10): the weights are held once. On CPU, ONNX Runtime memory-maps `weights.bin` for
every session itself (page-aligned external data), so all sessions read the same file-backed
pages; on CUDA, each stored tensor becomes one device OrtValue handed to every session that names
it (`SessionOptions.add_external_initializers`). Measured on CPU, handing OrtValues over a memory
map to a session makes ONNX Runtime 1.32 copy them (595 MiB anonymous for the decode graph at the
bench shape, against 5 MiB when it maps the file itself), so that path (`weights="ortvalues"`) is
the CUDA default only. Prepacking (a private, re-laid-out copy of each MatMul weight per session) is
off for every session but the fused decode graph's: the prefill graphs read the mapped weights (prefill
measured within 1% without prepacking, `python -m validation memory --speed`), while the decode
graph's one-row products run 0.78x the time on packed weights (issue 13), for one packed copy of the
decoder weights (`prepack="none"` drops it). Every run asks ONNX Runtime to
shrink its arena afterwards, so a session's arena does not stay at the high-water mark of the
largest batch it ever ran.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engines.backends.base import PackageBackend
from engines.core.errors import DyVTEError
from engines.core.manifest import Manifest

NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}
PROVIDER_ALIASES = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


_SUB_BYTE = (22, 21)  # onnx.TensorProto.INT4, UINT4


class SharedWeights:
    """One OrtValue per stored tensor of the package's external data, over one memory map per file
    (CPU: no copy; CUDA: one device copy), shared by every session that names it."""

    def __init__(self, folder: Path, device: str):
        self.folder = folder
        self.device = device
        self._maps: dict[str, np.memmap] = {}
        self._values: dict[tuple, object] = {}
        self._keep: list = []  # the arrays the CPU OrtValues point into

    def _map(self, location: str) -> np.memmap:
        if location not in self._maps:
            path = (self.folder / location).resolve()
            if self.folder.resolve() not in path.parents:
                raise DyVTEError(f"graph external data {location!r} lies outside the package")
            self._maps[location] = np.memmap(path, mode="r", dtype=np.uint8)
        return self._maps[location]

    def initializers(self, graph_path: Path) -> tuple[list[str], list]:
        """Names and OrtValues of the externally stored initializers of one graph file."""
        import onnx
        import onnxruntime as ort
        from onnx.helper import tensor_dtype_to_np_dtype

        model = onnx.load(str(graph_path), load_external_data=False)
        names, values = [], []
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL or tensor.data_type in _SUB_BYTE:
                continue  # sub-byte (int4 packages' weights): numpy has no such dtype; the session reads them
            info = {e.key: e.value for e in tensor.external_data}
            offset, length = int(info.get("offset", 0)), int(info["length"])
            dtype = tensor_dtype_to_np_dtype(tensor.data_type)
            key = (info["location"], offset, length, dtype.str, tuple(tensor.dims))
            if key not in self._values:
                raw = self._map(info["location"])[offset:offset + length]
                array = raw.view(dtype).reshape(tuple(tensor.dims))
                if self.device == "cpu":
                    self._keep.append(array)
                    self._values[key] = ort.OrtValue.ortvalue_from_numpy(array)
                else:
                    self._values[key] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0)
            names.append(tensor.name)
            values.append(self._values[key])
        return names, values

    @property
    def nbytes(self) -> int:
        return sum(k[2] for k in self._values)


_ENV_ARENA = False
SESSION_MODES = ("all", "graph-by-graph")
# graph by graph, these stay open: they gather the rows they read (token embeddings, one router's
# weights), so only those pages become resident, and they run between every two segments
RESIDENT = frozenset({"embed", "hypernet"})
PREPACK = ("decode", "none", "prefill", "all")


def _prepacks(setting: str, graph: str) -> bool:
    """Whether the session of `graph` lets ONNX Runtime prepack its MatMul weights."""
    return setting == "all" or (setting == "decode" and graph == "decode") or (
        setting == "prefill" and graph != "decode")


def _register_env_arena(ort) -> None:
    """One CPU arena in ONNX Runtime's environment, for every session that opts in
    (`session.use_env_allocators`): registered once per process."""
    global _ENV_ARENA
    if not _ENV_ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
        _ENV_ARENA = True


class OnnxRuntimeBackend(PackageBackend):
    def __init__(self, package: Path, manifest: Manifest, device: str = "cpu", threads: int | None = None,
                 spin: bool = False, weights: str = "auto", prepack: str = "auto",
                 shrink_arena: bool | None = None, shared_arena: bool | None = None, sessions: str = "all"):
        """`weights`: "mmap" (ONNX Runtime maps weights.bin in every session: one page-cache copy;
        the CPU default), "ortvalues" (one OrtValue per stored tensor, on the session's device, given
        to every session: the CUDA default), "auto";
        `prepack`: which sessions let ONNX Runtime prepack their weights (a private copy each):
        "decode" (the CPU default: only the fused decode graph, one packed copy of the decoder's
        weights, which MLAS' one-row products read faster than the mapped file: decode measured
        0.78x the time at the bench shape), "none" (every session reads the mapped weights only: the
        least memory; the default elsewhere), "prefill" (all but the fused decode graph), "all" (the
        behaviour before issue 10), "auto";
        `shared_arena` (CPU; the CPU default): every session allocates from one process-wide arena
        (ONNX Runtime's environment allocator) instead of its own, so the arena follows the largest
        single run, not the sum over sessions; `shrink_arena` (the default where no arena is shared,
        i.e. CUDA): every run returns its arena's free chunks afterwards (costs prefill ~30% on CPU);
        `sessions`: "all" (every graph's session opened at load and kept) or "graph-by-graph" (the
        low-memory mode of the parity report on large models: a session is opened when its graph
        is first run and closed when another weighty graph is needed, so one graph's weights are
        resident at a time; the embedding and the hyper-network, which read only the rows they
        gather, stay open; the fused decode graph, which holds every weight, is not used: decode
        runs segment by segment). On CPU an fp16 package's MatMul weights become float32 copies at
        session creation (measured: each segment session holds twice its fp16 weight bytes in
        anonymous memory), so all sessions together hold twice the package, four times with the
        fused decode graph; graph by graph, one graph's copy at a time."""
        import onnxruntime as ort

        super().__init__(package, manifest)
        if device not in PROVIDER_ALIASES:
            raise DyVTEError(f"unknown onnxruntime device {device!r}; choose {', '.join(PROVIDER_ALIASES)}")
        available = set(ort.get_available_providers())
        providers = [p for p in PROVIDER_ALIASES[device] if p in available]
        if PROVIDER_ALIASES[device][0] not in available:
            raise DyVTEError(
                f"onnxruntime has no {PROVIDER_ALIASES[device][0]} here (available: {', '.join(sorted(available))}); "
                "install onnxruntime-gpu on a CUDA machine or use --device cpu"
            )
        self.device = torch.device("cuda" if device != "cpu" else "cpu")
        self._ort_device = "cuda" if device != "cpu" else "cpu"
        if prepack == "auto":
            prepack = "decode" if self._ort_device == "cpu" else "none"
        if prepack not in PREPACK:
            raise DyVTEError(f"unknown prepack setting {prepack!r}; choose auto, {', '.join(PREPACK)}")
        if weights == "auto":
            weights = "mmap" if self._ort_device == "cpu" else "ortvalues"
        if weights not in ("mmap", "ortvalues"):
            raise DyVTEError(f"unknown weights setting {weights!r}; choose auto, mmap or ortvalues")
        if shared_arena is None:
            shared_arena = self._ort_device == "cpu"
        shared_arena = shared_arena and self._ort_device == "cpu"
        if shrink_arena is None:
            shrink_arena = not shared_arena
        self.weights = SharedWeights(self.package / "graphs", self._ort_device) if weights == "ortvalues" else None
        if sessions not in SESSION_MODES:
            raise DyVTEError(f"unknown sessions setting {sessions!r}; choose {' or '.join(SESSION_MODES)}")
        self.graph_by_graph = sessions == "graph-by-graph"
        self._ort, self._providers = ort, providers
        self._options = dict(threads=threads, spin=spin, shared_arena=shared_arena, prepack=prepack)
        self.sessions = {}
        for graph in manifest.graphs:
            if not self.graph_by_graph or graph.name in RESIDENT:
                self.sessions[graph.name] = self._open(graph.name)
        self.run_options = ort.RunOptions()
        if shrink_arena:
            arenas = "cpu:0" if device == "cpu" else "cpu:0;gpu:0"
            self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", arenas)
        # one run per generated token instead of one per graph
        self.fused_decode = manifest.has_graph("decode") and not self.graph_by_graph
        self.providers = providers

    def _open(self, name: str):
        """A new InferenceSession for graph `name`, with this backend's options."""
        ort, opts = self._ort, self._options
        graph = self.manifest.graph(name)
        path = self.graph_path(graph)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if opts["threads"]:
            options.intra_op_num_threads = opts["threads"]
        # Every graph has its own session and thread pool; threads left spinning after one graph's
        # run steal the cores the next graph needs (measured: 6x slower decode on a tiny model).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if opts["spin"] else "0")
        if opts["shared_arena"]:
            _register_env_arena(ort)
            options.add_session_config_entry("session.use_env_allocators", "1")
        # quantized packages: MatMulNBits runs on prepacked weights (measured >10x slower without, int4
        # LM head); their packed copies are small
        if not self.manifest.precision.quantized and not _prepacks(opts["prepack"], graph.name):
            options.add_session_config_entry("session.disable_prepacking", "1")
        try:
            if self.weights is not None:
                names, values = self.weights.initializers(path)
                if names:
                    options.add_external_initializers(names, values)
            return ort.InferenceSession(str(path), options, providers=self._providers)
        except DyVTEError:
            raise
        except Exception as exc:
            raise DyVTEError(f"onnxruntime cannot load {graph.file}: {str(exc).splitlines()[0]}") from exc

    def _session(self, name: str):
        """The session of graph `name`; graph by graph, opened now and the other weighty one closed."""
        session = self.sessions.get(name)
        if session is None:
            for other in [n for n in self.sessions if n not in RESIDENT]:
                del self.sessions[other]
            session = self.sessions[name] = self._open(name)
        return session

    def release(self) -> None:
        """Graph by graph: close the sessions opened on demand (the resident ones stay)."""
        if self.graph_by_graph:
            for other in [n for n in self.sessions if n not in RESIDENT]:
                del self.sessions[other]

    # ------------------------------------------------------------------ binding

    def _run(self, name: str, inputs: dict[str, torch.Tensor], outputs: dict[str, tuple]) -> list[torch.Tensor]:
        """Run graph `name` with inputs bound in place and outputs written into new torch tensors."""
        session = self._session(name)
        binding = session.io_binding()
        keep = []
        for key, tensor in inputs.items():
            tensor = tensor.contiguous()
            keep.append(tensor)
            binding.bind_input(key, self._ort_device, 0, NUMPY_DTYPES[tensor.dtype], list(tensor.shape),
                               tensor.data_ptr())
        results = []
        for key, (shape, dtype) in outputs.items():
            out = torch.empty(shape, dtype=dtype, device=self.device)
            results.append(out)
            binding.bind_output(key, self._ort_device, 0, NUMPY_DTYPES[dtype], list(shape), out.data_ptr())
        session.run_with_iobinding(binding, self.run_options)
        return results

    # ------------------------------------------------------------------ Backend protocol

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        n = self.names
        tiles = pixel_values.shape[0]
        (out,) = self._run("vision", {n.pixel_values: pixel_values.to(self.device, self.dtype)},
                           {n.visual_embeds: ((tiles, self.visual_per_tile, self.shape.hidden_size), self.dtype)})
        return out

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = self.names
        b, s = input_ids.shape
        (out,) = self._run("embed", {n.input_ids: input_ids.to(self.device, torch.int64)},
                           {n.inputs_embeds: ((b, s, self.shape.hidden_size), self.dtype)})
        return out

    def run_segment(self, index, hidden, position_ids, key_mask, past, phase):
        n = self.names
        start, end = self.segments[index]
        b, s, h = hidden.shape
        inputs = {n.hidden_in: hidden.to(self.dtype), n.position_ids: position_ids.to(torch.int64),
                  n.attention_mask: key_mask.to(torch.int64)}
        outputs = {n.hidden_out: ((b, s, h), self.dtype)}
        kv_shape = (b, self.shape.num_kv_heads, s, self.shape.head_dim)  # the new tokens' keys/values
        for layer, kv in zip(range(start, end), past):
            inputs.update(zip(n.past(layer), kv))
            outputs.update((name, (kv_shape, self.dtype)) for name in n.new(layer))
        out = self._run(self.segment_graphs[index], inputs, outputs)
        return out[0], [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(end - start)]

    def decode_step(self, input_ids, position_ids, masks, past):
        """One token through embedding, every segment and the head, in the fused decode graph."""
        if not self.fused_decode:
            return super().decode_step(input_ids, position_ids, masks, past)
        n = self.names
        b = input_ids.shape[0]
        inputs = {n.input_ids: input_ids.to(torch.int64), n.position_ids: position_ids.to(torch.int64)}
        outputs = {n.logits: ((b, 1, self.shape.vocab_size), self.dtype)}
        shape = (b, self.shape.num_kv_heads, 1, self.shape.head_dim)  # the new token's keys/values
        for i, (start, end) in enumerate(self.segments):
            inputs[n.mask(i)] = masks[i].to(torch.int64)
            for layer in range(start, end):
                inputs.update(zip(n.past(layer), past[layer]))
                outputs.update((name, (shape, self.dtype)) for name in n.new(layer))
        out = self._run("decode", inputs, outputs)
        return out[0], [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.shape.num_layers)]

    def router_logits(self, layer: int, hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n = self.names
        (out,) = self._run("hypernet", {n.hidden_in: hidden, n.text_weights: weights.to(self.dtype),
                                        n.router_layer: torch.tensor([layer], dtype=torch.int64, device=self.device)},
                           {n.router_logits: ((hidden.shape[0], 2), self.dtype)})
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        n = self.names
        b, s, _ = hidden.shape
        (out,) = self._run("lm_head", {n.hidden_in: hidden.to(self.dtype)},
                           {n.logits: ((b, s, self.shape.vocab_size), self.dtype)})
        return out
