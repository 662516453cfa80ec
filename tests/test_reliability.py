"""Careless and hostile input, table-driven: each case is (command line, expected exit status,
words the one `error: ...` line must hold), with an optional setup that damages a private copy of
a checkpoint or package and an optional check run afterwards (e.g. the user's files are intact).

Add a case by appending a `Case` to `CASES`. Commands run in-process through the CLIs' `main`
functions; placeholders in argv: {tmp} (the test's folder), {ckpt} (a private copy of the tiny VILA
checkpoint), {pkg} (a private copy of the session's fp32 package), {img} (an image file)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from engines.core.manifest import canonical_sha256


@dataclass
class Env:
    tmp: Path
    ckpt_source: Path
    pkg_source: Path
    img: Path
    _ckpt: Path | None = None
    _pkg: Path | None = None

    @property
    def ckpt(self) -> Path:
        if self._ckpt is None:
            self._ckpt = Path(shutil.copytree(self.ckpt_source, self.tmp / "ckpt"))
        return self._ckpt

    @property
    def pkg(self) -> Path:
        if self._pkg is None:
            self._pkg = Path(shutil.copytree(self.pkg_source, self.tmp / "pkg"))
        return self._pkg

    def expand(self, arg: str) -> str:
        out = arg
        for key in ("tmp", "ckpt", "pkg", "img"):
            if "{" + key + "}" in out:
                out = out.replace("{" + key + "}", str(getattr(self, key)))
        return out

    # helpers for setups
    def edit_manifest(self, edit: Callable[[dict], object], resign: bool = True) -> None:
        """`edit` changes the manifest's data in place, or returns `Replace(new data)`."""
        path = self.pkg / "manifest.json"
        data = json.loads(path.read_text())
        result = edit(data)
        data = result.value if isinstance(result, Replace) else data
        if resign and isinstance(data, dict):  # a hand edit that also recomputes the manifest's checksum
            data["manifest_sha256"] = canonical_sha256(data)
        path.write_text(json.dumps(data))

    def edit_config(self, sub: str, edit: Callable[[dict], object]) -> None:
        path = self.ckpt / sub / "config.json"
        data = json.loads(path.read_text())
        result = edit(data)
        path.write_text(json.dumps(result.value if isinstance(result, Replace) else data))


@dataclass
class Replace:
    value: object


@dataclass
class Case:
    id: str
    cli: str  # export | run | validation
    argv: list[str]
    words: tuple[str, ...] = ()
    code: int = 2
    setup: Callable[[Env], None] | None = None
    check: Callable[[Env], None] | None = None
    marks: tuple = field(default_factory=tuple)
    warns: tuple[str, ...] = ()  # words of a `warning: ...` line on stderr (accepted, with a reason)


def user_folder(env: Env) -> None:
    folder = env.tmp / "mine"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")


def user_folder_intact(env: Env) -> None:
    assert (env.tmp / "mine" / "thesis.txt").read_text() == "years of work"


def user_file(env: Env) -> None:
    (env.tmp / "notes.txt").write_text("keep me")


def checkpoint_intact(env: Env) -> None:
    assert (env.ckpt / "llm" / "config.json").is_file() and (env.ckpt / "config.json").is_file()
    assert not (env.ckpt / "manifest.json").exists()


def package_with_user_file(env: Env) -> None:
    (env.pkg / "thesis.txt").write_text("mine")


def package_intact(env: Env) -> None:
    from engines.core.manifest import Manifest

    Manifest.load(env.pkg)


E = ["--no-progress", "--no-validate"]  # export flags of the cases refused before any work

