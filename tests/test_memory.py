"""Runtime memory (issue 10): loading a package holds its weights once, and the runtime's limits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engines.core.errors import DyVTEError

# Fixed cost of a loaded runtime beyond its weights (sessions, thread pools, processor, the
# hyper-network's folded router stack): loading the `memory` preset's 212 MiB package grew 131 MiB
# in all with no session prepacking, every session prepacking its own copy (the behaviour before
# issue 10) 516 MiB. The default (issue 13) lets the fused decode graph alone prepack (one packed
# copy of the decoder weights, for decode speed): 304 MiB.
CONSTANT = 128 * 2**20

MEASURE = """
import json, sys
import onnx, onnxruntime
from engines.load import open_package
from engines.memory import RuntimeLimits, anonymous_bytes
before = anonymous_bytes()
runtime = open_package(sys.argv[1], verify=False, **json.loads(sys.argv[2]))
print(json.dumps({"grown": anonymous_bytes() - before}))
"""


@pytest.fixture(scope="module")
def memory_package(tmp_path_factory):
    """fp32 package of the `memory` LLaVA preset: ~200 MB of decoder weights in 4 layers."""
    from exporter.models.llava import Llava
    from exporter.package import export_onnx

    return export_onnx(Llava().preset(seed=0, name="memory"), tmp_path_factory.mktemp("mem") / "pkg", "fp32",
                       progress=False)


def _grown(package: Path, **options) -> int:
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", MEASURE, str(package), json.dumps(options)], check=True,
                         capture_output=True, text=True, cwd=root, env={"PYTHONPATH": str(root), "PATH": ""})
    return json.loads(out.stdout.strip().splitlines()[-1])["grown"]


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc/self/smaps_rollup")
def test_loading_holds_the_weights_once(memory_package):
    from engines.core.manifest import Manifest

    size = Manifest.load(memory_package, verify=False).package_bytes
    assert size > CONSTANT  # a second copy of the weights cannot hide in the constant
    grown = _grown(memory_package)
    print(f"package {size / 2**20:.0f} MiB, loading grew {grown / 2**20:.0f} MiB")
    assert grown <= size + CONSTANT, f"loading grew anonymous memory by {grown / 2**20:.0f} MiB, package {size / 2**20:.0f} MiB"
    # without the decode graph's packed copy, the weights stay in the mapped file only
    lean = _grown(memory_package, prepack="none")
    print(f"no prepacking: grew {lean / 2**20:.0f} MiB")
    assert lean <= 0.25 * size + CONSTANT, f"{lean / 2**20:.0f} MiB"
    # the check can fail: every session prepacking its own copy (the behaviour before issue 10)
    separate = _grown(memory_package, prepack="all", shrink_arena=False, shared_arena=False)
    print(f"every session prepacking: grew {separate / 2**20:.0f} MiB")
    assert separate > size + CONSTANT, f"{separate / 2**20:.0f} MiB"


def test_limits_are_enforced(vila_package):
    from engines.load import open_package
    from engines.memory import RuntimeLimits

    runtime = open_package(vila_package, verify=False, limits=RuntimeLimits(max_batch=2, max_tokens=400))
    prompts = [runtime.prepare("what color is the circle?")] * 3
    n = len(prompts[0].input_ids)
    assert runtime.admits(2, 2 * (n + 4)) and not runtime.admits(3, 3 * n) and not runtime.admits(1, 401)
    from engines.policy import ExitPolicy

    with pytest.raises(DyVTEError, match="max_batch of 2"):  # what a caller that cannot split a batch is told
        runtime.check(prompts, ExitPolicy.parse("none"), 4)
    assert runtime._chunks(prompts, 4) == [(0, 2), (2, 3)]  # generate() runs such a batch in chunks
    with pytest.raises(DyVTEError, match="max_tokens of 400"):
        runtime.generate(prompts[:1], "none", _config(400))
    assert len(runtime.generate(prompts[:2], "none", _config(2))) == 2
    budget = runtime.limits.budget(runtime.backend.shape, 4, 1000)
    assert budget["total"] == budget["weights"] + budget["kv_cache_x2"] + budget["activations"]
    assert budget["kv_cache_x2"] == 2 * 400 * runtime.backend.shape.kv_bytes_per_token(4) * runtime.backend.shape.num_layers


def test_ortvalue_weights_give_the_same_tokens(vila_package):
    """The CUDA path's weights (one OrtValue per stored tensor handed to every session), run on CPU."""
    import torch

    from engines.load import open_package

    plain = open_package(vila_package, verify=False)
    shared = open_package(vila_package, verify=False, weights="ortvalues", prepack="none")
    assert shared.backend.weights.nbytes > 0
    prompt = [plain.prepare("what color is the circle?")]
    a, b = plain.generate(prompt, "none", _config(4))[0], shared.generate(prompt, "none", _config(4))[0]
    assert a.generated_ids == b.generated_ids
    torch.testing.assert_close(a.first_logits, b.first_logits, atol=1e-5, rtol=1e-5)


def _config(n):
    from engines.policy import GenerationConfig

    return GenerationConfig(max_new_tokens=n)
