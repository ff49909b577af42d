"""vLLM conformance: a written checkpoint read by vLLM's own code, on a machine without a GPU.

What a user's ``vllm serve <folder>`` does before its first kernel call, done with vLLM's own
classes: parse ``config.json`` into an engine config (quantization method, dtype), build the
model class vLLM picks for the architecture with the quantization config (scheme per layer, the
linear and mixture-of-experts methods, ``create_weights``), and push every tensor of the folder
through the model's ``load_weights`` and the parameters' weight loaders. Then check that

* every tensor in the folder reached a weight loader, and every parameter vLLM created was
  loaded (the engine's own strict weight tracking);
* what vLLM holds is what we wrote: every quantized layer vLLM built, decoded here from vLLM's
  parameters with vLLM's own unpacker for 2-, 4- and 8-bit codes (the one its CPU and Machete
  kernels call) and, for 3-bit codes (read by vLLM only in Humming's CUDA kernel), a bit-stream
  reader written from that layout, equals our own decoding of the module(s) that fed it, shard
  by shard, bit for bit; every dense parameter equals its tensor in the folder;
* a kernel exists for every quantized layer on the GPUs users run: vLLM's kernel choice
  (``choose_mp_linear_kernel``, the WNA16 MoE backend oracle, Marlin checks) runs for compute
  capability 9.0 (H100/H200) and 8.0 (A100) with the platform switched to CUDA for the call,
  and for FP4 checkpoints also 10.0 (B200; FlashInfer, which vLLM's CUDA wheel pins, taken as
  present).

The kernels themselves (Marlin, Machete, Humming) need a GPU; everything up to them runs here.
Imported only where vLLM is installed (the CI's vLLM environment; ``-m vllm`` tests).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # vLLM's CPU platform builds the model
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from admmq_dist.checkpoint import fp4_layout  # noqa: E402
from admmq_dist.checkpoint.fp4_layout import KIND_OF_FORMAT  # noqa: E402
from admmq_dist.checkpoint.serving import SM80, SM90, SM100  # noqa: E402
from admmq_dist.quant.packing import (  # noqa: E402
    unpack_compressed_tensors_weight,
    unpack_compressed_tensors_zero_point,
    unpack_gptq_qweight,
    unpack_gptq_qzeros,
)

# The GPUs vLLM users serve on: compute capability (major * 10 + minor) -> their name.
CAPABILITIES = {90: SM90, 80: SM80}
# FP4 checkpoints also as on Blackwell, where NVFP4 is native (issue 28).
FP4_CAPABILITIES = {100: SM100, **CAPABILITIES}


class ConformanceError(AssertionError):
    """vLLM would refuse or mis-load the checkpoint; the message says where and why."""


@dataclass
class Conformance:
    """What vLLM made of a checkpoint."""

    quantization: str
    dtype: torch.dtype
    architecture: str
    # "<layer prefix>" -> {capability: kernel or backend name, or "refused: <reason>"}
    kernels: dict[str, dict[int, str]] = field(default_factory=dict)
    # capability -> why vLLM could not build the model there (absent: it could)
    refused: dict[int, str] = field(default_factory=dict)
    loaded_tensors: int = 0
    compared_layers: int = 0
    compared_dense: int = 0


# ------------------------------------------------------------------- simulated GPU kernel choice


@contextlib.contextmanager
def simulated_gpu(capability: int):
    """vLLM's platform reports CUDA at ``capability`` while the block runs (kernel choice only)."""
    from vllm.platforms import PlatformEnum, current_platform
    from vllm.platforms.interface import DeviceCapability

    platform = type(current_platform)
    cap = DeviceCapability(capability // 10, capability % 10)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(platform, "_enum", PlatformEnum.CUDA))
        stack.enter_context(mock.patch.object(
            platform, "get_device_capability", classmethod(lambda cls, device_id=0: cap)))
        if capability >= 100:
            # vLLM's CUDA wheel pins flashinfer-python and nvidia-cutlass-dsl, whose CuTe-DSL
            # BF16 x FP4 GEMM its NVFP4 weight-only choice probes for on sm100: present there.
            import vllm.model_executor.kernels.linear.nvfp4.flashinfer as nvfp4_flashinfer

            stack.enter_context(mock.patch.object(nvfp4_flashinfer, "has_flashinfer_bf16_fp4",
                                                  lambda: True))
        yield


def _accepting(kernel):
    """``kernel`` with its platform checks passed (its constructor asserts ``can_implement``,
    which looks at the platform; we build on CPU, after the choice was made for a GPU)."""
    return type(f"{kernel.__name__}", (kernel,),
                {"can_implement": classmethod(lambda cls, c: (True, None))})


class _KernelChoices:
    """Wraps vLLM's kernel/back-end choosers so that each call is answered as on a GPU of
    ``capability`` (:func:`simulated_gpu`), and records the answers per layer. The model is then
    built on the CPU with that choice, so the checks vLLM makes after choosing (a MoE method
    asserting a strategy its back-end takes) run as they would on that GPU."""

    def __init__(self, result: Conformance, capability: int) -> None:
        self.result = result
        self.capability = capability
        self.layer = "?"

    def _record(self, kind: str, outcome: str) -> None:
        self.result.kernels.setdefault(f"{self.layer} [{kind}]", {})[self.capability] = outcome

    def chooser(self, original, kind: str):
        def choose(*args, **kwargs):
            with simulated_gpu(self.capability):
                try:
                    answer = original(*args, **kwargs)
                except (ValueError, NotImplementedError, AssertionError) as exc:
                    self._record(kind, f"refused: {str(exc).splitlines()[0]}")
                    raise
            if kind == "linear":
                self._record(kind, answer.__name__)
                return _accepting(answer)
            if kind == "fp4-linear":  # an instance, made as on the GPU
                self._record(kind, type(answer).__name__)
                return answer
            if kind == "fp4-moe":
                self._record(kind, "/".join(getattr(a, "value", getattr(a, "__name__", str(a)))
                                            for a in answer))
                return answer
            self._record(kind, f"{answer[0].value}/{answer[1].__name__}")
            return answer
        return choose

    def checker(self, original, kind: str):
        """A platform check that raises when unsupported (``verify_marlin_supported``)."""
        def check(*args, **kwargs):
            with simulated_gpu(self.capability):
                try:
                    original(*args, **kwargs)
                except ValueError as exc:
                    self._record(kind, f"refused: {str(exc).splitlines()[0]}")
                    raise
            self._record(kind, "ok")
        return check

    @contextlib.contextmanager
    def installed(self):
        import vllm.model_executor.layers.quantization.auto_gptq as gptq
        import vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors as ct
        import vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe_wna16 as ct_moe  # noqa: E501
        import vllm.model_executor.layers.quantization.compressed_tensors.schemes.compressed_tensors_wNa16 as ct_linear  # noqa: E501
        import vllm.model_executor.layers.quantization.moe_wna16 as moe_wna16

        import vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe_w4a4_mxfp4 as ct_moe_mxfp4  # noqa: E501
        import vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe_w4a4_nvfp4 as ct_moe_nvfp4  # noqa: E501
        import vllm.model_executor.layers.quantization.compressed_tensors.schemes.compressed_tensors_w4a4_mxfp4 as ct_mxfp4  # noqa: E501
        import vllm.model_executor.layers.quantization.compressed_tensors.schemes.compressed_tensors_w4a4_nvfp4 as ct_nvfp4  # noqa: E501

        targets = [(ct_nvfp4, "init_nvfp4_linear_kernel", "fp4-linear"),
                   (ct_mxfp4, "init_mxfp4_linear_kernel", "fp4-linear"),
                   (ct_moe_nvfp4, "select_nvfp4_moe_backend", "fp4-moe"),
                   (ct_moe_mxfp4, "select_mxfp4_moe_backend", "fp4-moe"),
                   (ct_linear, "choose_mp_linear_kernel", "linear"),
                   (gptq, "choose_mp_linear_kernel", "linear"),
                   (ct_moe, "select_wna16_moe_backend", "moe"),
                   (gptq, "select_wna16_moe_backend", "moe"),
                   (moe_wna16, "select_wna16_moe_backend", "moe")]
        with contextlib.ExitStack() as stack:
            for module, name, kind in targets:
                stack.enter_context(mock.patch.object(
                    module, name, self.chooser(getattr(module, name), kind)))
            stack.enter_context(mock.patch.object(
                gptq, "verify_marlin_supported",
                self.checker(gptq.verify_marlin_supported, "marlin")))
            # Know which layer a choice is made for: the linear/MoE constructors pass `prefix`.
            original_get = ct.CompressedTensorsConfig.get_quant_method
            original_gptq_get = gptq.AutoGPTQConfig.get_quant_method
            choices = self

            def get_ct(config, layer, prefix):
                choices.layer = prefix
                return original_get(config, layer, prefix)

            def get_gptq(config, layer, prefix):
                choices.layer = prefix
                return original_gptq_get(config, layer, prefix)

            stack.enter_context(mock.patch.object(ct.CompressedTensorsConfig, "get_quant_method",
                                                  get_ct))
            stack.enter_context(mock.patch.object(gptq.AutoGPTQConfig, "get_quant_method",
                                                  get_gptq))
            yield


# ------------------------------------------------------------------------ engine and loading


_DISTRIBUTED = {"ready": False}


def _engine_config(folder: Path):
    """vLLM's engine configuration for ``folder``, as ``vllm serve <folder>`` makes it."""
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(folder), enforce_eager=True, max_model_len=64,
                      skip_tokenizer_init=True, dtype="auto")
    return args.create_engine_config()


