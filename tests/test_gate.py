"""The fused Triton gate and the centroid kernel against float64 references.

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
in float32: the interpreter's bf16 dot is wrong, so the centroid pieces are stored as float32
holding the same bf16-rounded values. The contract (docs/routing.md): outside near-ties the
selected set equals the float64 gate's; near-tie rows are those whose (K-1)-th and K-th best
float64 scores differ by < margin * |q| * max |candidate centroid|, margin 1e-6 for the default
precision and wider for the opt-ins (MARGINS below).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from moba_dist.config import HEAD_DIMS  # noqa: E402
from moba_dist.kernels import gate, triton_gate  # noqa: E402
from moba_dist.kernels.blocks import BlockLayout, segment_sums  # noqa: E402
from moba_dist.kernels.gate import block_centroids, block_sums, select_blocks  # noqa: E402
from moba_dist.kernels.triton_gate import (  # noqa: E402
    block_sums_triton,
    centroid_pieces,
    select_blocks_triton,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Near-tie margins per precision, from the score error bounds (relative to |q| * max|c|; a
# choice can flip only where two scores are within twice the error of one):
# float32: a few 2^-24, margin 1e-6 ~ 17 * 2^-24. bf16x2: the dropped centroid residual and
# query-piece products are each <= 2^-18, at most 3 per score, so two scores move apart by
# <= 6 * 2^-18 ~ 2.3e-5 < 4e-5. bf16: q and c each rounded to bf16 (2^-9), so <= 2 * 2^-8 ~
# 7.8e-3 < 1e-2.
MARGINS = {"float32": 1e-6, "bf16x2": 4e-5, "bf16": 1e-2}

CASES = {
    # name: (sequence lengths, block size, Hq, Hkv, D, topk)
    "ragged-last-block": ([83], 8, 2, 2, 64, 3),
    "several-seqs-gqa": ([37, 70, 5, 41], 8, 4, 2, 96, 4),
    "mqa-top2": ([64, 29], 4, 4, 1, 128, 2),
    "topk-ge-blocks": ([45, 20], 8, 2, 1, 64, 30),
    "top1": ([40], 8, 2, 2, 256, 1),
}


@pytest.fixture
def small_tiles(monkeypatch):
    # 16 x 16 tiles: query tiles straddle blocks and sequences, candidate ranges span tiles.
    cfg = dict(BLOCK_T=16, BLOCK_C=16, num_warps=4, num_stages=1)
    monkeypatch.setattr(triton_gate, "_CONFIGS", dict.fromkeys(HEAD_DIMS, cfg))


def make(lens, block, hq, hkv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q, k = torch.randn(t, hq, d, generator=g), torch.randn(t, hkv, d, generator=g)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    layout = BlockLayout.build(cu.to(DEV), block)
    return q.to(DEV), k.to(DEV), layout


def gate_args(q, centroids, layout, topk):
    tok = layout.token_block
    return q, centroids, tok, layout.block_seq_first[tok], topk


def near_ties(q, c64, layout, topk, margin=MARGINS["float32"]) -> torch.Tensor:
    """``[T, Hq]`` rows whose (K-1)-th and K-th best float64 candidate scores are closer than
    ``margin * |q| * max|c|`` (brute force over all blocks)."""
    hq, hkv = q.shape[1], c64.shape[1]
    cen = c64.repeat_interleave(hq // hkv, dim=1)  # [N, Hq, D]
    s = torch.einsum("thd,nhd->thn", q.double(), cen)
    own = layout.token_block
    ids = torch.arange(layout.num_blocks, device=q.device)
    ok = (ids >= layout.block_seq_first[own][:, None]) & (ids < own[:, None])  # [T, N]
    s.masked_fill_(~ok[:, None, :], float("-inf"))
    vals = s.sort(-1, descending=True).values
    maxn = torch.where(ok[:, None, :], cen.norm(dim=-1).T[None], 0).amax(-1)
    if topk < 2 or vals.shape[-1] < topk:
        return torch.zeros(q.shape[:2], dtype=torch.bool, device=q.device)
    gap = vals[..., topk - 2] - vals[..., topk - 1]
    bound = margin * q.double().norm(dim=-1) * maxn
    return (ok.sum(1)[:, None] >= topk) & (gap < bound)


def check_against_float64(q, k, layout, topk, precision="float32", max_ties=0.05):
    """Assert the fused gate's selection equals the float64 gate's outside near-ties."""
    c64 = block_centroids(k.double(), layout)
    want = select_blocks(*gate_args(q.double(), c64, layout, topk))
    got = select_blocks_triton(*gate_args(q, block_centroids(k, layout), layout, topk), precision)
    assert got.dtype == torch.int32 and got.shape == want.shape
    assert torch.equal(got[..., 0], want[..., 0])  # own block in slot 0
    same = (got[..., 1:].sort(-1).values == want[..., 1:].sort(-1).values).all(-1)
    ties = near_ties(q, c64, layout, topk, MARGINS[precision])
    assert ties.float().mean() < max_ties  # the comparison is not vacuous
    assert same[~ties].all(), f"{int((~same & ~ties).sum())} rows differ outside near-ties"


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fused_gate_matches_float64_outside_near_ties(case, small_tiles):
    lens, block, hq, hkv, d, topk = case
    q, k, layout = make(lens, block, hq, hkv, d)
    check_against_float64(q, k, layout, topk)


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_fused_gate_every_head_dim(d, small_tiles):
    # Packed sequences, GQA 2:1, tiles across blocks: D = 96 runs on a dot dimension padded to
    # 128, where reading anything but zeros past D would change the scores.
    q, k, layout = make([37, 70, 5, 41], 8, 4, 2, d, seed=d)
    check_against_float64(q, k, layout, 4)


@pytest.mark.parametrize("d", [16, 32, 48, 80, 512])
def test_fused_gate_refuses_other_head_dims(d):
    q, k, layout = make([40], 8, 2, 2, d)
    with pytest.raises(ValueError, match=r"head dim D of q .* one of \(64, 96, 128, 256\), got"):
        select_blocks_triton(*gate_args(q, block_centroids(k, layout), layout, 3))


@pytest.mark.parametrize("precision", ["bf16x2", "bf16"])
def test_opt_in_precisions_match_float64_outside_their_margin(precision, small_tiles):
    # The opt-ins keep the selection outside their own (wider) near-tie band; bf16's band holds
    # a large share of rows at this size, so more near-ties are allowed than for float32.
    q, k, layout = make([37, 70, 5, 41], 8, 4, 2, 64, seed=5)
    check_against_float64(q, k, layout, 4, precision, max_ties=0.5)


def test_default_precision_is_float32(small_tiles):
    q, k, layout = make([37, 70], 8, 4, 2, 64, seed=6)
    args = gate_args(q, block_centroids(k, layout), layout, 3)
    assert torch.equal(select_blocks_triton(*args), select_blocks_triton(*args, "float32"))


def test_fused_gate_slots_descending_by_score(small_tiles):
    # Slots 1.. hold the kept blocks best first: compare the whole table where no two of a
    # row's top K scores are near-equal (the order is then fixed by float64 scores).
    q, k, layout = make([37, 70, 5, 41], 8, 4, 2, 64, seed=3)
    c64 = block_centroids(k.double(), layout)
    want = select_blocks(*gate_args(q.double(), c64, layout, 4))
    got = select_blocks_triton(*gate_args(q, block_centroids(k, layout), layout, 4))
    ordered = torch.ones(q.shape[:2], dtype=torch.bool)
    for kk in range(2, 5):
        ordered &= ~near_ties(q, c64, layout, kk).cpu()
    assert ordered.float().mean() > 0.9
    assert torch.equal(got[ordered.to(DEV)], want[ordered.to(DEV)])


def test_fused_gate_exact_ties_to_lower_block(small_tiles):
    # 40 identical blocks over 3 candidate tiles: every past block ties exactly, so the lowest
    # ids win, in order. Small integers keep centroids, pieces and scores exact.
    g = torch.Generator().manual_seed(12)
    k = torch.randint(-3, 4, (2, 1, 64), generator=g).float().repeat(40, 1, 1).to(DEV)
    q = torch.randint(-3, 4, (80, 2, 64), generator=g).float().to(DEV)
    layout = BlockLayout.build(torch.tensor([0, 80], dtype=torch.int32, device=DEV), 2)
    sel = select_blocks_triton(*gate_args(q, block_centroids(k, layout), layout, 4))
    assert sel[79, 1].tolist() == [39, 0, 1, 2]
    assert sel[5, 0].tolist() == [2, 0, 1, -1]
    assert sel[1, 0].tolist() == [0, -1, -1, -1]


def test_fused_gate_tie_with_kept_block_after_insertions(small_tiles):
    # Blocks of one token, scores q . k = k[:, 0]: tile 1 keeps {0: 2, 1: 2, 2: 1}; tile 2 brings
    # 16: 3 (evicts 2) and then 17: 2, which ties the weakest kept block 1 and must not evict it.
    k = torch.zeros(40, 1, 64)
    k[[0, 1, 2, 16, 17], 0, 0] = torch.tensor([2.0, 2.0, 1.0, 3.0, 2.0])
    q = torch.zeros(40, 1, 64)
    q[:, 0, 0] = 1.0
    layout = BlockLayout.build(torch.tensor([0, 40], dtype=torch.int32, device=DEV), 1)
    sel = select_blocks_triton(*gate_args(q.to(DEV), block_centroids(k.to(DEV), layout), layout, 4))
    assert sel[39, 0].tolist() == [39, 16, 0, 1]


def test_centroid_pieces_sum_to_centroids():
    # Each piece is the bf16 rounding of what is left (exact float32 subtraction), so three
    # pieces leave at most 2^-27 of every value (2^-9 per rounding).
    c = torch.randn(50, 3, 16, dtype=torch.float64) * torch.logspace(-3, 3, 16, dtype=torch.float64)
    c32 = c.float()
    pieces = centroid_pieces(c32, 3, torch.float32)
    assert pieces.shape == (3, 3, 50, 16)
    rest = c32.double().transpose(0, 1) - pieces.double().sum(0)
    assert (rest.abs() <= 2.0**-27 * c32.double().transpose(0, 1).abs()).all()
    assert (pieces[1].abs() > 0).float().mean() > 0.9  # the lower pieces carry bits


def test_precision_option_errors():
    q, k, layout = make([40], 8, 2, 2, 64)
    args = gate_args(q, block_centroids(k, layout), layout, 3)
    with pytest.raises(ValueError, match="precision must be one of"):
        select_blocks_triton(*args, precision="tf32")
    with pytest.raises(ValueError, match=r"precision must be one of .*'bf16'\), got 'fp8'"):
        select_blocks(*args, precision="fp8")
    with pytest.raises(TypeError, match="float32 centroids"):
        select_blocks_triton(*gate_args(q, block_centroids(k.double(), layout), layout, 3))


# Block sums: the centroid kernel (one read of k, float32) must give, for any rank's subset of
# a block's rows, the partial sums that context parallelism all-reduces.


def rank_rows(layout, world, rank):
    """Rows of ``rank`` under a zigzag split of each block into ``2 * world`` pieces (ragged
    blocks give empty pieces): ascending, each block's rows contiguous, as CP ranks hold them."""
    starts = layout.block_starts.cpu().tolist()
    rows = []
    for j in range(layout.num_blocks):
        cut = torch.linspace(starts[j], starts[j + 1], 2 * world + 1).round().long().tolist()
        for p in (rank, 2 * world - 1 - rank):
            rows += range(cut[p], cut[p + 1])
    return torch.tensor(sorted(rows), dtype=torch.int64)


