"""``strategy="auto"`` on gloo: one decision on every rank, the cost model's, and the right output.

The runtime prices selective, allgather and streamed with ``parallel.cost_model`` from the
all-gathered union fractions. Each rank here rebuilds that prediction independently with
``cost_model.auto_choice`` from every rank's reported ``union_fraction`` and the call's shape, and
asserts that ``last_stats`` took its answer and reports its table. At these sizes the bytes are
tiny, so the model takes ``allgather`` (two fewer collectives, ~60 us of latency, outweigh a few
KiB); a fetch limit below allgather's fetched K/V but above selective's makes a concentrated
gate take ``selective``, and one below both forces ``streamed``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from cp_cases import make_inputs, reference, seq_lens
from dist_utils import run_world

from moba_dist.parallel import cost_model, moba_cp_attn_varlen, shard

pytestmark = pytest.mark.dist

# Float64 end to end: every strategy differs from the single-device op only in summation order
# (partial centroids, LSE merges, dK/dV partials), so 1e-9 is far above rounding and far below a
# misplaced or missing row (as in test_cp_streamed.py).
TOL = dict(atol=1e-9, rtol=1e-9)
HQ, HKV, D, BLOCK, TOPK = 4, 2, 8, 4, 2
CANDIDATES = ("selective", "allgather", "streamed")


def global_inputs(world: int, gate: str):
    """``uniform``: i.i.d. Gaussian; ``concentrated``: every query's one past choice (K = 2) is
    its sequence's first block (positive queries, that block's keys all 5: no near-ties)."""
    lens = seq_lens(world, "contiguous")
    q, k, v, dout, cu = make_inputs(lens, HQ, HKV, D, seed=world)
    if gate == "concentrated":
        q = q.abs()
        for s in cu[:-1].tolist():
            k[s : s + BLOCK] = 5.0
    return q, k, v, dout, cu


def run_auto(rank, world, inputs, **kw):
    """One auto call with backward; checks out, lse, dq, dk, dv against the single-device op and
    returns its stats."""
    q, k, v, dout, cu = inputs
    sh = dict(rank=rank, world_size=world)
    lq, lk, lv = (shard(x, cu, **sh).clone().requires_grad_() for x in (q, k, v))
    stats: dict = {}
    out, lse = moba_cp_attn_varlen(
        lq, lk, lv, cu, moba_chunk_size=BLOCK, moba_topk=TOPK, strategy="auto",
        return_lse=True, backend="reference", stats=stats, **kw,
    )  # fmt: skip
    out.backward(shard(dout, cu, **sh))
    want = reference(q, k, v, dout, cu, BLOCK, TOPK)
    got = [out, lse, lq.grad, lk.grad, lv.grad]
    for i, (name, a, b) in enumerate(zip(["out", "lse", "dq", "dk", "dv"], got, want, strict=True)):
        tol = dict(atol=1e-6, rtol=1e-6) if name == "lse" else TOL  # lse is float32 by contract
        ctx = f"{name} rank {rank}/{world} auto -> {stats['strategy']}"
        b = shard(b, cu, **sh, dim=1 if i == 1 else 0)
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m, c=ctx: f"{c}: {m}")
    return stats


def check_against_model(world, inputs, stats, limit, keep_fetched=False) -> str:
    """Every rank took the same strategy, the one ``cost_model.auto_choice`` predicts from the
    same inputs, and reports its every candidate's summary."""
    every: list = [None] * world
    dist.all_gather_object(every, (stats["strategy"], stats["union_fraction"]))
    assert len({s for s, _ in every}) == 1, every
    shape = cost_model.Shape(inputs[4][-1].item(), world, HQ, HKV, D, elem=8, block=BLOCK)
    names = CANDIDATES[:2] if keep_fetched else CANDIDATES
    taken, table = cost_model.auto_choice(
        shape, [u for _, u in every], cost_model.Links(), keep_fetched=keep_fetched,
        candidates=names, fetch_limit=limit,
    )  # fmt: skip
    assert stats["strategy"] == taken, (stats["strategy"], taken, table)
    assert stats["auto_costs"] == table
    assert stats["union_fraction_max"] == max(u for _, u in every)
    return taken


