"""Bucketed noise passes (issue 17 §3): chunks of many tensors drawn into one buffer and updated by one
``torch._foreach_*`` call per bucket must give exactly the noise and the updates of the per-tensor
definition, and one pass must issue a draw per chunk plus a few ops per bucket, not a few ops per tensor.

The reference noise here is written from the definition alone (a fresh ``torch.Generator`` seeded with
``mix_seed(seed, param_index, chunk)`` per chunk, ``normal_`` into a fresh tensor), not from SeededNoise.
"""

from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_bpfree.zo import ZOSGD, SeededNoise, ZOSGDSign, mix_seed

CHUNK = 512


def reference_noise(param: torch.Tensor, seed: int, index: int, chunk: int = CHUNK, rademacher: bool = False):
    """The float32 noise of ``param``, chunk by chunk from its definition (whole for a non-contiguous one)."""
    numel = param.numel()
    sizes = [numel] if not param.is_contiguous() else [min(chunk, numel - s) for s in range(0, numel, chunk)]
    parts = []
    for number, size in enumerate(sizes):
        z = torch.empty(size).normal_(generator=torch.Generator().manual_seed(mix_seed(seed, index, number)))
        parts.append(z.ge(0).float() * 2 - 1 if rademacher else z)
    return torch.cat(parts).view(param.shape) if parts else torch.empty(param.shape)


def mixed_params() -> list[nn.Parameter]:
    """fp32 and bf16, tiny (1 element, a 0-d scalar), several chunks, exactly one chunk, non-contiguous."""
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(40, 30, generator=g),  # 1200: three chunks, the last one partial
        torch.randn(7, generator=g).bfloat16(),
        torch.randn(1, generator=g),
        torch.randn((), generator=g),
        torch.randn(20, 33, generator=g).t(),  # non-contiguous: drawn whole
        torch.randn(CHUNK, generator=g).bfloat16(),  # exactly one chunk: a bucket alone
        torch.randn(3, 5, generator=g).bfloat16(),
        torch.randn(50, 20, generator=g).bfloat16(),  # 1000: two chunks
        torch.randn(16, 16, generator=g).t(),  # non-contiguous and small
        torch.randn(0, generator=g),  # empty: no chunk at all
        torch.randn(64, generator=g),
    ]
    return [nn.Parameter(t) for t in tensors]


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("threads", [1, 2])
def test_bucketed_noise_equals_the_per_parameter_definition_bitwise(distribution, threads):
    params, seed = mixed_params(), 2024
    assert any(not p.is_contiguous() for p in params) and {p.dtype for p in params} == {torch.float32, torch.bfloat16}
    noise = SeededNoise(distribution, chunk_numel=CHUNK, num_threads=threads)
    indices = [3 * i + 1 for i in range(len(params))]  # seeding indices other than positions
    expected = [reference_noise(p, seed, i, rademacher=distribution == "rademacher") for p, i in zip(params, indices)]
    got = [torch.full(p.shape, float("nan")) for p in params]
    seen = Counter()

    def collect(bucket):
        assert len({v.dtype for v in bucket.values}) == 1  # one dtype per bucket (the fused foreach path)
        for index, start, values, z in zip(bucket.indices, bucket.starts, bucket.values, bucket.noise):
            assert z.dtype == torch.float32 and z.shape == values.shape
            position = indices.index(index)
            seen[position] += values.numel()
            target = got[position]
            (target if values.dim() != 1 else target.view(-1)[start : start + z.numel()]).copy_(z)

    for _ in range(2):  # the second pass reuses the remembered plan
        for have in got:
            have.fill_(float("nan"))
        noise.for_each_bucket(params, seed, collect, param_indices=indices)
        for position, (want, have) in enumerate(zip(expected, got)):
            assert torch.equal(have, want), position
    assert all(seen[i] == 2 * p.numel() for i, p in enumerate(params))  # every element exactly once per pass
    # the per-chunk interface goes through the same buckets
    per_chunk = [torch.full(p.shape, float("nan")) for p in params]
    noise.for_each_chunk(
        params, seed, lambda i, s, v, z: (per_chunk[indices.index(i)] if v.dim() != 1 else
                                          per_chunk[indices.index(i)].view(-1)[s : s + z.numel()]).copy_(z),
        param_indices=indices,
    )  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(per_chunk, expected))


