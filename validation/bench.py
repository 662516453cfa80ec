"""`python -m validation bench`: what DyVTE buys, measured side by side in one run.

On a LLaVA-shaped model with random weights (hidden 1024, 12 layers, 576 visual + ~56 text tokens,
the shape of shared/design/ecosystem.md) it measures, with medians over repeats:
plain transformers (prefill, `generate`), transformers with the visual tokens dropped after layer K,
one monolithic ONNX graph of the same decoder in ONNX Runtime (what optimum-onnx would export), and
the DyVTE package in ONNX Runtime through the orchestrator (no exit, exit after K, dynamic). It
prints ratios, and the analytic FLOPs ratio each exit speed-up should approach.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engines.core.precision import get_precision
from engines.policy import GenerationConfig

TEXT_TOKENS = 56


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="bench", help="LLaVA preset to build (default: bench)")
    parser.add_argument("--exit-layer", type=int, default=3, help="K of the static exit (default 3)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument("--workdir", help="keep the exported graphs here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--precisions", default="fp32,int8,int4",
                        help="comma-separated package precisions for the per-precision decode section "
                             "(bandwidth limit and share reached); 'none' to skip it")
    parser.add_argument("--precisions-only", action="store_true",
                        help="run only the per-precision section: each precision's package, transformers' fp32 "
                             "generate and the monolithic fp32 graph in one rotation, and the decode targets table "
                             "(skips the DyVTE exit comparison)")


def _interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, run in rotation (one warm-up round first). A callable that
    returns a float reports its own time (e.g. the runtime's prefill-only timing)."""
    times: dict[str, list[float]] = {key: [] for key in fns}
    for round_ in range(repeats + 1):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            own = fn()
            elapsed = own if isinstance(own, float) else time.perf_counter() - t0
            if round_:
                times[key].append(elapsed)
            time.sleep(0.05)  # let a spinning thread pool go idle before the next contender runs
    return {key: statistics.median(v) for key, v in times.items()}


def _prompt(runtime, num_text: int):
    """One image plus a question padded so the prompt has `num_text` text tokens."""
    from PIL import Image

    image = Image.new("RGB", (336, 336), (90, 140, 200))
    words = ["what", "color", "is", "the", "big", "circle"]
    for n in range(1, 400):
        prompt = runtime.prepare(" ".join((words * 100)[:n]), image)
        if len(prompt.input_ids) - prompt.num_visual >= num_text:
            break
    return prompt


class TransformersBaseline:
    """The same weights through transformers' own Llama forward (the ecosystem's reference figure)."""

    def __init__(self, model, prompt):
        hf = model.native.hf
        self.lm = hf.model.language_model
        self.head = hf.lm_head
        visual = model.encode_images(prompt.pixel_values)
        ids = torch.tensor(prompt.input_ids).clamp(min=0)[None]
        embeds = model.decoder.embed_tokens(ids).detach().clone()
        embeds[0, prompt.visual_span[0]:prompt.visual_span[1]] = visual
        self.embeds = embeds
        self.span = prompt.visual_span

    @torch.no_grad()
    def prefill(self, exit_layer: int | None = None):
        seq = self.embeds.shape[1]
        positions = torch.arange(seq)[None]
        if exit_layer is None:
            out = self.lm(inputs_embeds=self.embeds, position_ids=positions, use_cache=False)
            return self.head(out.last_hidden_state[:, -1:])
        layers = self.lm.layers
        keep = [i for i in range(seq) if not self.span[0] <= i < self.span[1]]
        try:
            self.lm.layers = torch.nn.ModuleList(list(layers)[: exit_layer + 1])
            hidden = self.lm(inputs_embeds=self.embeds, position_ids=positions, use_cache=False,
                             output_hidden_states=True).hidden_states[-2]
            self.lm.layers = torch.nn.ModuleList(list(layers)[exit_layer + 1:])
            out = self.lm(inputs_embeds=hidden[:, keep], position_ids=positions[:, keep],
                          attention_mask=torch.ones(1, len(keep), dtype=torch.long), use_cache=False)
        finally:
            self.lm.layers = layers
        return self.head(out.last_hidden_state[:, -1:])

    @torch.no_grad()
    def generate(self, tokens: int):
        from transformers import LlamaForCausalLM

        if not hasattr(self, "_lm_causal"):
            causal = LlamaForCausalLM(self.lm.config)
            causal.model, causal.lm_head = self.lm, self.head
            self._lm_causal = causal.eval()
        return self._lm_causal.generate(inputs_embeds=self.embeds, max_new_tokens=tokens, min_new_tokens=tokens,
                                        do_sample=False, attention_mask=torch.ones(self.embeds.shape[:2], dtype=torch.long))