CASES = [
    # ---------------------------------------------------------------- --output never destroys data
    Case("output-user-folder", "export", ["--model", "vila", "--output", "{tmp}/mine", *E],
         ("--output", "not an export package", "--force"), setup=user_folder, check=user_folder_intact),
    Case("output-user-file", "export", ["--model", "vila", "--output", "{tmp}/notes.txt", *E],
         ("is a file", "--force"), setup=user_file,
         check=lambda env: (env.tmp / "notes.txt").read_text() == "keep me" or pytest.fail("file lost")),
    Case("output-package-with-user-files", "export", ["--model", "vila", "--output", "{pkg}", *E],
         ("holds files of yours", "thesis.txt"), setup=package_with_user_file, check=package_intact),
    Case("output-is-the-checkpoint", "export",
         ["--model", "vila", "--checkpoint", "{ckpt}", "--output", "{ckpt}", "--force", *E],
         ("an input of this export", "even with --force"), check=checkpoint_intact),
    Case("output-inside-the-checkpoint", "export",
         ["--model", "vila", "--checkpoint", "{ckpt}", "--output", "{ckpt}/llm", "--force", *E],
         ("an input of this export",), check=checkpoint_intact),
    Case("output-holds-the-checkpoint", "export",
         ["--model", "vila", "--checkpoint", "{ckpt}", "--output", "{tmp}", "--force", *E],
         ("an input of this export",), check=checkpoint_intact),
    Case("output-is-the-routers-file", "export",
         ["--model", "vila", "--routers", "{tmp}/notes.txt", "--output", "{tmp}/notes.txt", "--force", *E],
         ("an input of this export",), setup=user_file),
    Case("output-under-proc", "export", ["--model", "vila", "--output", "/proc/dyvte-pkg", *E],
         ("cannot write --output", "/proc/dyvte-pkg")),
    Case("output-under-sys", "export", ["--model", "vila", "--output", "/sys/dyvte-pkg", *E],
         ("cannot write --output", "/sys/dyvte-pkg")),
    Case("output-is-a-mount-point", "export", ["--model", "vila", "--output", "/proc", *E], ("mount point",)),
    Case("output-parent-is-a-file", "export", ["--model", "vila", "--output", "{tmp}/notes.txt/pkg", *E],
         ("notes.txt is a file",), setup=user_file),
    # ---------------------------------------------------------------- flags checked before any work
    Case("exit-window-negative", "export", ["--model", "vila", "--exit-window=-1:-2", "--output", "{tmp}/o", *E],
         ("--exit-window", "'-1:-2'")),
    Case("exit-window-reversed", "export", ["--model", "vila", "--exit-window", "3:1", "--output", "{tmp}/o", *E],
         ("--exit-window", "START <= END")),
    Case("exit-window-words", "export", ["--model", "vila", "--exit-window", "a:b", "--output", "{tmp}/o", *E],
         ("--exit-window",)),
    Case("thresholds-missing", "export", ["--model", "vila", "--thresholds", "{tmp}/nope.json", "--output",
                                          "{tmp}/o", "--no-progress"], ("--thresholds", "nope.json")),
    Case("thresholds-not-a-number", "export", ["--model", "vila", "--thresholds", "{tmp}/t.json", "--output",
                                               "{tmp}/o", "--no-progress"], ("logits_max_abs", "finite number"),
         setup=lambda env: (env.tmp / "t.json").write_text('{"logits_max_abs": "big"}')),
    Case("thresholds-nan", "export", ["--model", "vila", "--thresholds", "{tmp}/t.json", "--output", "{tmp}/o",
                                      "--no-progress"], ("min_cosine", "finite number"),
         setup=lambda env: (env.tmp / "t.json").write_text('{"min_cosine": NaN}')),
    Case("thresholds-unknown-key", "export", ["--model", "vila", "--thresholds", "{tmp}/t.json", "--output",
                                              "{tmp}/o", "--no-progress"], ("unknown threshold", "'logit_max'"),
         setup=lambda env: (env.tmp / "t.json").write_text('{"logit_max": 1}')),
    Case("thresholds-a-list", "export", ["--model", "vila", "--thresholds", "{tmp}/t.json", "--output", "{tmp}/o",
                                         "--no-progress"], ("JSON object",),
         setup=lambda env: (env.tmp / "t.json").write_text("[1, 2]")),
    Case("thresholds-a-fifo", "export", ["--model", "vila", "--thresholds", "{tmp}/t.json", "--output", "{tmp}/o",
                                         "--no-progress"], ("not a regular file",),
         setup=lambda env: os.mkfifo(env.tmp / "t.json")),
    Case("images-missing", "export", ["--model", "vila", "--images", "{tmp}/none", "--output", "{tmp}/o",
                                      "--no-progress"], ("images folder not found",)),
    Case("images-empty", "export", ["--model", "vila", "--images", "{tmp}", "--output", "{tmp}/o",
                                    "--no-progress"], ("no images",)),
    Case("prompts-without-images", "export", ["--model", "vila", "--prompts", "{tmp}/p.txt", "--output", "{tmp}/o",
                                              "--no-progress"], ("--prompts needs --images",),
         setup=lambda env: (env.tmp / "p.txt").write_text("hi\n")),
    Case("backend-tensorrt-without-gpu", "export", ["--model", "vila", "--backend", "tensorrt", "--output",
                                                    "{tmp}/o", *E], ("--backend tensorrt",),
         marks=(pytest.mark.skipif("__import__('torch').cuda.is_available()", reason="a GPU is here"),)),
    Case("checkpoint-missing", "export", ["--model", "vila", "--checkpoint", "{tmp}/none", "--output", "{tmp}/o", *E],
         ("--checkpoint", "does not exist")),
]


