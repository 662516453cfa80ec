"""Export streamed from a checkpoint folder: the same package as an eager export, with the
language model's weights in memory only while their graph exports."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from export import main as export_main
from helpers import random_image
from engines.core.errors import DyVTEError
from exporter.models import load_model
from exporter.package import export_onnx
from helpers import load_manifest
from exporter.streaming import SOURCE, is_streamed, stream_weights


def test_lazy_load_keeps_the_language_model_on_disk(vila_checkpoint):
    model = load_model("vila", vila_checkpoint, lazy=True)
    assert is_streamed(model)
    layers = model.decoder.layers
    assert all(p.is_meta for p in layers.parameters())
    assert not any(p.is_meta for p in model.vision.parameters())  # the vision half loads eagerly
    eager = load_model("vila", vila_checkpoint)
    with stream_weights(layers[1]) as layer:
        for (name, p), q in zip(layer.named_parameters(), eager.decoder.layers[1].parameters()):
            assert not p.is_meta and torch.equal(p, q), name
    assert all(p.is_meta and hasattr(p, SOURCE) for p in layers[1].parameters())  # dropped again


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_streamed_export_equals_the_eager_export(vila_checkpoint, tmp_path, precision):
    eager = export_onnx(load_model("vila", vila_checkpoint), tmp_path / "eager", precision, progress=False)
    lazy_model = load_model("vila", vila_checkpoint, lazy=True)
    streamed = export_onnx(lazy_model, tmp_path / "streamed", precision, progress=False, materialize=stream_weights)
    assert all(p.is_meta for p in lazy_model.decoder.layers.parameters())  # nothing kept after the export
    a, b = load_manifest(eager), load_manifest(streamed)
    assert {f: v["sha256"] for f, v in a["files"].items()} == {f: v["sha256"] for f, v in b["files"].items()}


def test_stream_flag_exports_and_validates(vila_checkpoint, tmp_path, capsys):
    out = tmp_path / "pkg"
    code = export_main(["--model", "vila", "--checkpoint", str(vila_checkpoint), "--stream", "--output", str(out),
                        "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert "parity: PASSED" in capsys.readouterr().out
    assert json.loads((out / "report" / "parity.json").read_text())["passed"]


def test_stream_refusals(vila_copy, tmp_path, capsys):
    assert export_main(["--model", "vila", "--stream", "--output", str(tmp_path / "x")]) == 2
    assert "--stream needs --checkpoint" in capsys.readouterr().err
    assert export_main(["--model", "vila", "--checkpoint", str(vila_copy), "--stream", "--exit-window", "auto",
                        "--output", str(tmp_path / "x")]) == 2
    assert "give START:END with --stream" in capsys.readouterr().err
    weights = vila_copy / "llm" / "model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("layers.1.mlp.up_proj.weight"))
    del tensors[key]
    save_file(tensors, str(weights))
    with pytest.raises(DyVTEError, match="lacks weights .*layers.1.mlp.up_proj.weight"):
        load_model("vila", vila_copy, lazy=True)


def test_random_weights_stream_matches_the_materialized_reference(tmp_path):
    """`export-bench`'s meta-device model, streamed with the same materializer: every graph parameter
    is meta again afterwards, and the package answers like the model rebuilt by `materialize_all`."""
    from engines.backends.torch_backend import TorchBackend
    from engines.load import open_package
    from engines.orchestrator import Runtime
    from engines.policy import GenerationConfig
    from validation.export_bench import export_random, materialize_all, skeleton

    package = export_random("tiny", tmp_path / "pkg", "fp32", seed=3)
    reference = materialize_all(skeleton("tiny", "fp32", 3), 3).eval()
    runtime = open_package(package)
    prompt = runtime.prepare("what color is the circle?", random_image(1))
    config = GenerationConfig(max_new_tokens=3, keep_logits=True)
    ours = runtime.generate([prompt], "layer:1", config)[0]
    ref = Runtime(TorchBackend(reference), reference.processor).generate([prompt], "layer:1", config)[0]
    assert ours.generated_ids == ref.generated_ids
    for a, b in zip(ours.step_logits, ref.step_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- every family

def _save_native(family: str, folder):
    """(checkpoint folder, load options) of a tiny preset of `family` in its published layout."""
    from exporter.models import get_family

    layout = family.split(":")[-1]
    model = get_family(family.split(":")[0]).preset(seed=5)
    if family == "llava:original":
        tower = folder / "clip"
        return model.native.save_original(folder / "llava", tower, model.routers), {"vision_tower": str(tower)}
    if family == "eagle":
        return model.native.save(folder / layout, model.routers), {}
    return model.native.save(folder / layout), {}


NATIVE = ["llava:hf", "llava:original", "internvl", "eagle"]


@pytest.fixture(scope="module", params=NATIVE)
def native_checkpoint(request, tmp_path_factory):
    folder, options = _save_native(request.param, tmp_path_factory.mktemp("native"))
    return request.param.split(":")[0], folder, options


def test_every_family_streams_to_the_eager_package(native_checkpoint, tmp_path, monkeypatch):
    """A lazy load leaves the language model on disk, and the vision tower too when it is over the
    eager threshold (set to 0 here; under it the tower loads as eagerly, see the VILA tests), and its
    streamed export is the eager export byte for byte."""
    import exporter.streaming as streaming
    from exporter.plan import SplitPlan

    family, folder, options = native_checkpoint
    monkeypatch.setattr(streaming, "EAGER_TOWER_BYTES", 0)
    lazy = load_model(family, folder, lazy=True, **options)
    assert all(p.is_meta for p in lazy.decoder.parameters())
    assert any(p.is_meta for p in lazy.vision.parameters())
    plan = SplitPlan.parse("1:1", lazy.shape.num_layers)
    streamed = export_onnx(lazy, tmp_path / "streamed", "fp32", plan, progress=False, materialize=stream_weights)
    eager = export_onnx(load_model(family, folder, **options), tmp_path / "eager", "fp32", plan, progress=False)
    a, b = load_manifest(eager), load_manifest(streamed)
    assert {f: v["sha256"] for f, v in a["files"].items()} == {f: v["sha256"] for f, v in b["files"].items()}


def test_reference_on_lazy_weights_gives_the_same_parity_numbers(tmp_path, monkeypatch):
    """The parity report's PyTorch reference, run on a lazy model (each module's weights read while it
    runs, dropped after), produces the eager reference's stages, exits and tokens exactly, and leaves
    nothing in memory."""
    import exporter.streaming as streaming
    from engines.load import open_package
    from exporter.plan import SplitPlan
    from exporter.reference import package_reference
    from validation.parity import compare, run_runner
    from validation.samples import sample_prompts

    monkeypatch.setattr(streaming, "EAGER_TOWER_BYTES", 0)
    folder, options = _save_native("llava:original", tmp_path)
    eager = load_model("llava", folder, **options)
    package = export_onnx(eager, tmp_path / "pkg", "fp32", SplitPlan.parse("1:2", 4), progress=False)
    lazy = load_model("llava", folder, lazy=True, **options)
    reference = package_reference(package, model=eager)
    samples = sample_prompts(reference, None, None, count=2)
    ref = run_runner(reference, samples, 3, True)
    ref_lazy = run_runner(package_reference(package, model=lazy), samples, 3, True)
    assert all(p.is_meta for p in lazy.decoder.parameters())
    assert all(p.is_meta for p in lazy.vision.tower.parameters())  # read while it ran, dropped after
    ort = run_runner(open_package(package), samples, 3, True)
    limits = {"logits_max_abs": 1e-3, "stage_max_rel": 1e-4, "min_cosine": 0.99999, "near_tie": 1e-4,
              "token_agreement": 1.0, "exit_layer_agreement": 1.0}
    ours, theirs = compare(ref_lazy, ort, limits), compare(ref, ort, limits)
    for report in (ours, theirs):
        report.pop("seconds")
    assert ours == theirs and ours["passed"]


def _shard(folder, name="model.safetensors"):
    return folder / name


@pytest.mark.parametrize("damage", ["missing", "shape", "dtype", "truncated"])
def test_damaged_checkpoint_is_refused_before_any_graph(tmp_path, damage, capsys):
    """A missing tensor, a wrong shape or dtype, a truncated shard: one line naming key and file, no package."""
    folder, _ = _save_native("llava:hf", tmp_path)
    weights = _shard(folder)
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    if damage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) - 1000])
        expected = f"cannot read {weights}"
    else:
        tensors = load_file(str(weights))
        if damage == "missing":
            del tensors[key]
            expected = f"lacks weights {key}"
        elif damage == "shape":
            tensors[key] = tensors[key][:-1].contiguous()
            expected = f"weight {key} in {weights} has shape"
        else:
            tensors[key] = tensors[key].to(torch.int32)
            expected = f"weight {key} in {weights} is I32"
        save_file(tensors, str(weights))
    out = tmp_path / "pkg"
    code = export_main(["--model", "llava", "--checkpoint", str(folder), "--stream", "--output", str(out),
                        "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert not out.exists() and not list(tmp_path.glob("pkg*"))


def test_streaming_default_follows_the_memory(vila_checkpoint, monkeypatch):
    import exporter.streaming as streaming
    from exporter.streaming import checkpoint_folders, choose_streaming

    folders = checkpoint_folders(vila_checkpoint)
    size = streaming.weight_bytes(folders)
    monkeypatch.setattr(streaming, "available_memory", lambda: 4 * size)
    assert choose_streaming(folders, None)[0] is False
    monkeypatch.setattr(streaming, "available_memory", lambda: size)
    stream, why = choose_streaming(folders, None)
    assert stream and "50% of" in why
    assert choose_streaming(folders, False) == (False, choose_streaming(folders, False)[1])
    assert "--no-stream given" in choose_streaming(folders, False)[1]
