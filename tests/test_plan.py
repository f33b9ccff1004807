"""Planning code of context-parallel MoBA against hand-built expectations (no process group).

Small batches whose ownership, need tables and row ranges were worked out by hand; the need
tables and the rows each owner sends are also checked against brute-force loops.
"""

from __future__ import annotations

import torch

from moba_dist.kernels.blocks import BlockLayout
from moba_dist.parallel.plan import build_ownership
from moba_dist.parallel.requests import (
    compact,
    keys_from_positions,
    needed_maxpos,
    query_runs,
    ranges,
    rows_total,
    rows_upto,
)

CPU = torch.device("cpu")
CU = torch.tensor([0, 6, 10], dtype=torch.int32)  # sequences of 6 and 4 tokens
BLOCKS = BlockLayout.build(CU, 2)  # blocks [0,2) [2,4) [4,6) | [6,8) [8,10)


def test_contiguous_ownership():
    own = build_ownership(CU, 1, 2, "contiguous", CPU)
    assert own.owner.tolist() == [0] * 5 + [1] * 5
    assert own.local_index.tolist() == [0, 1, 2, 3, 4] * 2
    assert own.positions.tolist() == [5, 6, 7, 8, 9]
    assert own.all_positions.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def test_zigzag_ownership():
    # Sequences of 4 and 8 over 2 ranks: chunks of 1 and 2 tokens; rank r holds chunks r, 3-r.
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)
    own = build_ownership(cu, 0, 2, "zigzag", CPU)
    assert own.positions.tolist() == [0, 3, 4, 5, 10, 11]
    assert own.owner.tolist() == [0, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 0]
    assert own.local_index.tolist() == [0, 0, 1, 1, 2, 3, 2, 3, 4, 5, 4, 5]
    assert own.all_positions[1].tolist() == [1, 2, 6, 7, 8, 9]


def test_empty_sequence_owns_nothing():
    # A repeated offset (empty sequence) changes no ownership and adds no block.
    cu = torch.tensor([0, 6, 6, 10], dtype=torch.int32)
    own = build_ownership(cu, 1, 2, "contiguous", CPU)
    assert own.positions.tolist() == [5, 6, 7, 8, 9]
    blocks = BlockLayout.build(cu, 2)
    assert blocks.block_starts.tolist() == BLOCKS.block_starts.tolist()


def test_query_runs():
    # Rank 1's positions 5..9 lie in blocks 2, 3, 3, 4, 4: three runs.
    run, last = query_runs(Q_POS, BLOCKS.token_block[Q_POS])
    assert run.tolist() == [0, 1, 1, 2, 2]
    assert last.tolist() == [5, 7, 9]


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
# need[block, kv head], worked out from SEL by hand: the last position of the last run of one
# block's queries that selected it (block 3 head 0 is chosen by position 8 of the run 8..9,
# hence 9: the same rows as 8, since the whole of block 3 lies before it); -1: not needed.
WANT = [[5, -1], [-1, 5], [5, 5], [9, 9], [9, 9]]


def test_needed_maxpos_by_hand():
    run, last = query_runs(Q_POS, BLOCKS.token_block[Q_POS])
    assert needed_maxpos(SEL, run, last, 2, BLOCKS.num_blocks).tolist() == WANT


def test_needed_maxpos_brute_force():
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 23, 40], dtype=torch.int32)
    blocks = BlockLayout.build(cu, 3)
    q_pos = torch.arange(7, 33)
    q_block = blocks.token_block[q_pos]
    hq, hkv, k = 6, 3, 3
    sel = torch.randint(-1, blocks.num_blocks, (q_pos.numel(), hq, k), generator=g)
    sel[:, :, 0] = q_block.view(-1, 1)  # every query selects its own block
    want = torch.full((blocks.num_blocks, hkv), -1)
    for t in range(q_pos.numel()):
        for h in range(hq):
            for j in sel[t, h].tolist():
                if j >= 0:
                    gh = h // (hq // hkv)
                    want[j, gh] = max(int(want[j, gh]), int(q_pos[t]))
    run, last = query_runs(q_pos, q_block)
    got = needed_maxpos(sel, run, last, hkv, blocks.num_blocks)
    # Same (block, head) pairs, and each names the same rows (maxpos may lie further past a
    # fully needed past block, never elsewhere).
    assert (got >= 0).tolist() == (want >= 0).tolist()
    assert rows_total(got, blocks).tolist() == rows_total(want, blocks).tolist()