def pkg_run(*extra):
    return ["{pkg}", "--image", "{img}", "--prompt", "what color?", "--max-new-tokens", "2", *extra]


def ckpt_run(*extra):
    return ["--model", "vila", "--checkpoint", "{ckpt}", "--image", "{img}", "--prompt", "hi", "--max-new-tokens",
            "1", "--exit-policy", "none", *extra]


def manifest_edit(edit, resign=True):
    return lambda env: env.edit_manifest(edit, resign)


def graph_file(env: Env, name: str, replace: Callable[[Path], None]) -> None:
    path = env.pkg / "graphs" / f"{name}.onnx"
    path.unlink()
    replace(path)


def _pop(*keys):
    def edit(data):
        obj = data
        for k in keys[:-1]:
            obj = obj[k]
        del obj[keys[-1]]
    return edit


def _set(value, *keys):
    def edit(data):
        obj = data
        for k in keys[:-1]:
            obj = obj[k]
        obj[keys[-1]] = value
    return edit


def _graph_index(data, name):
    return next(i for i, g in enumerate(data["graphs"]) if g["name"] == name)


def _router_file(env: Env, tensors: dict) -> None:
    import torch
    from safetensors.torch import save_file

    prefix = "model.visual_gates_router."
    base = {f"{prefix}{l}.{w}.weight": torch.zeros(shape) for l in range(4)
            for w, shape in (("w1", (8, 128)), ("w2", (2, 8)))}
    base.update({k if k.startswith("model.") else prefix + k: v for k, v in tensors.items() if v is not None})
    for k in [k for k, v in tensors.items() if v is None]:
        base.pop(prefix + k)
    save_file(base, str(env.tmp / "routers.safetensors"))


def _weights_file(env: Env, sub: str, edit: Callable[[dict], None]) -> None:
    from safetensors.torch import load_file, save_file

    path = next((env.ckpt / sub).glob("*.safetensors"))
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _int_weight(tensors):
    key = next(k for k in sorted(tensors) if k.endswith(".weight"))
    tensors[key] = tensors[key].to(__import__("torch").int32)


def _shard_index(env: Env) -> None:
    folder = env.ckpt / "mm_projector"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../llm/model.safetensors"}}))


