"""`admmq plan`: a job planned from config.json alone (tests/configs holds the public configs of
large models), the results table docs/planning.md quotes recomputed row by row, and the figures
pinned."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from admmq_dist.cli import main
from admmq_dist.run.job_plan import parse_bytes

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = Path(__file__).resolve().parent / "configs"
JOB = ["--num-samples", "128", "--seq-len", "2048"]


def plan(capsys, *args: str) -> tuple[int, dict]:
    code = main(["plan", *args, "--json"])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def readme_rows() -> list[list[str]]:
    """The table docs/planning.md quotes (benchmarks/results/plan_table.md)."""
    text = (ROOT / "benchmarks" / "results" / "plan_table.md").read_text()
    table = text.split("<!-- plan-table -->")[1].split("<!-- /plan-table -->")[0]
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in table.strip().splitlines()[2:]]


def test_the_json_line_has_what_the_issue_names(capsys):
    code, out = plan(capsys, str(CONFIGS / "Llama-3.1-8B"), "--device-memory", "80GiB", *JOB)
    assert code == 0 and out["fits"] is True
    for key in ("fits", "worker_device_peak_bytes", "worker_host_peak_bytes",
                "driver_host_peak_bytes", "disk_bytes", "items", "smallest_workers",
                "bytes_moved_per_block"):
        assert key in out, key
    assert out["worker_device_peak_bytes"] >= max(out["items"].values())
    assert out["disk_bytes"] == out["output_bytes"] + out["work_bytes"] > 0


def test_every_readme_row_is_what_the_command_prints(capsys):
    rows = readme_rows()
    assert len(rows) >= 8
    for model, schedule, cluster, peak, fits, fewest, worst in rows:
        workers, device = (part.strip() for part in cluster.split("×"))
        code, out = plan(capsys, str(CONFIGS / model), "--schedule", schedule, "--workers",
                         workers, "--device-memory", device, *JOB)
        assert f"{out['worker_device_peak_bytes'] / 2**30:.1f} GiB" == peak, (model, cluster)
        assert ("yes" if out["fits"] else "no") == fits and code == (0 if out["fits"] else 1)
        assert ("none" if out["smallest_workers"] is None
                else str(out["smallest_workers"])) == fewest, (model, schedule)
        assert out["worst"].endswith(worst)


def test_the_70b_targets(capsys):
    """Llama-3.1-70B with the defaults: 8 x 80 GB fits at <= 60 GiB a worker, one 141 GB H200
    fits, one 80 GB H100 is refused with the figure; 405B on 64 x 80 GB is refused first for
    its calibration batches (16 with the defaults), the figure of what one worker needs next."""
    llama70 = str(CONFIGS / "Llama-3.1-70B")
    code, out = plan(capsys, llama70, "--workers", "8", "--device-memory", "80GiB", *JOB)
    assert code == 0 and out["worker_device_peak_bytes"] <= 60 * 2**30
    code, out = plan(capsys, llama70, "--device-memory", "141GB", *JOB)
    assert code == 0
    code, out = plan(capsys, llama70, "--device-memory", "80GiB", *JOB)
    assert code == 1 and "80 GiB" in out["problems"][0]
    code, out = plan(capsys, str(CONFIGS / "Llama-3.1-405B"), "--workers", "64",
                     "--device-memory", "80GiB", *JOB)
    assert code == 1 and "only 16 calibration batches" in out["problems"][0]


def test_405b_fits_64_gpus_of_80_gib_in_batches_of_2(capsys):
    """Llama-3.1-405B with the defaults, 128 x 2048 tokens in batches of 2 (one per worker):
    each worker's device peak fits 80 GB; its host holds what the GPU worker parks there (the
    owner of down_proj's Hessian: handed parts, the merged copy, up to 8 waiting nodes per
    statistic; memory.plan_block's host) beside its block."""
    code, out = plan(capsys, str(CONFIGS / "Llama-3.1-405B"), "--workers", "64", "--batch-size",
                     "2", "--device-memory", "80GiB", *JOB)
    assert code == 0 and out["fits"] and out["worker_device_peak_bytes"] < 76 * 2**30
    assert out["worst"].endswith("mlp.down_proj")
    assert out["worker_host_peak_bytes"] > (3 + 2 + 3 * 8) * 4 * 53248**2


def test_more_workers_shrink_the_hidden_states_not_the_hessians(capsys):
    llama70 = str(CONFIGS / "Llama-3.1-70B")
    _, one = plan(capsys, llama70, "--device-memory", "141GB", *JOB)
    _, eight = plan(capsys, llama70, "--workers", "8", "--device-memory", "141GB", *JOB)
    assert eight["items"]["hidden states"] * 8 == one["items"]["hidden states"]
    assert eight["items"]["Hessians and factorizations"] == \
        one["items"]["Hessians and factorizations"]


