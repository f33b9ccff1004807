"""Planning code of context-parallel MoBA against hand-built expectations (no process group).

Small batches whose ownership, requests and row sets were worked out by hand; the requests are
also checked against a brute-force loop over every routing entry.
"""

from __future__ import annotations

import torch

from moba_dist.kernels.blocks import BlockLayout
from moba_dist.parallel.plan import build_ownership
from moba_dist.parallel.requests import (
    expand_requests,
    keys_from_positions,
    needed_requests,
    rows_for_rank,
)

CU = torch.tensor([0, 6, 10], dtype=torch.int32)  # sequences of 6 and 4 tokens
BLOCKS = BlockLayout.build(CU, 2)  # blocks [0,2) [2,4) [4,6) | [6,8) [8,10)


def test_contiguous_ownership():
    own = build_ownership(CU, 1, 2, "contiguous", torch.device("cpu"))
    assert own.owner.tolist() == [0] * 5 + [1] * 5
    assert own.local_index.tolist() == [0, 1, 2, 3, 4] * 2
    assert own.positions.tolist() == [5, 6, 7, 8, 9]


def test_zigzag_ownership():
    # Sequences of 4 and 8 over 2 ranks: chunks of 1 and 2 tokens; rank r holds chunks r, 3-r.
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)
    own = build_ownership(cu, 0, 2, "zigzag", torch.device("cpu"))
    assert own.positions.tolist() == [0, 3, 4, 5, 10, 11]
    assert own.owner.tolist() == [0, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 0]
    assert own.local_index.tolist() == [0, 0, 1, 1, 2, 3, 2, 3, 4, 5, 4, 5]


def test_empty_sequence_owns_nothing():
    # A repeated offset (empty sequence) changes no ownership and adds no block.
    cu = torch.tensor([0, 6, 6, 10], dtype=torch.int32)
    own = build_ownership(cu, 1, 2, "contiguous", torch.device("cpu"))
    assert own.positions.tolist() == [5, 6, 7, 8, 9]
    blocks = BlockLayout.build(cu, 2)
    assert blocks.block_starts.tolist() == BLOCKS.block_starts.tolist()


# Routing of rank 1's queries (positions 5..9) with Hq=4, Hkv=2 (heads 0,1 -> kv head 0; 2,3
# -> kv head 1), K=2 slots, -1 = unused slot.
SEL = torch.tensor(
    [
        [[2, 0], [2, -1], [2, 1], [2, 1]],  # pos 5, block 2
        [[3, -1], [3, -1], [3, -1], [3, -1]],  # pos 6, block 3
        [[3, -1], [3, -1], [3, -1], [3, -1]],  # pos 7, block 3
        [[4, 3], [4, -1], [4, -1], [4, -1]],  # pos 8, block 4
        [[4, -1], [4, -1], [4, 3], [4, -1]],  # pos 9, block 4
    ],
    dtype=torch.int32,
)
Q_POS = torch.tensor([5, 6, 7, 8, 9])
# (block, kv head, maxpos), worked out from SEL by hand: maxpos is the last position of the
# last run of one block's queries that selected it (block 3 head 0 is chosen by position 8 of
# the run 8..9, hence 9: the same rows as 8, since the whole of block 3 lies before it).
WANT = [[0, 0, 5], [1, 1, 5], [2, 0, 5], [2, 1, 5], [3, 0, 9], [3, 1, 9], [4, 0, 9], [4, 1, 9]]


def test_needed_requests_by_hand():
    got = needed_requests(SEL, Q_POS, BLOCKS.token_block[Q_POS], 2, BLOCKS.num_blocks)
    assert got.tolist() == WANT


def test_needed_requests_brute_force():
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 23, 40], dtype=torch.int32)
    blocks = BlockLayout.build(cu, 3)
    q_pos = torch.arange(7, 33)
    q_block = blocks.token_block[q_pos]
    hq, hkv, k = 6, 3, 3
    sel = torch.randint(-1, blocks.num_blocks, (q_pos.numel(), hq, k), generator=g)
    sel[:, :, 0] = q_block.view(-1, 1)  # every query selects its own block
    best: dict[tuple[int, int], int] = {}
    for t in range(q_pos.numel()):
        for h in range(hq):
            for j in sel[t, h].tolist():
                if j >= 0:
                    key = (j, h // (hq // hkv))
                    best[key] = max(best.get(key, -1), int(q_pos[t]))
    want = torch.tensor([[j, gh, m] for (j, gh), m in sorted(best.items())])
    got = needed_requests(sel, q_pos, q_block, hkv, blocks.num_blocks)
    # Same (block, head) pairs, and each names the same rows (maxpos may lie further past a
    # fully needed past block, never elsewhere).
    assert got[:, :2].tolist() == want[:, :2].tolist()
    a, b = expand_requests(got, blocks), expand_requests(want, blocks)
    for name in ("pos", "head", "req"):
        assert getattr(a, name).tolist() == getattr(b, name).tolist(), name


def test_needed_requests_without_queries():
    got = needed_requests(SEL[:0], Q_POS[:0], Q_POS[:0], 2, BLOCKS.num_blocks)
    assert got.shape == (0, 3)


def test_expand_requests_and_rows_for_rank():
    # Block 2 up to position 5 (rows 4, 5); block 3 up to position 6 (row 6 only: causal prefix).
    rows = expand_requests(torch.tensor([[2, 0, 5], [3, 1, 6]]), BLOCKS)
    assert rows.pos.tolist() == [4, 5, 6]
    assert rows.head.tolist() == [0, 0, 1]
    assert rows.req.tolist() == [0, 0, 1]
    own = build_ownership(CU, 0, 2, "contiguous", torch.device("cpu"))
    mine = rows_for_rank(rows, own, 0)  # rank 0 holds positions 0..4
    assert (mine.pos.tolist(), mine.head.tolist(), mine.req.tolist()) == ([4], [0], [0])
    empty = expand_requests(torch.zeros(0, 3, dtype=torch.int64), BLOCKS)
    assert empty.pos.numel() == 0


def test_keys_from_positions():
    keys = keys_from_positions(torch.tensor([1, 4, 5, 9]), BLOCKS)
    # Block j's rows are block_rows[j]:block_rows[j+1] of the key set.
    assert keys.block_rows.tolist() == [0, 1, 1, 3, 3, 4]
    assert keys.k_pos.tolist() == [1, 4, 5, 9]
