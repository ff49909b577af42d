import itertools

import pytest
import torch

from admmq_dist.quant.hessian import HessianAccumulator, condition, damp, relative_loss


def batches(count=11, seed=0, n=24):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 5 + i % 3, n, generator=g) * (1 + 10 * (i % 4 == 0)) for i in range(count)]


def single_pass(data, n=24):
    acc = HessianAccumulator(n)
    for i, x in enumerate(data):
        acc.add(x, i)
    return acc


def test_average_of_outer_products():
    data = batches()
    x = torch.cat([b.reshape(-1, 24) for b in data]).double()
    expected = x.T @ x / x.shape[0]
    h = single_pass(data).hessian()
    assert h.dtype == torch.float32
    assert torch.allclose(h.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cuts", [(5,), (1, 2), (3, 7, 8), (4, 6, 10)])
def test_shards_merge_into_exactly_the_single_pass_bytes(cuts):
    data = batches()
    reference = single_pass(data).hessian()
    bounds = [0, *cuts, len(data)]
    shards = []
    for a, b in zip(bounds, bounds[1:]):
        acc = HessianAccumulator(24)
        for i in range(a, b):
            acc.add(data[i], i)
        shards.append(acc)
    for order in itertools.permutations(range(len(shards))):
        merged = HessianAccumulator(24)
        for k in order:
            merged.merge(HessianAccumulator.from_state(shards[k].state()))
        assert torch.equal(merged.hessian(), reference)
        assert merged.num_rows == sum(b.reshape(-1, 24).shape[0] for b in data)


def test_interleaved_shards_merge_exactly():
    data = batches(count=9)
    reference = single_pass(data).hessian()
    even, odd = HessianAccumulator(24), HessianAccumulator(24)
    for i, x in enumerate(data):
        (even if i % 2 == 0 else odd).add(x, i)
    odd.merge(even)
    assert torch.equal(odd.hessian(), reference)


def test_errors():
    acc = HessianAccumulator(4)
    with pytest.raises(ValueError, match="no calibration activations"):
        acc.hessian()
    with pytest.raises(ValueError, match="3 features, expected 4"):
        acc.add(torch.zeros(2, 3), 0)
    acc.add(torch.ones(2, 4), 0)
    with pytest.raises(ValueError, match="added twice"):
        acc.add(torch.ones(2, 4), 0)


def test_dead_inputs_are_conditioned():
    w = torch.ones(3, 4)
    h = torch.diag(torch.tensor([2.0, 0.0, 3.0, 0.0]))
    w2, h2 = condition(w, h)
    assert torch.equal(w2[:, [1, 3]], torch.zeros(3, 2))
    assert torch.equal(w2[:, [0, 2]], w[:, [0, 2]])
    assert torch.equal(torch.diagonal(h2), torch.tensor([2.0, 1.0, 3.0, 1.0]))
    assert torch.equal(w, torch.ones(3, 4))  # inputs untouched


def test_condition_refuses_non_finite():
    h = torch.eye(3)
    h[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        condition(torch.ones(2, 3), h)


def test_damp_and_relative_loss():
    h = torch.diag(torch.tensor([1.0, 3.0]))
    assert torch.equal(torch.diagonal(damp(h, 0.5)), torch.tensor([2.0, 4.0]))
    w0 = torch.tensor([[1.0, 1.0]])
    assert relative_loss(w0 + torch.tensor([[0.0, 1.0]]), w0, h) == pytest.approx(3.0 / 4.0)


def test_cross_terms_average_and_merge_like_the_hessian():
    data = batches()
    g = torch.Generator().manual_seed(5)
    refs = [x + 0.1 * torch.randn(x.shape, generator=g) for x in data]
    whole = HessianAccumulator(24, cross=True)
    for i, (x, r) in enumerate(zip(data, refs)):
        whole.add(x, i, r)
    x = torch.cat([b.reshape(-1, 24) for b in data]).double()
    r = torch.cat([b.reshape(-1, 24) for b in refs]).double()
    assert torch.allclose(whole.cross().double(), (r - x).T @ x / x.shape[0], atol=1e-5)
    assert torch.allclose(whole.deviation().double(), (r - x).T @ (r - x) / x.shape[0],
                          atol=1e-6)
    assert torch.equal(whole.hessian(), single_pass(data).hessian())
    odd, even = HessianAccumulator(24, cross=True), HessianAccumulator(24, cross=True)
    for i, (x, r) in enumerate(zip(data, refs)):
        (odd if i % 2 else even).add(x, i, r)
    merged = HessianAccumulator.from_state(odd.state())
    merged.merge(HessianAccumulator.from_state(even.state()))
    assert torch.equal(merged.cross(), whole.cross())
    assert torch.equal(merged.deviation(), whole.deviation())
    with pytest.raises(ValueError, match="reference"):
        whole.add(data[0], 99)
    with pytest.raises(ValueError, match="cross"):
        merged.merge(single_pass(data[:1]))
    with pytest.raises(ValueError, match="without cross"):
        single_pass(data).cross()


def test_asymmetric_target_turns_the_asymmetric_loss_into_the_ordinary_one():
    """‖W X_ref − Q X‖² − ‖(Q − W̃) X‖² is the same for every Q (strength 1, no damping)."""
    from admmq_dist.quant.hessian import asymmetric_target

    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 16, generator=g, dtype=torch.float64)
    ref = x + 0.3 * torch.randn(400, 16, generator=g, dtype=torch.float64)
    w = torch.randn(6, 16, generator=g, dtype=torch.float64)
    h, cross = x.T @ x / 400, (ref - x).T @ x / 400
    target = asymmetric_target(w, h, cross, 1.0, 0.0)
    gaps = []
    for _ in range(4):
        q = w + 0.2 * torch.randn(6, 16, generator=g, dtype=torch.float64)
        asym = ((ref @ w.T - x @ q.T) ** 2).sum() / 400
        ordinary = (((q - target) @ h) * (q - target)).sum()
        gaps.append(float(asym - ordinary))
    assert max(gaps) - min(gaps) < 1e-9 * abs(gaps[0]) + 1e-9
    assert torch.equal(asymmetric_target(w, h, cross, 0.0, 0.01), w)
    half = asymmetric_target(w, h, cross, 0.5, 0.0)
    assert torch.allclose(half, (w + target) / 2, atol=1e-10)


def test_the_true_asymmetric_loss_is_measured_on_the_float_weights_and_inputs():
    """asymmetric_loss_terms equals ‖W X_ref − Q X‖² / ‖W X_ref‖² computed from the activations
    (whatever target Q was solved for), and differs from the loss against the moved target."""
    from admmq_dist.quant.hessian import asymmetric_loss_terms, asymmetric_target, relative_loss

    g = torch.Generator().manual_seed(4)
    x = torch.randn(500, 16, generator=g, dtype=torch.float64)
    ref = x + 0.3 * torch.randn(500, 16, generator=g, dtype=torch.float64)
    w = torch.randn(6, 16, generator=g, dtype=torch.float64)
    acc = HessianAccumulator(16, cross=True)
    acc.add(x, 0, ref)
    h, cross, deviation = acc.hessian(), acc.cross(), acc.deviation()
    target = asymmetric_target(w.float(), h, cross, 0.25, 0.01)
    q = (target * 4).round() / 4  # some quantized weight near the moved target
    num, den = asymmetric_loss_terms(q, w, h, cross, deviation)
    direct_num = float(((ref @ w.T - x @ q.double().T) ** 2).sum() / 500)
    direct_den = float(((ref @ w.T) ** 2).sum() / 500)
    assert num == pytest.approx(direct_num, rel=1e-5)
    assert den == pytest.approx(direct_den, rel=1e-5)
    assert abs(num / den - relative_loss(q, target, h)) > 0.01 * num / den
    # Q = W on identical streams: no loss at all.
    same = HessianAccumulator(16, cross=True)
    same.add(x, 0, x)
    assert asymmetric_loss_terms(w, w, same.hessian(), same.cross(), same.deviation())[0] == 0


def test_an_in_order_accumulator_keeps_one_running_sum_and_refuses_disorder():
    torch.manual_seed(0)
    batches = [torch.randn(2, 5, 8) for _ in range(6)]
    refs = [b + 0.1 * torch.randn_like(b) for b in batches]
    tree = HessianAccumulator(8, cross=True)
    running = HessianAccumulator(8, cross=True, in_order=True)
    for i, (b, r) in enumerate(zip(batches, refs)):
        tree.add(b, i, r)
        running.add(b, i, r)
    assert len(running._nodes) == 1 and len(tree._nodes) == 2
    assert torch.allclose(running.hessian(), tree.hessian(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(running.cross(), tree.cross(), rtol=1e-5, atol=1e-6)
    late = HessianAccumulator(8, in_order=True)
    late.add(batches[0], 0)
    with pytest.raises(ValueError, match="out of order"):
        late.add(batches[2], 2)
    with pytest.raises(ValueError, match="nothing merges"):
        tree.merge(running)


def crossed(count: int, n: int = 24, seed: int = 6):
    data = batches(count=count, seed=seed, n=n)
    g = torch.Generator().manual_seed(seed + 1)
    return data, [x + 0.1 * torch.randn(x.shape, generator=g) for x in data]


@pytest.mark.parametrize("cuts", [(3,), (1, 5), (2, 3, 6, 9)])
def test_parts_fold_in_place_into_the_single_pass_bytes_and_the_parts_stay_intact(cuts):
    """merge_state folds another worker's part in one node at a time, adding in place into
    the nodes this accumulator owns; take() finishes a statistic in its partial sums' memory.
    Any order gives the bytes of one pass, and what was handed over (the parts, the senders'
    trees, which share their tensors on a CPU) is never written to."""
    data, refs = crossed(11)
    whole = HessianAccumulator(24, cross=True)
    for i, (x, r) in enumerate(zip(data, refs)):
        whole.add(x, i, r)
    bounds = [0, *cuts, len(data)]
    shards = []
    for a, b in zip(bounds, bounds[1:]):
        acc = HessianAccumulator(24, cross=True)
        for i in range(a, b):
            acc.add(data[i], i, refs[i])
        shards.append(acc)
    before = [{k: {i: v.clone() for i, v in s.state().get(k, {}).items()}
               for k in ("nodes", "cross", "deviation")} for s in shards]
    for order in itertools.permutations(range(len(shards))):
        owner = HessianAccumulator(24, cross=True)  # the first part's batches, added here
        first = order[0]
        for i in range(bounds[first], bounds[first + 1]):
            owner.add(data[i], i, refs[i])
        for k in order[1:]:
            owner.merge_state(shards[k].state())
        for stat in ("deviation", "cross", "hessian"):
            assert torch.equal(owner.take(stat), getattr(whole, stat)()), (order, stat)
        with pytest.raises(ValueError, match="taken already"):
            owner.take("hessian")
    for shard, kept in zip(shards, before):
        state = shard.state()
        assert all(torch.equal(state[k][i], v) for k in kept for i, v in kept[k].items())
    # Merging shared parts into shared parts (no owned node anywhere) allocates new sums.
    merged = HessianAccumulator.from_state(shards[0].state())
    for shard in shards[1:]:
        merged.merge(shard)
    assert torch.equal(merged.take("hessian"), whole.hessian())
    assert all(torch.equal(shard.state()[k][i], v)
               for shard, kept in zip(shards, before) for k in kept for i, v in kept[k].items())


def test_a_merge_and_its_finish_need_no_second_copy_of_the_statistics():
    """The owner's tree and another worker's part (on the CPU, shared): folding the part in
    and finishing all three statistics allocates no [n, n] matrix at all — the old merge held a
    copy of the part and a new sum per level, and finishing cloned each statistic."""
    from alloc import peak_allocated

    n = 256
    data, refs = crossed(8, n=n)
    owner, other = HessianAccumulator(n, cross=True), HessianAccumulator(n, cross=True)
    for i, (x, r) in enumerate(zip(data, refs)):
        (owner if i < 4 else other).add(x, i, r)
    part = other.state()

    def fold_and_finish():
        owner.merge_state(part)
        return [owner.take(stat) for stat in ("deviation", "cross", "hessian")]

    _, peak = peak_allocated(fold_and_finish)
    assert peak < 4 * n * n / 8


def test_capturing_adds_each_batch_in_place():
    """While a worker adds its batches, the tree holds its canonical pieces and one new product:
    16 batches peak at 4 nodes + 1, not a new sum per level."""
    from alloc import peak_allocated

    n = 128
    data = batches(count=16, n=n)
    acc = HessianAccumulator(n)
    _, peak = peak_allocated(lambda: [acc.add(x, i) for i, x in enumerate(data)])
    activations = max(x.numel() for x in data) * 4
    assert peak <= (4 + 1) * 4 * n * n + 2 * activations
    assert len(acc._nodes) == 1


def test_asymmetric_targets_are_the_bytes_of_one_target_at_a_time_in_less_memory():
    """asymmetric_targets moves every weight reading an input with one factor computed after
    the float64 cross term is gone: the same bytes as asymmetric_target per weight (bfloat16
    weights enter float64 exactly), the float64 factor and the copy cholesky_solve makes of it
    at most, never beside the float64 cross term."""
    from admmq_dist.quant.hessian import (asymmetric_loss_terms, asymmetric_target,
                                          asymmetric_targets, deviation_term)
    from alloc import peak_allocated

    n, m = 300, 96
    data, refs = crossed(6, n=n)
    acc = HessianAccumulator(n, cross=True)
    for i, (x, r) in enumerate(zip(data, refs)):
        acc.add(x, i, r)
    h, cross, deviation = acc.hessian(), acc.cross(), acc.deviation()
    g = torch.Generator().manual_seed(9)
    weights = {"a": torch.randn(m, n, generator=g), "b": torch.randn(m // 3, n, generator=g)}
    weights["c"] = weights["a"].bfloat16()
    targets, peak = peak_allocated(lambda: asymmetric_targets(weights, h, cross, 0.25, 0.01,
                                                              dtype=torch.float32))
    for name, w in weights.items():
        assert torch.equal(targets[name], asymmetric_target(w.float(), h, cross, 0.25, 0.01))
    rows = sum(w.shape[0] for w in weights.values())
    assert peak <= 1.02 * (16 * n * n + 16 * rows * n)
    # The deviation's share of the true loss, taken apart, is the same number.
    w, q = weights["a"][:40], weights["a"][:40] + 0.01
    assert asymmetric_loss_terms(q, w, h, cross, deviation) == asymmetric_loss_terms(
        q, w, h, cross, deviation_term(w, deviation))