def test_needed_maxpos_without_queries():
    run, last = query_runs(Q_POS[:0], Q_POS[:0])
    got = needed_maxpos(SEL[:0], run, last, 2, BLOCKS.num_blocks)
    assert got.tolist() == [[-1, -1]] * BLOCKS.num_blocks


def test_rows_total_by_hand():
    # Block 2 = [4, 6) up to 5: 2 rows; block 3 = [6, 8) up to 6: 1 row; -1: none.
    need = torch.tensor([[-1, -1], [-1, -1], [5, 4], [6, -1], [-1, 99]])
    assert rows_total(need, BLOCKS).tolist() == [[0, 0], [0, 0], [2, 1], [1, 0], [0, 2]]


def test_rows_upto_by_hand():
    # Contiguous over 2 ranks: rank 0 holds 0..4, rank 1 holds 5..9.
    own = build_ownership(CU, 0, 2, "contiguous", CPU)
    bounds = torch.searchsorted(own.all_positions, BLOCKS.block_starts.expand(2, -1).contiguous())
    lo, hi = bounds[:, :-1], bounds[:, 1:]
    need = torch.tensor([[-1, -1], [-1, -1], [5, 4], [6, -1], [-1, 99]])
    start, length = rows_upto(own.all_positions[0], lo[0], hi[0], need)
    # Rank 0's rows of block 2 = {4}: local row 4 for both heads; nothing else of blocks 3, 4.
    assert length.tolist() == [[0, 0], [0, 0], [1, 1], [0, 0], [0, 0]]
    assert start[2].tolist() == [4, 4]
    start, length = rows_upto(own.all_positions[1], lo[1], hi[1], need)
    # Rank 1: block 2 up to 5 = {5} (local row 0); block 3 up to 6 = {6} (row 1); block 4 = rows
    # 3, 4 for head 1.
    assert length.tolist() == [[0, 0], [0, 0], [1, 0], [1, 0], [0, 2]]
    assert (start[2, 0], start[3, 0], start[4, 1]) == (0, 1, 3)


def test_rows_upto_brute_force():
    # Every (owner, requester, block, head) of a zigzag batch over 3 ranks, random needs.
    cu = torch.tensor([0, 12, 36, 42], dtype=torch.int32)
    world, hkv = 3, 2
    blocks = BlockLayout.build(cu, 5)
    own = build_ownership(cu, 0, world, "zigzag", CPU)
    starts = blocks.block_starts.expand(world, -1).contiguous()
    bounds = torch.searchsorted(own.all_positions, starts)
    lo, hi = bounds[:, :-1], bounds[:, 1:]
    g = torch.Generator().manual_seed(1)
    need = torch.randint(-1, 42, (world, blocks.num_blocks, hkv), generator=g)
    for o in range(world):
        batched = rows_upto(own.all_positions, lo, hi, need[o].expand_as(need))
        start, length = rows_upto(own.all_positions[o], lo[o], hi[o], need)
        # The owner's view (its rows for every requester) equals the requesters' view.
        assert torch.equal(batched[1][o], length[o])
        for r in range(world):
            for j in range(blocks.num_blocks):
                for h in range(hkv):
                    b0, b1 = blocks.block_starts[j : j + 2].tolist()
                    want = [int(own.local_index[p]) for p in range(b0, b1)
                            if own.owner[p] == o and p <= need[r, j, h]]  # fmt: skip
                    s, n = int(start[r, j, h]), int(length[r, j, h])
                    assert list(range(s, s + n)) == want, (o, r, j, h)


def test_ranges_and_compact():
    got = ranges(torch.tensor([3, 0, 7]), torch.tensor([2, 0, 3]), 5)
    assert got.tolist() == [3, 4, 7, 8, 9]
    mask = torch.tensor([False, True, True, False, True])
    assert compact(mask, 3).tolist() == [1, 2, 4]
    assert compact(mask, 0).numel() == 0


def test_keys_from_positions():
    keys = keys_from_positions(torch.tensor([1, 4, 5, 9]), BLOCKS)
    # Block j's rows are block_rows[j]:block_rows[j+1] of the key set.
    assert keys.block_rows.tolist() == [0, 1, 1, 3, 3, 4]
    assert keys.k_pos.tolist() == [1, 4, 5, 9]
