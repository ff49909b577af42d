"""Checkpoints verifiable to the byte: the writer's admmq-manifest.json (every file's size and
SHA-256, written last and atomically) and `admmq verify` checking it first.

Each damage below is one the layout checks alone let through (a low mantissa bit of a positive
scale, one code in a packed word): every such test also removes the manifest and shows the
layout checks pass, so it fails if the manifest check were a no-op.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import shutil
import struct
from pathlib import Path

import pytest
import torch
from checkpoints import quantize, save_source, tiny_model, write

import admmq_dist.checkpoint.manifest as manifest_module
import admmq_dist.files as files_module
from admmq_dist import __version__
from admmq_dist.checkpoint import CheckpointWriter
from admmq_dist.checkpoint.manifest import MANIFEST_NAME
from admmq_dist.checkpoint.verify import verify_checkpoint
from admmq_dist.cli import main

SETTINGS = dict(fmt="compressed-tensors", bits=4, group_size=32, symmetric=False)
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
ITEM_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "I32": 4}
NO_MANIFEST = f"no {MANIFEST_NAME}"


@pytest.fixture(scope="module")
def model():
    model = tiny_model("llama")
    return model, quantize(model, 4, 32, False)


@pytest.fixture(scope="module")
def written(model, tmp_path_factory):
    """The same model written with float32, bfloat16 and float16 scales (small shards, and the
    source's tokenizer files copied in)."""
    root = tmp_path_factory.mktemp("manifest")
    source = save_source(model[0], root / "source")
    return {key: write(*model, root / key, dtype=dtype, source=source, max_shard_bytes=40_000,
                       **SETTINGS)
            for key, dtype in DTYPES.items()}


def copy_of(written, key: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(written[key], tmp_path / key))


def every_file(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in folder.rglob("*") if p.is_file()}


def shard_of(folder: Path, tensor: str) -> str:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def flip_low_bit(folder: Path, tensor: str, dtype: str) -> str:
    """Flip bit 0 of ``tensor``'s first element in place, in the file's bytes (as bit rot would);
    checks the tensor is stored as ``dtype``; returns the shard's name."""
    shard = shard_of(folder, tensor)
    with open(folder / shard, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(length))[tensor]
        assert entry["dtype"] == dtype, entry
        f.seek(8 + length + entry["data_offsets"][0])  # little-endian: the element's low byte
        low = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([low ^ 1]))
    return shard


