"""The ONNX export: every graph against its PyTorch module, the package contract, and its safety."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from engines.load import open_package
from engines.core.errors import DyVTEError
from exporter.graphs import EmbedGraph, HeadGraph, HypernetGraph, SegmentGraph, VisionGraph
from exporter.onnx_export import check_graph
from exporter.package import export_onnx, weights_bytes
from helpers import load_manifest
from exporter.plan import SplitPlan
from exporter.trt_lint import lint_for_tensorrt

ROOT = Path(__file__).resolve().parents[1]


def session(package, name):
    return ort.InferenceSession(str(package / "graphs" / f"{name}.onnx"), providers=["CPUExecutionProvider"])


def run_onnx(package, name, feeds):
    return session(package, name).run(None, {k: v.numpy() for k, v in feeds.items()})


def assert_rel_close(onnx_out, torch_out, rel):
    ref = torch_out.detach().float()
    got = torch.from_numpy(np.asarray(onnx_out)).float()
    assert got.shape == ref.shape
    err = float((got - ref).abs().max()) / max(float(ref.abs().max()), 1e-6)
    assert err <= rel, f"relative error {err:.2e} > {rel}"
    return err


def segment_feeds(model, start, end, batch, seq, past, dtype, gap=0):
    """Inputs of one segment: left padding in sample 0, positions with a gap (post-exit)."""
    s = model.shape
    torch.manual_seed(start * 100 + seq)
    positions = torch.arange(past, past + seq) + gap
    positions[: seq // 2] -= gap
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    mask[0, :2] = 0
    feeds = {"hidden_states": torch.randn(batch, seq, s.hidden_size).to(dtype),
             "position_ids": positions.repeat(batch, 1), "attention_mask": mask}
    past_tensors = []
    for layer in range(start, end):
        for kind in ("key", "value"):
            t = torch.randn(batch, s.num_kv_heads, past, s.head_dim).to(dtype)
            feeds[f"past.{layer}.{kind}"] = t
            past_tensors.append(t)
    return feeds, tuple(past_tensors)


@pytest.mark.parametrize("precision,rel", [("fp32", 1e-4), ("fp16", 1e-2)])
def test_every_graph_matches_its_pytorch_module(request, vila_exit_model, precision, rel):
    package = request.getfixturevalue("vila_package" if precision == "fp32" else "vila_package_fp16")
    model = vila_exit_model
    dtype = torch.float16 if precision == "fp16" else torch.float32
    manifest = load_manifest(package)
    s = model.shape
    visual = manifest["architecture"]["visual_tokens_per_tile"]
    torch.manual_seed(0)
    pixels = torch.randn(3, *manifest["architecture"]["image_shape"])
    (out,) = run_onnx(package, "vision", {"pixel_values": pixels.to(dtype)})
    assert_rel_close(out, VisionGraph(model.vision)(pixels), rel)
    ids = torch.randint(0, s.vocab_size, (2, 9))
    (out,) = run_onnx(package, "embed", {"input_ids": ids})
    assert_rel_close(out, EmbedGraph(model.decoder.embed_tokens)(ids), rel)
    text = 30
    modes = {"pre-exit prefill": (visual + text, 0, 0), "post-exit prefill": (text, 0, visual),
             "pre-exit decode": (1, visual + text, 0), "post-exit decode": (1, text, visual)}
    for start, end in manifest["split"]["segments"]:
        module = SegmentGraph(model.decoder.layers[start:end], model.decoder.rotary_emb)
        for mode, (seq, past, gap) in modes.items():
            feeds, past_tensors = segment_feeds(model, start, end, 2, seq, past, dtype, gap)
            got = run_onnx(package, f"decoder.{start:02d}-{end - 1:02d}", feeds)
            want = module(feeds["hidden_states"].float(), feeds["position_ids"], feeds["attention_mask"],
                          tuple(t.float() for t in past_tensors))
            assert len(got) == len(want) == 1 + 2 * (end - start)
            for g, w in zip(got, want):
                assert_rel_close(g, w, rel)
    hidden = torch.randn(2, 7, s.hidden_size)
    weights = torch.zeros(2, 7)
    weights[0, 2:6] = 0.25  # sample 1: empty text span, the last position stands in
    for layer in (0, s.num_layers - 2):
        (out,) = run_onnx(package, "hypernet", {"hidden_states": hidden.to(dtype), "text_weights": weights.to(dtype),
                                                "layer": torch.tensor([layer])})
        assert_rel_close(out, HypernetGraph(model.routers)(hidden, weights, torch.tensor([layer])), rel)
    (out,) = run_onnx(package, "lm_head", {"hidden_states": hidden.to(dtype)})
    assert_rel_close(out, HeadGraph(model)(hidden), rel)


def test_weights_are_stored_once(tmp_path):
    from exporter.models.vila import Vila

    model = Vila().preset(seed=2, name="small")
    package = export_onnx(model, tmp_path / "small", "fp16", progress=False)
    manifest = load_manifest(package)
    total = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
    params = weights_bytes(model, "fp16")
    assert manifest["weights"]["parameter_bytes"] == params
    assert total <= 1.05 * params, f"package {total} B vs weights {params} B"
    assert (package / "graphs" / "weights.bin").stat().st_size <= params


def test_fp16_package_is_half_the_size(vila_package, vila_package_fp16):
    full = (vila_package / "graphs" / "weights.bin").stat().st_size
    half = (vila_package_fp16 / "graphs" / "weights.bin").stat().st_size
    assert 0.45 * full <= half <= 0.55 * full


def test_fused_decode_graph_shares_the_segments_weights(vila_package):
    """The decode graph is composed from the segments: every external tensor it uses is one the
    segments already wrote (same offset), so it adds no bytes to weights.bin."""
    def offsets(name):
        model = onnx.load(str(vila_package / "graphs" / f"{name}.onnx"), load_external_data=False)
        return {int({e.key: e.value for e in t.external_data}["offset"]) for t in model.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL}

    manifest = load_manifest(vila_package)
    others = set().union(*(offsets(g["name"]) for g in manifest["graphs"] if g["role"] != "decode"))
    assert offsets("decode") and offsets("decode") <= others
    decode = next(g for g in manifest["graphs"] if g["role"] == "decode")
    names = [t["name"] for t in decode["inputs"]]
    assert names[:3] == ["input_ids", "position_ids", "attention_mask.0"]
    assert "attention_mask.3" in names and "past.3.value" in names and names.count("position_ids") == 1
    assert decode["outputs"][0]["name"] == "logits"


def test_tied_weights_are_written_once(tmp_path):
    from exporter.models.vila import Vila

    model = Vila().preset(seed=1)
    model.decoder.lm_head.weight = model.decoder.embed_tokens.weight  # tie them
    package = export_onnx(model, tmp_path / "tied", progress=False)
    embed_bytes = model.decoder.embed_tokens.weight.numel() * 4
    untied = export_onnx(Vila().preset(seed=1), tmp_path / "untied", progress=False)
    size = lambda p: (p / "graphs" / "weights.bin").stat().st_size  # noqa: E731
    assert size(untied) - size(package) >= embed_bytes * 0.99


def test_graphs_pass_checker_shape_inference_and_tensorrt_lint(vila_package):
    for path in sorted((vila_package / "graphs").glob("*.onnx")):
        assert check_graph(path) == [], path.name


def test_axes_are_dynamic_and_named(vila_package):
    model = onnx.load(str(vila_package / "graphs" / "decoder.01-01.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["hidden_states"] == ["batch", "seq", 64]
    assert dims["attention_mask"] == ["batch", "total_seq"]
    assert dims["past.1.key"] == ["batch", 2, "past_seq", 16]
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert outs["new.1.value"] == ["batch", 2, "seq", 16]  # the new tokens only: the runtime owns the cache


def test_lint_flags_what_tensorrt_rejects():
    from onnx import helper

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    nodes = [helper.make_node("Unique", ["x"], ["u"]), helper.make_node("FusedMatMul", ["x", "x"], ["y"],
                                                                        domain="com.microsoft")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 21)])
    problems = lint_for_tensorrt(model)
    assert any("Unique is not supported" in p for p in problems)
    assert any("custom domain 'com.microsoft'" in p for p in problems)
    assert any("opset 21" in p for p in problems)


def test_manifest_describes_every_graph_and_file(vila_package, vila_exit_model):
    manifest = load_manifest(vila_package)
    s = vila_exit_model.shape
    assert manifest["family"] == "vila" and manifest["precision"] == "fp32"
    assert manifest["architecture"]["num_layers"] == s.num_layers
    assert manifest["split"]["exit_boundaries"] == list(range(s.num_layers - 1))
    assert manifest["split"]["segments"] == [[layer, layer + 1] for layer in range(s.num_layers)]
    roles = [g["role"] for g in manifest["graphs"]]
    assert roles == ["vision", "embed"] + ["decoder"] * s.num_layers + ["hypernet", "lm_head", "decode"]
    for graph in manifest["graphs"]:
        sess = session(vila_package, graph["name"])
        assert [i.name for i in sess.get_inputs()] == [t["name"] for t in graph["inputs"]]
        assert [o.name for o in sess.get_outputs()] == [t["name"] for t in graph["outputs"]]
    assert manifest["prompt"]["template"] == "conversation:vicuna_v1"
    assert manifest["special_tokens"]["image_token_id"] == -200
    assert {"torch", "transformers", "onnx", "opset"} <= set(manifest["versions"])
    assert manifest["export"]["peak_rss_mb"] > 0 and manifest["export"]["seconds"] > 0
    files = manifest["files"]
    assert "graphs/weights.bin" in files and "processor/tokenizer/tokenizer.json" in files
    assert all(len(f["sha256"]) == 64 for f in files.values())
    assert manifest["tensorrt"]["engines"] == []


def test_tampered_or_missing_file_is_named_at_load(vila_package, tmp_path):
    copy = Path(shutil.copytree(vila_package, tmp_path / "pkg"))
    weights = copy / "graphs" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DyVTEError, match="graphs/weights.bin does not match its checksum"):
        open_package(copy)
    (copy / "graphs" / "lm_head.onnx").unlink()
    with pytest.raises(DyVTEError, match="package file missing: graphs/lm_head.onnx"):
        open_package(copy)


def test_not_a_package_is_refused(tmp_path):
    with pytest.raises(DyVTEError, match="no manifest.json"):
        open_package(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DyVTEError, match="not a DyVTE export package"):
        open_package(tmp_path)


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    from exporter import package as package_module
    from exporter.models.vila import Vila

    calls = {"n": 0}
    real = package_module.save_graph

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return real(*args)

    monkeypatch.setattr(package_module, "save_graph", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx(Vila().preset(), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_killed_export_leaves_no_loadable_package(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "export.py"), "--model", "vila", "--output", str(out),
                             "--no-validate", "--no-progress"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # kill once graphs are being written
        partial = [p for p in tmp_path.glob(".killed.partial-*") if any((p / "graphs").glob("*.onnx"))]
        if partial:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the export ended before it was killed: {proc.communicate()[1][-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partial, "the export never started writing graphs"
    assert not out.exists()
    assert not (partial[0] / "manifest.json").exists()
    with pytest.raises(DyVTEError, match="package folder not found"):
        open_package(out)


def test_split_plan_from_window_flag_and_calibration():
    plan = SplitPlan.parse("2:4", 8)
    assert plan.boundaries == [2, 3, 4]
    assert plan.segments == [(0, 3), (3, 4), (4, 5), (5, 8)]
    assert SplitPlan.parse(None, 4).segments == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert SplitPlan.parse("none", 4).segments == [(0, 4)]
    calibrated = SplitPlan.from_exit_layers([3, 4, 4, 5, None, 3], 12)
    assert calibrated.window == (3, 5)
    with pytest.raises(DyVTEError, match="outside the model"):
        SplitPlan.parse("2:9", 8)
    with pytest.raises(DyVTEError, match="bad --exit-window"):
        SplitPlan.parse("two", 8)


def test_export_cli_calibrates_the_exit_window(vila_exit_model, vila_exit_checkpoint, tmp_path, capsys):
    """`export.py --exit-window auto`: the window is the one the reference's exits on the samples
    imply, the package is validated (exit code 0) and runs."""
    from conftest import TARGET_EXITS, sample_pairs
    from engines.backends.torch_backend import TorchBackend
    from engines.core.prompt import load_image
    from engines.orchestrator import Runtime
    from engines.policy import GenerationConfig
    from export import main as export_main
    from helpers import write_samples

    checkpoint, routers = vila_exit_checkpoint
    samples = [1, 2, 4]  # exits after layer 1, never, after layer 1
    images, questions = write_samples(tmp_path / "samples", sample_pairs(samples))
    out = tmp_path / "calibrated"
    code = export_main(["--model", "vila", "--checkpoint", str(checkpoint), "--routers", str(routers),
                        "--exit-window", "auto", "--images", str(images), "--prompts", str(questions),
                        "--output", str(out), "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0 and "parity: PASSED" in printed.out
    assert "calibration:" in printed.err and "-> window (1, 1)" in printed.err

    reference = Runtime(TorchBackend(vila_exit_model), vila_exit_model.processor)
    prompts = [reference.prepare(q, load_image(p)) for p, q in zip(sorted(images.iterdir()),
                                                                   questions.read_text().splitlines())]
    config = GenerationConfig(max_new_tokens=4)
    expected = reference.generate(prompts, "dynamic", config)
    exits = [r.exit_layer for r in expected]
    assert exits == [TARGET_EXITS[i] for i in samples]
    window = SplitPlan.from_exit_layers(exits, vila_exit_model.shape.num_layers).window
    assert window == (1, 1) != SplitPlan.full(vila_exit_model.shape.num_layers).window
    manifest = load_manifest(out)
    assert tuple(manifest["split"]["exit_window"]) == window and manifest["split"]["exit_boundaries"] == [1]
    assert manifest["source"]["routers"] == str(routers)
    results = open_package(out).generate(prompts, "dynamic", config)
    assert [r.exit_layer for r in results] == exits
    assert [r.generated_ids for r in results] == [r.generated_ids for r in expected]


def test_windowed_package_without_routers(vila_package_no_routers):
    package, _ = vila_package_no_routers
    manifest = load_manifest(package)
    assert manifest["split"]["segments"] == [[0, 2], [2, 4]]
    assert [g["name"] for g in manifest["graphs"]] == ["vision", "embed", "decoder.00-01", "decoder.02-03", "lm_head",
                                                       "decode"]
    runtime = open_package(package)
    from helpers import random_image

    prompt = runtime.prepare("what color?", random_image(3))
    assert runtime.generate([prompt], "layer:1")[0].exit_layer == 1
    with pytest.raises(DyVTEError, match="no DyVTE routers"):
        runtime.generate([prompt], "dynamic")
    with pytest.raises(DyVTEError, match="cannot exit after layer 2: exits are possible after layers 1"):
        runtime.generate([prompt], "layer:2")


def test_reference_rebuilt_from_the_source_must_have_the_exported_routers(vila_package, vila_exit_model):
    """vila_package's routers were fitted in Python: its recorded source (the preset) rebuilds other
    routers, which would exit elsewhere; that is refused, and passing the model itself works."""
    from engines.core.errors import DyVTEError
    from engines.core.manifest import Manifest
    from exporter.reference import package_reference

    assert Manifest.load(vila_package).source_model().routers_sha256 == vila_exit_model.routers.digest()
    with pytest.raises(DyVTEError, match="attached in Python"):
        package_reference(vila_package)
    assert package_reference(vila_package, model=vila_exit_model).backend.model is vila_exit_model



def test_hypernet_graph_stores_the_routers_stacked_once():
    """Routers of a real-ratio size (hidden 1024: 16 MiB a layer, past the exporter's constant-folding
    limit) reach the hypernet graph as one stacked initializer per weight, gathered by layer, not as
    an in-graph Unsqueeze+Concat of every router that ONNX Runtime would fold into a private copy at load."""
    from exporter.dyvte.router import seeded_routers
    from exporter.graphs import hypernet_spec
    from exporter.onnx_export import trace

    graph = trace(hypernet_spec(seeded_routers(3, 1024, 0)), torch.float32).graph
    weights = {t.name for t in graph.initializer}
    stacking = [n.op_type for n in graph.node if n.op_type in ("Concat", "Unsqueeze") and set(n.input) & weights]
    assert not stacking
    assert sorted(list(t.dims) for t in graph.initializer if len(t.dims) == 3) == [[3, 2, 2048], [3, 2048, 2048]]