CASES += [
    # ---------------------------------------------------------------- damaged or hand-edited packages
    Case("manifest-a-list", "run", pkg_run(), ("manifest.json", "JSON object", "list"),
         setup=manifest_edit(lambda d: Replace([]))),
    Case("manifest-null", "run", pkg_run(), ("manifest.json", "JSON object"), setup=manifest_edit(lambda d: Replace(None))),
    Case("manifest-not-json", "run", pkg_run(), ("not valid JSON",),
         setup=lambda env: (env.pkg / "manifest.json").write_text("{")),
    Case("manifest-edited", "run", pkg_run(), ("modified after export",),
         setup=manifest_edit(_set(False, "split", "has_routers"), resign=False)),
    Case("manifest-checksum-removed", "run", pkg_run(), ("modified after export",),
         setup=manifest_edit(_pop("manifest_sha256"), resign=False)),
    Case("manifest-no-graphs", "run", pkg_run(), ("graphs",), setup=manifest_edit(_pop("graphs"))),
    Case("manifest-no-architecture", "run", pkg_run(), ("architecture",), setup=manifest_edit(_pop("architecture"))),
    Case("manifest-no-prompt", "run", pkg_run(), ("prompt",), setup=manifest_edit(_pop("prompt"))),
    Case("manifest-no-bytes", "run", pkg_run(), ("bytes",),
         setup=manifest_edit(lambda d: d["files"]["graphs/weights.bin"].pop("bytes"))),
    Case("manifest-segments-as-strings", "run", pkg_run(), ("split.segments[0]", "pair of integers"),
         setup=manifest_edit(lambda d: d["split"].update(segments=["0-1"] * len(d["split"]["segments"])))),
    Case("manifest-graph-renamed", "run", pkg_run(), ("vision graph must be named 'vision'",),
         setup=manifest_edit(lambda d: d["graphs"][_graph_index(d, "vision")].update(name="eyes"))),
    Case("manifest-graph-removed", "run", pkg_run(), ("exactly one lm_head graph",),
         setup=manifest_edit(lambda d: d["graphs"].pop(_graph_index(d, "lm_head")))),
    Case("manifest-num-layers", "run", pkg_run(), ("manifest.json",),
         setup=manifest_edit(_set(5, "architecture", "num_layers"))),
    Case("manifest-hidden-size", "run", pkg_run(), ("axis 2 must be 32",),
         setup=manifest_edit(_set(32, "architecture", "hidden_size"))),
    Case("manifest-precision", "run", pkg_run(), ("fp16 package needs float16",),
         setup=manifest_edit(_set("fp16", "precision"))),
    Case("manifest-routers-switched-off", "run", pkg_run(), ("has_routers is false",),
         setup=manifest_edit(_set(False, "split", "has_routers"))),
    Case("manifest-absolute-graph-path", "run", pkg_run(), ("not a path inside the package",),
         setup=lambda env: env.edit_manifest(lambda d: d["graphs"][_graph_index(d, "vision")].update(
             file=str(env.pkg_source / "graphs" / "vision.onnx")))),
    Case("manifest-graph-path-climbs-out", "run", pkg_run(), ("not a path inside the package",),
         setup=manifest_edit(lambda d: d["graphs"][_graph_index(d, "vision")].update(file="../x/graphs/vision.onnx"))),
    Case("manifest-weights-path-climbs-out", "run", pkg_run(), ("not a path inside the package",),
         setup=manifest_edit(lambda d: d["weights"].update(file="../../weights.bin"))),
    Case("manifest-files-table-removed", "run", pkg_run(), ("lists no files",), setup=manifest_edit(_pop("files"))),
    Case("graph-is-a-fifo", "run", pkg_run(), ("graphs/vision.onnx", "not a regular file"),
         setup=lambda env: graph_file(env, "vision", os.mkfifo)),
    Case("graph-links-outside", "run", pkg_run(), ("leads outside the package",),
         setup=lambda env: graph_file(env, "vision", lambda p: p.symlink_to(env.pkg_source / "graphs" / "vision.onnx"))),
    Case("weights-corrupted", "run", pkg_run(), ("graphs/weights.bin", "does not match its checksum"),
         setup=lambda env: (env.pkg / "graphs" / "weights.bin").open("r+b").write(b"\xff" * 64)),
    Case("package-missing", "run", ["{tmp}/none", "--image", "{img}", "--prompt", "hi"], ("package folder not found",)),
    # ---------------------------------------------------------------- run flags and prompts
    Case("temperature-nan", "run", pkg_run("--do-sample", "--temperature", "nan"), ("temperature", "finite")),
    Case("temperature-inf", "run", pkg_run("--do-sample", "--temperature", "inf"), ("temperature", "finite")),
    Case("seed-too-big", "run", pkg_run("--do-sample", "--seed", str(2**70)), ("seed", "2**63-1")),
    Case("seed-negative", "run", pkg_run("--do-sample", "--seed", "-1"), ("seed",)),
    Case("top-p-nan", "run", pkg_run("--do-sample", "--top-p", "nan"), ("top_p",)),
    Case("top-k-negative", "run", pkg_run("--do-sample", "--top-k", "-3"), ("top_k",)),
    Case("prompt-not-utf8", "run", ["{pkg}", "--image", "{img}", "--prompt", b"\xff\xfeok".decode("utf-8", "surrogateescape")],
         ("prompt is not valid UTF-8",)),
    Case("exit-policy-outside", "run", pkg_run("--exit-policy", "layer:99"), ("layer 99",)),
    Case("image-not-an-image", "run", ["{pkg}", "--image", "{tmp}/notes.txt", "--prompt", "hi"], ("cannot read image",),
         setup=user_file),
    # ---------------------------------------------------------------- checkpoints
    Case("config-a-list", "run", ckpt_run(), ("config.json", "JSON object", "list"),
         setup=lambda env: env.edit_config("", lambda c: Replace([]))),
    Case("config-projector-type-null", "run", ckpt_run(), ("mm_projector_type", "None"),
         setup=lambda env: env.edit_config("mm_projector", lambda c: c.update(mm_projector_type=None))),
    Case("config-projector-type-number", "run", ckpt_run(), ("mm_projector_type", "3"),
         setup=lambda env: env.edit_config("mm_projector", lambda c: c.update(mm_projector_type=3))),
    Case("config-select-layer-text", "run", ckpt_run(), ("mm_vision_select_layer", "'last'"),
         setup=lambda env: env.edit_config("", lambda c: c.update(mm_vision_select_layer="last"))),
    Case("config-select-layer-outside", "run", ckpt_run(), ("mm_vision_select_layer", "40"),
         setup=lambda env: env.edit_config("", lambda c: c.update(mm_vision_select_layer=40))),
    Case("weights-integer-dtype", "run", ckpt_run(), ("dtype I32", "floating point"),
         setup=lambda env: _weights_file(env, "mm_projector", _int_weight)),
    Case("weights-a-fifo", "run", ckpt_run(), ("model.safetensors", "not a regular file"),
         setup=lambda env: ((env.ckpt / "mm_projector" / "model.safetensors").unlink(),
                            os.mkfifo(env.ckpt / "mm_projector" / "model.safetensors"))),
    Case("shard-index-escapes", "run", ckpt_run(), ("model.safetensors.index.json", "../llm/model.safetensors"),
         setup=_shard_index),
    Case("pickle-beside-safetensors", "run", ckpt_run(), code=0, warns=("pickle", "never unpickled"),
         setup=lambda env: (env.ckpt / "llm" / "pytorch_model.bin").write_bytes(b"not read")),
    # ---------------------------------------------------------------- router files
    Case("routers-bad-key", "run", ckpt_run("--routers", "{tmp}/routers.safetensors"),
         ("unexpected key", "model.visual_gates_router.x.w1.weight"),
         setup=lambda env: _router_file(env, {"x.w1.weight": __import__("torch").zeros(8, 128)})),
    Case("routers-missing-w1-of-layer-0", "run", ckpt_run("--routers", "{tmp}/routers.safetensors"),
         ("lack", "0.w1.weight"), setup=lambda env: _router_file(env, {"0.w1.weight": None})),
    Case("routers-scalar-tensor", "run", ckpt_run("--routers", "{tmp}/routers.safetensors"),
         ("0.w1.weight", "expected a matrix"),
         setup=lambda env: _router_file(env, {"0.w1.weight": __import__("torch").tensor(1.0)})),
    Case("routers-integer-dtype", "run", ckpt_run("--routers", "{tmp}/routers.safetensors"),
         ("dtype int64", "floating point"),
         setup=lambda env: _router_file(env, {"1.w2.weight": __import__("torch").zeros(2, 8, dtype=__import__("torch").int64)})),
    Case("routers-nan", "run", ckpt_run("--routers", "{tmp}/routers.safetensors"), code=0,
         warns=("NaN or Inf", "never exit"),
         setup=lambda env: _router_file(env, {"2.w1.weight": __import__("torch").full((8, 128), float("nan"))})),
]



