"""Token perplexity of a model or a written checkpoint on WikiText-2-style text, and its KL
divergence from a reference (float) model."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .checkpoint.compat import fix_asymmetric_loading
from .checkpoint.folder import load_config
from .checkpoint.fp4_layout import KIND_OF_FORMAT
from .model.calibration import read_text
from .model.loading import resolve_model_dir

# The default evaluation text: the first half of the WikiText-2 test file (the second half is
# the default calibration text, data/calibration.txt), shipped in the package (data/README.md).
EVALUATION_TEXT = Path(__file__).resolve().parent / "data" / "evaluation.txt"


def evaluation_text(dataset: str | None, split: str, text_field: str) -> str:
    if dataset is not None:
        return read_text(dataset, split=split, text_field=text_field)
    return read_text(str(EVALUATION_TEXT))


def _load(model_dir: Path, device: torch.device, device_map=None, max_memory=None,
          offload_folder: str | None = None):
    """The model in evaluation mode: loaded straight onto ``device`` (no whole copy in host
    memory first: under ``accelerate launch`` each process holds only its own device's), or
    spread by ``device_map`` (what does not fit ``max_memory`` goes to ``offload_folder``)."""
    from transformers import AutoModelForCausalLM

    # compressed-tensors decompresses FP4 weights to bfloat16 (exact for them), which float32
    # activations cannot meet: an FP4 checkpoint runs in its own dtype on a CPU too.
    config = load_config(Path(model_dir))
    fp4 = (config.get("quantization_config") or {}).get("format") in KIND_OF_FORMAT
    dtype = torch.float32 if device.type == "cpu" and not fp4 else None
    fix_asymmetric_loading()  # transformers >= 5.23 (see the function)
    spread = {} if device_map is None else {"max_memory": max_memory,
                                            "offload_folder": offload_folder}
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype or "auto", device_map=device_map or {"": str(device)},
        **spread).eval()


def _check_reference(model_dir: Path, reference_dir: Path) -> None:
    """Refuse, before any weight is read, a reference whose vocabulary is not the model's."""
    from transformers import AutoConfig

    sizes = [getattr(AutoConfig.from_pretrained(d).get_text_config(), "vocab_size", None)
             for d in (model_dir, reference_dir)]
    if sizes[0] != sizes[1]:
        raise ValueError(f"the reference has a vocabulary of {sizes[1]} tokens, the model "
                         f"{sizes[0]}: the KL divergence compares next-token distributions over "
                         "one vocabulary; give the float model this one was quantized from")


def _window_sums(lm, ref, chunk: torch.Tensor) -> torch.Tensor:
    """``[NLL, KL(reference ‖ model), reference NLL]`` summed over one window's predicted tokens
    (zeros for the reference's without one)."""
    logp = torch.log_softmax(lm(chunk, use_cache=False).logits.float()[0, :-1], dim=-1)
    target = chunk[0, 1:]
    nll = -logp.gather(1, target[:, None]).sum()
    if ref is None:
        return torch.stack([nll, nll.new_zeros(()), nll.new_zeros(())])
    ref_logp = torch.log_softmax(ref(chunk, use_cache=False).logits.float()[0, :-1], dim=-1)
    kl = torch.nn.functional.kl_div(logp, ref_logp, log_target=True, reduction="sum")
    return torch.stack([nll, kl, -ref_logp.gather(1, target[:, None]).sum()])


def _windows(model_dir: Path, text: str, seq_len: int, max_windows: int | None):
    """The text's tokens and how many whole windows of ``seq_len`` are evaluated."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(text, return_tensors="pt",
                                                   verbose=False).input_ids[0]
    windows = ids.numel() // seq_len
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window "
                         f"of {seq_len}; give more text or a smaller --seq-len")
    return ids, windows


@torch.no_grad()
def perplexity(model: str, *, dataset: str | None = None, split: str = "test",
               text_field: str = "text", seq_len: int = 512, max_windows: int | None = None,
               device: torch.device = torch.device("cpu"), reference: str | None = None,
               device_map: str | None = None, max_memory: dict | None = None) -> dict:
    """exp(mean token NLL) over consecutive non-overlapping windows of ``seq_len`` tokens; with a
    ``reference`` model (the float one), also the mean token KL divergence of this model's
    next-token distribution from the reference's, KL(P_ref ‖ P_model) in nats, and the
    reference's perplexity on the same windows.

    Under ``accelerate launch`` (``launch/accelerate.yaml``) every process takes every n-th
    window on its own GPU and the sums are reduced, so the figures are the single-process ones.
    ``device_map`` (``auto``, ``balanced``, ...): the model spread over every device instead, for
    one larger than a device; ``max_memory`` caps each (``{0: "70GiB", "cpu": "200GiB"}``), and
    what does not fit is offloaded to a temporary folder on disk. The result names the devices
    used (``devices``).
    """
    import tempfile

    from accelerate import PartialState
    from accelerate.utils import reduce

    model_dir = resolve_model_dir(model)
    reference_dir = None if reference is None else resolve_model_dir(reference)
    if reference_dir is not None:
        _check_reference(model_dir, reference_dir)
    ids, windows = _windows(model_dir, evaluation_text(dataset, split, text_field), seq_len,
                            max_windows)
    # Launched processes without CUDA form a gloo group only when told they are CPU processes:
    # otherwise accelerate leaves each one alone and every process evaluates every window.
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes > 1:
        if device_map is not None:
            raise ValueError("--device-map spreads one model over the devices; under accelerate "
                             "launch each process evaluates its own copy: use one or the other")
        device = state.device
    with tempfile.TemporaryDirectory(prefix="admmq-offload-") as offload:
        lm = _load(model_dir, device, device_map, max_memory, offload)
        ref = None if reference_dir is None else _load(reference_dir, device, device_map,
                                                       max_memory, offload)
        # A spread model takes its input where it is given and moves it to its first device.
        inputs = device if device_map is None else torch.device("cpu")
        sums = torch.zeros(3, dtype=torch.float64, device=inputs)
        for w in range(state.process_index, windows, state.num_processes):
            chunk = ids[w * seq_len:(w + 1) * seq_len].unsqueeze(0).to(inputs)
            sums += _window_sums(lm, ref, chunk).double().to(inputs)
        devices = sorted({str(d) for d in (getattr(lm, "hf_device_map", None) or {}).values()}
                         or {str(device)})
    if state.num_processes > 1:
        sums = reduce(sums, "sum")
    count = windows * (seq_len - 1)
    out = {"ppl": math.exp(float(sums[0]) / count), "windows": windows, "seq_len": seq_len,
           "tokens": count, "model": model, "processes": state.num_processes,
           "devices": devices}
    if ref is not None:
        out.update({"kl": float(sums[1]) / count,
                    "reference_ppl": math.exp(float(sums[2]) / count), "reference": reference})
    return out