class MonolithicBaseline:
    """One ONNX graph with every layer + norm + head, run the usual way (numpy feeds, past/present)."""

    def __init__(self, path: Path, model, embeds: np.ndarray, spin: bool | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if spin is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.shape = model.shape
        self.embeds = embeds
        self.table = model.decoder.embed_tokens.weight.detach().numpy().astype(embeds.dtype)

    def _feeds(self, embeds, positions, mask, past):
        feeds = {"inputs_embeds": embeds, "position_ids": positions, "attention_mask": mask}
        for layer in range(self.shape.num_layers):
            feeds[f"past.{layer}.key"], feeds[f"past.{layer}.value"] = past[layer]
        return feeds

    def _empty(self):
        s = self.shape
        empty = np.zeros((1, s.num_kv_heads, 0, s.head_dim), dtype=self.embeds.dtype)
        return [(empty, empty)] * s.num_layers

    def prefill(self):
        seq = self.embeds.shape[1]
        return self.session.run(None, self._feeds(self.embeds, np.arange(seq, dtype=np.int64)[None],
                                                  np.ones((1, seq), dtype=np.int64), self._empty()))

    def decode(self, tokens: int) -> float:
        """Prefill, then `tokens` greedy steps; returns the seconds of the steps alone."""
        out = self.prefill()
        seq = self.embeds.shape[1]
        t0 = time.perf_counter()
        for step in range(tokens):
            past = [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.shape.num_layers)]
            token = int(out[0][0, -1].argmax())
            out = self.session.run(None, self._feeds(self.table[token][None, None],
                                                     np.array([[seq + step]], dtype=np.int64),
                                                     np.ones((1, seq + step + 1), dtype=np.int64), past))
        return time.perf_counter() - t0


def _export_monolithic(model, mono: Path, precision: str) -> Path:
    from exporter.graphs import monolithic_spec
    from exporter.onnx_export import WeightStore, export_graph, save_graph

    mono.mkdir(parents=True, exist_ok=True)
    store = WeightStore(mono / "weights.bin")
    print("export monolithic baseline graph ...", file=sys.stderr)
    save_graph(export_graph(monolithic_spec(model), get_precision(precision).dtype, store), mono / "monolithic.onnx", store)
    store.close()
    return mono / "monolithic.onnx"


def _export(model, folder: Path, precision: str):
    from exporter.package import export_onnx

    package = export_onnx(model, folder / "dyvte", precision, progress=True)
    return package, _export_monolithic(model, folder / "monolithic", precision)


