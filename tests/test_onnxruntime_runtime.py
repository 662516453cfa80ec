"""The ONNX Runtime backend against the PyTorch reference: every family, every policy, batches, threads."""

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from conftest import TARGET_EXITS, model_with_exits, sample_pairs, sample_prompts
from engines.backends.torch_backend import TorchBackend
from engines.cli import main as engines_main
from engines.core.manifest import Manifest
from engines.load import open_package
from engines.orchestrator import Runtime
from engines.policy import GenerationConfig
from exporter.package import export_onnx
from validation.parity import DEFAULT_THRESHOLDS

POLICIES = ["none", "layer:1", "dynamic"]
CONFIG = GenerationConfig(max_new_tokens=5, keep_logits=True)


@pytest.fixture(scope="module", params=["vila", "llava", "internvl", "eagle"])
def family_pair(request, tmp_path_factory, vila_exit_model, vila_package):
    """(reference runtime, onnxruntime runtime) for each family's preset, routers fitted so the
    samples exit at TARGET_EXITS (varied layers, large margins)."""
    if request.param == "vila":
        model, package = vila_exit_model, vila_package
    else:
        from exporter.models import get_family

        model = model_with_exits(get_family(request.param).preset(seed=5))
        package = export_onnx(model, tmp_path_factory.mktemp(request.param) / "pkg", progress=False)
    return Runtime(TorchBackend(model), model.processor), open_package(package)


def assert_same(ref_results, ort_results):
    for a, b in zip(ref_results, ort_results):
        assert b.exit_layer == a.exit_layer
        assert b.generated_ids == a.generated_ids
        assert b.input_ids == a.input_ids and b.visual_span == a.visual_span
        steps_a, steps_b = torch.stack(a.step_logits), torch.stack(b.step_logits).float()
        torch.testing.assert_close(steps_b, steps_a, rtol=0, atol=1e-4)


@pytest.mark.parametrize("policy", POLICIES)
def test_generations_equal_reference_single_and_batched(family_pair, policy):
    reference, onnx_runtime = family_pair
    prompts = sample_prompts(reference)
    singles_ref = [reference.generate([p], policy, CONFIG)[0] for p in prompts]
    singles_ort = [onnx_runtime.generate([p], policy, CONFIG)[0] for p in prompts]
    assert_same(singles_ref, singles_ort)
    if policy == "dynamic":
        assert [r.exit_layer for r in singles_ort] == TARGET_EXITS
    batched = onnx_runtime.generate(prompts, policy, CONFIG)
    assert_same(singles_ref, batched)


def test_threads_share_one_runtime(vila_package, vila_exit_model):
    runtime = open_package(vila_package)
    prompts = sample_prompts(runtime)
    config = GenerationConfig(max_new_tokens=6)
    sequential = [runtime.generate([p], "dynamic", config)[0].generated_ids for p in prompts]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(3):
                results.setdefault(i, []).append(runtime.generate([prompts[i]], "dynamic", config)[0].generated_ids)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, runs in results.items():
        assert runs == [sequential[i]] * 3


