"""Whether a quantized checkpoint folder is what its loaders expect: ``verify_checkpoint`` checks
first every file against the sizes and SHA-256 digests of ``admmq-manifest.json`` when the folder
has one (:mod:`.manifest`), then, one module at a time so memory stays bounded, the index against
the shards, every tensor's shape and dtype against the model ``config.json`` describes (built on
the meta device) and against the layout (:mod:`.formats`), the packed words (codes, zero points,
zero padding bits), the scales (finite, positive), and that the ignore list names every module
stored dense. It returns one line per problem.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch

from admmq_dist.checkpoint.described_model import DescribedModel, tied_names
from admmq_dist.checkpoint.folder import FLOAT_DTYPES, is_embedding, load_config
from admmq_dist.checkpoint.formats import (
    CONFIG_NAME,
    HEADER_DTYPES,
    MARKER,
    SUFFIXES,
    matches_ignore,
    module_of,
    pack_codes,
    pack_zeros,
    read_settings,
    stored_tensors,
    unpack_codes,
    unpack_zeros,
)
from admmq_dist.checkpoint.fp4_layout import KIND_OF_FORMAT
from admmq_dist.checkpoint.manifest import check_manifest
from admmq_dist.checkpoint.shards import Enough, Problems, ShardFiles, check_shards
from admmq_dist.checkpoint.verify_fp4 import check_fp4_module
from admmq_dist.quant.grid import SUPPORTED_BITS

__all__ = ["verify_checkpoint"]


def verify_checkpoint(folder, max_problems: int = 20,
                      notes: list[str] | None = None) -> list[str]:
    """Check the quantized checkpoint in ``folder``; return its problems, one line each.

    An empty list means the checkpoint is consistent: every file its manifest lists is there
    with the recorded size and SHA-256 (each one that is not is named); the index and the shards
    agree; every tensor has the shape and dtype the model in ``config.json`` and the quantization
    settings call for; the packed codes and zero points unpack and repack to the stored words
    (so padding bits are zero); symmetric GPTQ zero points are ``2**(bits-1)``; scales are
    finite and positive. After ``max_problems`` problems a last line says that more were not
    listed. The manifest's lines come first; the layout's follow, whatever the manifest found.
    ``notes``, when given, receives what is worth saying but not wrong: files the manifest does
    not list (a README added later), or that there is no manifest (older checkpoints).

    Raises FileNotFoundError for a missing folder or ``config.json`` and ValueError for a folder
    that is not a quantized checkpoint.
    """
    if isinstance(max_problems, bool) or not isinstance(max_problems, int) or max_problems < 1:
        raise ValueError(f"max_problems={max_problems!r} must be a positive integer")
    folder = Path(folder)
    problems = Problems(max_problems)
    try:
        if folder.is_dir():
            check_manifest(folder, problems, [] if notes is None else notes)
        config = load_config(folder)
        settings = read_settings(folder, config)
    except Enough:
        return problems.result()
    except (OSError, ValueError) as exc:
        if not problems.lines:
            raise
        return [*problems.result(), str(exc)]  # a damaged config.json, already named above
    with ExitStack() as stack:
        try:
            files = check_shards(folder, problems, stack)
            if files is not None:
                _check_tensors(folder, config, settings, files, problems)
                _check_ignore_covers_dense(settings, files, problems)
        except Enough:
            pass
    return problems.result()


def _check_ignore_covers_dense(settings: dict, files: ShardFiles, problems: Problems) -> None:
    """compressed-tensors: every module stored with a dense 2-D weight must be named in the
    ignore list, or engines (vLLM) build it quantized and fail on its dense weight."""
    if settings["format"] != "compressed-tensors":
        return
    for name in sorted(files.all_names):
        module = name[: -len(".weight")]
        if (name.endswith(".weight") and name in files.meta and len(files.meta[name][0]) == 2
                and f"{module}.weight_packed" not in files.all_names
                and not is_embedding(module)
                and matches_ignore(module, settings["ignore"]) is None):
            problems.add(f"{module}: stored dense but not named in the ignore list; vLLM builds "
                         "it quantized and fails to load its weight")


def _settings_problem(settings: dict) -> str | None:
    """Why the quantization settings themselves cannot be checked against, if they cannot."""
    fmt, bits, group = settings["format"], settings["bits"], settings["group_size"]
    if fmt == "compressed-tensors" and settings["checkpoint_format"] not in (
            None, "pack-quantized", *KIND_OF_FORMAT):
        return (f"{CONFIG_NAME}: compressed-tensors format {settings['checkpoint_format']!r} "
                "is not checked (only pack-quantized, nvfp4- and mxfp4-pack-quantized)")
    if bits not in SUPPORTED_BITS:
        return f"{CONFIG_NAME}: quantization bits={bits!r} is not one of {SUPPORTED_BITS}"
    if group is not None and (not isinstance(group, int) or group < 1):
        return f"{CONFIG_NAME}: quantization group_size={group!r} is not a positive integer"
    return None


def _check_tensors(folder: Path, config: dict, settings: dict, files: ShardFiles,
                   problems: Problems) -> None:
    trouble = _settings_problem(settings)
    if trouble:
        problems.add(trouble)
        return
    fmt = settings["format"]
    dtype = HEADER_DTYPES.get(settings["dtype"]) if settings["dtype"] else None
    quantized = sorted({m for n in files.all_names if (m := module_of(n, (MARKER[fmt],)))})
    model = DescribedModel(folder, config, files, quantized, SUFFIXES[fmt], problems)
    for module in quantized:
        shape = model.linear_shape(module, problems)
        if f"{module}.weight" in files.meta:
            problems.add(f"{module}.weight: dense weight stored beside the quantized tensors of "
                         f"{module}")
        _check_module(module, shape, settings, dtype, files, problems)
    if model.model is not None:
        _check_dense(model, {f"{model.path(m)}.weight" for m in quantized}, settings, dtype,
                     files, problems)


def _check_dense(model: DescribedModel, quantized_weights: set[str], settings: dict, dtype: str | None,
                 files: ShardFiles, problems: Problems) -> None:
    """Every other parameter of the model: present, with its shape and the config's dtype."""
    tied_ok = tied_names(model.model, model.config)
    for name, param in model.model.named_parameters(remove_duplicate=False):
        if name in quantized_weights or model.in_fused(name):
            continue
        disk = model.disk_of.get(name, name)
        if disk not in files.meta:
            if disk in files.reported or name in tied_ok:
                continue
            problems.add(f"{disk}: missing from the checkpoint (the model built from "
                         f"{CONFIG_NAME} has it, shape {list(param.shape)})")
            continue
        stored_shape, stored_dtype = files.meta[disk]
        if stored_shape != tuple(param.shape):
            problems.add(f"{disk}: shape {list(stored_shape)}, but the model built from "
                         f"{CONFIG_NAME} expects {list(param.shape)}")
        elif dtype and stored_dtype in FLOAT_DTYPES and stored_dtype != dtype:
            problems.add(f"{disk}: dtype {stored_dtype}, but {CONFIG_NAME} says "
                         f"{settings['dtype']} ({dtype})")


