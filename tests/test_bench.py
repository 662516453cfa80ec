"""The benchmark runs end to end on a tiny preset and its figures are consistent with each other.

Its speed figures are not asserted (a 2-core CI box says nothing about speed); what is checked is
that every contender ran, the ratios are the quotients of the medians they are printed from, and
the analytic FLOPs ratio and KV-cache bytes follow from the shape."""

import pytest

from exporter.dyvte.flops import flops_ratio
from exporter.models.llava import Llava
from validation.bench import run_bench, table


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_bench(preset="tiny", exit_layer=1, repeats=1, decode_tokens=2,
                     workdir=str(tmp_path_factory.mktemp("bench")))


def test_every_contender_ran(result):
    for key in ("hf_prefill_s", "hf_prefill_exit_s", "mono_prefill_s", "mono_same_options_prefill_s",
                "ort_prefill_none_s", "ort_prefill_exit_s", "ort_prefill_dynamic_s", "ort_decode_none_ms_per_token",
                "ort_decode_exit_ms_per_token"):
        assert result[key] > 0, key


def test_ratios_are_the_quotients_of_the_medians(result):
    r = result
    assert r["ort_exit_speedup"] == pytest.approx(r["ort_prefill_none_s"] / r["ort_prefill_exit_s"])
    assert r["orchestrated_vs_monolithic_prefill"] == pytest.approx(r["ort_prefill_none_s"] / r["mono_prefill_s"])
    assert r["ort_exit_efficiency"] == pytest.approx(r["ort_exit_speedup"] / r["analytic_speedup"])


def test_analytic_ratio_and_kv_bytes_follow_from_the_shape(result):
    model = Llava().preset(seed=0, name="tiny")
    s, shape = model.shape, result["shape"]
    assert shape["layers"] == s.num_layers and shape["exit_layer"] == 1
    expected = 1 / flops_ratio(model.shape, shape["text_tokens"], shape["visual_tokens"], 1)
    assert result["analytic_speedup"] == pytest.approx(expected)
    per_token = 2 * s.num_kv_heads * s.head_dim * 4
    assert result["kv_bytes_saved"] == (s.num_layers - 2) * shape["visual_tokens"] * per_token
    text = table(result)
    assert "monolithic" in text and f"{result['analytic_speedup']:.2f}x" in text


@pytest.fixture(scope="module")
def per_precision(tmp_path_factory):
    import torch

    from engines.backends.torch_backend import TorchBackend
    from engines.orchestrator import Runtime
    from validation.bench import TEXT_TOKENS, _prompt, run_precisions

    torch.manual_seed(0)
    model = Llava().preset(seed=0, name="tiny")
    prompt = _prompt(Runtime(TorchBackend(model), model.processor), TEXT_TOKENS)
    return run_precisions(model, prompt, tmp_path_factory.mktemp("prec"), ["fp32", "int4"], repeats=1,
                          decode_tokens=2)


def test_one_run_gives_every_decode_target(per_precision):
    """The per-precision run carries transformers and the monolithic graph in its rotation, and the
    targets table is made of same-run quotients of the medians it prints."""
    from validation.bench import decode_targets, targets_table

    r = per_precision
    b, p = r["baselines"], r["precisions"]
    assert all(v > 0 for v in b.values()), b
    assert r["read_bandwidth_threads_gb_s"] > 0 and r["read_bandwidth_gb_s"] > 0
    rows = {x["what"]: x for x in decode_targets(r)}
    assert len(rows) == 6, list(rows)
    fp32, int4 = p["fp32"], p["int4"]
    assert fp32["share_of_limit"] == pytest.approx(fp32["limit_ms_per_token"] / fp32["decode_ms_per_token"])
    mono = rows["fp32 decode without exit / monolithic graph (ONNX Runtime defaults)"]
    assert mono["value"] == pytest.approx(fp32["decode_ms_per_token"] / b["monolithic_decode_ms_per_token"])
    hf = rows["int4 decode speed-up over transformers' fp32 generate"]
    assert hf["value"] == pytest.approx(b["transformers_decode_ms_per_token"] / int4["decode_ms_per_token"])
    assert hf["met"] == (hf["value"] >= 4)
    prefill = rows["prefill int4 / fp32 (time ratio)"]
    assert prefill["value"] == pytest.approx(int4["prefill_s"] / fp32["prefill_s"])
    # the limit: weights as stored + the KV cache, read once at the measured bandwidth
    limit = 1e3 * (fp32["decode_weight_bytes"] + r["kv_cache_bytes"]) / (r["read_bandwidth_gb_s"] * 1e9)
    assert fp32["limit_ms_per_token"] == pytest.approx(limit)
    assert int4["decode_weight_bytes"] < 0.4 * fp32["decode_weight_bytes"]
    assert "int4 decode speed-up" in targets_table(decode_targets(r))