def test_a_round_schedule_moves_hand_offs_not_hessians(capsys):
    """Round schedules keep every Hessian with its block's owner: per block and round at most
    one hand-off of 128 x 2048 hidden states on both streams (bf16) and the block's uint8
    codes, whatever the worker count (the sequential figure, partial Hessians to owners, grows
    with it)."""
    llama70 = str(CONFIGS / "Llama-3.1-70B")
    hand_off = 2 * 128 * 2048 * 8192 * 2
    # q, k and v (8 of 64 heads), o, the MLP and the two norms: one byte a parameter
    codes = 8192 * (8192 + 2 * 1024 + 8192) + 3 * 8192 * 28672 + 2 * 8192
    for schedule in ("coordinated", "depth-parallel"):
        moved = [plan(capsys, llama70, "--schedule", schedule, "--workers", w,
                      "--device-memory", "141GB", *JOB)[1]["bytes_moved_per_block"]
                 for w in ("8", "80")]
        assert moved[0] == moved[1] == hand_off + codes, schedule
    _, eight = plan(capsys, llama70, "--workers", "8", "--device-memory", "141GB", *JOB)
    assert eight["bytes_moved_per_block"] > 14 * 3 * 4 * 28672**2


def test_deepseek_v3_fits_80_gib_gpus_by_capturing_its_experts_in_waves(capsys):
    """256 experts' partial sums on every worker (49.4 GiB) do not fit an 80 GB GPU beside the
    rest: the plan captures the expert stages in the fewest waves that fit (two), counts their
    forward passes, and needs none on 141 GB."""
    config = str(CONFIGS / "DeepSeek-V3")
    _, small = plan(capsys, config, "--workers", "16", "--device-memory", "80GiB", *JOB)
    _, large = plan(capsys, config, "--workers", "16", "--device-memory", "141GB", *JOB)
    assert small["fits"] and small["expert_waves"] == 2
    assert large["fits"] and large["expert_waves"] == 1
    assert large["worker_device_peak_bytes"] > 70 * 2**30 > small["worker_device_peak_bytes"]
    # Two more forward passes (one per expert stage) in each of the 58 MoE blocks.
    extra = small["modelled_seconds_by_phase"]["forward"] - large["modelled_seconds_by_phase"][
        "forward"]
    assert 0 < extra < 0.2 * large["modelled_seconds_by_phase"]["forward"]


def test_mistakes_cost_a_line(capsys, tmp_path):
    assert main(["plan", str(tmp_path), "--device-memory", "80GiB"]) == 1
    assert "config.json" in capsys.readouterr().err
    assert main(["plan", str(CONFIGS / "Llama-3.1-8B"), "--device-memory", "eighty"]) == 1
    assert "amount of memory" in capsys.readouterr().err


@pytest.mark.parametrize("text,value", [("80GiB", 80 * 2**30), ("80GB", 80 * 10**9),
                                        ("141G", 141 * 10**9), ("512MiB", 512 * 2**20),
                                        ("1024", 1024)])
def test_memory_amounts(text, value):
    assert parse_bytes(text) == value


def test_the_plan_reads_nothing_but_the_config(tmp_path, capsys):
    """A folder with config.json alone (no weights, no tokenizer) is planned."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((CONFIGS / "Mixtral-8x22B-v0.1" / "config.json")
                                        .read_text())
    code, out = plan(capsys, str(folder), "--workers", "16", "--device-memory", "80GiB", *JOB)
    assert re.search(r"experts", out["worst"])


HUB_CONFIGS = {"meta-llama/Llama-3.1-8B": "Llama-3.1-8B", "meta-llama/Llama-3.1-70B":
               "Llama-3.1-70B", "meta-llama/Llama-3.1-405B": "Llama-3.1-405B"}
NOT_PLANNED = {"-o", "--output", "--address", "--dataset"}  # flags with a value plan ignores
NOT_PLANNED_SWITCHES = {"--resume", "--overwrite", "--round-checkpoints", "--json"}


# `admmq quantize` and `accelerate launch … -m admmq_dist.cli quantize`, maybe continued.
DOCUMENTED = r"admmq(?:_dist\.cli)? (?:quantize|plan)\s+(?:#\s+)?(meta-llama/\S+)([^\n`'|#]*)"


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every `admmq quantize` of a hub model in the README and launch/, as (where, argv)."""
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
                 *sorted((ROOT / "launch").iterdir())]:
        text = path.read_text().replace("\\\n", " ").replace(">-\n", "")
        # Continued lines, in YAML and in shell comments.
        text = re.sub(r"\s#\s+--", " --", re.sub(r"\n\s*#?\s+--", " --", text))
        for match in re.finditer(DOCUMENTED, text):
            out.append((f"{path.name}: {match.group(0)[:80]}",
                        [match.group(1), *match.group(2).split()]))
    return out


def test_every_documented_command_passes_its_own_plan(capsys, monkeypatch):
    """The README's and launch/'s commands, planned as written on 80 GB GPUs (the cluster size
    each names): each fits, so none of them is refused at its first step."""
    monkeypatch.chdir(ROOT)
    commands = documented_commands()
    assert len(commands) >= 6
    for where, argv in commands:
        model, rest, args = argv[0], argv[1:], []
        skip = False
        for token in rest:
            if skip:
                skip = False
            elif token in NOT_PLANNED:
                skip = True
            elif token not in NOT_PLANNED_SWITCHES:
                args.append(token)
        if "--device-memory" not in args:
            args += ["--device-memory", "80GiB"]
        code, out = plan(capsys, str(CONFIGS / HUB_CONFIGS[model]), *args)
        assert code == 0, (where, out["problems"])
