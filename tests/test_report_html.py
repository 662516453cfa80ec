"""The HTML parity report (validation/report_html.py): rendered from hand-built report dicts, and
opened in Debian's headless chromium (installed by `make test`; CI must exercise it, so its absence
is a failure, not a skip)."""

import copy
import html
import re
import subprocess
from pathlib import Path

import pytest

from validation.report_html import render_html, write_html

CHROMIUM = Path("/usr/bin/chromium")
FAIL_RGB, PASS_RGB = (0xCF, 0x22, 0x2E), (0x1A, 0x7F, 0x37)  # the verdict's colours

THRESHOLDS = {"logits_max_abs": 1e-3, "stage_max_rel": 1e-4, "min_cosine": 0.99999, "near_tie": 1e-4,
              "token_agreement": 1.0, "exit_layer_agreement": 1.0}


def _stages(scale=1.0, bad=None):
    out = {"vision": {"max_abs": 3e-7 * scale, "max_rel": 4e-7 * scale, "min_cosine": 0.9999998}}
    for layer in range(4):
        out[f"layers {layer}-{layer}"] = {"max_abs": 3e-7 * scale, "max_rel": 3.9e-7 * scale, "min_cosine": 0.9999997}
    out["logits"] = {"max_abs": 1.8e-7 * scale, "max_rel": 4e-7 * scale, "min_cosine": 0.9999999}
    for layer in range(3):
        out[f"router {layer}"] = {"max_abs": 1.7e-8 * scale, "max_rel": 2e-6 * scale, "min_cosine": 0.99999994}
    if bad:
        out[bad] = {"max_abs": 0.03, "max_rel": 0.042, "min_cosine": 0.9991}
    return out


def passing_report():
    exits = [2, 2, 1, 1, 2, 2, 2, 1]
    return {
        "passed": True, "samples": 8, "precision": "fp32", "thresholds": dict(THRESHOLDS), "policy": "dynamic",
        "reference": {"exit_layers": exits, "seconds": 5.47},
        "backends": {
            "onnxruntime": {
                "passed": True, "skipped": None,
                "checks": {"logits": True, "stages": True, "exit_layers": True, "tokens": True},
                "failed_stages": [], "exit_layer_agreement": 1.0, "logits_max_abs_diff": 1.79e-7,
                "logits_min_cosine": 0.9999998, "token_agreement": 1.0,
                "near_ties": [{"sample": 5, "reference": 2, "backend": 1, "near_tie_layers": [1]}],
                "exit_disagreements": [], "stages": _stages(), "exit_layers": [2, 2, 1, 1, 2, 1, 2, 1],
                "seconds": 1.17,
            },
        },
        "speed": {
            "exit_layer": 2, "visual_tokens": 25, "text_tokens": 40, "kv_bytes_full": 66560,
            "kv_bytes_saved": 6400, "analytic_speedup": 1.1136,
            "pytorch": {"prefill_ms_none": 48.4, "vision_ms_none": 5.3, "decode_ms_per_token_none": 4.98,
                        "prefill_ms_exit": 40.1, "vision_ms_exit": 5.2, "decode_ms_per_token_exit": 4.1,
                        "prefill_speedup": 1.207, "efficiency": 1.0838},
            "onnxruntime": {"prefill_ms_none": 11.69, "vision_ms_none": 0.79, "decode_ms_per_token_none": 5.35,
                            "prefill_ms_exit": 8.10, "vision_ms_exit": 0.76, "decode_ms_per_token_exit": 5.89,
                            "prefill_speedup": 1.4425, "efficiency": 1.2953},
        },
    }


def failing_report():
    data = passing_report()
    data["passed"] = False
    data["precision"] = "fp16"
    ort = data["backends"]["onnxruntime"]
    ort.update({
        "passed": False,
        "checks": {"logits": True, "stages": False, "exit_layers": False, "tokens": True},
        "failed_stages": ["layers 2-2"], "stages": _stages(10.0, bad="layers 2-2"),
        "exit_layer_agreement": 0.875,
        "exit_disagreements": [{"sample": 3, "reference": 1, "backend": None, "near_tie_layers": []}],
    })
    data["backends"]["tensorrt"] = {"passed": None, "skipped": "no CUDA GPU on this machine"}
    return data


def skipped_no_exit_report():
    """Policy none (no exit anywhere), TensorRT skipped with a hostile reason, speed without exit keys."""
    data = passing_report()
    data["policy"] = "none"
    data["reference"]["exit_layers"] = [None] * 8
    data["backends"]["onnxruntime"]["exit_layers"] = [None] * 8
    data["backends"]["onnxruntime"]["near_ties"] = []
    data["backends"]["tensorrt"] = {"passed": None, "skipped": "tensorrt <script>alert(1)</script> & missing"}
    data["speed"] = {
        "exit_layer": None, "visual_tokens": 25, "text_tokens": 40, "kv_bytes_full": 66560,
        "pytorch": {"prefill_ms_none": 48.4, "vision_ms_none": 5.3, "decode_ms_per_token_none": 4.98},
    }
    return data


def verdict_section(page: str) -> str:
    m = re.search(r'<section id="verdict".*?</section>', page, re.S)
    assert m, "no verdict section"
    return m.group(0)


