"""Shared fixtures: synthetic layers with the outlier input channels real LLM layers have."""

from __future__ import annotations

import os

# The tests never reach the hub (the machines have no access): hub ids must fail fast, offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from admmq_dist.checkpoint.compat import fix_asymmetric_loading  # noqa: E402

# Tests load asymmetric checkpoints through transformers, which >= 5.23 cannot do without this
# (an upstream bug; tests/test_checkpoint.py shows both sides of it in a fresh process).
fix_asymmetric_loading()


def synthetic_layer(rows: int, cols: int, num_tokens: int, seed: int, outliers: int = 4,
                    dead: int = 0):
    """``(weight [rows, cols], hessian [cols, cols], activations [num_tokens, cols])``.

    Correlated inputs (a low-rank mixture plus noise), log-normal channel scales, ``outliers``
    channels 20× louder, and ``dead`` channels that are always zero.
    """
    g = torch.Generator().manual_seed(seed)
    rank = max(cols // 4, 1)
    base = torch.randn(num_tokens, rank, generator=g)
    mix = torch.randn(rank, cols, generator=g) / rank**0.5
    x = base @ mix + 0.3 * torch.randn(num_tokens, cols, generator=g)
    chan = torch.exp(0.5 * torch.randn(cols, generator=g))
    chan[torch.randperm(cols, generator=g)[:outliers]] *= 20
    x = x * chan
    if dead:
        x[:, torch.randperm(cols, generator=g)[:dead]] = 0
    hessian = x.T @ x / num_tokens
    weight = torch.randn(rows, cols, generator=g) * 0.02
    return weight, hessian, x


@pytest.fixture
def layer():
    return synthetic_layer(96, 128, 2048, seed=0)


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA is present, so the default test command stays green on CPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
