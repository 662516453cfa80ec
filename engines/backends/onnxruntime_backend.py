"""ONNX Runtime backend: one InferenceSession per package graph, driven through IO binding.

Inputs are bound straight from the orchestrator's torch tensors and outputs are written into
torch tensors allocated on the same device, so hidden states and KV caches never leave the device
they live on (CPU here; CUDA with the CUDA/TensorRT execution providers).
"""

from __future__ import annotations

import threading
from math import prod
from pathlib import Path

import numpy as np
import torch

from exporter.errors import DyVTEError
from exporter.models.decoder import DecoderShape

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}
NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}
PROVIDER_ALIASES = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def shape_from_manifest(manifest: dict) -> DecoderShape:
    a = manifest["architecture"]
    return DecoderShape(a["num_layers"], a["hidden_size"], a["num_heads"], a["num_kv_heads"], a["head_dim"],
                        a["vocab_size"], a["max_positions"])


class PackageBackend:
    """What every backend of an exported package reads from its manifest."""

    def __init__(self, package: Path, manifest: dict):
        self.package = Path(package)
        self.manifest = manifest
        self.shape = shape_from_manifest(manifest)
        split = manifest["split"]
        self.segments = [tuple(s) for s in split["segments"]]
        self.router_layers = frozenset(split["exit_boundaries"]) if split["has_routers"] else frozenset()
        self.dtype = torch.float16 if manifest["precision"] == "fp16" else torch.float32
        self.visual_per_tile = manifest["architecture"]["visual_tokens_per_tile"]


class OnnxRuntimeBackend(PackageBackend):
    def __init__(self, package: Path, manifest: dict, device: str = "cpu", threads: int | None = None,
                 spin: bool = False):
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
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        # Every graph has its own session and thread pool; threads left spinning after one graph's
        # run steal the cores the next graph needs (measured: 6x slower decode on a tiny model).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.sessions = {}
        self.graphs = {}
        self._local = threading.local()
        for graph in manifest["graphs"]:
            path = self.package / graph["file"]
            try:
                self.sessions[graph["name"]] = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as exc:
                raise DyVTEError(f"onnxruntime cannot load {graph['file']}: {str(exc).splitlines()[0]}") from None
            self.graphs[graph["name"]] = graph
        self._segment_graphs = [g["name"] for g in manifest["graphs"] if g["role"] == "decoder"]
        # one run per generated token instead of one per graph (packages from before it lack it)
        self.fused_decode = "decode" in self.sessions
        self.providers = providers

    # ------------------------------------------------------------------ binding

    def _kv_buffer(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """An output tensor for a decode step's `present.*` cache, from two buffers per name used in
        turn: step t writes into the one step t-2 wrote (dead by then: step t-1 read it and wrote
        the other). A fresh 60 MB allocation per token costs its page faults on every step; the
        monolithic graph gets its outputs from ONNX Runtime's arena. Per thread, so concurrent
        generations never share a buffer."""
        pools = self._local.__dict__.setdefault("kv", {})
        slot = pools.setdefault(name, [[None, None], 0])
        buffers, turn = slot
        numel = prod(shape)
        buf = buffers[turn]
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = buffers[turn] = torch.empty(numel + numel // 4, dtype=dtype, device=self.device)  # room to grow
        slot[1] = 1 - turn
        return buf[:numel].view(shape)

    def _run(self, name: str, inputs: dict[str, torch.Tensor], outputs: dict[str, tuple],
             reuse: tuple[str, ...] = ()) -> list[torch.Tensor]:
        """Run graph `name`; outputs whose names start with a prefix in `reuse` go to
        `_kv_buffer`s (decode only: their previous contents must be dead)."""
        session = self.sessions[name]
        binding = session.io_binding()
        keep = []
        for key, tensor in inputs.items():
            tensor = tensor.contiguous()
            keep.append(tensor)
            binding.bind_input(key, self._ort_device, 0, NUMPY_DTYPES[tensor.dtype], list(tensor.shape),
                               tensor.data_ptr())
        results = []
        for key, (shape, dtype) in outputs.items():
            if reuse and key.startswith(reuse):
                out = self._kv_buffer(key, shape, dtype)
            else:
                out = torch.empty(shape, dtype=dtype, device=self.device)
            results.append(out)
            binding.bind_output(key, self._ort_device, 0, NUMPY_DTYPES[dtype], list(shape), out.data_ptr())
        session.run_with_iobinding(binding)
        return results

    # ------------------------------------------------------------------ Backend protocol

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tiles = pixel_values.shape[0]
        (out,) = self._run("vision", {"pixel_values": pixel_values.to(self.device, self.dtype)},
                           {"visual_embeds": ((tiles, self.visual_per_tile, self.shape.hidden_size), self.dtype)})
        return out

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        b, s = input_ids.shape
        (out,) = self._run("embed", {"input_ids": input_ids.to(self.device, torch.int64)},
                           {"inputs_embeds": ((b, s, self.shape.hidden_size), self.dtype)})
        return out

    def run_segment(self, index, hidden, position_ids, key_mask, past):
        start, end = self.segments[index]
        b, s, h = hidden.shape
        inputs = {"hidden_states": hidden.to(self.dtype), "position_ids": position_ids.to(torch.int64),
                  "attention_mask": key_mask.to(torch.int64)}
        outputs = {"hidden_states_out": ((b, s, h), self.dtype)}
        total = key_mask.shape[1]
        kv_shape = (b, self.shape.num_kv_heads, total, self.shape.head_dim)
        for layer, (k, v) in zip(range(start, end), past):
            inputs[f"past.{layer}.key"], inputs[f"past.{layer}.value"] = k, v
            outputs[f"present.{layer}.key"] = (kv_shape, self.dtype)
            outputs[f"present.{layer}.value"] = (kv_shape, self.dtype)
        out = self._run(self._segment_graphs[index], inputs, outputs)
        return out[0], [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(end - start)]

    def decode_step(self, input_ids, position_ids, masks, past):
        """One token through embedding, every segment and the head, in the fused decode graph.
        `masks[i]` is segment i's key mask (past + the new token); `past[l]` layer l's cache."""
        b = input_ids.shape[0]
        inputs = {"input_ids": input_ids.to(torch.int64), "position_ids": position_ids.to(torch.int64)}
        outputs = {"logits": ((b, 1, self.shape.vocab_size), self.dtype)}
        kv = (self.shape.num_kv_heads, self.shape.head_dim)
        for i, (start, end) in enumerate(self.segments):
            inputs[f"attention_mask.{i}"] = masks[i].to(torch.int64)
            for layer in range(start, end):
                k, v = past[layer]
                inputs[f"past.{layer}.key"], inputs[f"past.{layer}.value"] = k, v
                shape = (b, kv[0], masks[i].shape[1], kv[1])
                outputs[f"present.{layer}.key"] = (shape, self.dtype)
                outputs[f"present.{layer}.value"] = (shape, self.dtype)
        out = self._run("decode", inputs, outputs, reuse=("present.",))
        return out[0], [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.shape.num_layers)]

    def router_logits(self, layer: int, hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        (out,) = self._run("hypernet", {"hidden_states": hidden, "text_weights": weights.to(self.dtype),
                                        "layer": torch.tensor([layer], dtype=torch.int64, device=self.device)},
                           {"router_logits": ((hidden.shape[0], 2), self.dtype)})
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        b, s, _ = hidden.shape
        (out,) = self._run("lm_head", {"hidden_states": hidden.to(self.dtype)},
                           {"logits": ((b, s, self.shape.vocab_size), self.dtype)})
        return out