def run_bench(preset: str = "bench", exit_layer: int = 3, repeats: int = 5, decode_tokens: int = 16,
              precision: str = "fp32", workdir: str | None = None) -> dict:
    from engines.backends.torch_backend import TorchBackend
    from engines.load import open_package
    from engines.orchestrator import Runtime
    from exporter.dyvte.flops import flops_ratio
    from exporter.models.llava import Llava

    torch.manual_seed(0)
    model = Llava().preset(seed=0, name=preset)
    reference = Runtime(TorchBackend(model), model.processor)
    prompt = _prompt(reference, TEXT_TOKENS)
    num_visual, num_text = prompt.num_visual, len(prompt.input_ids) - prompt.num_visual
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    folder = Path(workdir or tmp.name)
    package, mono_path = _export(model, folder, precision)
    runtime = open_package(package, verify=False)
    hf = TransformersBaseline(model, prompt)
    mono = MonolithicBaseline(mono_path, model, hf.embeds.numpy().astype(
        np.float16 if precision == "fp16" else np.float32))

    def orchestrated(policy, tokens):
        return runtime.generate([prompt], policy, GenerationConfig(max_new_tokens=tokens))[0]

    k = exit_layer
    r = {}
    print("measuring ...", file=sys.stderr)
    n = decode_tokens
    # Interleaved: one run of each per round, so the machine's drift hits every contender alike.
    # The monolithic graph is measured with ONNX Runtime's default session options (what optimum's
    # ORTModel gets) and with the package runtime's own options (no spinning between runs).
    mono_same = MonolithicBaseline(mono_path, model, mono.embeds, spin=False)
    prefill = _interleaved({
        "hf_prefill_s": hf.prefill,
        "hf_prefill_exit_s": lambda: hf.prefill(k),
        "mono_prefill_s": mono.prefill,
        "mono_same_options_prefill_s": mono_same.prefill,
        "ort_prefill_none_s": lambda: orchestrated("none", 1).timings_ms["prefill"] / 1e3,
        "ort_prefill_exit_s": lambda: orchestrated(f"layer:{k}", 1).timings_ms["prefill"] / 1e3,
        "ort_prefill_dynamic_s": lambda: orchestrated("dynamic", 1).timings_ms["prefill"] / 1e3,
    }, repeats)
    r.update(prefill)
    r["dynamic_exit_layer"] = orchestrated("dynamic", 1).exit_layer
    # Decode times are the steps alone (no prefill to subtract), except transformers' `generate`,
    # whose prefill is measured again in the same rotation and subtracted.
    decode = _interleaved({
        "hf_generate_s": lambda: hf.generate(n + 1),
        "hf_prefill_s": hf.prefill,
        "mono_decode_s": lambda: mono.decode(n),
        "mono_same_options_decode_s": lambda: mono_same.decode(n),
        "ort_decode_none_ms_per_token": lambda: orchestrated("none", n + 1).timings_ms["decode"] / n,
        "ort_decode_exit_ms_per_token": lambda: orchestrated(f"layer:{k}", n + 1).timings_ms["decode"] / n,
    }, max(2, repeats // 2))
    r["hf_decode_ms_per_token"] = 1e3 * (decode["hf_generate_s"] - decode["hf_prefill_s"]) / n
    r["mono_decode_ms_per_token"] = 1e3 * decode["mono_decode_s"] / n
    r["mono_same_options_decode_ms_per_token"] = 1e3 * decode["mono_same_options_decode_s"] / n
    r["ort_decode_none_ms_per_token"] = decode["ort_decode_none_ms_per_token"]
    r["ort_decode_exit_ms_per_token"] = decode["ort_decode_exit_ms_per_token"]
    shape = model.shape
    analytic = 1 / flops_ratio(shape, num_text, num_visual, k)
    s = model.shape
    kv_per_token = s.kv_bytes_per_token(get_precision(precision).element_bytes)
    r.update({
        "machine": _machine(),
        "shape": {"layers": s.num_layers, "hidden": s.hidden_size, "visual_tokens": num_visual,
                  "text_tokens": num_text, "precision": precision, "exit_layer": k},
        "analytic_speedup": analytic,
        "hf_exit_speedup": r["hf_prefill_s"] / r["hf_prefill_exit_s"],
        "ort_exit_speedup": r["ort_prefill_none_s"] / r["ort_prefill_exit_s"],
        "ort_dynamic_speedup": r["ort_prefill_none_s"] / r["ort_prefill_dynamic_s"],
        "orchestrated_vs_monolithic_prefill": r["ort_prefill_none_s"] / r["mono_prefill_s"],
        "orchestrated_vs_monolithic_decode": r["ort_decode_none_ms_per_token"] / r["mono_decode_ms_per_token"],
        "exit_decode_vs_monolithic": r["ort_decode_exit_ms_per_token"] / r["mono_decode_ms_per_token"],
        "dyvte_vs_transformers_prefill": r["hf_prefill_s"] / r["ort_prefill_exit_s"],
        "dyvte_vs_transformers_decode": r["hf_decode_ms_per_token"] / r["ort_decode_exit_ms_per_token"],
        "kv_bytes_saved": (s.num_layers - k - 1) * num_visual * kv_per_token,
        "kv_bytes_full": s.num_layers * (num_visual + num_text) * kv_per_token,
    })
    r["hf_exit_efficiency"] = r["hf_exit_speedup"] / analytic
    r["ort_exit_efficiency"] = r["ort_exit_speedup"] / analytic
    if tmp is not None:
        tmp.cleanup()
    return r


def _machine() -> str:
    import os
    import platform

    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} threads {torch.get_num_threads()}"


def table(r: dict) -> str:
    k = r["shape"]["exit_layer"]
    rows = [
        ("prefill, exit after layer %d vs no exit (ONNX Runtime, DyVTE package)" % k,
         f"{r['ort_exit_speedup']:.2f}x", f"{r['ort_exit_efficiency']:.0%} of analytic {r['analytic_speedup']:.2f}x"),
        ("prefill, exit after layer %d vs no exit (plain PyTorch)" % k,
         f"{r['hf_exit_speedup']:.2f}x", f"{r['hf_exit_efficiency']:.0%} of analytic"),
        ("prefill, dynamic (exit after %s) vs no exit (ONNX Runtime)" % r["dynamic_exit_layer"],
         f"{r['ort_dynamic_speedup']:.2f}x", ""),
        ("prefill, orchestrated no-exit / monolithic graph (time ratio)",
         f"{r['orchestrated_vs_monolithic_prefill']:.3f}", f"{r['ort_prefill_none_s']:.3f}s vs {r['mono_prefill_s']:.3f}s"),
        ("decode/token, orchestrated no-exit / monolithic graph (time ratio)",
         f"{r['orchestrated_vs_monolithic_decode']:.3f}",
         f"{r['ort_decode_none_ms_per_token']:.1f} vs {r['mono_decode_ms_per_token']:.1f} ms"),
        ("prefill, orchestrated no-exit / monolithic, same session options",
         f"{r['ort_prefill_none_s'] / r['mono_same_options_prefill_s']:.3f}", f"monolithic {r['mono_same_options_prefill_s']:.3f}s"),
        ("decode/token, orchestrated no-exit / monolithic, same session options",
         f"{r['ort_decode_none_ms_per_token'] / r['mono_same_options_decode_ms_per_token']:.3f}",
         f"monolithic {r['mono_same_options_decode_ms_per_token']:.1f} ms"),
        ("decode/token, after exit / monolithic graph (time ratio)",
         f"{r['exit_decode_vs_monolithic']:.3f}", f"{r['ort_decode_exit_ms_per_token']:.1f} ms"),
        ("prefill, DyVTE (exit %d) in ONNX Runtime vs transformers (speed-up)" % k,
         f"{r['dyvte_vs_transformers_prefill']:.2f}x", f"{r['hf_prefill_s']:.3f}s vs {r['ort_prefill_exit_s']:.3f}s"),
        ("decode/token, DyVTE in ONNX Runtime vs transformers generate (speed-up)",
         f"{r['dyvte_vs_transformers_decode']:.2f}x", f"{r['hf_decode_ms_per_token']:.1f} ms in transformers"),
        ("KV cache saved by the exit", f"{r['kv_bytes_saved'] / 2**20:.1f} MiB",
         f"of {r['kv_bytes_full'] / 2**20:.1f} MiB"),
    ]
    width = max(len(a) for a, _, _ in rows)
    head = (f"DyVTE benchmark: {r['shape']['layers']} layers, hidden {r['shape']['hidden']}, "
            f"{r['shape']['visual_tokens']} visual + {r['shape']['text_tokens']} text tokens, "
            f"{r['shape']['precision']}; {r['machine']}")
    return "\n".join([head] + [f"  {a:<{width}}  {b:>9}  {c}" for a, b, c in rows])


# --------------------------------------------------------------------------- per precision


def read_bandwidth(megabytes: int = 512, repeats: int = 5, threads: int = 1) -> float:
    """The machine's measured read bandwidth in bytes/s: the best of `repeats` sums over one large
    float32 array (one pass over memory, far larger than the caches), split over `threads` threads
    (numpy releases the GIL in the sum). One thread is the issue's definition; the decode graph
    reads its weights with ONNX Runtime's intra-op threads, and two cores of this VM read up to
    twice what one does when the other is idle, so the limit at the runtime's thread count is the
    stricter, more honest one."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for round_ in range(repeats + 1):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            if round_:  # the first pass faults the pages in
                best = min(best, time.perf_counter() - t0)
    return a.nbytes / best


def decode_weight_bytes(package: Path) -> int:
    """Bytes of the weights one decode step reads: every initializer of the decoder segments and
    the LM head, as stored (quantized weights, scales), the embedding table apart (one row read)."""
    import onnx

    from engines.core.manifest import Manifest

    manifest = Manifest.load(package, verify=False)
    total = 0
    for g in manifest.segment_graphs + manifest.by_role("lm_head"):
        model = onnx.load(str(manifest.resolve(package, g.file)), load_external_data=False)
        for t in model.graph.initializer:
            ext = {e.key: e.value for e in t.external_data}
            total += int(ext["length"]) if "length" in ext else len(t.raw_data)
    return total


def _intra_op_threads() -> int:
    """ONNX Runtime's default intra-op thread count on CPU: the physical cores."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_precisions(model, prompt, folder: Path, precisions: list[str], repeats: int, decode_tokens: int,
                   packages: dict | None = None, baselines: bool = True) -> dict:
    """Per precision (a package each, no exit): decode ms/token, prefill, and the decode step's
    bandwidth limit (weights as stored + the KV cache, read once at the measured read bandwidth)
    with the share of it reached. With `baselines`, transformers' fp32 `generate` and the
    monolithic fp32 graph (optimum-onnx's form, ONNX Runtime's default session options, and again
    with the package's) run in the same rotation, so every decode target is a same-run ratio."""
    from engines.load import open_package
    from exporter.package import export_onnx

    packages = dict(packages or {})
    for p in precisions:
        if p not in packages:
            print(f"export {p} package ...", file=sys.stderr)
            packages[p] = export_onnx(model, folder / f"dyvte-{p}", p, progress=True)
    runtimes = {p: open_package(packages[p], verify=False) for p in precisions}
    n = decode_tokens

    def run(p, tokens):
        return runtimes[p].generate([prompt], "none", GenerationConfig(max_new_tokens=tokens))[0]

    prefill_fns = {p: (lambda p=p: run(p, 1).timings_ms["prefill"] / 1e3) for p in precisions}
    decode_fns = {p: (lambda p=p: run(p, n + 1).timings_ms["decode"] / n / 1e3) for p in precisions}
    if baselines:
        hf = TransformersBaseline(model, prompt)
        mono_path = folder / "monolithic" / "monolithic.onnx"
        if not mono_path.exists():
            _export_monolithic(model, mono_path.parent, "fp32")
        mono = MonolithicBaseline(mono_path, model, hf.embeds.numpy())
        mono_same = MonolithicBaseline(mono_path, model, mono.embeds, spin=False)
        prefill_fns.update({"transformers": hf.prefill, "monolithic": mono.prefill})
        # transformers: `generate` minus its prefill, measured in the same rotation
        decode_fns.update({"transformers_generate": lambda: hf.generate(n + 1), "transformers_prefill": hf.prefill,
                           "monolithic": lambda: mono.decode(n) / n,
                           "monolithic_same_options": lambda: mono_same.decode(n) / n})
    threads = _intra_op_threads()
    bandwidth_1 = read_bandwidth()
    bandwidth_n = read_bandwidth(threads=threads)
    prefill = _interleaved(prefill_fns, repeats)
    decode = _interleaved(decode_fns, max(2, repeats // 2))
    # the bandwidth again after the timed runs: the best of both (a neighbour's load lowers it)
    bandwidth_1 = max(bandwidth_1, read_bandwidth())
    bandwidth_n = max(bandwidth_n, read_bandwidth(threads=threads))
    s = model.shape
    seq = len(prompt.input_ids) + n // 2  # mean cache length over the timed steps
    kv = s.num_layers * seq * s.kv_bytes_per_token(4)
    out = {"read_bandwidth_gb_s": bandwidth_1 / 1e9, "read_bandwidth_threads": threads,
           "read_bandwidth_threads_gb_s": bandwidth_n / 1e9, "kv_cache_bytes": kv, "precisions": {}}
    for p in precisions:
        weights = decode_weight_bytes(packages[p])
        ms = 1e3 * decode[p]
        limit_ms = 1e3 * (weights + kv) / bandwidth_1
        limit_n_ms = 1e3 * (weights + kv) / bandwidth_n
        out["precisions"][p] = {"decode_ms_per_token": ms, "prefill_s": prefill[p],
                                "decode_weight_bytes": weights, "limit_ms_per_token": limit_ms,
                                "share_of_limit": limit_ms / ms, "limit_threads_ms_per_token": limit_n_ms,
                                "share_of_limit_threads": limit_n_ms / ms}
    if baselines:
        out["baselines"] = {
            "transformers_decode_ms_per_token": 1e3 * (decode["transformers_generate"] - decode["transformers_prefill"]) / n,
            "transformers_prefill_s": prefill["transformers"],
            "monolithic_decode_ms_per_token": 1e3 * decode["monolithic"],
            "monolithic_same_options_decode_ms_per_token": 1e3 * decode["monolithic_same_options"],
            "monolithic_prefill_s": prefill["monolithic"],
        }
    return out


def precision_table(r: dict) -> str:
    rows = [f"per precision (no exit): read bandwidth {r['read_bandwidth_gb_s']:.1f} GB/s (numpy sum of 512 MiB, "
            f"1 thread), {r['read_bandwidth_threads_gb_s']:.1f} GB/s ({r['read_bandwidth_threads']} threads, "
            f"the runtime's), KV cache {r['kv_cache_bytes'] / 2**20:.1f} MiB"]
    base = r["precisions"].get("fp32")
    for p, v in r["precisions"].items():
        vs = f"  {base['decode_ms_per_token'] / v['decode_ms_per_token']:.2f}x fp32 decode" if base else ""
        rows.append(f"  {p:<5} decode {v['decode_ms_per_token']:6.1f} ms/token  limit {v['limit_ms_per_token']:6.1f} ms "
                    f"/ {v['limit_threads_ms_per_token']:.1f} ms ({v['decode_weight_bytes'] / 2**20:.0f} MiB weights)  "
                    f"reached {v['share_of_limit']:.0%} / {v['share_of_limit_threads']:.0%}  "
                    f"prefill {v['prefill_s']:.3f} s{vs}")
    b = r.get("baselines")
    if b:
        rows.append(f"  transformers fp32 generate {b['transformers_decode_ms_per_token']:.1f} ms/token, "
                    f"prefill {b['transformers_prefill_s']:.3f} s; monolithic fp32 graph "
                    f"{b['monolithic_decode_ms_per_token']:.1f} ms/token (ONNX Runtime defaults), "
                    f"{b['monolithic_same_options_decode_ms_per_token']:.1f} (the package's options), "
                    f"prefill {b['monolithic_prefill_s']:.3f} s")
    return "\n".join(rows)


def decode_targets(r: dict) -> list[dict]:
    """Issue 13's decode/prefill targets from one per-precision run with baselines: the figure,
    the target and whether it is met. Ratios are same-run quotients of the medians."""
    p, b = r["precisions"], r.get("baselines") or {}
    rows = []

    def add(what, value, target, met, detail):
        rows.append({"what": what, "value": value, "target": target, "met": bool(met), "detail": detail})

    if "fp32" in p:
        f = p["fp32"]
        add("fp32 decode, share of its bandwidth limit (1 thread / the runtime's threads)", f["share_of_limit"],
            ">= 87% (within 1.15x)", f["share_of_limit"] >= 1 / 1.15,
            f"{f['decode_ms_per_token']:.1f} ms vs {f['limit_ms_per_token']:.1f} ms; "
            f"{f['share_of_limit_threads']:.0%} of {f['limit_threads_ms_per_token']:.1f} ms")
        if b:
            ratio = f["decode_ms_per_token"] / b["monolithic_decode_ms_per_token"]
            add("fp32 decode without exit / monolithic graph (ONNX Runtime defaults)", ratio, "<= 1.03",
                ratio <= 1.03, f"{f['decode_ms_per_token']:.1f} vs {b['monolithic_decode_ms_per_token']:.1f} ms")
            same = f["decode_ms_per_token"] / b["monolithic_same_options_decode_ms_per_token"]
            add("fp32 decode without exit / monolithic graph (the package's options)", same, "<= 1.03",
                same <= 1.03, f"{b['monolithic_same_options_decode_ms_per_token']:.1f} ms")
    if "int4" in p and b:
        i4 = p["int4"]["decode_ms_per_token"]
        x = b["transformers_decode_ms_per_token"] / i4
        add("int4 decode speed-up over transformers' fp32 generate", x, ">= 4x", x >= 4,
            f"{i4:.1f} vs {b['transformers_decode_ms_per_token']:.1f} ms")
        x = b["monolithic_decode_ms_per_token"] / i4
        add("int4 decode speed-up over the monolithic fp32 graph", x, ">= 3x", x >= 3,
            f"{i4:.1f} vs {b['monolithic_decode_ms_per_token']:.1f} ms")
    for q in ("int8", "int4"):
        if q in p and "fp32" in p:
            ratio = p[q]["prefill_s"] / p["fp32"]["prefill_s"]
            add(f"prefill {q} / fp32 (time ratio)", ratio, "<= 1.00", ratio <= 1.0,
                f"{p[q]['prefill_s']:.3f} vs {p['fp32']['prefill_s']:.3f} s")
    return rows


def targets_table(rows: list[dict]) -> str:
    width = max((len(x["what"]) for x in rows), default=0)
    out = ["decode targets (issue 13), same run:"]
    for x in rows:
        value = f"{x['value']:.0%}" if "share" in x["what"] else (
            f"{x['value']:.2f}x" if "speed-up" in x["what"] else f"{x['value']:.3f}")
        out.append(f"  {x['what']:<{width}}  {value:>7}  target {x['target']:<22} "
                   f"{'met' if x['met'] else 'NOT met':<7}  {x['detail']}")
    return "\n".join(out)


def run(args) -> int:
    precisions = [] if args.precisions == "none" else [p.strip() for p in args.precisions.split(",") if p.strip()]
    for p in precisions:
        get_precision(p)
    if args.precisions_only:
        from engines.backends.torch_backend import TorchBackend
        from engines.orchestrator import Runtime
        from exporter.models.llava import Llava

        torch.manual_seed(0)
        model = Llava().preset(seed=0, name=args.preset)
        prompt = _prompt(Runtime(TorchBackend(model), model.processor), TEXT_TOKENS)
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            r = {"machine": _machine(), "per_precision": run_precisions(
                model, prompt, Path(tmp), precisions, args.repeats, args.decode_tokens)}
        print(precision_table(r["per_precision"]))
        r["targets"] = decode_targets(r["per_precision"])
        print(targets_table(r["targets"]))
    else:
        r = run_bench(args.preset, args.exit_layer, args.repeats, args.decode_tokens, args.precision, args.workdir)
        print(table(r))
        if precisions:
            from exporter.models.llava import Llava
            from engines.backends.torch_backend import TorchBackend
            from engines.orchestrator import Runtime

            torch.manual_seed(0)
            model = Llava().preset(seed=0, name=args.preset)
            prompt = _prompt(Runtime(TorchBackend(model), model.processor), TEXT_TOKENS)
            with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
                r["per_precision"] = run_precisions(model, prompt, Path(tmp), precisions, args.repeats,
                                                    args.decode_tokens)
            print(precision_table(r["per_precision"]))
            r["targets"] = decode_targets(r["per_precision"])
            print(targets_table(r["targets"]))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0
