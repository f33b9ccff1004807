"""Tests for moba_dist.parallel.layouts: CP token layouts, shard/unshard, padding plans."""

from __future__ import annotations

import pytest
import torch

from moba_dist.parallel.layouts import (
    LAYOUTS,
    CPPadding,
    check_layout,
    local_positions,
    pad_for_cp,
    shard,
    unshard,
)

WORLD_SIZES = (1, 2, 3, 4)


def cu(*lens: int) -> torch.Tensor:
    """cu_seqlens (int32) from sequence lengths."""
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def naive_positions(lens: list[int], rank: int, world: int, layout: str) -> list[int]:
    """The layout spelled out token by token, independently of the module."""
    total = sum(lens)
    if layout == "contiguous":
        per_rank = total // world
        return [t for t in range(total) if t // per_rank == rank]
    out, start = [], 0
    for n in lens:
        chunk = n // (2 * world)
        for c in (rank, 2 * world - 1 - rank):
            for j in range(chunk):
                out.append(start + c * chunk + j)
        start += n
    return out


def batch_lens(kind: str, world: int, layout: str) -> list[int]:
    """Packed batches that satisfy the layout's constraint for `world`."""
    unit = 2 * world if layout == "zigzag" else 1
    if kind == "one_seq":
        lens = [6 * unit]
    elif kind == "mixed":
        lens = [2 * unit, 5 * unit, unit, 3 * unit]
    else:  # many short sequences
        lens = [unit * (1 + i % 3) for i in range(9)]
    if layout == "contiguous":
        lens[-1] += (-sum(lens)) % world
    return lens


BATCHES = ("one_seq", "mixed", "many")


@pytest.mark.parametrize("kind", BATCHES)
@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda p: f"P{p}")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_and_positions(layout: str, world: int, kind: str) -> None:
    lens = batch_lens(kind, world, layout)
    cus = cu(*lens)
    total = sum(lens)
    x = torch.arange(total * 3, dtype=torch.float64).reshape(total, 3)
    parts = []
    for r in range(world):
        pos = local_positions(cus, rank=r, world_size=world, layout=layout)
        assert pos.dtype == torch.long
        assert pos.tolist() == naive_positions(lens, r, world, layout)
        part = shard(x, cus, rank=r, world_size=world, layout=layout)
        assert torch.equal(part, x[pos])
        parts.append(part)
    assert torch.equal(unshard(parts, cus, layout=layout), x)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_unshard_other_dim(layout: str) -> None:
    cus, world = cu(8, 16), 2
    x = torch.randn(2, 24, 3)
    parts = [shard(x, cus, rank=r, world_size=world, layout=layout, dim=1) for r in range(world)]
    assert parts[0].shape == (2, 12, 3)
    assert torch.equal(unshard(parts, cus, layout=layout, dim=-2), x)


def test_zigzag_hand_worked() -> None:
    cus = cu(8)
    assert local_positions(cus, rank=0, world_size=2, layout="zigzag").tolist() == [0, 1, 6, 7]
    assert local_positions(cus, rank=1, world_size=2, layout="zigzag").tolist() == [2, 3, 4, 5]
    two = cu(4, 8)  # chunks of 1 then 2 tokens
    assert local_positions(two, rank=0, world_size=2, layout="zigzag").tolist() == [
        0,
        3,
        4,
        5,
        10,
        11,
    ]
    assert local_positions(two, rank=1, world_size=2, layout="zigzag").tolist() == [
        1,
        2,
        6,
        7,
        8,
        9,
    ]


def test_unshard_is_differentiable() -> None:
    cus, world = cu(4, 8), 2
    parts = [torch.randn(6, 2, requires_grad=True) for _ in range(world)]
    weight = torch.randn(12, 2)
    (unshard(parts, cus, layout="zigzag") * weight).sum().backward()
    for r, part in enumerate(parts):
        pos = local_positions(cus, rank=r, world_size=world, layout="zigzag")
        assert torch.equal(part.grad, weight[pos])


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cus", "exc", "words"),
    [
        pytest.param([0, 4, 8], TypeError, "torch.Tensor", id="not_tensor"),
        pytest.param(torch.tensor([0.0, 4.0]), TypeError, "integer dtype", id="float"),
        pytest.param(torch.tensor([[0, 4]]), ValueError, "1-D", id="2d"),
        pytest.param(torch.tensor([0]), ValueError, "at least one sequence", id="no_seq"),
        pytest.param(torch.tensor([1, 4]), ValueError, "start at 0", id="nonzero_start"),
        pytest.param(torch.tensor([0, 6, 4]), ValueError, "non-decreasing", id="decreasing"),
    ],
)
def test_bad_cu_seqlens(cus, exc: type, words: str) -> None:
    with pytest.raises(exc, match=words):
        check_layout(cus, world_size=2, layout="contiguous")
    with pytest.raises(exc, match=words):
        pad_for_cp(cus, world_size=2)


def test_bad_layout_world_rank() -> None:
    with pytest.raises(ValueError, match=r"layout must be one of .*'ring'"):
        check_layout(cu(8), world_size=2, layout="ring")
    with pytest.raises(ValueError, match=r"world_size must be an int >= 1, got 0"):
        check_layout(cu(8), world_size=0, layout="zigzag")
    with pytest.raises(ValueError, match=r"rank must be .*\[0, world_size=2\), got 2"):
        local_positions(cu(8), rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"rank must be .*got -1"):
        shard(torch.zeros(8), cu(8), rank=-1, world_size=2)
    with pytest.raises(ValueError, match=r"rank must be"):
        pad_for_cp(cu(8), world_size=2).local_real_index(3)