def text_of(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


# ------------------------------------------------------------------------------ rendering


def test_passing_report_states_the_facts():
    page = render_html(passing_report())
    verdict = text_of(verdict_section(page))
    assert "PASSED" in verdict and "FAILED" not in page
    assert "fp32" in verdict and "8 samples" in verdict
    assert page.count("<svg") == 3  # error per stage, exit histogram, latency
    assert 'class="verdict pass"' in page
    body = text_of(page)
    assert "onnxruntime" in body and "1.79e-07" in body and "0.9999998" in body
    assert "near ties (1)" in body and "real exit disagreements (0)" in body
    # the near tie's record: sample 5, reference exit 2, backend exit 1, tie at layer 1
    assert re.search(r"<td>5</td><td>2</td><td>1</td><td>1</td>", page)
    # speed table: measured vs analytic speed-up, efficiency, KV saved
    assert "1.44×" in body and "1.11×" in body and "129.5%" in body and "6.25 KiB" in body
    # thresholds
    assert "stage_max_rel" in body and "0.0001" in body and "0.99999" in body
    assert "n/a" not in body


def test_failing_report_names_backend_check_and_stage():
    page = render_html(failing_report())
    verdict = text_of(verdict_section(page))
    assert "FAILED" in verdict and "PASSED" not in page
    assert 'class="verdict fail"' in page
    assert "fp16" in verdict
    assert "onnxruntime failed" in verdict
    assert "stage errors" in verdict and "exit-layer agreement" in verdict
    assert "final logits" not in verdict  # that check passed
    assert "stage over threshold layers 2-2" in verdict and "0.042" in verdict
    assert "layers 1-1" not in verdict
    assert "87.5%" in verdict and "1 real disagreement" in verdict
    body = text_of(page)
    assert "real exit disagreements (1)" in body and "no exit" in body
    assert "tensorrt" in body and "no CUDA GPU on this machine" in body
    assert page.count("<svg") == 3


def test_skipped_backend_and_no_exit():
    page = render_html(skipped_no_exit_report())
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; missing" in page
    body = text_of(page)
    assert "SKIPPED" in body and "PASSED" in text_of(verdict_section(page))
    # no exit: exit columns and the analytic ratio read n/a; the plots are still drawn
    row = re.search(r"<tr><td>pytorch</td>.*?</tr>", page).group(0)
    assert text_of(row).count("n/a") == 6, row
    assert "KV bytes saved by the exit" in body
    assert page.count("<svg") == 3


def test_missing_keys_render_na():
    assert "n/a" in render_html({})
    data = failing_report()
    ort = data["backends"]["onnxruntime"]
    for key in ("logits_max_abs_diff", "logits_min_cosine", "token_agreement", "checks", "near_ties"):
        ort[key] = None
    ort["stages"]["layers 3-3"] = {"missing": True}
    data["speed"] = None
    data["thresholds"] = {}
    del data["samples"]
    page = render_html(data)
    assert "FAILED" in text_of(verdict_section(page))
    assert "missing" in text_of(page) and "n/a" in text_of(page)
    assert page.count("<svg") == 2  # no latency plot without speed
    data["backends"] = {"tensorrt": {"passed": None, "skipped": "no GPU"}}
    data["reference"] = {}
    page = render_html(data)
    assert "no backend was compared" in text_of(verdict_section(page))
    assert page.count("<svg") == 0


def test_text_is_escaped_in_names():
    data = passing_report()
    data["backends"]['b"<i>'] = copy.deepcopy(data["backends"]["onnxruntime"])
    data["backends"]['b"<i>']["stages"]["$x$ <stage>"] = {"max_abs": 1.0, "max_rel": 1.0, "min_cosine": 0.5}
    page = render_html(data)
    assert "<i>" not in page and "<stage>" not in page
    assert "b&quot;&lt;i&gt;" in page and "$x$ &lt;stage&gt;" in page


# ------------------------------------------------------------------------------ in a browser


def chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the HTML report test needs Debian's chromium. `make test` installs "
                    "it (apt-get install -y chromium); CI must run this test, so it does not skip.")
    profile = tmp_path / "profile"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc


@pytest.mark.parametrize("kind", ["passing", "failing"])
def test_page_in_headless_chromium(kind, tmp_path):
    from PIL import Image

    data = passing_report() if kind == "passing" else failing_report()
    path = write_html(data, tmp_path / "report" / "parity.html")
    assert path.exists()
    url = path.resolve().as_uri()

    png = tmp_path / "page.png"
    dom = chromium(tmp_path, "--dump-dom", f"--screenshot={png}", "--window-size=1200,2000", url).stdout
    verdict = text_of(verdict_section(dom))
    assert ("PASSED" if kind == "passing" else "FAILED") in verdict
    if kind == "failing":
        assert "layers 2-2" in verdict
    assert len(re.findall(r"<svg\b", dom)) == 3

    image = Image.open(png).convert("RGB")
    assert image.size == (1200, 2000)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, f"screenshot looks blank: {len(colours or [])} colours"
    # the verdict at the top is drawn in its colour (large text and border): CSS and layout were applied
    top = image.crop((0, 0, 1200, 400)).getcolors(maxcolors=1 << 20) or []
    counts = {rgb: n for n, rgb in top}
    expected = PASS_RGB if kind == "passing" else FAIL_RGB
    assert counts.get(expected, 0) > 500, f"verdict colour {expected} barely present: {counts.get(expected, 0)} px"
