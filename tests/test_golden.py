"""Golden digests: what the pipeline writes for fixed tiny inputs, byte for byte.

Recorded with the code as it was before a refactor, so that moving code around can be shown to
change nothing. Floating-point reductions depend on the torch build, the CPU's vector units and
the model code in transformers, so the digests hold only where they were recorded: the test skips
(saying why) when any of those differ. Re-record deliberately, when an output change is intended:

    ADMMQ_RECORD_GOLDEN=1 python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import transformers

from admmq_dist.run.job import quantize_model
from admmq_dist.recipe import Recipe, override

from tiny import tiny_model_dir

GOLDEN = Path(__file__).resolve().parent / "golden" / "digests.json"
RECORD = os.environ.get("ADMMQ_RECORD_GOLDEN") == "1"
# Set by CI (.ci/run), whose environment is the recorded one: there a skip would hide a change.
REQUIRED = os.environ.get("ADMMQ_GOLDEN_REQUIRED") == "1"
# The plain objective unless a run says otherwise: the recorded bytes predate the "auto" default.
FAST = {"calibration": {"dataset": None, "num_samples": 8, "seq_len": 48, "batch_size": 2,
                        "asymmetric": 0.0},
        "solver": {"row_block": 24, "admm": {"iterations": 40}}, "report": {"html": False}}

RUNS = {
    "admmq-ct-asym3": ("llama", {"grid": {"bits": 3, "group_size": 32}}),
    "admmq-ct-sym4-gptaq-skip": ("llama", {
        "grid": {"bits": 4, "group_size": 32, "symmetric": True},
        "calibration": {"asymmetric": 0.25},
        "output": {"skip": ["lm_head", "self_attn.o_proj"]}}),
    "gptq-gptq4": ("llama", {"grid": {"bits": 4, "group_size": 32},
                             "solver": {"method": "gptq"}, "output": {"format": "gptq"}}),
    "admmq-moe-sym4": ("qwen3_moe", {"grid": {"bits": 4, "group_size": 32},
                                     "calibration": {"min_expert_tokens": 40}}),
    "admmq-depth-parallel": ("llama", {"grid": {"bits": 3, "group_size": 32},
                                       "solver": {"schedule": "depth-parallel", "segments": 3,
                                                  "rounds": 1}}),
}


def environment() -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "cpu": torch.backends.cpu.get_cpu_capability()}


def merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def digest(folder: Path) -> str:
    """The checkpoint's tensors (name and bytes) and its quantization config; not the paths,
    timings or report, which legitimately vary."""
    from safetensors import safe_open

    h = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in sorted(f.keys()):
                tensor = f.get_tensor(name)
                h.update(name.encode() + str(tensor.dtype).encode()
                         + tensor.contiguous().view(torch.uint8).numpy().tobytes())
    config = json.loads((folder / "config.json").read_text())
    h.update(json.dumps([config["quantization_config"], config.get("dtype")],
                        sort_keys=True).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden-src")
    return {"llama": tiny_model_dir(root / "llama", "llama", num_hidden_layers=3),
            "qwen3_moe": tiny_model_dir(root / "qwen3_moe", "qwen3_moe")}


@pytest.fixture(scope="module")
def golden():
    if RECORD:
        return {"environment": environment(), "digests": {}}
    if not GOLDEN.is_file():
        pytest.skip(f"no golden digests at {GOLDEN}")
    data = json.loads(GOLDEN.read_text())
    if data["environment"] != environment():
        why = (f"golden digests were recorded with {data['environment']}, this is "
               f"{environment()}; they hold only there")
        if REQUIRED:  # CI's environment is the recorded one: comparing nothing there is a failure
            pytest.fail(f"{why}. If the environment changed on purpose (a new transformers), "
                        "re-record the digests on a commit whose output you trust (see the "
                        "module doc); test_golden_solvers.py compares codes in any environment")
        pytest.skip(why)
    return data


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_the_pipeline_writes_the_recorded_bytes(sources, golden, tmp_path, name):
    arch, updates = RUNS[name]
    recipe = override(Recipe(), merged(FAST, updates))
    out = tmp_path / "out"
    quantize_model(str(sources[arch]), out, recipe, device=torch.device("cpu"), progress=False,
                   threads=1)
    got = digest(out)
    if RECORD:
        golden["digests"][name] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    assert got == golden["digests"][name], f"{name}: the checkpoint's bytes changed"
