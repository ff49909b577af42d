"""run/backends.py: any number of in-process workers writes the bytes one worker writes — the
Hessians merge canonically, row blocks are fixed, nothing depends on who solved what."""

import hashlib

import pytest
import torch

from admmq_dist.recipe import Recipe, override
from admmq_dist.run.backends import LocalBackend
from admmq_dist.run.job import quantize_model

from tiny import tiny_model_dir

SETTINGS = {"grid": {"bits": 3, "group_size": 32},
            "solver": {"row_block": 24, "admm": {"iterations": 40}},
            "calibration": {"dataset": None, "num_samples": 8, "seq_len": 48, "batch_size": 2}}


def digest(folder):
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes()
                                   for p in sorted(folder.glob("*.safetensors")))).hexdigest()


def quantize(model_dir, out, workers, **calibration):
    recipe = override(Recipe(), {**SETTINGS,
                                 "calibration": {**SETTINGS["calibration"], **calibration}})
    return quantize_model(str(model_dir), out, recipe, device=torch.device("cpu"),
                          progress=False, threads=1, backend=LocalBackend(workers))


@pytest.mark.parametrize("arch,calibration", [("llama", {}), ("llama", {"asymmetric": 0.25}),
                                              ("qwen3_moe", {"min_expert_tokens": 40})])
def test_one_two_and_three_workers_write_the_same_bytes(tmp_path, arch, calibration):
    src = tiny_model_dir(tmp_path / "src", arch)
    runs = {n: quantize(src, tmp_path / f"w{n}", n, **calibration) for n in (1, 2, 3)}
    assert [runs[n]["workers"] for n in (1, 2, 3)] == [1, 2, 3]
    assert digest(tmp_path / "w1") == digest(tmp_path / "w2") == digest(tmp_path / "w3")
    # Every worker solved row blocks: the sharding was real, not a fallback to one worker.
    assert all(s["solve"] > 0 for s in runs[3]["worker_busy_seconds"])
    assert runs[1]["mean_loss"] == runs[3]["mean_loss"] and 0 < runs[1]["mean_loss"] < 0.3


def test_more_workers_than_batches_is_refused_before_any_work(tmp_path):
    src = tiny_model_dir(tmp_path / "src", "llama")
    with pytest.raises(ValueError, match="calibration batches"):
        quantize(src, tmp_path / "o", 5)
    assert not (tmp_path / "o").exists()


def test_a_backend_and_ray_workers_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        quantize_model(str(tiny_model_dir(tmp_path / "src", "llama")), tmp_path / "o", Recipe(),
                       device=torch.device("cpu"), workers=2, backend=LocalBackend(2))


def test_what_crosses_between_workers_is_counted_and_lean(tmp_path):
    """Per decoder block: partial Hessians move once each to their owner, the merged Hessian once
    to each other solver, results and layers as codes (a byte each) with scales and zeros."""
    src = tiny_model_dir(tmp_path / "src", "llama")
    one = quantize(src, tmp_path / "w1", 1)["bytes_moved"]
    two = quantize(src, tmp_path / "w2", 2)["bytes_moved"]
    assert [row["block"] for row in two["per_block"]] == [0, 1]
    for kind in ("block_tensors", "hessian_parts", "merged_hessians"):
        assert one["total"][kind] == 0 and two["total"][kind] > 0, kind
    # Quantized layers: 2 blocks x (q,k,v,o: 64x64 + 2 of 32x64 ... ) — as uint8 codes they weigh
    # a quarter of their fp32 weights, plus the grids.
    dense_fp32 = 2 * 4 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3)
    assert one["total"]["weights"] < dense_fp32 / 2
    assert two["total"]["weights"] == 2 * one["total"]["weights"]
    # Every partial Hessian leaves a worker at most once (no all-to-all): at most one per
    # Hessian per non-owner worker, i.e. below what one worker's whole tree of sums weighs.
    assert 0 < two["total"]["hessian_parts"] < 2 * 4 * 128 * 128 * 4 * 3