# ----------------------------------------------------------------------------- per-module checks


def _expect(files: ShardFiles, problems: Problems, name: str, shape, dtypes: tuple[str, ...],
            what: str) -> bool:
    """Check ``name`` is stored with ``shape`` and one of ``dtypes``; True when it is."""
    if name not in files.meta:
        if name not in files.reported:
            problems.add(f"{name}: missing ({what} expected, shape {list(shape)})")
        return False
    stored_shape, stored_dtype = files.meta[name]
    ok = True
    if stored_shape != tuple(shape):
        problems.add(f"{name}: shape {list(stored_shape)}, expected {list(shape)} ({what})")
        ok = False
    if stored_dtype not in dtypes:
        problems.add(f"{name}: dtype {stored_dtype}, expected {' or '.join(dtypes)} ({what})")
        ok = False
    return ok


def _check_scales(name: str, scale: torch.Tensor, problems: Problems) -> None:
    scale = scale.float()
    finite = torch.isfinite(scale)
    bad = int((~finite).sum())
    if bad:
        first = tuple(int(i) for i in (~finite).nonzero()[0])
        problems.add(f"{name}: {bad} scale(s) are NaN or infinite (first at {list(first)})")
    low = finite & (scale <= 0)
    bad = int(low.sum())
    if bad:
        first = tuple(int(i) for i in low.nonzero()[0])
        problems.add(f"{name}: {bad} scale(s) are zero or negative (first at {list(first)}, "
                     f"value {float(scale[first])})")


def _check_roundtrip(name: str, stored: torch.Tensor, repacked: torch.Tensor,
                     problems: Problems, what: str) -> None:
    differ = stored != repacked
    count = int(differ.sum())
    if count:
        first = [int(i) for i in differ.nonzero()[0]]
        problems.add(f"{name}: {count} word(s) do not survive unpacking and repacking (first at "
                     f"{first}): {what}")