def _ensure_distributed(config) -> None:
    """vLLM's parallel layers need (single-process) parallel groups, made for each model: the
    expert-parallel group exists only when the model has experts."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import (destroy_model_parallel, init_distributed_environment,
                                  initialize_model_parallel)
    from vllm.utils.network_utils import get_open_port

    with set_current_vllm_config(config):
        if not _DISTRIBUTED["ready"]:
            init_distributed_environment(
                world_size=1, rank=0, local_rank=0, backend="gloo",
                distributed_init_method=f"tcp://127.0.0.1:{get_open_port()}")
            _DISTRIBUTED["ready"] = True
        destroy_model_parallel()
        initialize_model_parallel(1, 1)


@dataclass
class _Load:
    """One call of a weight loader: the parameter and the folder tensor it was given."""

    param: str
    source: str
    shard_id: object
    expert_id: object


def _record_loaders(model, sources: dict[int, str], calls: list[_Load]) -> None:
    """Wrap every parameter's weight loader to record which folder tensor reaches it."""
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader
    from vllm.model_executor.parameter import BasevLLMParameter

    for pname, param in model.named_parameters():
        original = getattr(param, "weight_loader", None) or default_weight_loader

        def loader(*args, _original=original, _pname=pname, **kwargs):
            loaded = args[1] if len(args) > 1 else kwargs.get("loaded_weight")
            key = loaded.untyped_storage().data_ptr() if isinstance(loaded, torch.Tensor) else 0
            if "expert_id" in kwargs or len(args) > 4:
                # FusedMoE.weight_loader(param, weight, weight_name, shard_id, expert_id)
                shard = kwargs.get("shard_id", args[3] if len(args) > 3 else None)
                expert = kwargs.get("expert_id", args[4] if len(args) > 4 else None)
            else:  # weight_loader(param, weight[, shard_id])
                shard = kwargs.get("loaded_shard_id", args[2] if len(args) > 2 else None)
                expert = None
            calls.append(_Load(_pname, sources.get(key, "?"), shard, expert))
            return _original(*args, **kwargs)

        if isinstance(param, BasevLLMParameter):
            param._weight_loader = loader
        else:
            param.weight_loader = loader