@pytest.mark.parametrize("d", [64, 96, 256])
def test_block_sums_kernel_partial_sums_add_up(d, monkeypatch):
    # Force the kernel path of gate.block_sums (CUDA-only in production) so its device-side
    # search of the rows of each block runs here; the float64 sums are the reference.
    monkeypatch.setattr(gate, "_block_sums_kernel", lambda k: block_sums_triton)
    g = torch.Generator().manual_seed(d)
    k = torch.randn(150, 3, d, generator=g).to(DEV)
    layout = BlockLayout.build(torch.tensor([0, 70, 75, 150], dtype=torch.int32, device=DEV), 16)
    n = layout.num_blocks
    want = segment_sums(k.double(), layout.token_block, n, 16, torch.float64)
    total = torch.zeros_like(want)
    for rank in range(3):
        rows = rank_rows(layout, 3, rank).to(DEV)
        part = block_sums(k[rows], layout.token_block[rows], n, 16)
        ref = segment_sums(k[rows].double(), layout.token_block[rows], n, 16, torch.float64)
        # Float32 sums of <= 16 O(1) terms err by ~1e-6; a missing or extra row is O(1).
        torch.testing.assert_close(part.double(), ref, atol=1e-5, rtol=1e-5)
        total += part.double()
    torch.testing.assert_close(total, want, atol=1e-5, rtol=1e-5)
    full = block_centroids(k, layout)
    counts = (layout.block_starts[1:] - layout.block_starts[:-1]).double().view(-1, 1, 1)
    torch.testing.assert_close(full.double(), want / counts, atol=1e-6, rtol=1e-6)
