"""run/plan.py: who does what never depends on the number of workers."""

import pytest
import torch

from admmq_dist.model.capture import Stage
from admmq_dist.quant.solvers.rows import row_blocks
from admmq_dist.run.plan import assign, shard_batches, stage_units


def test_row_blocks_and_assignment_do_not_depend_on_the_worker_count():
    assert row_blocks(576, 512) == [(0, 288), (288, 576)]
    assert row_blocks(100, 24) == [(0, 20), (20, 40), (40, 60), (60, 80), (80, 100)]
    assert row_blocks(7, 512) == [(0, 7)]
    units = [("q", (0, 288), 288 * 576), ("q", (288, 576), 288 * 576),
             ("k", (0, 192), 192 * 576), ("v", (0, 192), 192 * 576)]
    two = assign(units, 2)
    assert [u[0] for u in two[0]] == ["q", "k"] and [u[0] for u in two[1]] == ["q", "v"]
    assert sum(len(v) for v in assign(units, 3).values()) == 4
    batches = [torch.full((1, 4), i) for i in range(5)]
    shards = shard_batches(batches, 2)
    assert [sorted(s) for s in shards] == [[0, 1], [2, 3, 4]]
    with pytest.raises(ValueError, match="batches"):
        shard_batches(batches, 6)


def test_stage_units_cover_every_row_of_every_linear_once():
    stage = Stage([["q", "k"], ["o"]])
    units = stage_units(stage, {"q": (100, 64), "k": (30, 64), "o": (64, 100)}, row_block=24)
    for name, rows in (("q", 100), ("k", 30), ("o", 64)):
        covered = sorted(u[1] for u in units if u[0] == name)
        assert covered == row_blocks(rows, 24)
    assert all(u[2] == (u[1][1] - u[1][0]) * (64 if u[0] != "o" else 100) for u in units)
