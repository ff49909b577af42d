"""Bad input through the command line: one clear line on stderr, a non-zero exit, no traceback
(unless --debug), and nothing half-written — an existing checkpoint is never destroyed."""

import errno
import hashlib
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from admmq_dist.cli import main

from tiny import sample_text, tiny_model_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("src"), "llama")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("cal") / "cal.txt"
    path.write_text(sample_text())
    return path


def args(model, out, text, *extra):
    return ["quantize", str(model), "-o", str(out), "--dataset", str(text), "--num-samples", "4",
            "--seq-len", "32", "--group-size", "32", "--method", "rtn", *extra]


def refused(capsys, argv, *needles, code=1):
    """Run ``argv``; it must fail with exactly one ``admmq:`` line holding every needle."""
    assert main(argv) == code
    err = capsys.readouterr().err
    # Progress bars share stderr: cut at carriage returns and drop cursor escapes.
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", err).replace("\r", "\n")
    lines = [line.strip() for line in plain.splitlines() if line.strip().startswith("admmq:")]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def damaged_copy(model, tmp_path, value=None, rows=None):
    """A copy of ``model`` with one weight set to ``value`` at [3, 5], or ``rows`` of the first
    block's gate/up projections zeroed (their down_proj inputs are then dead channels)."""
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    tensors = load_file(folder / "model.safetensors")
    if value is not None:
        tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = value
    if rows is not None:
        for name in ("gate_proj", "up_proj"):
            tensors[f"model.layers.0.mlp.{name}.weight"][:rows] = 0
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_missing_model_or_path(capsys, tmp_path, text):
    refused(capsys, args(tmp_path / "nope", tmp_path / "o", text), "does not exist")
    # A hub id that is not in the local cache (conftest sets HF_HUB_OFFLINE).
    refused(capsys, args("nobody-here/no-such-model-xyz", tmp_path / "o", text),
            "cannot find model 'nobody-here/no-such-model-xyz'")
    assert not (tmp_path / "o").exists()


def test_not_a_causal_lm(capsys, tmp_path, model, text):
    folder = tmp_path / "bert"
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="bert", architectures=["BertModel"])
    (folder / "config.json").write_text(json.dumps(config))
    refused(capsys, args(folder, tmp_path / "o", text), "BertModel", "not a causal language model")


def test_unsupported_bits_and_groups(capsys, tmp_path, model, text):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("grid: {bits: 5}\n")
    refused(capsys, args(model, tmp_path / "o", text, "--recipe", str(recipe)), "bits")
    recipe.write_text("grid: {group_size: 0}\n")
    refused(capsys, args(model, tmp_path / "o", text, "--recipe", str(recipe)), "group_size")
    with pytest.raises(SystemExit) as exc:  # argparse: usage and the allowed values
        main(args(model, tmp_path / "o", text, "--bits", "5"))
    assert exc.value.code == 2
    assert "invalid choice: 5" in capsys.readouterr().err


def test_a_group_size_the_format_cannot_hold_fails_before_any_work(capsys, tmp_path, model, text):
    line = refused(capsys, args(model, tmp_path / "o", text, "--group-size", "48"),
                   "in_features=64 is not divisible by group_size=48", "compressed-tensors")
    assert "model.layers.0." in line  # found on the first block, before its forward passes
    refused(capsys, args(model, tmp_path / "o", text, "--format", "gptq", "--asym"), "GPTQ",
            "--sym")
    # Nothing to resume was left behind: the corrected command just runs.
    assert leftovers(tmp_path) == [] and not (tmp_path / "o").exists()
    assert main(args(model, tmp_path / "o", text)) == 0


def test_an_unknown_recipe_key_is_named(capsys, tmp_path, model, text):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("solver:\n  admm:\n    rho_strat: 0.2\n")
    refused(capsys, args(model, tmp_path / "o", text, "--recipe", str(recipe)),
            "'solver.admm.rho_strat'")


def test_empty_or_too_short_calibration_text(capsys, tmp_path, model):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    refused(capsys, args(model, tmp_path / "o", empty), "empty")
    short = tmp_path / "short.txt"
    short.write_text("the city of the river .\n")
    refused(capsys, args(model, tmp_path / "o", short), "need at least seq_len+1 = 33",
            "--seq-len")
    refused(capsys, args(model, tmp_path / "o", tmp_path / "missing.txt"), "missing.txt")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weights_name_the_tensor(capsys, tmp_path, model, text, value):
    folder = damaged_copy(model, tmp_path, value=value)
    refused(capsys, args(folder, tmp_path / "o", text),
            "'model.layers.1.mlp.up_proj.weight' holds 1 NaN or Inf values")
    assert not (tmp_path / "o").exists()


def test_dead_input_channels_quantize_cleanly(capsys, tmp_path, model, text):
    folder = damaged_copy(model, tmp_path, rows=40)
    out = tmp_path / "o"
    assert main(args(folder, out, text, "--method", "admmq", "--json")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {json.loads(line)["layer"]: json.loads(line)
            for line in (out / "report.jsonl").read_text().splitlines()}
    down = rows["model.layers.0.mlp.down_proj"]
    # 40 of down_proj's 128 inputs are always zero: its Hessian is singular there, yet the
    # solve is finite and as good as the other layers'.
    assert 0 < down["loss"] < 0.05 and summary["mean_loss"] < 0.05


def test_an_existing_output_is_refused_and_never_destroyed(capsys, tmp_path, model, text):
    out = tmp_path / "o"
    assert main(args(model, out, text)) == 0
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    refused(capsys, args(model, out, text, "--bits", "3"), "already exists", "--overwrite")
    # A failing run with --overwrite keeps the old checkpoint too.
    refused(capsys, args(model, out, text, "--overwrite", "--group-size", "48"), "group_size=48")
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    assert after == before
    assert main(args(model, out, text, "--bits", "3", "--overwrite")) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"][
        "config_groups"]["group_0"]["weights"]["num_bits"] == 3


