"""Calibration text and the token windows the Hessians are captured from.

``read_text`` turns a source (a local text/JSON Lines/JSON/Parquet/CSV file, or a Hugging Face
dataset id) into one string; ``token_windows`` tokenizes it once and draws fixed-length windows at
random offsets, deterministically from a seed, so every worker and every rerun sees the same
calibration set; ``split_text`` separates evaluation text from calibration text when both must come
from one file (the benchmarks evaluate on the first half of WikiText-2 test, calibrate on the second).
"""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path

import torch

# Local files that datasets.load_dataset reads, by suffix -> its builder name.
DATASET_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Suffixes that mark a source as a file path (so a missing one is reported as a missing file
# rather than looked up on the hub as a dataset id).
FILE_SUFFIXES = {".txt", ".raw", ".text", ".md", *DATASET_FORMATS}
DOCUMENT_SEPARATOR = "\n\n"
# A paragraph boundary: a line break, a line holding only spaces/tabs/CR, another line break.
# (WikiText's blank lines are " \n", and CRLF files would otherwise hide them.)
_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")


def read_text(source: str, *, split: str = "train", text_field: str = "text") -> str:
    """The calibration text named by ``source``, documents joined with a blank line.

    ``source`` is one of:

    - a local text file (``.txt``, ``.raw``, or any suffix not below), read whole as UTF-8;
    - a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file, read with ``datasets``; each row's
      ``text_field`` is one document;
    - a Hugging Face dataset id ``name[:config]`` (e.g. ``wikitext:wikitext-2-raw-v1``), whose
      ``split`` is loaded with ``datasets.load_dataset`` and each row's ``text_field`` used.

    Raises FileNotFoundError for a path that does not exist, ValueError for a missing field or
    an empty text.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        raise ValueError(f"calibration source {source!r} is a directory; give a file")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in DATASET_FORMATS:
            text = _read_dataset(DATASET_FORMATS[suffix], None, "train", text_field, source,
                                 data_files=str(path))
        else:
            # Universal newlines: CRLF files (WikiText's raw files are CRLF) read as "\n".
            text = path.read_text(encoding="utf-8")
    elif _looks_like_path(source):
        raise FileNotFoundError(f"calibration file {source!r} does not exist")
    else:
        name, _, config = source.partition(":")
        text = _read_dataset(name, config or None, split, text_field, source)
    if not text.strip():
        raise ValueError(f"calibration text from {source!r} is empty")
    return text


def _looks_like_path(source: str) -> bool:
    """Whether ``source`` is meant as a file path rather than a dataset id ``org/name[:config]``."""
    return (source.startswith(("/", "./", "../", "~", "\\"))
            or Path(source).suffix.lower() in FILE_SUFFIXES)


def _read_dataset(builder: str, config: str | None, split: str, text_field: str, source: str,
                  data_files: str | None = None) -> str:
    # Imported here: datasets is slow to import, and plain-text sources do not need it.
    import datasets

    if data_files is not None:
        dataset = datasets.load_dataset(builder, data_files=data_files, split=split)
    else:
        dataset = datasets.load_dataset(builder, config, split=split)
    if text_field not in dataset.column_names:
        raise ValueError(
            f"calibration data {source!r} has no field {text_field!r}; its fields are "
            f"{', '.join(map(repr, dataset.column_names))} (choose one with the text field option)"
        )
    # Rows with no text (None, or "" as WikiText's blank lines are) are not documents.
    return DOCUMENT_SEPARATOR.join(doc for doc in dataset[text_field] if doc)


def token_windows(tokenizer, text: str, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``num_samples`` windows of ``seq_len`` consecutive tokens from ``text``, as LongTensor ``[num_samples, seq_len]``.

    The text is tokenized once, without special tokens; window starts are drawn uniformly (with
    replacement) from a ``torch.Generator`` seeded with ``seed``, so the windows depend only on the
    text, the tokenizer and the seed.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    # verbose=False: the whole text is far longer than the model's context, which is expected
    # here (we cut windows from it) and must not warn.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    num_tokens = len(ids)
    if num_tokens < seq_len + 1:
        raise ValueError(
            f"calibration text has {num_tokens} tokens; need at least seq_len+1 = {seq_len + 1} "
            "— give more text or a smaller --seq-len"
        )
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # Starts in [0, num_tokens - seq_len - 1], as in GPTQ's sampler: leaves room for one more
    # token after every window.
    starts = torch.randint(0, num_tokens - seq_len, (num_samples,), generator=generator)
    tokens = torch.tensor(ids, dtype=torch.long)
    return tokens[starts[:, None] + torch.arange(seq_len)]


def split_text(text: str, fraction: float = 0.5) -> tuple[str, str]:
    """Split ``text`` at the paragraph boundary (blank line) nearest ``fraction`` of its length.

    Returns ``(first, second)``, both without the blank line between them. Falls back to the
    nearest line break when the text has no blank line; raises ValueError when it has neither.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be strictly between 0 and 1, got {fraction}")
    target = round(len(text) * fraction)
    # Only boundaries that leave non-blank text on both sides count.
    first_visible = len(text) - len(text.lstrip())
    end_visible = len(text.rstrip())
    for pattern in (_BLANK_LINE, re.compile(r"\n")):
        cuts = [m for m in pattern.finditer(text)
                if m.start() > first_visible and m.end() < end_visible]
        if cuts:
            best = min(cuts, key=lambda m: abs(m.start() - target))
            return text[:best.start()], text[best.end():]
    raise ValueError("the text has no line break to split at")


def default_calibration_text() -> str:
    """The calibration text shipped in the package (see ``admmq_dist/data/README.md``)."""
    return importlib.resources.files("admmq_dist").joinpath("data/calibration.txt").read_text(
        encoding="utf-8")


def calibration_batches(model_dir: Path, recipe) -> list[torch.Tensor]:
    """The recipe's calibration windows (its ``calibration`` settings) in batches, tokenized with
    the model's tokenizer."""
    from transformers import AutoTokenizer

    cal = recipe.calibration
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = default_calibration_text() if cal.dataset is None else read_text(
        cal.dataset, split=cal.split, text_field=cal.text_field)
    windows = token_windows(tokenizer, text, cal.num_samples, cal.seq_len, cal.seed)
    return list(torch.split(windows, cal.batch_size))
