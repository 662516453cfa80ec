"""Accuracy evaluation, analytic FLOPs, and DyVTE's claims on the committed built-in VILA."""

import json

import pytest

from exporter.builtin import builtin_checkpoint
from exporter.data.synthetic import synthetic_split
from engines.core.shape import ModelShape
from exporter.dyvte.flops import flops_ratio, layer_flops, prefill_flops
from exporter.dyvte.router import save_routers, seeded_routers
from exporter.models import load_model
from validation.__main__ import main
from validation.accuracy import checks, evaluate_accuracy, format_report

SHAPE = ModelShape(num_layers=4, hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4, vocab_size=10,
                   max_positions=64, intermediate_size=16)


def test_layer_flops_by_hand():
    # 3 tokens: q/o widths 8, k/v widths 4 -> 3*2*8*(8+4+4+8); MLP 3*3*2*8*16; attention 4*8*(1+2+3)
    assert layer_flops(SHAPE, 3) == 3 * 2 * 8 * 24 + 3 * 3 * 2 * 8 * 16 + 4 * 8 * 6


def test_prefill_flops_with_exit():
    full = prefill_flops(SHAPE, 5, 20, None)
    assert full == 4 * layer_flops(SHAPE, 25) + 2 * 8 * 10
    assert prefill_flops(SHAPE, 5, 20, 3) == full  # an exit after the last layer is no exit
    at1 = prefill_flops(SHAPE, 5, 20, 1)
    assert at1 == 2 * layer_flops(SHAPE, 25) + 2 * layer_flops(SHAPE, 5) + 2 * 8 * 10
    ratios = [flops_ratio(SHAPE, 5, 20, k) for k in range(4)]
    assert ratios == sorted(ratios) and ratios[-1] == 1.0 and ratios[0] < 0.5
    with_routers = prefill_flops(SHAPE, 5, 20, 1, router_inner=32)
    assert with_routers - at1 == 2 * 2 * (16 * 32 + 32 * 2)  # routers 0 and 1 were asked


def test_checks_compare_dynamic_with_static_exits_of_equal_or_higher_flops():
    report = {"num_layers": 4, "full_accuracy": 0.95, "dynamic_accuracy": 0.94, "dynamic_mean_exit_layer": 1.2,
              "dynamic_flops_ratio": 0.5,
              "static": {"0": {"accuracy": 0.99, "flops_ratio": 0.4}, "1": {"accuracy": 0.93, "flops_ratio": 0.5},
                         "2": {"accuracy": 0.94, "flops_ratio": 0.7}}}
    c = checks(report)
    assert c["static_layers_compared"] == [1, 2]  # layer 0 is cheaper: not a fair comparison
    assert all(c[k] for k in c if k != "static_layers_compared")
    report["static"]["2"]["accuracy"] = 0.945
    assert not checks(report)["dynamic_not_worse_than_static_of_equal_or_higher_flops"]
    report.update(dynamic_mean_exit_layer=3.0, dynamic_accuracy=0.9)
    c = checks(report)
    assert not c["routers_exit"] and not c["dynamic_within_2_points_of_full"]


def test_accuracy_command_writes_the_json_keys(tmp_path, vila_checkpoint, capsys):
    routers = save_routers(seeded_routers(4, 64, 1, inner=64), tmp_path / "r.safetensors")
    out = tmp_path / "acc.json"
    code = main(["accuracy", "--model", "vila", "--checkpoint", str(vila_checkpoint), "--routers", str(routers),
                 "--samples", "7", "--batch-size", "4", "--max-new-tokens", "2", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    for key in ("full_accuracy", "dynamic_accuracy", "dynamic_mean_exit_layer", "dynamic_flops_ratio", "static",
                "checks", "num_samples"):
        assert key in report
    assert report["num_samples"] == 7
    assert sorted(report["static"]) == ["0", "1", "2"]
    for k, s in report["static"].items():
        assert set(s) >= {"accuracy", "flops_ratio"} and s["mean_exit_layer"] == int(k)
        assert 0 < s["flops_ratio"] < 1
    assert 0 <= report["dynamic_mean_exit_layer"] <= 3
    printed = capsys.readouterr().out
    assert "dynamic" in printed and "layer:2" in printed


def test_accuracy_command_errors(tmp_path, capsys):
    assert main(["accuracy", "--model", "nope"]) == 2
    assert "unknown model family 'nope'" in capsys.readouterr().err
    assert main(["accuracy", "--model", "vila", "--data", str(tmp_path / "x.jsonl")]) == 2
    assert "data file not found" in capsys.readouterr().err


def test_builtin_vila_is_the_default_and_has_the_vila_shape():
    if builtin_checkpoint("vila") is None:
        pytest.fail("exporter/builtin/vila is missing: run python -m exporter.builtin.train_vila")
    model = load_model("vila")
    assert model.source.get("builtin") and model.routers is not None
    assert model.shape.num_layers >= 8
    prompt = model.processor.build("what color is the circle?", synthetic_split("eval", 1)[0].image)
    assert prompt.num_visual >= 36 and prompt.num_visual / len(prompt.input_ids) > 0.4
    assert type(model.vision.tower).__name__ == "SiglipVisionModel"
    assert model.vision.projector.kind == "mlp_downsample"
    assert type(model.native.llm).__name__ == "LlamaForCausalLM"


@pytest.fixture(scope="module")
def builtin_report():
    if builtin_checkpoint("vila") is None:
        pytest.fail("exporter/builtin/vila is missing: run python -m exporter.builtin.train_vila")
    model = load_model("vila")
    report = evaluate_accuracy(model, synthetic_split("eval", 500), batch_size=100)
    print(format_report(report))
    return report


def test_builtin_vila_answers_and_its_routers_exit_early_without_losing_accuracy(builtin_report):
    r = builtin_report
    L = r["num_layers"]
    assert r["full_accuracy"] >= 0.90
    assert r["dynamic_accuracy"] >= r["full_accuracy"] - 0.02
    assert r["dynamic_mean_exit_layer"] < L - 1
    assert r["dynamic_flops_ratio"] < 1.0


def test_builtin_vila_dynamic_exit_beats_every_static_exit_of_equal_or_higher_flops(builtin_report):
    r = builtin_report
    compared = {k: s for k, s in r["static"].items() if s["flops_ratio"] >= r["dynamic_flops_ratio"]}
    for k, s in compared.items():
        assert r["dynamic_accuracy"] >= s["accuracy"], f"layer:{k} {s} vs dynamic {r['dynamic_accuracy']}"
    assert all(v for v in r["checks"].values() if isinstance(v, bool))


def test_builtin_training_script_runs_end_to_end(tmp_path, capsys):
    """The script that made exporter/builtin/vila, a few steps of each stage: writes a loadable VILA
    folder with routers and a training record."""
    from exporter.builtin.train_vila import main as train_main

    out = tmp_path / "vila"
    code = train_main(["--steps", "6", "--batch-size", "2", "--vision-steps", "2", "--polish-from", "3",
                       "--eval-samples", "7", "--router-samples", "8", "--router-epochs", "1",
                       "--router-eval-samples", "4", "--output", str(out), "--no-progress"])
    assert code == 0
    model = load_model("vila", out)
    assert model.routers is not None and len(model.routers) == 8
    record = json.loads((out / "training.json").read_text())
    assert record["base"]["history"][-1]["step"] == 6 and len(record["routers"]["layers"]) == 8
    assert "exit labels" in capsys.readouterr().out