def check_with_vllm(folder: Path | str) -> Conformance:
    """Load ``folder`` into vLLM's model on CPU and check it (see the module docstring)."""
    from vllm.config import set_current_vllm_config

    folder = Path(folder)
    written = json.loads((folder / "config.json").read_text())
    config = _engine_config(folder)
    model_config = config.model_config
    result = Conformance(quantization=str(model_config.quantization), dtype=model_config.dtype,
                         architecture=model_config.architectures[0])
    if written.get("dtype") in ("float16", "bfloat16") and \
            str(model_config.dtype) != f"torch.{written['dtype']}":
        raise ConformanceError(f"config.json says {written['dtype']} but vLLM serves the model "
                               f"in {model_config.dtype}")
    built = _build(folder, result, torch.device("cpu"))
    if not built:
        raise ConformanceError(f"vLLM cannot build {folder} on any of "
                               f"{list(CAPABILITIES.values())}: {result.refused}")
    model, config, loader = next(iter(built.values()))
    model_config = config.model_config

    # Every folder tensor, kept alive so that storage pointers name them unambiguously.
    tensors = _read_folder(folder)
    sources = {t.untyped_storage().data_ptr(): name for name, t in tensors.items()}
    calls: list[_Load] = []
    _record_loaders(model, sources, calls)
    loader.get_all_weights = lambda *_: iter(list(tensors.items()))
    with set_current_vllm_config(config), torch.device("cpu"):
        try:
            loader.load_weights(model, model_config)
        except (ValueError, KeyError, AssertionError, RuntimeError) as exc:
            where = f" (loading {calls[-1].source} into {calls[-1].param})" if calls else ""
            raise ConformanceError(f"vLLM's weight loading failed{where}: "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0][:500]}"
                                   ) from exc
    result.loaded_tensors = len(tensors)

    consumed = {c.source for c in calls}
    loaded = {c.param for c in calls}
    missing = [name for name, param in model.named_parameters()
               if name not in loaded and not _defaulted(name, param)]
    if missing:
        raise ConformanceError(f"{len(missing)} parameter(s) vLLM built were not loaded from "
                               f"the folder: {missing[:8]}")
    settings = _settings(written["quantization_config"])
    unused = [n for n in tensors if n not in consumed
              and not _harmless_unused(n, tensors, settings)]
    if unused:
        raise ConformanceError(f"vLLM did not load {len(unused)} tensor(s) of the folder: "
                               f"{unused[:8]}")
    _compare(model, tensors, calls, settings, result)
    return result


