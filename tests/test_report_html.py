"""The HTML parity report (validation/report_html.py) of real reports: `validate_package` run on a
passing package, a failing one (a perturbed segment and router), and one without routers, each page
also opened in Debian's headless chromium (installed by `make test`; CI must exercise it, so its
absence is a failure, not a skip)."""

import copy
import html
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest

from conftest import TARGET_EXITS, sample_pairs
from helpers import perturb_weight, write_samples
from validation.parity import validate_package
from validation.report_html import render_html

CHROMIUM = Path("/usr/bin/chromium")
FAIL_RGB, PASS_RGB = (0xCF, 0x22, 0x2E), (0x1A, 0x7F, 0x37)  # the verdict's colours
HOSTILE = "tensorrt <script>alert(1)</script> & missing"
CHECK_NAMES = {"logits": "final logits", "stages": "stage errors", "exit_layers": "exit-layer agreement",
               "tokens": "generated-token agreement"}


@dataclass
class Report:
    data: dict  # parity.json as written
    page: str  # parity.html as written
    path: Path  # of parity.html


def validated(package: Path, model, samples, **options) -> Report:
    images, prompts = samples
    report = validate_package(package, model=model, images=images, prompts=prompts, progress=False, **options)
    path = Path(report.data["html"])
    return Report(json.loads(Path(report.data["json"]).read_text()), path.read_text(), path)


def copy_package(package: Path, tmp_path_factory, name: str) -> Path:
    return Path(shutil.copytree(package, tmp_path_factory.mktemp(name) / "pkg"))


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """The six samples of conftest (exits TARGET_EXITS) as an images folder and a prompts file."""
    return write_samples(tmp_path_factory.mktemp("samples"), sample_pairs())


@pytest.fixture(scope="module")
def passing(vila_package, vila_exit_model, samples, tmp_path_factory) -> Report:
    package = copy_package(vila_package, tmp_path_factory, "passing")
    return validated(package, vila_exit_model, samples, speed_repeats=1)


@pytest.fixture(scope="module")
def perturbed(vila_package, tmp_path_factory) -> Path:
    """vila_package with layer 2's largest weight scaled by 1.01 (its stage fails, its tokens hold)
    and router 2's output weights negated (its decision flips: samples 2 and 3 change exit)."""
    package = copy_package(vila_package, tmp_path_factory, "perturbed")
    perturb_weight(package, "decoder.02-02", 1.01)
    hypernet = onnx.load(str(package / "graphs" / "hypernet.onnx"), load_external_data=False)
    # the routers' stacked output weights: [layers, 2 logits, inner]
    w2 = next(t.name for t in hypernet.graph.initializer if len(t.dims) == 3 and t.dims[1] == 2)
    perturb_weight(package, "hypernet", -1.0, tensor=w2, index=2)
    return package


@pytest.fixture(scope="module")
def failing(perturbed, vila_exit_model, samples, tmp_path_factory) -> Report:
    package = copy_package(perturbed, tmp_path_factory, "failing")
    return validated(package, vila_exit_model, samples, speed_repeats=0)


@pytest.fixture(scope="module")
def near_ties(perturbed, vila_exit_model, samples, tmp_path_factory) -> Report:
    """The failing package judged with a near-tie margin above every router margin (+-5): its
    flipped exits are near ties, not disagreements."""
    package = copy_package(perturbed, tmp_path_factory, "near-ties")
    return validated(package, vila_exit_model, samples, speed_repeats=0, thresholds={"near_tie": 100.0})


