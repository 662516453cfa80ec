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