def test_many_buckets_over_the_thread_pool_and_shard_slices_match_the_definition():
    # 300 k elements in chunks of 4096: ~75 buckets, enough for the thread pool to take them
    g = torch.Generator().manual_seed(1)
    params = [nn.Parameter(torch.randn(n, generator=g)) for n in (150_000, 3, 90_001, 7, 59_999)]
    noise = SeededNoise(chunk_numel=4096, num_threads=2)
    got = [torch.empty(p.shape) for p in params]

    def collect(bucket):
        for index, start, z in zip(bucket.indices, bucket.starts, bucket.noise):
            got[index][start : start + z.numel()].copy_(z)

    noise.for_each_bucket(params, 5, collect)
    for i, p in enumerate(params):
        assert torch.equal(got[i], reference_noise(p, 5, i, chunk=4096))
    # a shard's noise (elements 5000:97000 of the first parameter) is the slice of the whole one
    shard = noise.slice_noise(5, 0, (92_000,), 5000, 150_000)
    assert torch.equal(shard, reference_noise(params[0], 5, 0, chunk=4096)[5000:97_000])


@pytest.mark.parametrize("exact_restore", [False, True])
def test_zosgd_step_on_mixed_dtypes_equals_the_per_tensor_ops_bitwise(exact_restore):
    params = mixed_params()
    lr, eps, wd, seed = 0.05, 1e-2, 0.1, 77
    reference = [p.detach().clone() for p in params]
    opt = ZOSGD(params, lr=lr, eps=eps, weight_decay=wd, seed=seed, chunk_numel=CHUNK, num_threads=1,
                exact_restore=exact_restore)  # fmt: skip
    target = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]

    def loss_of(tensors):
        return sum(((t.float() - u) ** 2).sum() for t, u in zip(tensors, target))

    for step in range(3):
        opt.step(lambda: loss_of(params))
        # MeZO's ops, one tensor at a time, with the noise from its definition; restores arithmetic (fused
        # with the update) or, with exact_restore, copies of theta
        zs = [reference_noise(r, mix_seed(seed, step, 0), i) for i, r in enumerate(reference)]
        theta = [r.clone() for r in reference]
        for r, z in zip(reference, zs):
            r.add_(z, alpha=eps)
        plus = float(loss_of(reference))
        for r, z, t in zip(reference, zs, theta):
            r.copy_(t).add_(z, alpha=-eps) if exact_restore else r.add_(z, alpha=-2 * eps)
        minus = float(loss_of(reference))
        grad = (plus - minus) / (2 * eps)
        for r, z, t in zip(reference, zs, theta):
            r.copy_(t) if exact_restore else r.add_(z, alpha=eps)
            r.mul_(1 - lr * wd).add_(z, alpha=-lr * grad)
        for position, (p, r) in enumerate(zip(params, reference)):
            assert torch.equal(p.detach(), r), (step, position)


def test_bucketed_and_per_chunk_updates_agree_for_the_sign_rule(monkeypatch):
    runs = []
    for bucketed in (True, False):
        params = mixed_params()
        opt = ZOSGDSign(params, lr=0.01, weight_decay=0.1, num_queries=2, seed=3, chunk_numel=CHUNK, num_threads=1)
        monkeypatch.setattr(opt, "bucketed", lambda bucketed=bucketed: bucketed)  # False: the masked path's loop
        for _ in range(3):
            opt.step(lambda params=params: sum((p.float() ** 2).sum() for p in params))
        runs.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