def test_layout_constraint_messages() -> None:
    with pytest.raises(
        ValueError, match=r"contiguous.*multiple of world_size=3, got 8.*pad_for_cp"
    ):
        check_layout(cu(3, 5), world_size=3, layout="contiguous")
    with pytest.raises(
        ValueError, match=r"multiple of 2 \* world_size = 4, got sequence 1 of length 6.*pad_for_cp"
    ):
        check_layout(cu(8, 6, 4), world_size=2, layout="zigzag")
    with pytest.raises(ValueError, match=r"sequence 0 of length 8"):
        shard(torch.zeros(8), cu(8), rank=0, world_size=3, layout="zigzag")


def test_shape_mismatch_messages() -> None:
    with pytest.raises(ValueError, match=r"x.shape\[0\] must equal .*cu_seqlens\[-1\] = 8.*\(9,\)"):
        shard(torch.zeros(9), cu(8), rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"dim must be in"):
        shard(torch.zeros(8), cu(8), rank=0, world_size=2, dim=1)
    with pytest.raises(ValueError, match=r"parts\[1\] must have 4 tokens .*got shape \(3,\)"):
        unshard([torch.zeros(4), torch.zeros(3)], cu(8))
    with pytest.raises(ValueError, match=r"empty"):
        unshard([], cu(8))
    plan = pad_for_cp(cu(5), world_size=2)
    with pytest.raises(ValueError, match=r"num_real_tokens = 5"):
        plan.pad(torch.zeros(6))
    with pytest.raises(ValueError, match=r"num_padded_tokens = 6"):
        plan.unpad(torch.zeros(5))


# --- padding ---------------------------------------------------------------------------------

PAD_BATCHES = {
    "one_odd": [7],
    "mixed": [5, 8, 1, 13],
    "many": [1 + (3 * i) % 7 for i in range(11)],
}


@pytest.mark.parametrize("kind", list(PAD_BATCHES))
@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda p: f"P{p}")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pad_for_cp(layout: str, world: int, kind: str) -> None:
    lens = PAD_BATCHES[kind]
    cus = cu(*lens)
    plan = pad_for_cp(cus, world_size=world, layout=layout)
    assert isinstance(plan, CPPadding)
    assert plan.cu_seqlens.dtype == torch.int32
    check_layout(plan.cu_seqlens, world_size=world, layout=layout)
    assert plan.num_real_tokens == sum(lens)
    assert plan.num_padded_tokens == int(plan.cu_seqlens[-1])

    padded_lens = plan.cu_seqlens.diff().tolist()
    if layout == "contiguous":
        # Real sequences untouched (same offsets); at most one dummy sequence appended.
        assert torch.equal(plan.cu_seqlens[: len(cus)], cus)
        assert len(padded_lens) - len(lens) == (1 if sum(lens) % world else 0)
        assert plan.num_padding < world
    else:
        assert len(padded_lens) == len(lens)
        assert all(p >= n and p - n < 2 * world for p, n in zip(padded_lens, lens, strict=True))

    # Real tokens sit at the head of each padded sequence, in order.
    starts = plan.cu_seqlens.tolist()
    expect_real = [s + j for s, n in zip(starts, lens, strict=False) for j in range(n)]
    assert plan.real_index.tolist() == expect_real

    x = torch.randn(sum(lens), 2, dtype=torch.float64)
    xp = plan.pad(x)
    assert xp.shape == (plan.num_padded_tokens, 2)
    is_pad = torch.ones(plan.num_padded_tokens, dtype=torch.bool)
    is_pad[plan.real_index] = False
    assert torch.all(xp[is_pad] == 0)
    assert torch.equal(plan.unpad(xp), x)

    # Dropping padding rank by rank, then concatenating, recovers the real tokens in order.
    kept = []
    for r in range(world):
        held = naive_positions(padded_lens, r, world, layout)
        local = plan.local_real_index(r).tolist()
        assert local == [i for i, t in enumerate(held) if not is_pad[t]]
        x_local = shard(xp, plan.cu_seqlens, rank=r, world_size=world, layout=layout)
        kept.extend(held[i] for i in local)
        assert torch.equal(
            x_local.index_select(0, plan.local_real_index(r)), xp[[held[i] for i in local]]
        )
    assert sorted(kept) == expect_real


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pad_gradients(layout: str) -> None:
    plan = pad_for_cp(cu(5, 4), world_size=2, layout=layout)
    assert plan.num_padding > 0
    x = torch.randn(9, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(plan.num_padded_tokens, 2, dtype=torch.float64)
    (plan.pad(x) * weight).sum().backward()
    assert torch.equal(x.grad, weight[plan.real_index])

    # Backprop from real outputs only: padded positions of the padded stream get zero gradient.
    xp = plan.pad(x.detach()).requires_grad_()
    (plan.unpad(xp) ** 2).sum().backward()
    is_pad = torch.ones(plan.num_padded_tokens, dtype=torch.bool)
    is_pad[plan.real_index] = False
    assert torch.all(xp.grad[is_pad] == 0)
    assert torch.equal(xp.grad[~is_pad], 2 * x.detach())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_padding_when_satisfied(layout: str) -> None:
    cus = cu(8, 16, 4)
    plan = pad_for_cp(cus, world_size=2, layout=layout)
    assert torch.equal(plan.cu_seqlens, cus)
    assert plan.num_padding == 0
    assert plan.real_index.tolist() == list(range(28))
    x = torch.randn(28)
    assert torch.equal(plan.pad(x), x)
    assert plan.local_real_index(1).tolist() == list(range(14))