CASES += [
    # ---------------------------------------------------------------- python -m validation
    Case("validation-report-dir-unwritable", "validation", ["{pkg}", "--no-speed", "--report-dir", "/proc/dyvte-report"],
         ("cannot write into /proc/dyvte-report",)),
    Case("validation-report-is-a-file", "validation", ["{pkg}", "--no-speed"], ("cannot write into", "report"),
         setup=lambda env: (shutil.rmtree(env.pkg / "report", ignore_errors=True),
                            (env.pkg / "report").write_text("mine"))),
    Case("validation-samples-zero", "validation", ["{pkg}", "--samples", "0"], ("--samples",)),
    Case("validation-thresholds-nan", "validation", ["{pkg}", "--thresholds", "{tmp}/t.json"], ("finite number",),
         setup=lambda env: (env.tmp / "t.json").write_text('{"near_tie": Infinity}')),
    Case("validation-not-a-package", "validation", ["{tmp}"], ("not an export package",)),
]


def _main(cli: str):
    if cli == "export":
        import export

        return export.main
    if cli == "run":
        from engines.cli import main

        return lambda argv: main(["run", *argv])
    from validation.__main__ import main

    return main


def assert_one_line_error(code, err: str, expected_code: int, words) -> None:
    assert "Traceback" not in err, err[-3000:]
    assert code == expected_code, f"exit status {code}, expected {expected_code}; stderr: {err[-2000:]}"
    if expected_code != 2:
        return
    # progress bars of the loading may precede it; the error itself is the one last line
    errors = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]), err[-2000:]
    for word in words:
        assert word in errors[0], errors[0]