def test_disk_full_while_writing_leaves_no_checkpoint_and_resumes(capsys, tmp_path, model, text,
                                                                 monkeypatch):
    import admmq_dist.checkpoint.writer as writer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "shard"))

    monkeypatch.setattr(writer, "save_file", full)
    out = tmp_path / "o"
    refused(capsys, args(model, out, text), "disk is full", "--resume")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    monkeypatch.undo()
    assert main(args(model, out, text, "--resume", "--json")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["resumed_blocks"] == 2 and summary["layers"] == 14


def test_ctrl_c_stops_cleanly_and_resume_continues(capsys, tmp_path, model, text, monkeypatch):
    import admmq_dist.run.sequential as sequential

    reference = tmp_path / "ref"
    assert main(args(model, reference, text, "--method", "admmq")) == 0
    original = sequential.commit_block
    calls = []

    def commit_then_interrupt(work, b, out):
        original(work, b, out)
        calls.append(b)
        raise KeyboardInterrupt  # the user presses Ctrl-C right after block 0 is committed

    monkeypatch.setattr(sequential, "commit_block", commit_then_interrupt)
    out = tmp_path / "o"
    refused(capsys, args(model, out, text, "--method", "admmq"), "interrupted", "--resume",
            code=130)
    assert calls == [0] and not out.exists()
    monkeypatch.undo()
    assert main(args(model, out, text, "--method", "admmq", "--resume", "--json")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["resumed_blocks"] == 1
    shards = sorted(p.name for p in reference.glob("*.safetensors"))
    assert shards == sorted(p.name for p in out.glob("*.safetensors")) and shards
    for name in shards:
        a, b = load_file(out / name), load_file(reference / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_debug_shows_the_traceback(tmp_path, model, text):
    with pytest.raises(ValueError, match="group_size=48"):
        main(["--debug", *args(model, tmp_path / "o", text, "--group-size", "48")])


def test_modules_gptq_cannot_keep_dense_are_refused_before_any_work(capsys, tmp_path, model,
                                                                   text, monkeypatch):
    refused(capsys, args(model, tmp_path / "o", text, "--format", "gptq", "--sym", "--skip",
                         "down_proj"), "GPTQ checkpoints cannot mark", "compressed-tensors")
    # Qwen2-MoE's shared-expert gate stays dense: found on the first block, not at the end.
    moe = tiny_model_dir(tmp_path / "moe", "qwen2_moe", num_hidden_layers=2)
    calls = []
    from admmq_dist.run.sequential import SequentialSchedule

    original = SequentialSchedule._capture

    def capture(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(SequentialSchedule, "_capture", capture)
    refused(capsys, args(moe, tmp_path / "o", text, "--format", "gptq", "--sym"),
            "shared_expert_gate", "compressed-tensors")
    assert calls == []  # refused before the first capture pass


@pytest.mark.parametrize("argv, needle, command", [
    (["quantize", "-o", "x", "--bits", "5"], "argument --bits: invalid choice: 5", "quantize"),
    (["quantize", "--bits", "4"], "the following arguments are required: -o/--output",
     "quantize"),
    (["quantize", "-o", "x", "--sym", "--asym"], "not allowed with argument", "quantize"),
    (["verify"], "the following arguments are required: folder", "verify"),
    (["nonsense"], "invalid choice: 'nonsense'", None),
])
def test_usage_mistakes_cost_one_line_and_a_hint(capsys, argv, needle, command):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("admmq: error: ") and needle in err
    prog = "admmq" if command is None else f"admmq {command}"
    assert err.rstrip().endswith(f"(see `{prog} --help`)")


def test_plan_level_mistakes_are_refused_before_any_weight_is_read(model, text, tmp_path,
                                                                  capsys, monkeypatch):
    """From the config alone, before the model's weights are read or hashed, Ray started or a
    worker built: more workers than calibration batches, an existing output folder, a group size
    or a skip entry that does not fit the model, and a job the device cannot hold (here a device
    with 200 kB)."""
    from admmq_dist.model.loading import TensorIndex
    from admmq_dist.run import memory

    reads = []
    monkeypatch.setattr(TensorIndex, "read", lambda *a, **k: reads.append(a) or 1 / 0)
    # 4 samples in batches of 2: 2 batches for 4 workers (Ray would start for --workers).
    refused(capsys, args(model, tmp_path / "o", text, "--workers", "4", "--batch-size", "2"),
            "4 workers but only 2 calibration batches")
    (tmp_path / "exists").mkdir()
    refused(capsys, args(model, tmp_path / "exists", text), "already exists", "--overwrite")
    # Groups that do not tile a layer's width, a skip entry naming nothing (a typo), a module
    # the format cannot keep dense.
    refused(capsys, args(model, tmp_path / "o", text, "--group-size", "48"), "group_size=48",
            "model.layers.0.self_attn.q_proj")
    refused(capsys, args(model, tmp_path / "o", text, "--skip", "down_porj"),
            "--skip 'down_porj' matches no module", "mlp.down_proj")
    refused(capsys, args(model, tmp_path / "o", text, "--format", "gptq", "--sym", "--skip",
                         "down_proj"), "GPTQ checkpoints cannot mark")
    monkeypatch.setattr(memory, "device_capacity", lambda device, reserve=True: 200_000)
    refused(capsys, args(model, tmp_path / "o", text), "model.layers.", "needs about",
            "GiB usable")
    assert reads == [] and not (tmp_path / "o").exists()
