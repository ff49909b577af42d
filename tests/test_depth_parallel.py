"""run/depth_parallel.py: rounds are deterministic whatever the number of workers, exact after
segments - 1 rounds, and one segment is the sequential schedule."""

import hashlib

import pytest
import torch

from admmq_dist.recipe import Recipe, override
from admmq_dist.run.job import quantize_model
from admmq_dist.run.backends import LocalBackend

from runs import SETTINGS, digest, quantize
from tiny import tiny_model_dir

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("src"), "llama", num_hidden_layers=3)



def test_depth_parallel_rounds_write_the_same_bytes_for_any_worker_count(model_dir, tmp_path):
    settings = {"solver": {**SETTINGS["solver"], "schedule": "depth-parallel", "rounds": 3,
                           "segments": 3}}
    recipe = override(Recipe(), {**SETTINGS, **settings})
    local = quantize_model(str(model_dir), tmp_path / "local", recipe,
                           device=torch.device("cpu"), progress=False, threads=1,
                           round_checkpoints=True)
    two = quantize_model(str(model_dir), tmp_path / "two", recipe,
                         device=torch.device("cpu"), progress=False, threads=1,
                         backend=LocalBackend(2))
    assert digest(tmp_path / "local") == digest(tmp_path / "two")

    def tensors(folder):
        return hashlib.sha256(b"".join(p.read_bytes()
                                       for p in sorted(folder.glob("*.safetensors")))).hexdigest()

    # The model as each round left it: the last round's is the output; earlier ones differ.
    rounds = [tensors(tmp_path / f"local.round-{r}") for r in range(3)]
    assert rounds[2] == tensors(tmp_path / "local") and len(set(rounds)) == 3
    # Three segments: round r re-solves segments r.. on new inputs; after round 2 the last one
    # was solved on final inputs, so round 3 has nothing to do.
    for run in (local, two):
        assert [(r["round"], r["segments_solved"]) for r in run["rounds"]] == [(0, 3), (1, 2), (2, 1)]
    assert local["rounds"][0]["changed"] == 1.0
    assert 0 < local["rounds"][2]["changed"] < 0.5 and 0 < local["rounds"][1]["changed"] < 0.5
    assert local["layers"] == 21
    # Each round solves the segment whose inputs just became final with the full schedule, so
    # after segments - 1 rounds the result is the sequential schedule's, byte for byte.
    sequential = quantize(model_dir, tmp_path / "seq")
    assert digest(tmp_path / "local") == digest(tmp_path / "seq")
    assert local["mean_loss"] == pytest.approx(sequential["mean_loss"], rel=1e-12)


def test_one_depth_parallel_segment_is_the_sequential_schedule(model_dir, tmp_path):
    """A single segment is quantized block by block from the embeddings: the sequential
    protocol, byte for byte (the Hessians merge canonically, row blocks are fixed)."""
    recipe = override(Recipe(), {**SETTINGS, "solver": {**SETTINGS["solver"],
                                                        "schedule": "depth-parallel",
                                                        "segments": 1}})
    one = quantize_model(str(model_dir), tmp_path / "one", recipe, device=torch.device("cpu"),
                         progress=False, threads=1)
    sequential = quantize(model_dir, tmp_path / "seq")
    assert [r["round"] for r in one["rounds"]] == [0]
    assert digest(tmp_path / "one") == digest(tmp_path / "seq")
    assert one["mean_loss"] == pytest.approx(sequential["mean_loss"], rel=1e-12)