@pytest.fixture(scope="module")
def sources(vila_checkpoint, vila_package, tmp_path_factory):
    from helpers import random_image

    img = tmp_path_factory.mktemp("img") / "image.png"
    random_image(3).save(img)
    return vila_checkpoint, vila_package, img


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_refused_in_one_line(case: Case, sources, tmp_path, capsys, monkeypatch):
    ckpt, pkg, img = sources
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    env = Env(tmp_path, ckpt, pkg, img)
    if case.setup:
        case.setup(env)
    argv = [env.expand(a) for a in case.argv]
    try:
        code = _main(case.cli)(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    _, err = capsys.readouterr()
    assert_one_line_error(code, err, case.code, case.words)
    if case.warns:
        warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
        assert any(all(w in line for w in case.warns) for line in warnings), err[-2000:]
    if case.check:
        case.check(env)


# ---------------------------------------------------------------------------- NaN-aware parity


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _runner(stages: dict, exits=(None,), tokens=((1, 2),)):
    import torch

    from validation.parity import RunnerOutput

    return RunnerOutput(stages=[{k: torch.tensor(v, dtype=torch.float32) for k, v in stages.items()}],
                        probe_logits=[{0: [1.0, -1.0]}], exit_layers=list(exits), tokens=[list(t) for t in tokens])


NAN, INF = float("nan"), float("inf")
GOOD = {"vision": [[1.0, 2.0]], "layers 0-0": [[0.5, 0.25]], "router 0": [1.0, -1.0], "layers 1-1": [[1.0, 1.0]],
        "logits": [[3.0, 1.0]]}


@pytest.mark.parametrize("side, stage, value, first", [
    ("backend", "logits", NAN, "logits"),
    ("backend", "layers 1-1", INF, "layers 1-1"),
    ("backend", "router 0", NAN, "router 0"),
    ("reference", "vision", NAN, "vision"),  # a NaN checkpoint: both sides NaN
    ("both", "router 0", NAN, "router 0"),  # NaN routers in the model: reference and package agree on NaN
])
def test_non_finite_values_fail_by_stage(side, stage, value, first):
    from validation.parity import DEFAULT_THRESHOLDS, ParityReport, compare

    ref, other = dict(GOOD), dict(GOOD)
    poisoned = [[value] * len(GOOD[stage][0])] if isinstance(GOOD[stage][0], list) else [value] * len(GOOD[stage])
    if side in ("reference", "both"):
        ref[stage] = poisoned
        if side == "reference":  # a NaN model makes every later stage NaN, in the package too
            ref = {k: ([[NAN] * len(v[0])] if isinstance(v[0], list) else [NAN] * len(v)) for k, v in ref.items()}
            other = dict(ref)
    if side in ("backend", "both"):
        other[stage] = poisoned
    result = compare(_runner(ref), _runner(other), DEFAULT_THRESHOLDS["fp32"])
    assert result["passed"] is False and result["checks"]["finite"] is False
    assert result["first_non_finite_stage"] == first
    if first != "logits":
        assert result["first_failed_stage"] == first
    data = {"passed": False, "samples": 1, "precision": "fp32", "backends": {"onnxruntime": result}}
    summary = ParityReport(data).summary()
    assert "FAILED" in summary and f"first non-finite stage: {first}" in summary
    from validation.parity import _jsonable

    _strict_json(json.dumps(_jsonable(data), allow_nan=False))


def test_nan_after_a_finite_sample_is_not_folded_away():
    """Python's max(0.0, nan) is 0.0: a NaN in the second sample must still be seen."""
    from validation.parity import _stage_errors

    ref = _runner(GOOD)
    ref.stages.append(dict(ref.stages[0]))
    other = _runner(GOOD)
    other.stages.append({**other.stages[0], "logits": other.stages[0]["logits"] * NAN})
    errors = _stage_errors(ref, other)
    assert errors["logits"]["non_finite"] == {"reference": 0, "backend": 2}
    assert errors["logits"]["max_abs"] != errors["logits"]["max_abs"]  # NaN, not 0
    assert list(errors) == ["vision", "layers 0-0", "router 0", "layers 1-1", "logits"]  # compute order


def test_nan_checkpoint_export_fails_its_report_at_the_vision_stage(vila_checkpoint, tmp_path, capsys):
    """The issue's case end to end: an all-NaN checkpoint exported with validation is FAILED, by
    the first stage that went non-finite, and the report is strict JSON."""
    import torch

    import export
    from exporter.models import load_model

    model = load_model("vila", str(vila_checkpoint))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    folder = model.native.save(tmp_path / "nan-ckpt")
    code = export.main(["--model", "vila", "--checkpoint", str(folder), "--output", str(tmp_path / "pkg"),
                        "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 1, err[-2000:]
    assert "parity: FAILED" in out and "first non-finite stage: vision" in out
    assert "warning: the model's weight" in err and "NaN or Inf" in err
    data = _strict_json((tmp_path / "pkg" / "report" / "parity.json").read_text())
    assert data["passed"] is False and data["backends"]["onnxruntime"]["first_non_finite_stage"] == "vision"


# ---------------------------------------------------------------------------- the output swap


def _fake_package(folder: Path, marker: str) -> Path:
    (folder / "graphs").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"format": "dyvte-package", "marker": marker}))
    return folder


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "fallback"])
def test_swap_replaces_a_package_in_one_step(tmp_path, monkeypatch, exchange):
    from exporter import output as out_module

    if not exchange:  # a system without RENAME_EXCHANGE: lock + two renames
        monkeypatch.setattr(out_module, "_renameat2", lambda *a: False)
    target = _fake_package(tmp_path / "pkg", "old")
    new = _fake_package(tmp_path / ".pkg.partial-1", "new")
    out_module.swap_into_place(new, target)
    assert json.loads((target / "manifest.json").read_text())["marker"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]  # nothing left beside it
    fresh = _fake_package(tmp_path / ".other.partial-1", "first")
    out_module.swap_into_place(fresh, tmp_path / "other")  # nothing there yet
    assert json.loads((tmp_path / "other" / "manifest.json").read_text())["marker"] == "first"