class CountOps(TorchDispatchMode):
    """Every aten op dispatched while active (on this thread), by name."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


VIEW_OPS = {"view", "slice", "split_with_sizes", "split", "detach", "alias", "as_strided", "_unsafe_view", "t"}


def layered_model(layers: int = 50) -> nn.Module:
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(16, 16), nn.LayerNorm(16))])


@pytest.mark.parametrize("bf16_norms", [False, True])
def test_one_noise_pass_costs_a_draw_per_chunk_and_a_few_ops_per_bucket(bf16_norms):
    model = layered_model()  # 200 tensors of 16 to 256 elements: 200 chunks
    if bf16_norms:
        for module in model:
            if isinstance(module, nn.LayerNorm):
                module.bfloat16()
    tensors = list(model.parameters())
    assert len(tensors) == 200
    buckets = 2 if bf16_norms else 1  # 15,200 elements, below one 2^18 bucket per dtype
    opt = ZOSGD(model.parameters(), lr=1e-3, weight_decay=0.1, exact_restore=False, num_threads=1)
    opt.perturb_(1, 1.0)  # plans the buckets and allocates the buffer once
    with CountOps() as one_pass:
        opt.perturb_(2, 1.0)
    draws = one_pass.ops.pop("normal_")
    compute = sum(n for name, n in one_pass.ops.items() if name not in VIEW_OPS)
    views = sum(n for name, n in one_pass.ops.items() if name in VIEW_OPS)
    assert draws == len(tensors)  # one seeded draw per chunk: the noise's definition
    assert one_pass.ops["_foreach_add_"] == buckets and compute == buckets  # one update per bucket, not per tensor
    assert views <= 2 * buckets  # the bucket's slice of the buffer and its split
    # the whole step (3 passes: +eps z, -2 eps z, restore + decay + update) with a closure that runs no op;
    # per chunk and pass the code before buckets issued one draw, one add and 3 views (3815 ops in all)
    with CountOps() as step:
        opt.step(lambda: 0.5)
    assert step.ops["normal_"] == 3 * len(tensors)
    assert sum(step.ops.values()) - step.ops["normal_"] <= 3 * 4 * buckets + 10  # + the step's few scalars


def test_buckets_stay_within_the_chunk_cap_and_follow_replaced_parameters():
    model = layered_model(20)
    noise = SeededNoise(chunk_numel=1000, num_threads=1)
    params = list(model.parameters())
    plan = noise._plan(params, None)
    assert max(bucket.total for bucket in plan.buckets) <= 1000  # the temporary: one buffer of chunk_numel
    assert len(plan.buckets) == 7  # 3 layers of 304 elements fit in 1000: packed in order, not one per tensor
    # the plan is remembered; a parameter given new storage must be perturbed there, not in the old one
    opt = ZOSGD(model.parameters(), lr=0.0, eps=1.0, exact_restore=False, num_threads=1)
    opt.perturb_(9, 1.0)
    layer = model[0]
    old = layer.weight.data
    before = old.clone()
    layer.weight.data = torch.zeros(16, 16)
    opt.perturb_(9, 1.0)
    assert torch.equal(layer.weight.detach(), reference_noise(layer.weight, 9, 0, chunk=1 << 18))
    assert torch.equal(old, before)


def test_a_subclass_that_changes_only_the_chunk_rule_is_updated_by_that_rule():
    class Frozen(ZOSGDSign):  # inherits ZOSGDSign's bucket rule, but its own chunk rule moves nothing
        def update_chunk(self, group, index, start, values, z, coeff, query):
            pass

    params = mixed_params()
    before = [p.detach().clone() for p in params]
    opt = Frozen(params, lr=0.1, exact_restore=True, chunk_numel=CHUNK, num_threads=1)
    opt.step(lambda: sum((p.float() ** 2).sum() for p in params))
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))  # the sign rule would move every one