def test_cli_runs_a_package_with_the_json_contract(vila_package, image_file, capsys):
    code = engines_main(["run", str(vila_package), "--image", str(image_file), "--prompt", "what color?",
                         "--exit-policy", "layer:0", "--max-new-tokens", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["backend"] == "onnxruntime" and out["exit_layer"] == 0
    assert {"text", "input_ids", "visual_span", "generated_ids", "timings_ms"} <= set(out)


def test_streaming_prints_tokens_as_they_come(vila_package, image_file, capsys):
    seen = []
    runtime = open_package(vila_package)
    prompt = runtime.prepare("what color?", __import__("helpers").random_image(0))
    result = runtime.generate([prompt], "none", GenerationConfig(max_new_tokens=4),
                              on_token=lambda i, t: seen.append((i, t)))[0]
    assert seen == [(0, t) for t in result.generated_ids]
    code = engines_main(["run", str(vila_package), "--image", str(image_file), "--prompt", "hi", "--stream",
                         "--max-new-tokens", "3", "--exit-policy", "none"])
    assert code == 0 and capsys.readouterr().out.strip()


def test_cli_errors_for_packages(vila_package, image_file, tmp_path, capsys):
    assert engines_main(["run", str(tmp_path), "--image", str(image_file), "--prompt", "hi"]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert engines_main(["run", "--model", "vila", "--backend", "onnxruntime", "--image", str(image_file),
                         "--prompt", "hi"]) == 2
    assert "runs exported packages" in capsys.readouterr().err
    assert engines_main(["run", str(vila_package), "--device", "cuda", "--image", str(image_file),
                         "--prompt", "hi"]) == 2
    assert "CUDAExecutionProvider" in capsys.readouterr().err
    from validation.parity import tensorrt_unavailable

    if tensorrt_unavailable():  # on a GPU machine this would build engines into the shared fixture
        assert engines_main(["build", str(vila_package)]) == 2
        assert "TensorRT" in capsys.readouterr().err


def prefix_agreement(a: list[int], b: list[int]) -> float:
    """Share of the longer sequence that both generated identically before they first differ."""
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / max(len(a), len(b), 1)


def test_fp16_package_generates_like_the_fp32_reference(vila_package_fp16, vila_exit_model):
    limits = DEFAULT_THRESHOLDS["fp16"]
    assert Manifest.load(vila_package_fp16).precision.name == "fp16"
    reference = Runtime(TorchBackend(vila_exit_model), vila_exit_model.processor)
    prompts = sample_prompts(reference)
    config = GenerationConfig(max_new_tokens=8)
    ref = reference.generate(prompts, "dynamic", config)
    half = open_package(vila_package_fp16).generate(prompts, "dynamic", config)  # one batch, exits differ
    assert [r.exit_layer for r in half] == [r.exit_layer for r in ref] == TARGET_EXITS
    agreement = sum(prefix_agreement(a.generated_ids, b.generated_ids) for a, b in zip(ref, half)) / len(ref)
    assert agreement >= limits["token_agreement"], agreement
    # the first logits carry half-precision error (so fp16 graphs ran) within the fp16 limit
    diff = max(float((b.first_logits.float() - a.first_logits.float()).abs().max()) for a, b in zip(ref, half))
    assert 0 < diff <= limits["logits_max_abs"], diff


def test_cli_torch_backend_of_a_package_matches_onnxruntime(vila_package, vila_exit_checkpoint, tmp_path, capsys):
    """`run PACKAGE --backend torch` rebuilds the package's source model (the PyTorch reference)."""
    checkpoint, routers = vila_exit_checkpoint
    package = Path(shutil.copytree(vila_package, tmp_path / "pkg"))
    # The source `export.py --checkpoint --routers` records. vila_package's own (the preset it was
    # built from) rebuilds the preset's routers, not the fitted ones its graphs hold.
    manifest = Manifest.load(package)
    manifest.source = {"family": "vila", "checkpoint": str(checkpoint), "routers": str(routers)}
    manifest.save(package)
    samples = [3, 1]  # exits after layers 2 and 1
    argv = ["run", str(package), "--max-new-tokens", "6", "--json"]
    for k, (question, image) in enumerate(sample_pairs(samples)):
        image.save(tmp_path / f"{k}.png")
        argv += ["--image", str(tmp_path / f"{k}.png"), "--prompt", question]
    out = {}
    for backend in ("torch", "onnxruntime"):
        assert engines_main([*argv, "--backend", backend]) == 0
        out[backend] = json.loads(capsys.readouterr().out)["results"]
    assert [r["exit_layer"] for r in out["torch"]] == [TARGET_EXITS[i] for i in samples]
    for ref, ort in zip(out["torch"], out["onnxruntime"]):
        assert (ref["backend"], ort["backend"]) == ("torch", "onnxruntime")
        assert ref["input_ids"] == ort["input_ids"] and ref["visual_span"] == ort["visual_span"]
        assert ref["exit_layer"] == ort["exit_layer"]
        assert ref["generated_ids"] == ort["generated_ids"] and len(ref["generated_ids"]) > 1


def test_a_batch_over_the_limits_runs_in_chunks_that_fit(vila_package):
    """generate() with more rows or tokens than the runtime's limits splits the batch (in order, sample
    indices of the callbacks kept); a single prompt over max_tokens is refused by name."""
    from engines.memory import RuntimeLimits

    runtime = open_package(vila_package)
    prompts = sample_prompts(runtime)
    assert len(prompts) >= 3
    config = GenerationConfig(max_new_tokens=4)
    whole = Runtime(runtime.backend, runtime.processor, limits=None).generate(prompts, "dynamic", config)
    longest = max(len(p.input_ids) for p in prompts) + 4
    bounded = Runtime(runtime.backend, runtime.processor, RuntimeLimits(max_batch=2, max_tokens=2 * longest))
    assert len(bounded._chunks(prompts, 4)) >= 2
    streamed: dict[int, list[int]] = {}
    split = bounded.generate(prompts, "dynamic", config,
                             on_token=lambda i, t: streamed.setdefault(i, []).append(t))
    assert [g.generated_ids for g in split] == [g.generated_ids for g in whole]
    assert [g.exit_layer for g in split] == [g.exit_layer for g in whole]
    assert streamed == {i: g.generated_ids for i, g in enumerate(whole)}
    tight = Runtime(runtime.backend, runtime.processor, RuntimeLimits(max_batch=2, max_tokens=longest - 1))
    from engines.core.errors import DyVTEError

    with pytest.raises(DyVTEError, match="max_tokens"):
        tight.generate(prompts, "dynamic", config)
