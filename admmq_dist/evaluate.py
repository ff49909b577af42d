"""Token perplexity of a model or a written checkpoint on WikiText-2-style text."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .checkpoint.compat import fix_asymmetric_loading
from .model.calibration import read_text, split_text
from .model.loading import resolve_model_dir

# Tests and benchmarks evaluate on the first half of this file (the second half calibrates).
WIKITEXT_TEST = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / \
    "wikitext-2-raw" / "wiki.test.raw"


def evaluation_text(dataset: str | None, split: str, text_field: str) -> str:
    if dataset is not None:
        return read_text(dataset, split=split, text_field=text_field)
    if not WIKITEXT_TEST.is_file():
        raise FileNotFoundError(
            "no evaluation text given and the WikiText-2 test file is not beside the checkout; "
            "pass --dataset FILE_OR_HUB_ID")
    return split_text(read_text(str(WIKITEXT_TEST)), 0.5)[0]


@torch.no_grad()
def perplexity(model: str, *, dataset: str | None = None, split: str = "test",
               text_field: str = "text", seq_len: int = 512, max_windows: int | None = None,
               device: torch.device = torch.device("cpu")) -> dict:
    """exp(mean token NLL) over consecutive non-overlapping windows of ``seq_len`` tokens.

    Under ``accelerate launch`` (``launch/accelerate.yaml``) every process takes every n-th
    window on its own GPU and the sums are reduced, so the figure is the single-process one.
    """
    from accelerate import PartialState
    from accelerate.utils import reduce
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_dir(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = evaluation_text(dataset, split, text_field)
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    windows = ids.numel() // seq_len
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window "
                         f"of {seq_len}; give more text or a smaller --seq-len")
    state = PartialState()
    if state.num_processes > 1:
        device = state.device
    dtype = torch.float32 if device.type == "cpu" else None
    fix_asymmetric_loading()  # transformers >= 5.23 (see the function)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or "auto").to(device).eval()
    total, count = 0.0, 0
    for w in range(state.process_index, windows, state.num_processes):
        chunk = ids[w * seq_len:(w + 1) * seq_len].unsqueeze(0).to(device)
        logits = lm(chunk, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
        total += float(nll)
        count += seq_len - 1
    if state.num_processes > 1:
        sums = reduce(torch.tensor([total, count], dtype=torch.float64, device=device), "sum")
        total, count = float(sums[0]), int(sums[1])
    return {"ppl": math.exp(total / count), "windows": windows, "seq_len": seq_len,
            "tokens": count, "model": model}