def _auto_worker(rank, world):
    cpu_default = 1 << 30  # strategies.auto_fetch_limit on CPU without max_fetch_bytes
    for gate in ("uniform", "concentrated"):
        inputs = global_inputs(world, gate)
        stats = run_auto(rank, world, inputs)
        # A few KiB each: latency decides, and allgather has the fewer collectives.
        assert check_against_model(world, inputs, stats, cpu_default) == "allgather"
        remote = {n: c["remote_bytes"] for n, c in stats["auto_costs"].items()}
        assert remote["selective"] < remote["allgather"], remote
        if gate == "concentrated":  # allgather no longer fits, selective does
            limit = int(remote["selective"] + remote["allgather"]) // 2
            stats = run_auto(rank, world, inputs, max_fetch_bytes=limit)
            assert check_against_model(world, inputs, stats, limit) == "selective"
        # Below everything but streamed's own budget: streamed, in pieces.
        limit = max(1, int(remote["selective"]) // 3)
        stats = run_auto(rank, world, inputs, max_fetch_bytes=limit)
        assert check_against_model(world, inputs, stats, limit) == "streamed"
        assert stats["pieces"] > world - 1 and stats["max_piece_bytes"] <= limit, stats
        # keep_fetched refuses streamed: nothing fits, so the least memory (selective).
        stats = run_auto(rank, world, inputs, max_fetch_bytes=limit, keep_fetched=True)
        assert check_against_model(world, inputs, stats, limit, keep_fetched=True) == "selective"


@pytest.mark.parametrize("world", [2, 3], ids=lambda w: f"world{w}")
def test_auto_follows_the_cost_model(world):
    run_world(world, _auto_worker)


def test_auto_costs_are_lazy_host_objects():
    """The runtime's prediction needs no device and no collective: the union fractions, the
    shape and the limit decide it (and the same inputs give the same answer)."""
    shape = cost_model.Shape(tokens=96, world=3, hq=4, hkv=2, head_dim=8, elem=8, block=4)
    args = (shape, [0.2, 0.9, 0.5], cost_model.Links(), False, CANDIDATES, 1 << 30)
    first = cost_model.auto_costs(*args)
    assert list(first) == list(CANDIDATES)
    assert cost_model.choose(first, fetch_limit=1 << 30) == "allgather"
    assert {n: c.summary() for n, c in first.items()} == {
        n: c.summary() for n, c in cost_model.auto_costs(*args).items()
    }
    with pytest.raises(ValueError, match="needs a fetch_limit"):
        cost_model.auto_costs(shape, [0.0] * 3, candidates=("streamed",))


def test_runtime_prices_equal_inputs_once():
    """Pricing is ~1 ms of host work per layer call: equal values (same shape, fractions, limit)
    are priced once, and the memo's answer is the cost model's."""
    from moba_dist.parallel import strategies

    shape = cost_model.Shape(tokens=96, world=3, hq=4, hkv=2, head_dim=8, elem=8, block=4)
    fractions, limit = (1.0, 1.0, 0.75), 1 << 30
    strategies._priced.cache_clear()
    first = strategies._priced(shape, fractions, False, limit)
    again = strategies._priced(shape, fractions, False, limit)
    assert strategies._priced.cache_info().hits == 1 and again is first
    want = cost_model.auto_costs(shape, list(fractions), strategies.AUTO_LINKS, False,
                                 ("selective", "allgather", "streamed"), limit)  # fmt: skip
    assert first[0] == cost_model.choose(want, fetch_limit=limit)
    summaries = {n: c.summary() for n, c in first[1].items()}
    assert summaries == {n: c.summary() for n, c in want.items()}
