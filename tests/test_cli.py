"""`python -m engines run`: the JSON contract, and one-line errors with a non-zero exit for bad input."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from engines.cli import main
from exporter.dyvte.router import Routers, save_routers


def run_cli(capsys, *argv):
    code = main(["run", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output_has_the_contract_fields(capsys, image_file, vila_checkpoint):
    code, out, _ = run_cli(capsys, "--model", "vila", "--checkpoint", str(vila_checkpoint), "--image",
                           str(image_file), "--prompt", "what color?", "--exit-policy", "layer:1",
                           "--max-new-tokens", "3", "--json")
    assert code == 0
    obj = json.loads(out)
    assert {"text", "input_ids", "visual_span", "generated_ids", "exit_layer", "timings_ms"} <= set(obj)
    s, e = obj["visual_span"]
    assert e - s == 25 and len(obj["input_ids"]) > e
    assert obj["exit_layer"] == 1 and len(obj["generated_ids"]) <= 3
    assert obj["timings_ms"]["total"] > 0


def test_batch_of_prompts_gives_one_result_each(capsys, image_file):
    code, out, _ = run_cli(capsys, "--model", "vila", "--image", str(image_file), "--prompt", "what color?",
                           "--prompt", "how many?", "--exit-policy", "none", "--max-new-tokens", "2", "--json")
    assert code == 0
    results = json.loads(out)["results"]
    assert len(results) == 2 and all(r["exit_layer"] is None for r in results)


def assert_one_line_error(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err
    # progress bars of the loading may precede it; the error itself is the one last line
    errors = [line for line in err.strip().splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and err.strip().endswith(errors[0]), err
    for n in needles:
        assert n in errors[0], errors[0]


def test_missing_checkpoint_folder(capsys, image_file, tmp_path):
    code, _, err = run_cli(capsys, "--model", "vila", "--checkpoint", str(tmp_path / "nope"),
                           "--image", str(image_file), "--prompt", "hi")
    assert_one_line_error(code, err, "VILA checkpoint folder not found")


def test_missing_weight_file(capsys, image_file, vila_copy):
    (vila_copy / "llm" / "model.safetensors").unlink()
    code, _, err = run_cli(capsys, "--model", "vila", "--checkpoint", str(vila_copy),
                           "--image", str(image_file), "--prompt", "hi")
    assert_one_line_error(code, err, "no .safetensors weights in", "llm")


def test_truncated_weight_file(capsys, image_file, vila_copy):
    weights = vila_copy / "vision_tower" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = run_cli(capsys, "--model", "vila", "--checkpoint", str(vila_copy),
                           "--image", str(image_file), "--prompt", "hi")
    assert_one_line_error(code, err, "cannot load VILA vision tower")


def test_missing_config(capsys, image_file, vila_copy):
    (vila_copy / "config.json").unlink()
    code, _, err = run_cli(capsys, "--model", "vila", "--checkpoint", str(vila_copy),
                           "--image", str(image_file), "--prompt", "hi")
    assert_one_line_error(code, err, "missing file", "config.json")


def test_unsupported_architecture(capsys, image_file, vila_copy):
    cfg = json.loads((vila_copy / "config.json").read_text())
    cfg.update(model_type="t5", architectures=["T5ForConditionalGeneration"])
    (vila_copy / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "--model", "vila", "--checkpoint", str(vila_copy),
                           "--image", str(image_file), "--prompt", "hi")
    assert_one_line_error(code, err, "not a VILA checkpoint", "'t5'")


def test_unsupported_language_model(capsys, image_file, vila_copy):
    cfg_path = vila_copy / "llm" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_type"] = "gpt2"
    cfg_path.write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "--model", "vila", "--checkpoint", str(vila_copy),
                           "--image", str(image_file), "--prompt", "hi")
    assert code == 2 and "error: " in err and "Traceback" not in err


def test_unknown_family(capsys, image_file):
    code, _, err = run_cli(capsys, "--model", "blip", "--image", str(image_file), "--prompt", "hi")
    assert_one_line_error(code, err, "unknown model family 'blip'")


def test_unreadable_image(capsys, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    code, _, err = run_cli(capsys, "--model", "vila", "--image", str(bad), "--prompt", "hi")
    assert_one_line_error(code, err, "cannot read image", "bad.png")


def test_router_weights_of_wrong_shape(capsys, image_file, tmp_path):
    path = save_routers(Routers(8, 32, inner=16), tmp_path / "r.safetensors")  # the built-in: 8 layers, hidden 64
    code, _, err = run_cli(capsys, "--model", "vila", "--routers", str(path), "--image", str(image_file),
                           "--prompt", "hi")
    assert_one_line_error(code, err, "shape [16, 64], expected [16, 128]")


def test_router_file_with_other_keys(capsys, image_file, tmp_path):
    path = tmp_path / "r.safetensors"
    save_file({"model.visual_gates_router.0.w1.weight": torch.zeros(8, 128)}, str(path))
    code, _, err = run_cli(capsys, "--model", "vila", "--routers", str(path), "--image", str(image_file),
                           "--prompt", "hi")
    assert_one_line_error(code, err, "the model has 8 decoder layers")


def test_prompt_longer_than_context(capsys, image_file):
    code, _, err = run_cli(capsys, "--model", "vila", "--image", str(image_file), "--prompt", "red " * 600)
    assert_one_line_error(code, err, "exceeds the model's context of 256")


def test_bad_policy(capsys, image_file):
    code, _, err = run_cli(capsys, "--model", "vila", "--image", str(image_file), "--prompt", "hi",
                           "--exit-policy", "layer:x")
    assert_one_line_error(code, err, "bad exit policy")


@pytest.mark.slow
def test_real_process_prints_no_traceback(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    proc = subprocess.run([sys.executable, "-m", "engines", "run", "--model", "vila", "--image", str(bad),
                           "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "cannot read image" in proc.stderr
