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