@pytest.fixture(scope="module")
def no_routers(vila_package_no_routers, samples, tmp_path_factory) -> Report:
    """A package without routers (policy none), TensorRT skipped for a reason holding markup."""
    package, model = vila_package_no_routers
    package = copy_package(package, tmp_path_factory, "no-routers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("validation.parity.tensorrt_unavailable", lambda: HOSTILE)
        return validated(package, model, samples, speed_repeats=0)


def verdict_section(page: str) -> str:
    m = re.search(r'<section id="verdict".*?</section>', page, re.S)
    assert m, "no verdict section"
    return m.group(0)


def text_of(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def speed_row(page: str, runner: str) -> str:
    m = re.search(rf"<tr><td>{runner}</td>.*?</tr>", page)
    assert m, f"no speed row for {runner}"
    return text_of(m.group(0))


# ------------------------------------------------------------------------------ rendering


def test_passing_report_states_the_facts(passing):
    data, page = passing.data, passing.page
    assert data["passed"] is True and data["samples"] == len(TARGET_EXITS)
    verdict = text_of(verdict_section(page))
    assert "PASSED" in verdict and "FAILED" not in page
    assert "fp32" in verdict and f"{data['samples']} samples" in verdict
    assert page.count("<svg") == 3  # error per stage, exit histogram, latency
    assert 'class="verdict pass"' in page
    body = text_of(page)
    ort = data["backends"]["onnxruntime"]
    assert f"{ort['logits_max_abs_diff']:.3g}" in body and f"{ort['logits_min_cosine']:.7g}" in body
    assert "near ties (0)" in body and "real exit disagreements (0)" in body
    exits = ", ".join("no exit" if e is None else str(e) for e in TARGET_EXITS)
    assert data["reference"]["exit_layers"] == TARGET_EXITS and f"exit layers {exits};" in body
    # speed table: measured vs analytic speed-up, efficiency, KV saved
    speed = data["speed"]
    for runner in ("pytorch", "onnxruntime"):
        measured, row = speed[runner], speed_row(page, runner)
        assert f"{measured['prefill_ms_none']:.2f}" in row and f"{measured['prefill_ms_exit']:.2f}" in row
        assert f"{measured['prefill_speedup']:.2f}×" in row and f"{100 * measured['efficiency']:.1f}%" in row
        assert f"{speed['analytic_speedup']:.2f}×" in row
    assert 1024 <= speed["kv_bytes_saved"] < 1024 ** 2 and f"{speed['kv_bytes_saved'] / 1024:.2f} KiB" in body
    for name, value in data["thresholds"].items():
        assert re.search(rf"<th>{name}</th><td>{re.escape(f'{value:.6g}')}</td>", page), name
    # no GPU here (CI neither): TensorRT is recorded as skipped, with the reason
    trt = data["backends"]["tensorrt"]
    assert trt["skipped"] and trt["skipped"] in body and "SKIPPED" in body
    assert "n/a" not in body


def test_failing_report_names_backend_check_and_stage(failing):
    data, page = failing.data, failing.page
    ort = data["backends"]["onnxruntime"]
    assert data["passed"] is False and ort["first_failed_stage"] == "layers 2-2"
    assert ort["checks"]["stages"] is False and ort["checks"]["exit_layers"] is False
    assert ort["checks"]["logits"] is True  # the probe runs without an exit: only layer 2 is off
    verdict = text_of(verdict_section(page))
    assert "FAILED" in verdict and "PASSED" not in page
    assert 'class="verdict fail"' in page
    assert "onnxruntime failed" in verdict
    for check, name in CHECK_NAMES.items():  # failed checks are named, passed ones are not
        assert (name in verdict) is (ort["checks"][check] is False), check
    stage = ort["stages"]["layers 2-2"]
    assert "stage over threshold layers 2-2" in verdict and f"max rel {stage['max_rel']:.3g}" in verdict
    assert "router 2" in verdict
    assert "layers 1-1" not in verdict and "router 1" not in verdict
    flips = [(d["sample"], d["reference"], d["backend"]) for d in ort["exit_disagreements"]]
    assert flips == [(2, None, 2), (3, 2, None)]
    assert "66.7%" in verdict and "2 real disagreement" in verdict
    assert "real exit disagreements (2)" in text_of(page)
    assert "<tr><td>2</td><td>no exit</td><td>2</td><td>—</td></tr>" in page
    assert "<tr><td>3</td><td>2</td><td>no exit</td><td>—</td></tr>" in page
    assert page.count("<svg") == 2 and "No latency measurements in this report." in page  # speed_repeats=0


def test_near_ties_are_listed_apart_from_real_disagreements(near_ties):
    data, page = near_ties.data, near_ties.page
    ort = data["backends"]["onnxruntime"]
    assert [t["sample"] for t in ort["near_ties"]] == [2, 3] and ort["exit_disagreements"] == []
    verdict = text_of(verdict_section(page))
    assert "FAILED" in verdict and "stage errors" in verdict  # the stages still fail
    assert "exit-layer agreement" not in verdict
    body = text_of(page)
    assert "near ties (2)" in body and "real exit disagreements (0)" in body
    # sample 2: reference never exits, the backend after layer 2; margins under the limit at 0, 1, 2
    assert "<tr><td>2</td><td>no exit</td><td>2</td><td>0, 1, 2</td></tr>" in page
    assert re.search(r"<th>near_tie</th><td>100</td>", page)


def test_report_without_routers(no_routers):
    data, page = no_routers.data, no_routers.page
    assert data["policy"] == "none" and data["backends"]["tensorrt"]["skipped"] == HOSTILE
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; missing" in page
    verdict = text_of(verdict_section(page))
    assert "PASSED" in verdict and "exit policy none" in verdict
    body = text_of(page)
    assert "SKIPPED" in body
    exits = ", ".join(["no exit"] * len(TARGET_EXITS))
    assert f"exit layers {exits};" in body  # the reference's line; the backend's row says the same
    assert not any(s.startswith("router") for s in data["backends"]["onnxruntime"]["stages"])
    assert "router" not in body.split("errors per stage")[1].split("Plots")[0]
    assert page.count("<svg") == 2  # error per stage, exit histogram (all "no exit"); no speed measured
    assert "No speed measurements in this report." in page


def test_missing_keys_render_na(passing, failing):
    assert "n/a" in render_html({})
    data = copy.deepcopy(failing.data)
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
    # speed measured without an exit: the exit columns and the analytic ratio read n/a
    data = copy.deepcopy(passing.data)
    speed = data["speed"]
    speed["exit_layer"] = None
    for key in ("kv_bytes_saved", "analytic_speedup"):
        del speed[key]
    for runner in ("pytorch", "onnxruntime"):
        speed[runner] = {k: v for k, v in speed[runner].items() if k.endswith("_none")}
    page = render_html(data)
    assert speed_row(page, "pytorch").count("n/a") == 6
    assert re.search(r"<th>KV bytes saved by the exit</th><td>n/a</td>", page)
    assert page.count("<svg") == 3


def test_text_is_escaped_in_names(passing):
    data = copy.deepcopy(passing.data)
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
def test_page_in_headless_chromium(kind, request, tmp_path):
    from PIL import Image

    report: Report = request.getfixturevalue(kind)  # the page validate_package wrote
    png = tmp_path / "page.png"
    dom = chromium(tmp_path, "--dump-dom", f"--screenshot={png}", "--window-size=1200,2000",
                   report.path.resolve().as_uri()).stdout
    verdict = text_of(verdict_section(dom))
    assert ("PASSED" if kind == "passing" else "FAILED") in verdict
    if kind == "failing":
        assert "layers 2-2" in verdict
    assert len(re.findall(r"<svg\b", dom)) == report.page.count("<svg") > 0

    image = Image.open(png).convert("RGB")
    assert image.size == (1200, 2000)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, f"screenshot looks blank: {len(colours or [])} colours"
    # the verdict at the top is drawn in its colour (large text and border): CSS and layout were applied
    top = image.crop((0, 0, 1200, 400)).getcolors(maxcolors=1 << 20) or []
    counts = {rgb: n for n, rgb in top}
    expected = PASS_RGB if kind == "passing" else FAIL_RGB
    assert counts.get(expected, 0) > 500, f"verdict colour {expected} barely present: {counts.get(expected, 0)} px"
