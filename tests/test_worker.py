"""run/worker.py and run/device_model.py: a worker holds its shard of the calibration batches;
what it hands over (the plan, partial Hessians, solved row blocks) lets any number of workers
reproduce one worker's bytes."""

import pytest
import torch

from admmq_dist.recipe import Recipe, override
from admmq_dist.run.backends import LocalBackend
from admmq_dist.run.job import calibration_batches, settle_recipe
from admmq_dist.run.layer import merge_parts
from admmq_dist.run.plan import shard_batches

from tiny import tiny_model_dir

FAST = {"calibration": {"dataset": None, "num_samples": 8, "seq_len": 32, "batch_size": 2}}


def started(src, recipe, workers: int) -> LocalBackend:
    batches = calibration_batches(src, recipe)
    backend = LocalBackend(workers)
    backend.start(str(src), recipe, shard_batches(batches, workers), "cpu")
    return backend


def test_two_workers_hand_over_what_one_worker_computes(tmp_path):
    src = tiny_model_dir(tmp_path / "src", "llama")
    # Row blocks of 32: the rows solved below are canonical blocks (the deviation's share of
    # the true loss is taken per canonical block when the Hessian is merged).
    recipe, _ = settle_recipe(override(Recipe(), {**FAST, "solver": {"row_block": 32}}),
                              experts=False)
    one, two = started(src, recipe, 1), started(src, recipe, 2)
    for backend in (one, two):
        for w in range(backend.size):
            backend.call(w, "load_block", 0)
    plans = [one.call(0, "plan", 0), two.call(0, "plan", 0), two.call(1, "plan", 0)]
    assert plans[0]["shapes"] == plans[1]["shapes"] == plans[2]["shapes"]
    stage = plans[0]["stages"][0]
    assert stage.groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]]
    for backend in (one, two):
        for w in range(backend.size):
            backend.call(w, "capture", 0, stage)
    key = stage.groups[0][0]
    whole = merge_parts([one.call(0, "hessian_part", 0, key)], torch.device("cpu"))
    split = merge_parts([two.call(w, "hessian_part", 0, key) for w in (1, 0)], torch.device("cpu"))
    assert torch.equal(whole[0], split[0]) and whole[1] == split[1] == 8 * 32
    # The Hessian is reduced on its owner (worker 0 here) and handed to the other solver; a row
    # block solved on either side of the split, or by one worker alone, is the same row block.
    one.call(0, "finish_hessian", 0, key)
    two.call(0, "merge_hessian_part", 0, key, two.call(1, "hessian_part", 0, key))
    size = two.call(0, "finish_hessian", 0, key)
    # The merged Hessian and cross term (asymmetric calibration, the default) cross once, fp32,
    # no partial-sum tree; the deviation only as its numbers per row block.
    assert size == 2 * 64 * 64 * 4
    a = one.call(0, "solve", 0, key, key, [(0, 32)])
    b = two.call(1, "solve", 0, key, key, [(0, 32)], two.call(0, "merged_hessian", 0, key))
    c = two.call(0, "solve", 0, key, key, [(32, 64)])
    assert torch.equal(a["blocks"][0].codes, b["blocks"][0].codes)
    assert torch.equal(a["grid"]["scale"], b["grid"]["scale"]) and c["grid"] is None
    # Results travel lean: codes as bytes, no dequantized weight, no solver state.
    block = b["blocks"][0]
    assert block.codes.dtype == torch.uint8 and block.weight is None and block.state == {}
    with pytest.raises(RuntimeError, match="no merged Hessian"):
        two.call(1, "solve", 0, "self_attn.o_proj", "self_attn.o_proj", [(0, 32)])
    # Dense modules named for the ignore list: only lm_head in a dense Llama.
    assert one.call(0, "dense_modules") == {"lm_head": False}


def test_a_worker_refuses_a_step_that_does_not_follow_its_position(tmp_path):
    """Every step names its block: a worker without that block loaded on its inputs (a rebuilt
    one is back at block 0) refuses it and changes nothing; propagating and replaying a block
    the worker is already past are no-ops, so a retried step never advances it twice."""
    from admmq_dist.run.faults import PositionError

    src = tiny_model_dir(tmp_path / "src", "llama")
    recipe, _ = settle_recipe(override(Recipe(), FAST), experts=False)
    backend = started(src, recipe, 1)
    with pytest.raises(PositionError, match="block 0 and no block loaded"):
        backend.call(0, "plan", 0)
    with pytest.raises(PositionError, match="asked to load block 1"):
        backend.call(0, "load_block", 1)
    backend.call(0, "load_block", 0)
    with pytest.raises(PositionError):
        backend.call(0, "plan", 1)
    backend.call(0, "propagate", 0)
    hidden = [h.clone() for h in backend.workers[0].hidden]
    backend.call(0, "propagate", 0)  # retried: already past block 0
    backend.call(0, "replay", 0, {})
    assert all(torch.equal(a, b) for a, b in zip(hidden, backend.workers[0].hidden))
    assert backend.call(0, "position") == {"block": 1, "loaded": 0,
                                           "token": backend.workers[0].token}
    with pytest.raises(PositionError, match="holds the inputs of block 1"):
        backend.call(0, "capture", 0, None)
