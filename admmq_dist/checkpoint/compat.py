"""A load-time workaround for an upstream bug: transformers >= 5.23 with compressed-tensors
<= 0.20.1 cannot load asymmetric ``pack-quantized`` checkpoints — ours or anyone's.

What goes wrong (measured on transformers 5.23.0/5.24.0, compressed-tensors 0.20.1): transformers
builds a pre-quantized model on the meta device and has compressed-tensors compress it;
``PackedQuantizationCompressor.compress`` then takes a meta-device shortcut that packs ``weight``
but leaves the ``weight_zero_point`` placeholder unpacked, ``[N, G]`` (the real path packs it
along the output dim, ``[ceil(N*bits/32), G]``, which is what every checkpoint stores and vLLM
reads). transformers <= 5.22 replaced any mis-shaped parameter while a quantizer was active;
5.23 does so only for parameters the quantizer quantizes on load, so the stored zero point is
reported as a size mismatch. Symmetric checkpoints have no zero point and load everywhere.

:func:`fix_asymmetric_loading` gives the placeholder the stored shape; nothing on disk changes.
It stands down by itself once compressed-tensors builds the right placeholder.
"""

from __future__ import annotations

import functools
import math

import torch

_PATCHED = "_admmq_packed_zero_point_placeholder"


def fix_asymmetric_loading() -> bool:
    """Make transformers >= 5.23 load asymmetric compressed-tensors checkpoints; call it before
    ``from_pretrained``. Idempotent, harmless on older releases, a no-op without
    compressed-tensors; returns whether the fix is in place."""
    try:
        from compressed_tensors.compressors.pack_quantized import base as packed
    except ImportError:
        return False
    cls = packed.PackedQuantizationCompressor
    if getattr(cls.compress, _PATCHED, False):
        return True
    original = cls.compress.__func__  # a classmethod

    @functools.wraps(original)
    def compress(klass, state_dict, scheme):
        weight = state_dict.get("weight")
        out = original(klass, state_dict, scheme)
        args = scheme.weights
        zero = out.get("weight_zero_point")
        if (weight is not None and weight.device.type == "meta" and zero is not None
                and args is not None and not args.symmetric
                and args.strategy in packed.PACK_ZP_STRATS and zero.dim() == 2
                and zero.shape[0] == weight.shape[0]):  # still the unpacked [N, G] placeholder
            out = dict(out)
            out["weight_zero_point"] = torch.empty(
                (math.ceil(zero.shape[0] * args.num_bits / 32), zero.shape[1]),
                dtype=torch.int32, device="meta")
        return out

    setattr(compress, _PATCHED, True)
    cls.compress = classmethod(compress)
    return True
