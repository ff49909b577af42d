"""Storage on a cluster: workers find the model for themselves (the driver's folder where their
node sees the same files, else the hub id at the driver's revision from their own cache), the
work folder may live elsewhere (``--work-dir``), and a run whose workers cannot write it, or
write where the driver does not read, stops before any block with one line."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from admmq_dist.model.loading import ModelLoadError, ModelSource
from admmq_dist.recipe import Recipe, override
from admmq_dist.run.backends import LocalBackend
from admmq_dist.run.device_model import DeviceModel
from admmq_dist.run.job import quantize_model
from admmq_dist.run.workdir import StorageError, work_dir_for

from runs import SETTINGS, digest
from tiny import tiny_model_dir

ROUNDS = {**SETTINGS, "solver": {**SETTINGS["solver"], "schedule": "depth-parallel",
                                 "rounds": 2, "segments": 2}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("src"), "llama", num_hidden_layers=2)


def test_a_worker_uses_the_drivers_folder_only_when_it_holds_the_same_files(model_dir, tmp_path):
    source = ModelSource.of("org/tiny", model_dir)
    assert source.revision is None and source.locate() == model_dir
    # The folder is there but another model's config sits in it (another node's copy).
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    moved = ModelSource(source.name, str(copy), None, source.content)
    assert moved.locate() == copy
    original = (copy / "config.json").read_bytes()
    config = json.loads(original)
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    with pytest.raises(ModelLoadError, match=r"config.json is not the driver's.*shared"):
        moved.locate()
    (copy / "config.json").write_bytes(original)
    (copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"model.safetensors is missing"):
        moved.locate()
    gone = ModelSource(source.name, str(tmp_path / "nowhere"), None, source.content)
    with pytest.raises(ModelLoadError, match=r"nowhere does not exist here"):
        gone.locate()


def _hub_cache(root, model_dir, revision):
    """``model_dir`` as the hub client caches a download of ``org/tiny`` at ``revision``."""
    repo = root / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(model_dir.iterdir())):
        blob = repo / "blobs" / f"{i:064x}"
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_a_worker_finds_a_hub_model_in_its_own_cache_at_the_drivers_revision(model_dir,
                                                                            tmp_path):
    revision = "a" * 40
    driver = _hub_cache(tmp_path / "driver", model_dir, revision)
    source = ModelSource.of("org/tiny", driver)
    assert source.revision == revision
    node = _hub_cache(tmp_path / "node", model_dir, revision)
    shutil.rmtree(tmp_path / "driver")  # the driver's cache is not on the worker's machine
    run = "from admmq_dist.model.loading import ModelSource as M; import sys; " \
          f"print(M(*{(source.name, source.path, source.revision)!r}, {source.content!r}).locate())"
    env = {**os.environ, "HF_HOME": str(tmp_path / "node"), "HF_HUB_OFFLINE": "1"}
    found = subprocess.run([sys.executable, "-c", run], env=env, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == str(node)
    # Another revision in the node's cache is not the driver's model: one line, no fallback.
    other = ModelSource(source.name, source.path, "b" * 40, source.content)
    run = run.replace(repr(source.revision), repr(other.revision))
    found = subprocess.run([sys.executable, "-c", run], env=env, capture_output=True, text=True)
    assert found.returncode != 0
    assert "is not in this machine's hub cache" in found.stderr


def test_the_work_folder_goes_where_work_dir_says(model_dir, tmp_path):
    recipe = override(Recipe(), ROUNDS)
    seen = []

    def on_block(b):
        seen.append((work_dir_for(tmp_path / "out", tmp_path / "shared").is_dir(),
                     work_dir_for(tmp_path / "out").exists()))

    quantize_model(str(model_dir), tmp_path / "out", recipe, device=torch.device("cpu"),
                   progress=False, threads=1, backend=LocalBackend(2),
                   work_dir=tmp_path / "shared", on_block=on_block)
    quantize_model(str(model_dir), tmp_path / "beside", recipe, device=torch.device("cpu"),
                   progress=False, threads=1, backend=LocalBackend(2))
    assert seen and all(shared and not beside for shared, beside in seen)
    assert digest(tmp_path / "out") == digest(tmp_path / "beside")
    assert not work_dir_for(tmp_path / "out", tmp_path / "shared").exists()  # removed when done


@pytest.mark.parametrize("fault", ["not shared", "not writable"])
def test_workers_that_cannot_share_the_work_folder_stop_the_run_before_any_block(
        model_dir, tmp_path, monkeypatch, fault):
    elsewhere = tmp_path / "node-local"
    real = DeviceModel.write_probe

    def write_probe(self, work, name):
        if fault == "not writable":
            raise PermissionError(13, "Permission denied", os.path.join(work, name))
        return real(self, str(elsewhere), name)  # the worker's node mounts another disk there

    elsewhere.mkdir()
    monkeypatch.setattr(DeviceModel, "write_probe", write_probe)
    solved = []
    monkeypatch.setattr(DeviceModel, "forward", lambda *a: solved.append(a))
    recipe = override(Recipe(), ROUNDS)
    message = "not shared storage" if fault == "not shared" else "cannot write the work folder"
    with pytest.raises(StorageError, match=f"{message}.*--work-dir"):
        quantize_model(str(model_dir), tmp_path / "out", recipe, device=torch.device("cpu"),
                       progress=False, threads=1, backend=LocalBackend(2))
    assert not solved
    assert not (tmp_path / "out").exists() and not work_dir_for(tmp_path / "out").exists()


def test_the_sequential_schedule_needs_no_shared_work_folder(model_dir, tmp_path, monkeypatch):
    # Its commits are the driver's: a worker's disk is none of its business.
    monkeypatch.setattr(DeviceModel, "write_probe", lambda *a: pytest.fail("probed"))
    quantize_model(str(model_dir), tmp_path / "out", override(Recipe(), SETTINGS),
                   device=torch.device("cpu"), progress=False, threads=1,
                   backend=LocalBackend(2))