def _build(folder: Path, result: Conformance, device: torch.device) -> dict[int, tuple]:
    """``(model, engine config, loader)`` as vLLM builds them on each GPU of
    :data:`CAPABILITIES` (kernel choices made for that GPU; a fresh engine config each time, as
    every ``vllm serve`` makes its own); a GPU where vLLM refuses is noted in ``result.refused``."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.utils.torch_utils import set_default_torch_dtype

    built = {}
    qc = json.loads((folder / "config.json").read_text()).get("quantization_config", {})
    fp4 = qc.get("format") in KIND_OF_FORMAT
    for capability in FP4_CAPABILITIES if fp4 else CAPABILITIES:
        config = _engine_config(folder)
        _ensure_distributed(config)
        loader = DefaultModelLoader(config.load_config)
        try:
            with set_current_vllm_config(config), \
                    set_default_torch_dtype(config.model_config.dtype), device, \
                    _KernelChoices(result, capability).installed():
                model = loader.create_model(vllm_config=config, model_config=config.model_config)
        except (ValueError, NotImplementedError, AssertionError, RuntimeError) as exc:
            result.refused[capability] = (f"{type(exc).__name__}: "
                                          f"{(str(exc) or 'assertion').splitlines()[0][:300]}")
            continue
        built[capability] = (model, config, loader)
    return built


def _read_folder(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
             if index.is_file() else ["model.safetensors"])
    out = {}
    for file in files:
        with safe_open(folder / file, "pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name).clone()
    return out


def _settings(qc: dict) -> dict:
    if qc["quant_method"] == "gptq":
        return {"format": "gptq", "bits": qc["bits"], "symmetric": qc["sym"],
                "group_size": None if qc["group_size"] == -1 else qc["group_size"], "kind": "int"}
    weights = qc["config_groups"]["group_0"]["weights"]
    return {"format": "compressed-tensors", "bits": weights["num_bits"],
            "symmetric": weights["symmetric"], "group_size": weights["group_size"],
            "kind": KIND_OF_FORMAT.get(qc.get("format"), "int")}


def _defaulted(name: str, param) -> bool:
    """Parameters vLLM builds whatever the checkpoint and fills itself when it has none: the
    attention's KV-cache quantization scales, the zero expert biases some MoE back-ends add
    for models without biases, and NVFP4 experts' activation scales (unused weight-only)."""
    leaf = name.rsplit(".", 1)[-1]
    if ".attn." in name and leaf in ("k_scale", "v_scale", "q_scale", "prob_scale",
                                      "k_zero_point", "v_zero_point", "q_zero_point"):
        return True
    if leaf in ("w13_input_global_scale", "w2_input_global_scale"):
        # NVFP4's MoE method registers activation scales for weight-only (W4A16) checkpoints
        # too; with no activation quantization its kernels take ones instead
        # (fused_moe/oracle/nvfp4.py, convert_to_nvfp4_moe_kernel_format).
        return True
    return leaf in ("w13_bias", "w2_bias") and not bool(param.data.any())