def test_concurrent_swaps_end_with_one_whole_package(tmp_path):
    import threading

    from exporter.output import swap_into_place

    target = _fake_package(tmp_path / "pkg", "old")
    errors = []

    def export(i):
        try:
            swap_into_place(_fake_package(tmp_path / f".pkg.partial-{i}", str(i)), target)
        except Exception as exc:  # noqa: BLE001 - the test reports any
            errors.append(exc)

    threads = [threading.Thread(target=export, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert json.loads((target / "manifest.json").read_text())["marker"] in {str(i) for i in range(8)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_interrupted_fallback_swap_is_restored_and_stale_partials_removed(tmp_path):
    from exporter.output import remove_stale_partials, restore_interrupted_swap

    dead = 2**22 + 12345  # above the default pid_max: no such process
    _fake_package(tmp_path / f".pkg.old-{dead}", "old")  # killed between the two renames
    _fake_package(tmp_path / f".pkg.partial-{dead}", "half")
    _fake_package(tmp_path / f".pkg.partial-{os.getpid()}", "ours")  # a live export's: kept
    (tmp_path / ".other.partial-1").mkdir()  # another output's: not ours to judge
    restore_interrupted_swap(tmp_path / "pkg")
    assert json.loads((tmp_path / "pkg" / "manifest.json").read_text())["marker"] == "old"
    removed = remove_stale_partials(tmp_path / "pkg")
    assert [p.name for p in removed] == [f".pkg.partial-{dead}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-1", f".pkg.partial-{os.getpid()}", "pkg"]


def test_export_replaces_a_package_and_cleans_dead_partials(sources, tmp_path):
    """A real export over an earlier package (a copy of the session's): replaced, loadable, and a
    dead export's partial beside it removed."""
    from engines.core.manifest import Manifest
    from exporter.models.vila import Vila
    from exporter.package import export_onnx
    from exporter.plan import SplitPlan

    _, pkg, _ = sources
    package = Path(shutil.copytree(pkg, tmp_path / "pkg"))
    before = Manifest.load(package).split.segments
    stale = tmp_path / f".pkg.partial-{2**22 + 7}"
    stale.mkdir()
    model = Vila().preset(seed=5)
    model.routers = None
    export_onnx(model, package, plan=SplitPlan.parse("1:1", 4), progress=False)
    assert Manifest.load(package).split.segments != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_force_replaces_a_user_folder_but_never_an_input(tmp_path):
    from exporter.output import check_output, swap_into_place

    user_folder(Env(tmp_path, tmp_path, tmp_path, tmp_path))
    mine = tmp_path / "mine"
    assert check_output(mine, force=True) == mine.resolve()
    swap_into_place(_fake_package(tmp_path / ".mine.partial-1", "new"), mine, force=True)
    assert not (mine / "thesis.txt").exists() and (mine / "manifest.json").is_file()
    from engines.core.errors import DyVTEError

    with pytest.raises(DyVTEError, match="an input of this export"):
        check_output(mine, force=True, protect=[mine / "graphs"])


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import errno
    from collections import namedtuple

    import export
    from exporter import package as package_module

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(package_module.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    code = export.main(["--model", "vila", "--no-validate", "--no-progress", "--output", str(tmp_path / "pkg")])
    assert_one_line_error(code, capsys.readouterr().err, 2, ("not enough space", "MiB are free"))
    monkeypatch.undo()

    def full(*args):  # the disk fills up while graphs are written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(package_module, "save_graph", full)
    code = export.main(["--model", "vila", "--no-validate", "--no-progress", "--output", str(tmp_path / "pkg")])
    assert_one_line_error(code, capsys.readouterr().err, 2, ("No space left on device",))
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_export_removes_the_partial(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "pkg"
    proc = subprocess.Popen([sys.executable, str(root / "export.py"), "--model", "vila", "--output", str(out),
                             "--no-validate", "--no-progress"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    partial = []
    while time.time() < deadline and proc.poll() is None and not partial:
        partial = [p for p in tmp_path.glob(".pkg.partial-*") if any((p / "graphs").glob("*.onnx"))]
        time.sleep(0.1)
    assert partial and proc.poll() is None, "the export ended before SIGTERM"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: no package was written" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_run_json_is_strict_with_nan_routers(sources, tmp_path, capsys):
    import torch

    from engines.cli import main

    ckpt, _, img = sources
    env = Env(tmp_path, ckpt, ckpt, img)
    _router_file(env, {f"{l}.w1.weight": torch.full((8, 128), float("nan")) for l in range(4)})
    code = main(["run", *[env.expand(a) for a in ckpt_run("--routers", "{tmp}/routers.safetensors")],
                 "--exit-policy", "dynamic", "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err
    obj = _strict_json(out)
    assert obj["exit_layer"] is None and obj["router_logits"]["0"] == [None, None]
    assert "router logits after layer 0 are NaN or Inf" in err


@pytest.mark.parametrize("kind", [None, 3, ["mlp2x_gelu"]])
def test_llava_original_projector_type_must_be_a_name(kind):
    from engines.core.errors import DyVTEError
    from exporter.models.llava import original_projector

    with pytest.raises(DyVTEError, match="unsupported mm_projector_type"):
        original_projector(kind, 8, 8)


@pytest.mark.parametrize("value", ["last", 1.5, True, 99])
def test_config_integers_are_checked_by_name(value):
    from engines.core.errors import DyVTEError
    from exporter.models.checkpoint import config_int

    with pytest.raises(DyVTEError, match="mm_vision_select_layer must be an integer"):
        config_int({"mm_vision_select_layer": value}, "mm_vision_select_layer", -2, "config.json", -4, 3)


def test_prompt_bytes_that_are_not_utf8_from_a_real_command_line(sources):
    """argv bytes reach Python as lone surrogates; the subprocess sees exactly what a shell passes."""
    import subprocess
    import sys

    _, pkg, img = sources
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable.encode(), b"-m", b"engines", b"run", str(pkg).encode(), b"--image",
                           str(img).encode(), b"--prompt", b"caf\xe9?"], cwd=root, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    err = proc.stderr.decode("utf-8", "replace")
    assert_one_line_error(proc.returncode, err, 2, ("prompt is not valid UTF-8",))


@pytest.mark.parametrize("graph, stage, words", [
    ("lm_head", "logits", "max|diff| non-finite"),
    ("hypernet", "router 0", "first non-finite stage: router 0"),
])
def test_package_with_nan_weights_fails_the_report_at_their_stage(vila_package, vila_exit_model, tmp_path,
                                                                  graph, stage, words):
    """NaN logits and NaN routers each fail the report, named by the first stage that went non-finite."""
    from helpers import perturb_weight
    from validation.parity import validate_package

    package = Path(shutil.copytree(vila_package, tmp_path / "pkg"))
    perturb_weight(package, graph, scale=NAN)
    report = validate_package(package, model=vila_exit_model, speed_repeats=0, count=2, max_new_tokens=2)
    ort = report.data["backends"]["onnxruntime"]
    assert not report.passed and ort["first_non_finite_stage"] == stage
    assert words in report.summary()
    if stage == "logits":
        data = _strict_json(Path(report.data["json"]).read_text())
        assert data["backends"]["onnxruntime"]["stages"]["logits"]["non_finite"]["backend"] > 0