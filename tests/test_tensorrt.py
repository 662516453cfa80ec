"""TensorRT: profile ranges, engine-cache keys and their refusal, profile choice and the errors of a
machine without TensorRT run anywhere; on a GPU (marked `gpu`), engines built for the tiny VILA
must generate what the PyTorch reference does."""

import json
import shutil
import subprocess
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.backends import tensorrt_backend as backend_module
from engines.backends import tensorrt_build as tb
from engines.backends.tensorrt_backend import TensorRTBackend, bind_axes, resolve_shape, select_build
from engines.cli import main as engines_main
from engines.core.errors import DyVTEError
from engines.core.manifest import EngineBuild, EngineEntry, Manifest, TensorRTSection

ROOT = Path(__file__).resolve().parent.parent
H100 = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt": "10.3.0.26"}
A100 = {"gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "tensorrt": "10.3.0.26"}


@pytest.fixture(scope="module")
def manifest():
    """The (typed) manifest of the tiny VILA's package (every layer a possible exit), without exporting."""
    from engines.core.precision import get_precision
    from exporter.graphs import graph_specs
    from exporter.models.vila import Vila
    from exporter.package import _entry, _image_shape, _manifest
    from exporter.plan import SplitPlan

    model = Vila().preset(seed=11)
    plan = SplitPlan.full(model.shape.num_layers)
    entries = [_entry(spec, "float32", 0.0) for spec in graph_specs(model, plan.segments, _image_shape(model))]
    return _manifest(model, get_precision("fp32"), plan, entries, time.perf_counter())


def graph(manifest, role):
    return manifest.by_role(role)[0]  # decoder: the first segment


# ---------------------------------------------------------------- profiles


def test_decoder_engine_has_pre_exit_post_exit_and_decode_profiles(manifest):
    assert manifest.architecture.visual_tokens_per_tile == 25 and manifest.shape.max_positions == 512
    limits = tb.limits_for(manifest, max_batch=4, max_text=100, max_tiles=1)
    pre, post, decode = tb.graph_profiles(graph(manifest, "decoder"), limits)
    assert (pre.name, post.name, decode.name) == tb.PROFILE_NAMES
    assert pre.axes == {"batch": (1, 1, 4), "seq": (26, 89, 125), "past_seq": (0, 0, 0), "total_seq": (26, 89, 125)}
    assert post.axes == {"batch": (1, 1, 4), "seq": (1, 64, 100), "past_seq": (0, 0, 0), "total_seq": (1, 64, 100)}
    assert decode.axes == {"batch": (1, 1, 4), "seq": (1, 1, 1), "past_seq": (1, 89, 511), "total_seq": (2, 90, 512)}
    for profile in (pre, post, decode):  # TensorRT evaluates min, opt and max: each must be a real shape
        for k in range(3):
            assert profile.axes["total_seq"][k] == profile.axes["past_seq"][k] + profile.axes["seq"][k]
    shapes = decode.input_shapes(graph(manifest, "decoder").inputs)
    assert shapes["hidden_states"] == ((1, 1, 64), (1, 1, 64), (4, 1, 64))
    assert shapes["attention_mask"] == ((1, 2), (1, 90), (4, 512))
    assert shapes["past.0.key"] == ((1, 2, 1, 16), (1, 2, 89, 16), (4, 2, 511, 16))
    assert pre.input_shapes(graph(manifest, "decoder").inputs)["past.0.value"][2] == (4, 2, 0, 16)


def test_profiles_of_vision_embed_hypernet_and_head(manifest):
    limits = tb.limits_for(manifest, max_batch=4, max_text=100, max_tiles=3)
    (vision,) = tb.graph_profiles(graph(manifest, "vision"), limits)
    assert vision.axes == {"tiles": (1, 3, 12)}
    assert vision.input_shapes(graph(manifest, "vision").inputs) == {
        "pixel_values": ((1, 3, 54, 54), (3, 3, 54, 54), (12, 3, 54, 54))}
    (embed,) = tb.graph_profiles(graph(manifest, "embed"), limits)
    assert embed.axes == {"batch": (1, 1, 4), "seq": (1, 1, 175)}  # 3 tiles x 25 + 100 text
    (hyper,) = tb.graph_profiles(graph(manifest, "hypernet"), limits)
    assert hyper.axes == {"batch": (1, 1, 4), "seq": (1, 89, 175)}
    assert "layer" not in hyper.input_shapes(graph(manifest, "hypernet").inputs)  # static [1]
    (head,) = tb.graph_profiles(graph(manifest, "lm_head"), limits)
    assert head.axes == {"batch": (1, 1, 4), "seq": (1, 1, 175)}
    pre, post, _ = tb.graph_profiles(graph(manifest, "decoder"), limits)
    assert pre.axes["seq"] == (26, 89, 175) and post.axes["seq"] == (1, 64, 150)  # text beside a 1-tile image


def test_prefill_is_clamped_to_the_context(manifest):
    limits = tb.limits_for(manifest, max_batch=2, max_text=1000, max_tiles=1)
    assert limits.prefill == 512 and limits.text_only == 487
    pre, post, decode = tb.graph_profiles(graph(manifest, "decoder"), limits)
    assert pre.axes["seq"][2] == 512 and decode.axes["total_seq"][2] == 512
    short = tb.limits_for(manifest, max_batch=2, max_text=100, max_tiles=1, max_context=200)
    assert tb.graph_profiles(graph(manifest, "decoder"), short)[2].axes["past_seq"] == (1, 89, 199)
    with pytest.raises(DyVTEError, match="max_batch must be at least 1"):
        tb.limits_for(manifest, max_batch=0, max_text=100, max_tiles=1)
    with pytest.raises(DyVTEError, match="cannot hold one image"):
        tb.limits_for(manifest, max_batch=1, max_text=100, max_tiles=1, max_context=25)


def test_profile_round_trips_through_the_manifest(manifest):
    limits = tb.limits_for(manifest, max_batch=4, max_text=100, max_tiles=1)
    profiles = tb.graph_profiles(graph(manifest, "decoder"), limits)
    stored = json.loads(json.dumps([p.to_dict() for p in profiles]))
    assert [tb.Profile.from_dict(p) for p in stored] == profiles


def test_max_tiles_from_the_package_image_processor(tmp_path):
    folder = tmp_path / "processor" / "image_processor"
    assert tb.max_tiles_of(tmp_path) == 1  # no processor config: one tile
    folder.mkdir(parents=True)
    config = folder / "preprocessor_config.json"
    config.write_text(json.dumps({"image_processor_type": "SiglipImageProcessor", "size": {"height": 54}}))
    assert tb.max_tiles_of(tmp_path) == 1
    config.write_text(json.dumps({"crop_to_patches": True, "max_patches": 4}))
    assert tb.max_tiles_of(tmp_path) == 5  # 4 crops + the thumbnail
    config.write_text(json.dumps({"crop_to_patches": True, "max_patches": 1}))
    assert tb.max_tiles_of(tmp_path) == 1


# ---------------------------------------------------------------- choosing a profile


def sizes(batch, seq, past):
    return {"batch": batch, "seq": seq, "past_seq": past, "total_seq": seq + past}


def test_the_orchestrators_phase_chooses_the_decoder_profile(manifest):
    """The orchestrator names the phase (engines.backends.base.PHASES); the backend passes it on
    as the preferred profile instead of guessing the phase from the shapes."""
    from engines.backends.base import PHASES

    assert tuple(PHASES) == tb.PROFILE_NAMES
    limits = tb.limits_for(manifest, max_batch=4, max_text=100, max_tiles=1)
    profiles = tb.graph_profiles(graph(manifest, "decoder"), limits)

    def choose(s, phase):
        return tb.choose_profile("decoder.00-00", profiles, s, preferred=phase)

    assert choose(sizes(1, 120, 0), "pre_exit") == 0  # image + text prefill, before the exit
    assert choose(sizes(1, 40, 0), "post_exit") == 1  # text only, after the exit
    assert choose(sizes(1, 1, 0), "post_exit") == 1  # one text token after the exit
    assert choose(sizes(1, 1, 30), "decode") == 2  # one token on a cache
    assert choose(sizes(1, 40, 0), "pre_exit") == 0  # a shape both prefill profiles take: the phase decides
    for phase in (*PHASES, None):  # chunked prefill (several tokens on a cache): no profile was built for it
        with pytest.raises(DyVTEError, match=r"longer, or the batch larger.*rebuild them with larger limits"):
            choose(sizes(1, 5, 30), phase)


def test_choose_profile_by_mode_and_refuse_what_was_not_built(manifest):
    limits = tb.limits_for(manifest, max_batch=4, max_text=100, max_tiles=1)
    profiles = tb.graph_profiles(graph(manifest, "decoder"), limits)

    def choose(s, preferred):
        return tb.choose_profile("decoder.00-00", profiles, s, preferred)

    assert choose(sizes(2, 120, 0), "pre_exit") == 0  # image + text, before the exit
    assert choose(sizes(2, 40, 0), "post_exit") == 1  # text only, after the exit
    assert choose(sizes(4, 1, 300), "decode") == 2  # decode
    assert choose(sizes(1, 1, 511), "decode") == 2
    assert choose(sizes(1, 20, 0), preferred="pre_exit") == 1  # not in the preferred one: the one that takes it
    for bad, phase in ((sizes(1, 126, 0), "pre_exit"), (sizes(5, 40, 0), "post_exit"), (sizes(1, 1, 512), "decode"),
                       (sizes(1, 5, 30), "decode")):
        with pytest.raises(DyVTEError, match=r"longer, or the batch larger.*rebuild them with larger limits"):
            choose(bad, phase)
    with pytest.raises(DyVTEError, match=r"pre_exit: batch 1\.\.4, seq 26\.\.125, past_seq 0"):
        choose(sizes(1, 126, 0), "pre_exit")


def test_axes_bound_from_inputs_and_output_shapes_resolved(manifest):
    g = graph(manifest, "decoder")
    shapes = {"hidden_states": (2, 7, 64), "position_ids": (2, 7), "attention_mask": (2, 10),
              "past.0.key": (2, 2, 3, 16), "past.0.value": (2, 2, 3, 16)}
    bound = bind_axes(g.inputs, shapes)
    assert bound == {"batch": 2, "seq": 7, "total_seq": 10, "past_seq": 3}
    assert [resolve_shape(o.shape, bound) for o in g.outputs] == [(2, 7, 64), (2, 2, 7, 16), (2, 2, 7, 16)]
    with pytest.raises(DyVTEError, match="axis batch is 2 in one input and 3"):
        bind_axes(g.inputs, {**shapes, "attention_mask": (3, 10)})
    with pytest.raises(DyVTEError, match="expected"):
        bind_axes(g.inputs, {**shapes, "hidden_states": (2, 7, 65)})
    with pytest.raises(DyVTEError, match="missing input past.0.value"):
        bind_axes(g.inputs, {k: v for k, v in shapes.items() if k != "past.0.value"})
    vision = graph(manifest, "vision")
    with pytest.raises(DyVTEError, match="visual_tokens"):
        resolve_shape(vision.outputs[0].shape, {"tiles": 2})
    assert resolve_shape(vision.outputs[0].shape, {"tiles": 2, "visual_tokens": 25}) == (2, 25, 64)


# ---------------------------------------------------------------- engine cache keys


def test_engine_key_names_gpu_capability_tensorrt_and_precision():
    key = tb.engine_key(H100, "fp16")
    assert key == "NVIDIA-H100-80GB-HBM3_sm90_trt10.3.0.26_fp16"
    assert tb.engine_key(H100, "fp32") != key
    assert tb.engine_key(A100, "fp16") != key
    assert tb.engine_key({**H100, "tensorrt": "10.8.0.43"}, "fp16") != key


def build_of(manifest, identity, precision, **fields) -> EngineBuild:
    limits = tb.limits_for(manifest, max_batch=4, max_text=100, max_tiles=1)
    return EngineBuild(**identity, precision=precision, limits=limits, **fields)


def with_builds(manifest, *builds) -> Manifest:
    """A copy of `manifest` whose TensorRT section holds these (identity, precision) builds."""
    section = TensorRTSection({tb.engine_key(identity, precision): build_of(manifest, identity, precision)
                               for identity, precision in builds}, [], "built")
    return replace(manifest, tensorrt=section)


def test_engines_of_this_machine_are_selected(manifest):
    m = with_builds(manifest, (H100, "fp32"), (H100, "fp16"), (A100, "fp32"))
    assert select_build(m, H100) == tb.engine_key(H100, "fp32")  # the package's own precision first
    assert select_build(m, H100, "fp16") == tb.engine_key(H100, "fp16")
    assert select_build(m, A100) == tb.engine_key(A100, "fp32")
    only16 = with_builds(manifest, (H100, "fp16"))
    assert select_build(only16, H100) == tb.engine_key(H100, "fp16")  # the one build there is


def test_engines_built_elsewhere_are_refused_naming_both_machines(manifest):
    m = with_builds(manifest, (H100, "fp16"))
    with pytest.raises(DyVTEError) as err:
        select_build(m, A100)
    text = str(err.value)
    assert text.startswith(
        "engines were built for NVIDIA H100 80GB HBM3 (compute capability 9.0), TensorRT 10.3.0.26, fp16")
    assert "this machine is NVIDIA A100-SXM4-80GB (compute capability 8.0), TensorRT 10.3.0.26, fp32" in text
    assert text.endswith("rebuild with python -m engines build PACKAGE")
    with pytest.raises(DyVTEError, match="TensorRT 10.8.0.43"):
        select_build(m, {**H100, "tensorrt": "10.8.0.43"})
    with pytest.raises(DyVTEError, match=r"built for .*fp16, this machine is .*fp32"):
        select_build(m, H100, "fp32")
    with pytest.raises(DyVTEError, match="no TensorRT engines; build them on this machine"):
        select_build(manifest, H100)


def test_backend_refuses_foreign_engines_before_touching_the_gpu(manifest, monkeypatch, tmp_path):
    """The identity is injected: the refusal needs neither a GPU nor TensorRT."""
    monkeypatch.setattr(backend_module, "import_tensorrt", lambda doing: types.SimpleNamespace())
    with pytest.raises(DyVTEError, match="engines were built for NVIDIA H100.*this machine is NVIDIA A100"):
        TensorRTBackend(tmp_path, with_builds(manifest, (H100, "fp32")), identity=A100)


# ---------------------------------------------------------------- manifest


def make_package(folder: Path, manifest: Manifest) -> Manifest:
    """A package folder holding the fixture's manifest and a small dummy file for every file it
    names (the graphs and the weights), saved and loaded back with every checksum verified."""
    m = Manifest.from_dict(manifest.to_dict())  # a copy: record_engines updates it in place
    for rel in [g.file for g in m.graphs] + [m.weights.file]:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(f"dummy {rel}".encode())
    m.save(folder)
    return Manifest.load(folder, verify=True)


def fake_build(package: Path, key: str, content: bytes) -> list[EngineEntry]:
    from engines.core.manifest import sha256_file

    path = package / "engines" / key / "embed.plan"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return [EngineEntry(key=key, graph="embed", file=f"engines/{key}/embed.plan", sha256=sha256_file(path),
                        bytes=path.stat().st_size, profiles=[])]


def test_builds_are_recorded_with_checksums_and_other_builds_kept(manifest, tmp_path):
    package = tmp_path / "pkg"
    m = make_package(package, manifest)
    k1, k2 = tb.engine_key(H100, "fp32"), tb.engine_key(A100, "fp32")
    on_h100, on_a100 = build_of(manifest, H100, "fp32"), build_of(manifest, A100, "fp32")
    tb.record_engines(package, m, k1, on_h100, fake_build(package, k1, b"one"))
    m = Manifest.load(package, verify=True)
    assert m.tensorrt.status == f"built for {k1}" and list(m.tensorrt.builds) == [k1]
    assert m.tensorrt.builds[k1] == on_h100
    assert f"engines/{k1}/embed.plan" in m.files and "graphs/embed.onnx" in m.files
    (package / "report").mkdir()
    (package / "report" / "parity.json").write_text("{}")  # rewritten by every validation: never checksummed
    tb.record_engines(package, m, k2, on_a100, fake_build(package, k2, b"two"))
    m = Manifest.load(package, verify=True)
    assert set(m.tensorrt.builds) == {k1, k2} and len(m.tensorrt.engines) == 2
    assert not any(rel.startswith("report/") for rel in m.files)
    tb.record_engines(package, m, k1, on_h100, fake_build(package, k1, b"one, rebuilt"))
    m = Manifest.load(package, verify=True)
    assert [e.key for e in m.tensorrt.engines] == [k2, k1]
    shutil.rmtree(package / "engines" / k2)  # a build deleted by hand disappears from the manifest
    tb.record_engines(package, m, k1, on_h100, fake_build(package, k1, b"one again"))
    m = Manifest.load(package, verify=True)
    assert list(m.tensorrt.builds) == [k1] and not any(k2 in rel for rel in m.files)


# ---------------------------------------------------------------- typing


def test_network_typing_follows_the_package_precision():
    trt10 = types.SimpleNamespace(__version__="10.3.0", BuilderFlag=types.SimpleNamespace(FP16=1, TF32=2))
    trt11 = types.SimpleNamespace(__version__="11.0.0", BuilderFlag=types.SimpleNamespace(TF32=2))
    assert tb.resolve_typing(trt10, None, "fp16", "fp16") == "strong"
    assert tb.resolve_typing(trt10, None, "fp32", "fp32") == "strong"
    assert tb.resolve_typing(trt10, None, "fp32", "fp16") == "weak"  # the FP16 flag lowers an fp32 graph
    assert tb.resolve_typing(trt10, "weak", "fp16", "fp16") == "weak"
    assert tb.resolve_typing(trt11, None, "fp16", "fp16") == "strong"
    with pytest.raises(DyVTEError, match="strongly typed networks only.*export an fp16 package"):
        tb.resolve_typing(trt11, None, "fp32", "fp16")
    with pytest.raises(DyVTEError, match="need typing='weak'"):
        tb.resolve_typing(trt10, "strong", "fp32", "fp16")
    with pytest.raises(DyVTEError, match="unknown network typing"):
        tb.resolve_typing(trt10, "loose", "fp32", "fp32")


# ---------------------------------------------------------------- machines without TensorRT


def test_missing_tensorrt_is_named_by_build_backend_and_parity(monkeypatch, tmp_path, capsys):
    from validation.parity import tensorrt_unavailable

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError
    assert "tensorrt package is not installed" in tb.environment_problem()
    assert tensorrt_unavailable() == tb.environment_problem()
    with pytest.raises(DyVTEError, match=r"cannot build TensorRT engines for .*: the tensorrt package is not"):
        tb.build_engines(tmp_path)
    with pytest.raises(DyVTEError, match="cannot run the TensorRT backend: the tensorrt package is not installed"):
        TensorRTBackend(tmp_path, {})
    assert engines_main(["build", str(tmp_path)]) == 2
    assert "error: cannot build TensorRT engines" in capsys.readouterr().err


def test_tensorrt_older_than_10_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    assert "TensorRT 8.6.1 is too old" in tb.environment_problem()


def test_build_without_gpu_fails_with_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    proc = subprocess.run([sys.executable, "-m", "engines", "build", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: cannot build TensorRT engines for {tmp_path}: no CUDA GPU on this machine")
    assert len(proc.stderr.strip().splitlines()) == 1
    from validation.parity import tensorrt_unavailable

    assert tensorrt_unavailable().startswith("no CUDA GPU")


def test_acceptance_script_skips_without_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    proc = subprocess.run(["bash", str(ROOT / "validation" / "gpu_acceptance.sh"), str(tmp_path / "acc")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("skipped: no GPU")
    assert json.loads((tmp_path / "acc.json").read_text())["status"] == "skipped"
    assert "skipped" in (tmp_path / "acc.txt").read_text()


def test_acceptance_summary_reads_parity_reports_and_engine_builds(manifest):
    from validation.gpu_acceptance import engine_figures, parity_figures, summary_text

    report = {"passed": False, "samples": 2, "precision": "fp16", "reference": {"exit_layers": [3, None]},
              "backends": {
                  "tensorrt": {"passed": False, "checks": {"tokens": False}, "logits_max_abs_diff": 0.03,
                               "logits_min_cosine": 0.9999, "exit_layer_agreement": 1.0, "token_agreement": 0.5,
                               "failed_stages": ["layers 4-4"], "exit_layers": [3, None], "near_ties": [{}],
                               "seconds": 1.5, "stages": {"huge": "left out"}},
                  "onnxruntime": {"passed": None, "skipped": "not asked"}},
              "speed": {"exit_layer": 3, "visual_tokens": 576, "text_tokens": 40,
                        "tensorrt": {"prefill_ms_none": 20.0, "prefill_ms_exit": 8.0, "prefill_speedup": 2.5,
                                     "decode_ms_per_token_none": 9.0, "decode_ms_per_token_exit": 7.5}}}
    build = build_of(manifest, H100, "fp32", typing="strong", seconds=300)
    engines = [EngineEntry("K", "embed", "engines/K/embed.plan", "0" * 64, 2**30, [], seconds=4),
               EngineEntry("K", "decoder.00-00", "engines/K/decoder.00-00.plan", "0" * 64, 2**29, [], seconds=9,
                           device_memory={"pre_exit": 4096, "post_exit": 8192, "decode": 12288})]
    built = replace(manifest, tensorrt=TensorRTSection({"K": build}, engines, "built for K"))
    parity = parity_figures(report)
    assert "stages" not in parity["backends"]["tensorrt"] and parity["backends"]["tensorrt"]["near_ties"] == 1
    builds = engine_figures(built)
    assert builds["K"]["engines"] == 2 and builds["K"]["gib"] == 1.5 and builds["K"]["slowest"] == ("decoder.00-00", 9)
    assert builds["K"]["limits"] == build.limits.to_dict() and builds["K"]["seconds"] == 300
    assert builds["K"]["device_memory"] == {"embed": {}, "decoder.00-00": {"pre_exit": 4096, "post_exit": 8192,
                                                                           "decode": 12288}}
    text = summary_text({"status": "failed", "environment": {"gpu": "NVIDIA H100"}, "steps": {"llava-7b": {
        "status": "failed", "wall_seconds": 612, "tensorrt_builds": builds, "parity": parity}}})
    assert "[llava-7b] failed in 612 s" in text
    assert "tensorrt     FAIL  logits max|diff| 3.00e-02" in text and "stages over threshold: layers 4-4" in text
    assert "onnxruntime  skipped: not asked" in text
    assert "prefill 20.00 ms -> 8.00 ms (x2.50), decode 9.00 -> 7.50 ms/token" in text


# ---------------------------------------------------------------- a fake TensorRT on the CPU


class FakeTensorRT(types.ModuleType):
    """The slice of the TensorRT 10 Python API that the builder and the backend use, running the
    ONNX graphs with ONNX Runtime on the memory the backend binds. It checks what TensorRT checks
    (profile ranges and named dimensions at build; shapes inside the context's profile, inputs
    bound, scratch memory set, at run), so the build -> manifest -> backend -> orchestrator path
    runs without a GPU. What it cannot check is TensorRT itself: that is left to the GPU tests."""

    def __init__(self, version="10.9.0.34"):
        super().__init__("tensorrt")
        self.__version__ = version
        self.built = []  # (graph file, profiles as set, flags) of every build
        self.ran = []  # (graph name, profile index) of every execution
        ns = types.SimpleNamespace
        self.DataType = ns(FLOAT="float32", HALF="float16", INT64="int64", INT32="int32", BOOL="bool")
        self.BuilderFlag = ns(FP16="FP16", TF32="TF32")
        self.MemoryPoolType = ns(WORKSPACE="WORKSPACE")
        self.NetworkDefinitionCreationFlag = ns(STRONGLY_TYPED=5)
        self.ExecutionContextAllocationStrategy = ns(STATIC="STATIC", USER_MANAGED="USER_MANAGED")
        trt = self

        class ILogger:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

            def __init__(self):
                pass

        class Network:
            def __init__(self, flags):
                self.flags, self.inputs = flags, []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        class Parser:
            def __init__(self, network, logger):
                self.network, self.num_errors = network, 0

            def parse_from_file(self, path):
                import onnx

                model = onnx.load(path, load_external_data=False)
                for value in model.graph.input:
                    dims = tuple(d.dim_value if d.HasField("dim_value") else -1
                                 for d in value.type.tensor_type.shape.dim)
                    names = tuple(d.dim_param for d in value.type.tensor_type.shape.dim)
                    self.network.inputs.append(types.SimpleNamespace(name=value.name, shape=dims, dim_names=names,
                                                                     is_shape_tensor=False))
                self.network.path = path
                return True

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                if not all(0 <= a <= b <= c for a, b, c in zip(lo, opt, hi)):
                    raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
                self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        class Config:
            def __init__(self):
                self.flags, self.profiles, self.cache = {"TF32"}, [], None

            def set_memory_pool_limit(self, pool, size):
                assert pool == "WORKSPACE" and size > 0

            def set_flag(self, flag):
                self.flags.add(flag)

            def clear_flag(self, flag):
                self.flags.discard(flag)

            def create_timing_cache(self, data):
                return types.SimpleNamespace(data=bytes(data), serialize=lambda: memoryview(bytes(data) + b"+"))

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache

            def add_optimization_profile(self, profile):
                self.profiles.append(profile)
                return len(self.profiles) - 1

        class Builder:
            def __init__(self, logger):
                assert isinstance(logger, ILogger)

            def create_network(self, flags):
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                for profile in config.profiles:  # TensorRT's checks: every dynamic input set, names agree
                    named = {}
                    for t in network.inputs:
                        if -1 in t.shape:
                            assert t.name in profile.shapes, f"no profile shape for {t.name}"
                        for k, ((lo, opt, hi), dim) in enumerate(zip(zip(*profile.shapes.get(t.name, ((),) * 3)),
                                                                     t.shape)):
                            assert dim == -1 or lo == opt == hi == dim, f"{t.name} dim {k} is fixed at {dim}"
                            name = t.dim_names[k]
                            if name:
                                assert named.setdefault(name, (lo, opt, hi)) == (lo, opt, hi), f"axis {name} differs"
                profiles = [{n: list(map(list, v)) for n, v in p.shapes.items()} for p in config.profiles]
                trt.built.append((network.path, profiles, network.flags, set(config.flags), config.cache.data))
                return memoryview(json.dumps({"path": network.path, "profiles": profiles}).encode())

        class Runtime:
            def __init__(self, logger):
                assert isinstance(logger, ILogger)

            def deserialize_cuda_engine(self, data):
                return Engine(json.loads(bytes(data)))

        class Engine:
            def __init__(self, plan):
                import onnxruntime as ort

                options = ort.SessionOptions()
                options.intra_op_num_threads = 1
                self.session = ort.InferenceSession(plan["path"], options, providers=["CPUExecutionProvider"])
                self.graph = Path(plan["path"]).stem
                self.profiles = plan["profiles"]
                self.io = {v.name: (v, "in") for v in self.session.get_inputs()}
                self.io.update({v.name: (v, "out") for v in self.session.get_outputs()})
                self.names = list(self.io)

            num_io_tensors = property(lambda self: len(self.names))
            num_optimization_profiles = property(lambda self: len(self.profiles))

            def get_tensor_name(self, i):
                return self.names[i]

            def get_tensor_dtype(self, name):
                return {"tensor(float)": "float32", "tensor(float16)": "float16",
                        "tensor(int64)": "int64"}[self.io[name][0].type]

            def get_tensor_profile_shape(self, name, index):
                return [tuple(s) for s in self.profiles[index][name]]

            def get_device_memory_size_for_profile_v2(self, index):
                return 4096 * (index + 1)

            def create_execution_context(self, strategy):
                assert strategy == "USER_MANAGED"
                return Context(self)

        class Context:
            def __init__(self, engine):
                self.engine, self.profile, self.shapes, self.addresses, self.memory = engine, None, {}, {}, None

            def set_optimization_profile_async(self, index, stream):
                self.profile = index
                return True

            def set_device_memory(self, ptr, size):
                assert ptr and size >= self.engine.get_device_memory_size_for_profile_v2(self.profile)
                self.memory = ptr

            def set_input_shape(self, name, shape):
                lo, _, hi = self.engine.profiles[self.profile][name]
                if not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
                    return False  # outside this context's profile: the backend chose the wrong one
                self.shapes[name] = tuple(shape)
                return True

            def set_tensor_address(self, name, ptr):
                assert ptr, f"null address for {name}"
                self.addresses[name] = ptr
                return True

            def _input(self, meta):
                shape = self.shapes.get(meta.name) or tuple(meta.shape)
                dtype = np.dtype(self.engine.get_tensor_dtype(meta.name))
                return _read(self.addresses[meta.name], shape, dtype)

            def _compute(self):
                feeds = {m.name: self._input(m) for m in self.engine.session.get_inputs()}
                names = [o.name for o in self.engine.session.get_outputs()]
                return dict(zip(names, self.engine.session.run(names, feeds)))

            def get_tensor_shape(self, name):
                return self._compute()[name].shape

            def execute_async_v3(self, stream):
                assert self.memory, "no scratch memory set"
                trt.ran.append((self.engine.graph, self.profile))
                for name, value in self._compute().items():
                    _read(self.addresses[name], value.shape, value.dtype)[...] = value
                return True

        self.ILogger, self.Builder, self.OnnxParser, self.Runtime = ILogger, Builder, Parser, Runtime


def _read(ptr, shape, dtype):
    """A numpy view of `shape` elements of `dtype` at CPU address `ptr`."""
    import ctypes

    count = int(np.prod(shape))
    if count == 0:
        return np.empty(shape, dtype)
    buffer = (ctypes.c_byte * (count * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


class FakeStream:
    cuda_stream = 0

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass


class CpuTorch(types.ModuleType):
    """torch as the backend module sees it, with the CUDA device and streams mapped to the CPU."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = types.SimpleNamespace(current_device=lambda: 0, Stream=lambda device=None: FakeStream(),
                                          current_stream=lambda device=None: FakeStream())
        self.device = lambda *args, **kwargs: torch.device("cpu")

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.fixture
def fake_tensorrt(monkeypatch):
    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tb, "_LOGGER", None)  # the process-wide logger must be the fake's
    monkeypatch.setattr(tb, "machine_identity", lambda: H100)
    monkeypatch.setattr(backend_module, "machine_identity", lambda: H100)
    monkeypatch.setattr(backend_module, "torch", CpuTorch())
    return fake


def test_build_manifest_backend_and_orchestrator_plumbing_through_a_fake_tensorrt(fake_tensorrt, vila_package,
                                                                                   tmp_path):
    """Build -> manifest -> backend -> orchestrator on the CPU, plumbing only: the fake's engines
    hold the ONNX graphs and run them with ONNX Runtime, so equal tokens say nothing about
    TensorRT's numerics (the GPU tests check those). They show that the build is recorded, the
    backend binds every input and output in place, each call lands in a profile that takes its
    shapes, and each decoder call runs in the profile of the orchestrator's phase."""
    from conftest import TARGET_EXITS, sample_prompts
    from engines.load import open_package
    from engines.policy import GenerationConfig

    package = Path(shutil.copytree(vila_package, tmp_path / "vila"))
    entries = tb.build_engines(package, max_batch=6, max_text=100, progress=False)
    manifest = Manifest.load(package, verify=True)
    key = tb.engine_key(H100, "fp32")
    assert manifest.tensorrt.builds[key].limits.to_dict() == {
        "max_batch": 6, "max_text": 100, "max_tiles": 1, "visual_tokens": 25, "context": 512}
    assert [e.to_dict() for e in manifest.tensorrt.engines_of(key)] == [e.to_dict() for e in entries]
    assert [e.file for e in entries] == [f"engines/{key}/{g.name}.plan" for g in manifest.graphs
                                         if g.role != "decode"]  # the fused decode graph is ORT's
    built = {Path(path).stem: (profiles, flags, features, cache) for path, profiles, flags, features, cache
             in fake_tensorrt.built}
    profiles, flags, features, _ = built["decoder.01-01"]
    assert flags == 1 << 5 and "TF32" not in features  # strongly typed fp32, no TF32
    assert profiles[0]["past.1.key"] == [[1, 2, 0, 16], [1, 2, 0, 16], [6, 2, 0, 16]]
    assert profiles[2]["attention_mask"] == [[1, 2], [1, 90], [6, 512]]
    assert [c for *_, c in fake_tensorrt.built] == [b"+" * i for i in range(len(entries))]  # timings carried over

    reference = open_package(package)  # ONNX Runtime
    trt_runtime = open_package(package, backend="tensorrt")
    assert trt_runtime.backend.key == key and trt_runtime.backend.dtype == torch.float32
    prompts = sample_prompts(reference)
    config = GenerationConfig(max_new_tokens=4, keep_logits=True)
    for policy in ("none", "layer:1", "dynamic"):
        expected = reference.generate(prompts, policy, config)
        for results in (trt_runtime.generate(prompts, policy, config),
                        [trt_runtime.generate([p], policy, config)[0] for p in prompts]):
            assert [r.exit_layer for r in results] == [r.exit_layer for r in expected]
            assert [r.generated_ids for r in results] == [r.generated_ids for r in expected]
            for a, b in zip(expected, results):
                torch.testing.assert_close(torch.stack(b.step_logits), torch.stack(a.step_logits), rtol=0, atol=1e-5)
        if policy == "dynamic":
            assert [r.exit_layer for r in expected] == TARGET_EXITS
    fake_tensorrt.ran.clear()  # exit after layer 1: segments 0-1 run before the exit, 2-3 after it
    trt_runtime.generate(prompts, "layer:1", GenerationConfig(max_new_tokens=2))
    phases: dict[str, set] = {}
    for name, index in fake_tensorrt.ran:
        if name.startswith("decoder."):
            phases.setdefault(name, set()).add(tb.PROFILE_NAMES[index])
    assert phases == {"decoder.00-00": {"pre_exit", "decode"}, "decoder.01-01": {"pre_exit", "decode"},
                      "decoder.02-02": {"post_exit", "decode"}, "decoder.03-03": {"post_exit", "decode"}}
    from helpers import random_image

    long = trt_runtime.prepare("what color is the circle " * 40, random_image(1))
    assert len(long.input_ids) > 25 + 100
    with pytest.raises(DyVTEError, match="rebuild them with larger limits"):
        trt_runtime.generate([long], "none", GenerationConfig(max_new_tokens=2))


# ---------------------------------------------------------------- on a GPU


def require_tensorrt():
    problem = tb.environment_problem()
    if problem is None:
        return
    if not torch.cuda.is_available():
        build = "CPU-only torch build" if torch.version.cuda is None else f"torch for CUDA {torch.version.cuda}"
        pytest.skip(f"no CUDA GPU: torch.cuda.is_available() is False ({build})")
    pytest.skip(f"TensorRT unavailable: {problem}")


MAX_TEXT = 128


@pytest.fixture(scope="module")
def trt_vila(request, tmp_path_factory):
    """A copy of the tiny VILA package with fp32 engines for this GPU (batch up to 6)."""
    require_tensorrt()  # before the package fixture, so that a machine without GPU exports nothing
    source = request.getfixturevalue("vila_package")
    package = Path(shutil.copytree(source, tmp_path_factory.mktemp("trt") / "vila"))
    entries = tb.build_engines(package, max_batch=6, max_text=MAX_TEXT, progress=False)
    return package, entries


@pytest.fixture(scope="module")
def trt_pair(trt_vila, request):
    from engines.backends.torch_backend import TorchBackend
    from engines.load import open_package
    from engines.orchestrator import Runtime

    model = request.getfixturevalue("vila_exit_model")
    return Runtime(TorchBackend(model), model.processor), open_package(trt_vila[0], backend="tensorrt")


@pytest.mark.gpu
def test_engines_are_recorded_for_this_gpu(trt_vila):
    package, entries = trt_vila
    manifest = Manifest.load(package, verify=True)
    key = tb.engine_key(tb.machine_identity(), "fp32")
    assert list(manifest.tensorrt.builds) == [key]
    # every graph but the fused decode graph, which the builder skips on purpose (tb.SKIPPED_ROLES)
    assert {e.graph for e in entries} == {g.name for g in manifest.graphs if g.role != "decode"}
    for e in entries:
        assert (package / e.file).is_file() and manifest.files[e.file].sha256 == e.sha256
        role = manifest.graph(e.graph).role
        names = [p.name for p in e.profiles]
        if role == "decoder":
            assert names == list(tb.PROFILE_NAMES)
        else:
            assert len(names) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["none", "layer:1", "dynamic"])
def test_tensorrt_generations_equal_reference(trt_pair, policy):
    from conftest import TARGET_EXITS, sample_prompts
    from engines.policy import GenerationConfig

    reference, trt_runtime = trt_pair
    config = GenerationConfig(max_new_tokens=5, keep_logits=True)
    prompts = sample_prompts(reference)
    singles_ref = [reference.generate([p], policy, config)[0] for p in prompts]
    singles_trt = [trt_runtime.generate([p], policy, config)[0] for p in prompts]
    batched = trt_runtime.generate(prompts, policy, config)
    for results in (singles_trt, batched):
        for a, b in zip(singles_ref, results):
            assert b.exit_layer == a.exit_layer
            assert b.generated_ids == a.generated_ids
            torch.testing.assert_close(torch.stack(b.step_logits).float(), torch.stack(a.step_logits).float(),
                                       rtol=0, atol=1e-3)
    if policy == "dynamic":
        assert [r.exit_layer for r in singles_trt] == TARGET_EXITS


@pytest.mark.gpu
def test_prompt_longer_than_the_engines_is_refused(trt_pair):
    from engines.policy import GenerationConfig
    from helpers import random_image

    _, trt_runtime = trt_pair
    prompt = trt_runtime.prepare("what color is the circle " * 60, random_image(1))
    assert len(prompt.input_ids) > 25 + MAX_TEXT
    with pytest.raises(DyVTEError, match="rebuild them with larger limits"):
        trt_runtime.generate([prompt], "none", GenerationConfig(max_new_tokens=2))


@pytest.mark.gpu
def test_engines_of_another_gpu_are_refused_on_a_gpu(trt_vila):
    package, _ = trt_vila
    with pytest.raises(DyVTEError, match="engines were built for .*this machine is NVIDIA A100"):
        TensorRTBackend(package, Manifest.load(package), identity=A100)