def _harmless_unused(name: str, tensors: dict, settings: dict) -> bool:
    """GPTQ's ``g_idx`` without act-order (``i // group_size``): vLLM derives it and skips it."""
    if settings["format"] == "gptq" and name.endswith(".g_idx"):
        g_idx = tensors[name]
        size = settings["group_size"] or g_idx.numel()
        return torch.equal(g_idx, (torch.arange(g_idx.numel()) // size).to(g_idx.dtype))
    return False


# ------------------------------------------------------------------------------ comparison


def _bitstream(words: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """Unsigned ``bits``-bit values ``0..count-1`` along ``dim`` of int32 ``words``, as vLLM
    reads them. 2-, 4- and 8-bit: vLLM's own unpacker (``unpack_quantized_values_into_int32``,
    what its CPU and Machete kernels call on these parameters). 3-bit values straddle word
    boundaries (``ceil(count * 3 / 32)`` words per line, one little-endian bit stream), and the
    one reader vLLM has for them is Humming's CUDA unpack kernel, so here they are read by the
    bit-stream reader below, written from that layout."""
    if 32 % bits == 0:
        from vllm.model_executor.layers.quantization.utils.quant_utils import (
            unpack_quantized_values_into_int32)
        from vllm.scalar_type import scalar_types

        values = unpack_quantized_values_into_int32(words, getattr(scalar_types, f"uint{bits}"),
                                                    packed_dim=dim % words.ndim)
        return values.narrow(dim, 0, count)
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    bit_index = torch.arange(count, dtype=torch.int64) * bits
    word, shift = bit_index // 32, bit_index % 32
    lo = w[..., word] >> shift
    nxt = torch.clamp(word + 1, max=w.shape[-1] - 1)
    hi = torch.where(shift + bits > 32, w[..., nxt] << (32 - shift), torch.zeros_like(lo))
    values = (lo | hi) & ((1 << bits) - 1)
    return values.movedim(-1, dim)


def _dequantize(codes, zero, scale, group_size) -> torch.Tensor:
    """``(codes - zero) * scale`` with ``zero``/``scale`` ``[rows, groups]`` spread over groups."""
    cols = codes.shape[-1]
    size = group_size or cols
    zero = zero.to(torch.float32).repeat_interleave(size, dim=-1)[..., :cols]
    scale = scale.to(torch.float32).repeat_interleave(size, dim=-1)[..., :cols]
    return (codes.to(torch.float32) - zero) * scale


def _fp4_values(packed: torch.Tensor) -> torch.Tensor:
    """E2M1 values of uint8 ``packed`` (``[..., in / 2]``) by compressed-tensors' own unpacker
    (the release vLLM pins), not ours."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    flat = packed.reshape(-1, packed.shape[-1])
    values = unpack_fp4_from_uint8(flat, flat.shape[0], flat.shape[1] * 2, dtype=torch.float32)
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _fp4_scales(kind: str, scale: torch.Tensor, global_scale) -> torch.Tensor:
    """What an E2M1 value is multiplied by: NVFP4's E4M3 scale over its global scale (broadcast
    from ``global_scale``, one per row), MXFP4's E8M0 exponent as a power of two."""
    if kind == "nvfp4":
        return scale.to(torch.float32) / global_scale
    return torch.exp2(scale.to(torch.float32) - 127)


def _fp4_dequantize(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    group = values.shape[-1] // scale.shape[-1]
    return values * scale.repeat_interleave(group, dim=-1)


def _ours(module: str, tensors: dict, settings: dict) -> torch.Tensor:
    """Our decoding of the folder's quantized module (the writer's own layout code)."""
    bits, gs = settings["bits"], settings["group_size"]
    if settings["kind"] != "int":
        return fp4_layout.stored_weight(settings["kind"], tensors, module)
    if settings["format"] == "gptq":
        scales = tensors[f"{module}.scales"].T
        cols = tensors[f"{module}.g_idx"].numel()
        codes = unpack_gptq_qweight(tensors[f"{module}.qweight"], bits, cols)
        zero = unpack_gptq_qzeros(tensors[f"{module}.qzeros"], bits, scales.shape[0])
        return _dequantize(codes, zero, scales, gs)
    rows, cols = tensors[f"{module}.weight_shape"].tolist()
    codes = unpack_compressed_tensors_weight(tensors[f"{module}.weight_packed"], bits,
                                            (rows, cols))
    scale = tensors[f"{module}.weight_scale"]
    if f"{module}.weight_zero_point" in tensors:
        zero = unpack_compressed_tensors_zero_point(tensors[f"{module}.weight_zero_point"], bits,
                                                    rows)
    else:
        zero = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.int32)
    return _dequantize(codes, zero, scale, gs)


def _vllm_linear(layer, settings: dict) -> torch.Tensor:
    """Decode the dense ``[out, in]`` weight vLLM holds for a quantized linear layer."""
    bits, gs = settings["bits"], settings["group_size"]
    if hasattr(layer, "qweight"):  # GPTQ: packed along the input dim, zero implied (symmetric)
        qweight, scales = layer.qweight.data, layer.scales.data
        cols = qweight.shape[0] * 32 // bits
        codes = _bitstream(qweight, bits, cols, dim=0).T
        zero = torch.full(scales.T.shape, 2 ** (bits - 1))
        return _dequantize(codes, zero, scales.T, gs)
    packed, scale = layer.weight_packed.data, layer.weight_scale.data
    if settings["kind"] != "int":
        global_scale = None
        if settings["kind"] == "nvfp4":  # one per logical shard (q, k, v; gate, up)
            if torch.unique(layer.weight_global_scale.data).numel() != 1:
                # vLLM then warns and serves every shard with the largest (process_weights_...)
                raise ConformanceError("a fused linear's shards have different NVFP4 global "
                                       f"scales: {layer.weight_global_scale.data.tolist()}")
            sizes = torch.tensor(layer.output_partition_sizes)
            global_scale = layer.weight_global_scale.data.float().repeat_interleave(sizes)[:, None]
        return _fp4_dequantize(_fp4_values(packed),
                               _fp4_scales(settings["kind"], scale, global_scale))
    cols = layer.input_size_per_partition
    codes = _bitstream(packed, bits, cols, dim=1)
    if hasattr(layer, "weight_zero_point"):
        zero = _bitstream(layer.weight_zero_point.data, bits, packed.shape[0], dim=0)
    else:
        zero = torch.full(scale.shape, 2 ** (bits - 1))
    return _dequantize(codes, zero, scale, gs)


def _vllm_experts(layer, which: str, settings: dict) -> torch.Tensor:
    """``[experts, out, in]`` for ``w13`` or ``w2`` of a quantized FusedMoE layer."""
    bits, gs = settings["bits"], settings["group_size"]
    if hasattr(layer, f"{which}_qweight"):  # GPTQ: [experts, in packed, out], zero implied
        qweight = getattr(layer, f"{which}_qweight").data
        scales = getattr(layer, f"{which}_scales").data.transpose(1, 2)
        codes = _bitstream(qweight, bits, qweight.shape[1] * 32 // bits, dim=1).transpose(1, 2)
        return _dequantize(codes, torch.full(scales.shape, 2 ** (bits - 1)), scales, gs)
    packed = getattr(layer, f"{which}_weight_packed").data
    scale = getattr(layer, f"{which}_weight_scale").data
    if settings["kind"] != "int":
        global_scale = None
        if settings["kind"] == "nvfp4":  # [experts, 2] (w1, w3) for w13, [experts] for w2
            per = getattr(layer, f"{which}_weight_global_scale").data.float()
            per = per.reshape(per.shape[0], -1)
            if not torch.equal(per[:, :1].expand_as(per), per):
                # vLLM's NVFP4 MoE method refuses w1 and w3 global scales that differ.
                raise ConformanceError(f"{which}: an expert's w1 and w3 NVFP4 global scales "
                                       f"differ: {per.tolist()}")
            global_scale = per.repeat_interleave(packed.shape[1] // per.shape[1], dim=1)[..., None]
        return _fp4_dequantize(_fp4_values(packed),
                               _fp4_scales(settings["kind"], scale, global_scale))
    cols = packed.shape[-1] * 32 // bits
    codes = _bitstream(packed, bits, cols, dim=2)
    zp = getattr(layer, f"{which}_weight_zero_point", None)
    if zp is not None:
        zero = _bitstream(zp.data, bits, packed.shape[1], dim=1)
    else:
        zero = torch.full(scale.shape, 2 ** (bits - 1))
    return _dequantize(codes, zero, scale, gs)


def _shard_rows(layer, shard) -> tuple[int, int]:
    """Rows of a stacked linear (q/k/v, gate/up) that shard ``shard`` fills."""
    if shard is None:
        return 0, layer.output_size_per_partition
    if isinstance(shard, str):  # QKVParallelLinear
        q = layer.num_heads * layer.head_size
        kv = layer.num_kv_heads * layer.head_size
        v = layer.num_kv_heads * getattr(layer, "v_head_size", layer.head_size)
        return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + kv + v)}[shard]
    sizes = layer.output_partition_sizes
    return sum(sizes[:shard]), sum(sizes[:shard + 1])


def _compare(model, tensors: dict, calls: list[_Load], settings: dict, result: Conformance):
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    decoded: dict[str, torch.Tensor] = {}
    checked: set[tuple] = set()
    for call in calls:
        owner, _, leaf = call.param.rpartition(".")
        layer = modules[owner]
        source_module, _, source_leaf = call.source.rpartition(".")
        key = (owner, source_module, str(call.shard_id), str(call.expert_id))
        if leaf in ("weight_packed", "qweight", "w13_weight_packed", "w2_weight_packed",
                    "w13_qweight", "w2_qweight"):
            if key in checked:
                continue
            checked.add(key)
            ours = _ours(source_module, tensors, settings)
            if leaf.startswith("w13") or leaf.startswith("w2"):
                which = leaf.split("_")[0]
                if (owner, which) not in decoded:
                    decoded[(owner, which)] = _vllm_experts(layer, which, settings)
                full = decoded[(owner, which)][int(call.expert_id)]
                half = full.shape[0] // 2
                rows = {"w1": (0, half), "w3": (half, full.shape[0])}.get(
                    call.shard_id, (0, full.shape[0]))
            else:
                if owner not in decoded:
                    decoded[owner] = _vllm_linear(layer, settings)
                full = decoded[owner]
                rows = _shard_rows(layer, call.shard_id)
            held = full[rows[0]:rows[1]]
            if held.shape != ours.shape or not torch.equal(held, ours):
                diff = ((held - ours).abs().max().item() if held.shape == ours.shape
                        else f"shape {tuple(held.shape)} vs {tuple(ours.shape)}")
                raise ConformanceError(f"{call.source} -> vLLM {call.param} (shard "
                                       f"{call.shard_id}, expert {call.expert_id}): the weight "
                                       f"vLLM holds differs from ours ({diff})")
            result.compared_layers += 1
        elif leaf in ("weight", "bias") and source_leaf in ("weight", "bias") \
                and call.param in params and params[call.param].is_floating_point():
            # A dense tensor: it must sit unchanged (vocabularies may be padded at the end).
            held, ours = params[call.param].data, tensors[call.source]
            if held.dtype != ours.dtype and ours.dtype != torch.float32:
                raise ConformanceError(f"{call.source}: stored as {ours.dtype}, vLLM holds "
                                       f"{held.dtype} (the model's dtype is {result.dtype})")
            ours = ours.to(held.dtype)  # vLLM serves float32 checkpoints in 16 bits
            if held.dim() == ours.dim() and held.shape[1:] == ours.shape[1:] \
                    and call.shard_id is None and call.expert_id is None:
                if not torch.equal(held[: ours.shape[0]], ours):
                    raise ConformanceError(f"{call.source}: vLLM holds different values")
                result.compared_dense += 1


# ------------------------------------------------------------------ kernels at real shapes


def kernels_at_real_shapes(config: dict, folder: Path) -> Conformance:
    """vLLM's kernel choice for every quantized layer of a model of real size described by
    ``config`` (a ``config.json`` with its ``quantization_config``; a layer or two suffice), built
    on the meta device: no weights are allocated, only the choices are made. Tiny test models
    cannot answer this: kernels take or refuse layers by their shapes."""

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    engine = _engine_config(folder)
    result = Conformance(quantization=str(engine.model_config.quantization),
                         dtype=engine.model_config.dtype,
                         architecture=engine.model_config.architectures[0])
    _build(folder, result, torch.device("meta"))
    return result