def run_verify(folder: Path, capsys) -> tuple[int, dict, str]:
    code = main(["verify", str(folder), "--json", "--max-problems", "100"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out.strip().splitlines()[-1]), captured.err


# ----------------------------------------------------------------------------- the writer


@pytest.mark.parametrize("key", list(DTYPES))
def test_the_manifest_lists_every_file_with_its_size_and_sha256(written, key):
    folder = written[key]
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["tool"] == f"admmq-dist {__version__}" and manifest["algorithm"] == "sha256"
    on_disk = every_file(folder)
    del on_disk[MANIFEST_NAME]
    assert sorted(manifest["files"]) == sorted(on_disk)
    assert len([n for n in on_disk if n.endswith(".safetensors")]) > 1
    assert {"config.json", "model.safetensors.index.json", "recipe.yaml",
            "tokenizer_config.json", "special_tokens_map.json"} <= set(on_disk)
    for name, data in on_disk.items():
        assert manifest["files"][name] == {"size": len(data),
                                           "sha256": hashlib.sha256(data).hexdigest()}, name


def test_files_in_subfolders_are_listed_and_the_manifest_name_is_reserved(model, tmp_path):
    extra = {"report.jsonl": "{}\n", "eval/results.json": b"[1, 2]\n"}
    with CheckpointWriter(tmp_path / "nested", format="compressed-tensors", bits=4,
                          group_size=32, symmetric=False) as writer:
        for name, (codes, grid) in model[1].items():
            writer.add_quantized(name, codes, grid)
        writer.finalize(config=model[0].config.to_dict(), source_dir=None, ignore=["lm_head"],
                        extra_files=extra)
    listed = json.loads((tmp_path / "nested" / MANIFEST_NAME).read_text())["files"]
    assert listed["eval/results.json"]["size"] == 7 and "report.jsonl" in listed
    with CheckpointWriter(tmp_path / "refused", format="compressed-tensors", bits=4,
                          group_size=32, symmetric=False) as writer:
        name, (codes, grid) = next(iter(model[1].items()))
        writer.add_quantized(name, codes, grid)
        with pytest.raises(ValueError, match="does not replace a file the writer produces"):
            writer.finalize(config=model[0].config.to_dict(), source_dir=None,
                            ignore=["lm_head"], extra_files={MANIFEST_NAME: "{}"})
    assert not (tmp_path / "refused").exists()


def test_the_manifest_is_written_last(model, tmp_path, monkeypatch):
    """Every other file is complete when the manifest is written, and nothing touches one after
    it: each file's size, mtime and inode are the same in the published folder."""
    seen = {}
    real = manifest_module.write_text

    def snapshot_then_write(path, text):
        seen.update({p.relative_to(path.parent).as_posix(): (p.stat().st_size,
                                                              p.stat().st_mtime_ns, p.stat().st_ino)
                     for p in path.parent.rglob("*") if p.is_file()})
        real(path, text)

    monkeypatch.setattr(manifest_module, "write_text", snapshot_then_write)
    out = write(*model, tmp_path / "out", max_shard_bytes=40_000, **SETTINGS)
    after = {p.relative_to(out).as_posix(): p.stat() for p in out.rglob("*") if p.is_file()}
    assert set(after) == {*seen, MANIFEST_NAME} and MANIFEST_NAME not in seen
    assert {n: (s.st_size, s.st_mtime_ns, s.st_ino) for n, s in after.items()
            if n != MANIFEST_NAME} == seen
    assert all(after[MANIFEST_NAME].st_mtime_ns >= s.st_mtime_ns for s in after.values())
    assert sorted(json.loads((out / MANIFEST_NAME).read_text())["files"]) == sorted(seen)


@pytest.mark.parametrize("when", ["while writing it", "before renaming it"])
def test_a_failed_manifest_write_leaves_no_folder(model, tmp_path, monkeypatch, when):
    """The manifest appears whole (written beside, renamed) or the checkpoint never appears."""
    out = tmp_path / "out"
    state = {}
    real_write_text, real_replace = pathlib.Path.write_text, files_module.os.replace

    def half_then_fail(self, text, *args, **kwargs):
        if not self.name.startswith(f".{MANIFEST_NAME}.tmp"):
            return real_write_text(self, text, *args, **kwargs)
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        state["visible"] = (self.parent / MANIFEST_NAME).exists()
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    def fail_on_manifest(src, dst, *args, **kwargs):
        if Path(dst).name == MANIFEST_NAME:
            state["visible"] = Path(dst).exists()
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    if when == "while writing it":
        monkeypatch.setattr(pathlib.Path, "write_text", half_then_fail)
    else:
        monkeypatch.setattr(files_module.os, "replace", fail_on_manifest)
    with pytest.raises(OSError):
        write(*model, out, **SETTINGS)
    assert state == {"visible": False}  # the writer got there, and no partial manifest showed
    assert not out.exists() and list(tmp_path.iterdir()) == []  # and nothing is left beside it


# ----------------------------------------------------------------------------- verify


@pytest.mark.parametrize("key", list(DTYPES))
def test_a_written_checkpoint_verifies(written, key, capsys):
    notes = []
    assert verify_checkpoint(written[key], notes=notes) == [] and notes == []
    code, result, err = run_verify(written[key], capsys)
    assert code == 0 and result == {"ok": True, "problems": [], "notes": []}
    assert "OK" in err and "note" not in err


@pytest.mark.parametrize("key, tensor, dtype", [
    ("f32", "model.layers.0.self_attn.q_proj.weight_scale", "F32"),
    ("bf16", "model.layers.1.mlp.up_proj.weight_scale", "BF16"),
    ("f16", "lm_head.weight", "F16"),
    ("f16", "model.layers.1.mlp.down_proj.weight_packed", "I32"),
])
def test_a_flipped_low_bit_is_named(written, tmp_path, capsys, key, tensor, dtype):
    folder = copy_of(written, key, tmp_path)
    shard = flip_low_bit(folder, tensor, dtype)
    problems = verify_checkpoint(folder)
    assert problems == [f"{shard}: SHA-256 differs from {MANIFEST_NAME}; its bytes changed after "
                        "it was written (bit rot or a bad copy)"]
    code, result, err = run_verify(folder, capsys)
    assert code == 1 and result["problems"] == problems
    assert "failed verification" in err and f"  {shard}: SHA-256 differs" in err
    # The layout checks alone pass this bit: only the manifest catches it.
    (folder / MANIFEST_NAME).unlink()
    notes = []
    assert verify_checkpoint(folder, notes=notes) == []
    assert len(notes) == 1 and notes[0].startswith(NO_MANIFEST)


def test_a_missing_and_a_truncated_shard_are_named(written, tmp_path, capsys):
    folder = copy_of(written, "f16", tmp_path)
    missing, truncated = sorted(p.name for p in folder.glob("*.safetensors"))[:2]
    (folder / missing).unlink()
    size = (folder / truncated).stat().st_size
    os.truncate(folder / truncated, size // 2)
    code, result, err = run_verify(folder, capsys)
    assert code == 1 and not result["ok"]
    assert result["problems"][:2] == [
        f"{missing}: missing ({MANIFEST_NAME} lists it, "
        f"{written['f16'].joinpath(missing).stat().st_size} bytes)",
        f"{truncated}: {size // 2} bytes, but {MANIFEST_NAME} says {size} (truncated or replaced)",
    ]
    assert f"  {missing}: missing" in err and f"  {truncated}: {size // 2} bytes" in err
    # The layout checks still run after the manifest's: the unreadable shard is named again.
    assert any(p.startswith(f"{truncated}: cannot read") for p in result["problems"][2:])


def test_an_unlisted_file_is_a_note_not_a_failure(written, tmp_path, capsys):
    folder = copy_of(written, "bf16", tmp_path)
    (folder / "README.md").write_text("# my quantized model\n")
    (folder / "eval").mkdir()
    (folder / "eval" / "ppl.json").write_text("{}")
    notes = []
    assert verify_checkpoint(folder, notes=notes) == []
    assert [n.split(":")[0] for n in notes] == ["README.md", "eval/ppl.json"]
    assert all(f"not listed in {MANIFEST_NAME}" in n for n in notes)
    code, result, err = run_verify(folder, capsys)
    assert code == 0 and result["ok"] and result["notes"] == notes
    assert "admmq: note: README.md: not listed" in err and "OK" in err


def test_a_folder_without_a_manifest_verifies_as_before(written, tmp_path, capsys):
    folder = copy_of(written, "f16", tmp_path)
    (folder / MANIFEST_NAME).unlink()
    code, result, err = run_verify(folder, capsys)
    assert code == 0 and result["problems"] == []
    assert len(result["notes"]) == 1 and result["notes"][0].startswith(NO_MANIFEST)
    assert err.count("admmq: note:") == 1 and "OK" in err


def test_layout_problems_are_listed_after_the_files_that_changed(written, tmp_path):
    folder = copy_of(written, "f32", tmp_path)
    name = "model.layers.0.mlp.gate_proj.weight_scale"
    shard = shard_of(folder, name)
    with open(folder / shard, "r+b") as f:  # the sign bit of the first scale: -scale
        (length,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + length + json.loads(f.read(length))[name]["data_offsets"][0] + 3)
        high = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([high ^ 0x80]))
    problems = verify_checkpoint(folder)
    assert len(problems) == 2 and problems[0].startswith(f"{shard}: SHA-256 differs")
    assert problems[1].startswith(f"{name}: 1 scale(s) are zero or negative (first at [0, 0]")


def test_a_damaged_config_or_manifest_is_a_problem_not_a_crash(written, tmp_path):
    folder = copy_of(written, "f16", tmp_path)
    config = (folder / "config.json").read_bytes()
    (folder / "config.json").write_bytes(config[:-40])
    problems = verify_checkpoint(folder)
    assert problems[0] == (f"config.json: {len(config) - 40} bytes, but {MANIFEST_NAME} says "
                           f"{len(config)} (truncated or replaced)")
    assert len(problems) == 2 and "is not valid JSON" in problems[1]
    (folder / "config.json").write_bytes(config)
    (folder / MANIFEST_NAME).write_text('{"algorithm": "sha256", "files": [')
    problems = verify_checkpoint(folder)
    assert len(problems) == 1 and problems[0].startswith(f"{MANIFEST_NAME}: unreadable (")
