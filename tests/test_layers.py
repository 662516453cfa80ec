"""The import layers the README states, checked by walking every module's imports (top level and
inside functions alike): engines.core <- engines (runtime) <- exporter <- validation <- entry points."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The entry points (CLIs) sit on top and may import any layer.
ENTRY_POINTS = {"export", "engines.cli", "engines.__main__", "validation.__main__", "engines.serve.cli"}
# layer -> the layers it may import
ALLOWED = {
    "core": {"core"},
    "engines": {"core", "engines"},
    "exporter": {"core", "engines", "exporter"},
    "validation": {"core", "engines", "exporter", "validation"},
    "entry": {"core", "engines", "exporter", "validation", "entry"},
}


def layer_of(module: str) -> str | None:
    if module in ENTRY_POINTS or any(module.startswith(e + ".") for e in ENTRY_POINTS):
        return "entry"
    top = module.split(".")[0]
    if module == "engines.core" or module.startswith("engines.core."):
        return "core"
    return top if top in ("engines", "exporter", "validation") else None


def modules():
    for path in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("engines/**/*.py")) + \
            sorted(ROOT.glob("exporter/**/*.py")) + sorted(ROOT.glob("validation/**/*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def imported(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno


def test_no_import_runs_against_the_layer_order():
    wrong = []
    for module, path in modules():
        own = layer_of(module)
        if own is None:
            continue
        for target, line in imported(path):
            theirs = layer_of(target)
            if theirs is not None and theirs not in ALLOWED[own]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({own}) imports {target} ({theirs})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_check_sees_a_violation():
    """The walk is not vacuous: the runtime layer exists, and an upward import would be caught."""
    assert layer_of("engines.orchestrator") == "engines" and layer_of("engines.core.manifest") == "core"
    assert "exporter" not in ALLOWED[layer_of("engines.orchestrator")]
    assert any(m == "engines.orchestrator" for m, _ in modules())
    tree_imports = dict(imported(ROOT / "exporter" / "package.py"))
    assert "engines.core.manifest" in tree_imports


def test_no_module_reads_the_manifest_json_itself():
    """The manifest has one owner: nothing else opens manifest.json or parses it by key."""
    owner = ROOT / "engines" / "core" / "manifest.py"
    offenders = []
    for _, path in modules():
        if path == owner:
            continue
        text = path.read_text()
        if '"manifest.json"' in text or "manifest[\"" in text or "manifest.get(" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders
