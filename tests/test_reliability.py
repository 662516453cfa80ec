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
        path = self.pkg / "manifest.json"
        data = json.loads(path.read_text())
        result = edit(data)
        data = data if result is None else result
        if resign and isinstance(data, dict):  # a hand edit that also recomputes the manifest's checksum
            data["manifest_sha256"] = canonical_sha256(data)
        path.write_text(json.dumps(data))

    def edit_config(self, sub: str, edit: Callable[[dict], object]) -> None:
        path = self.ckpt / sub / "config.json"
        data = json.loads(path.read_text())
        result = edit(data)
        path.write_text(json.dumps(data if result is None else result))


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
    if case.check:
        case.check(env)