def _check_module(module: str, shape, settings: dict, dtype: str | None, files: ShardFiles,
                  problems: Problems) -> None:
    """Every tensor the layout (:func:`.formats.stored_tensors`) says ``module`` stores: shape,
    dtype, and that the packed words survive unpacking and repacking."""
    fmt, bits, group = settings["format"], settings["bits"], settings["group_size"]
    if settings["kind"] != "int":
        check_fp4_module(module, shape, settings["kind"], files, problems, _expect)
        return
    shape = (_ct_shape(module, shape, files, problems) if fmt == "compressed-tensors"
             else shape or _gptq_shape(module, files, problems))
    if shape is None:
        return  # nothing to size the other tensors by
    out, inn = shape
    if fmt == "compressed-tensors" and group is not None and inn % group:
        problems.add(f"{module}: in_features {inn} is not a multiple of group_size {group}; "
                     "compressed-tensors cannot dequantise a ragged last group")
    for stored in stored_tensors(fmt, out, inn, bits, group, settings["symmetric"], dtype):
        name = f"{module}.{stored.suffix}"
        if stored.suffix == "weight_shape":
            continue  # read above
        if _expect(files, problems, name, stored.shape, stored.dtypes, stored.what):
            _check_content(fmt, stored.suffix, name, files.read(name), settings, out, inn,
                           problems)
    zero_name = f"{module}.weight_zero_point"
    if fmt == "compressed-tensors" and settings["symmetric"] and zero_name in files.meta:
        problems.add(f"{zero_name}: present although {CONFIG_NAME} says symmetric "
                     "(loaders would not expect it)")


def _ct_shape(module: str, shape, files: ShardFiles, problems: Problems):
    """compressed-tensors stores ``[out, in]``: check it against the model's, or use it."""
    name = f"{module}.weight_shape"
    stored = None
    if _expect(files, problems, name, (2,), ("I64",), "[out, in]"):
        stored = tuple(int(v) for v in files.read(name).tolist())
        if shape is not None and stored != shape:
            problems.add(f"{name}: holds {list(stored)}, but the model built from "
                         f"{CONFIG_NAME} has [out, in] = {list(shape)}")
    if shape is not None:
        return shape
    if stored is not None and min(stored) < 1:
        problems.add(f"{name}: holds {list(stored)}, not a positive [out, in]")
        return None
    return stored


def _gptq_shape(module: str, files: ShardFiles, problems: Problems):
    """GPTQ without a model to compare with: ``[out, in]`` from ``qweight`` and ``g_idx``."""
    qweight_shape = files.meta.get(f"{module}.qweight", ((), ""))[0]
    g_idx_shape = files.meta.get(f"{module}.g_idx", ((), ""))[0]
    if len(qweight_shape) == 2 and len(g_idx_shape) == 1:
        return qweight_shape[1], g_idx_shape[0]
    for name in (f"{module}.qweight", f"{module}.g_idx"):
        if name not in files.meta and name not in files.reported:
            problems.add(f"{name}: missing")
    return None


_PADDING = {"weight_packed": "the padding bits after the last code of a row are not zero",
            "qweight": "the padding bits after the last code of a column are not zero"}


def _check_content(fmt: str, suffix: str, name: str, value: torch.Tensor, settings: dict,
                   out: int, inn: int, problems: Problems) -> None:
    bits, group = settings["bits"], settings["group_size"]
    if suffix in _PADDING:
        codes = unpack_codes(fmt, value, bits, out, inn)
        _check_roundtrip(name, value, pack_codes(fmt, codes, bits), problems, _PADDING[suffix])
    elif suffix in ("weight_scale", "scales"):
        _check_scales(name, value, problems)
    elif suffix == "weight_zero_point":
        zero = unpack_zeros(fmt, value, bits, out)
        if int(zero.min()) < 0 or int(zero.max()) >= 2 ** bits:  # a guard: masking prevents it
            problems.add(f"{name}: zero points outside [0, {2 ** bits - 1}]")
        _check_roundtrip(name, value, pack_zeros(fmt, zero, bits), problems,
                         "the padding bits after the last zero point are not zero")
    elif suffix == "qzeros":
        _check_gptq_zeros(name, value, settings, out, problems)
    elif suffix == "g_idx":
        groups = 1 if group is None else -(-inn // group)
        bad = (value < 0) | (value >= groups)
        count = int(bad.sum())
        if count:
            first = int(bad.nonzero()[0][0])
            problems.add(f"{name}: {count} group index(es) outside [0, {groups}) (first "
                         f"at input {first}, value {int(value[first])})")


def _check_gptq_zeros(name: str, qzeros: torch.Tensor, settings: dict, out: int,
                      problems: Problems) -> None:
    bits, v2 = settings["bits"], settings["gptq_v2"]
    zero = unpack_zeros("gptq", qzeros, bits, out)  # adds v1's 1 back
    if v2:
        zero = zero - 1
    if settings["symmetric"]:
        bad = zero != 2 ** (bits - 1)
        what = f"not {2 ** (bits - 1)} as a symmetric grid's are"
    else:
        bad = (zero < (0 if v2 else 1)) | (zero >= 2 ** bits)
        what = f"outside [{0 if v2 else 1}, {2 ** bits - 1}]"
    count = int(bad.sum())
    if count:
        first = [int(i) for i in bad.nonzero()[0]]
        problems.add(f"{name}: {count} zero point(s) {what} (first at [out, group] = "
                     f"{first}, value {int(zero[tuple(first)])})")
    elif not v2:
        _check_roundtrip(name, qzeros, pack_zeros("gptq", zero, bits), problems,
                         "the padding bits after the last zero point are not zero")
