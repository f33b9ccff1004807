"""Traffic model of context-parallel MoBA (``moba_dist.parallel``): expected K/V rows per rank.

Accounting (what ``MoBAContextParallel.last_stats`` counts). Rank r holds the rows ``held[r, j]``
of block j (its queries there) and requests, per KV head g, every block j that one of its local
queries of group g selected as a *past* block (slots 1.. of ``sel``): all remote rows of j,
``len_j - held[r, j]``. A block holding local queries but not selected that way is still
requested as the own block: its remote rows at positions <= the last local query in it
(``pre[r, j]``, the causal prefix held by other ranks). With ``u[g, r, j]`` the probability
that group g of rank r selects j as a past block, the rows rank r receives are

    rows_r = sum_g sum_j  u[g,r,j] * (len_j - held[r,j]) + (1 - u[g,r,j]) * pre[r,j]

and ``union_fraction_r = rows_r / ((T - T_local) * Hkv)``. ``u`` in {0, 1} (read from a real
routing) makes this the exact count; a routing model makes it an expectation. Bytes, times and
memory of every strategy follow from these rows in the library's cost model
(``moba_dist.parallel.cost_model``, the one source of truth that ``project_cp.py`` uses).

Routing model. Query (t, h) in block c picks ``k_c = min(K - 1, #candidates_c)`` of its
candidates (the strictly-past blocks of its sequence) with inclusion probabilities proportional
to block popularity w_j, capped at 1 (water filling: the largest weights saturate at 1 and the
rest share what remains of k_c in proportion to w; zero-weight candidates only take what the
positive ones cannot). Choices of different (query, head) pairs are independent given w, so

    u[g, r, j] = 1 - prod_{c} (1 - p[c, j]) ** (G * held[r, c]),   G = Hq / Hkv,

computed as ``1 - exp(G * held @ log(1 - p))``. Popularity is Zipf: ``w_j = (rank_j + 1) **
-alpha`` with rank_j the block's popularity rank inside its sequence (``index`` order: early
blocks most popular, sink-like); alpha = 0 is uniform-random routing (the worst case), alpha =
inf makes every query take the k_c most popular candidates (every rank agrees: the best case).
The model is exact whenever every p is 0 or 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LAYOUTS = ("contiguous", "zigzag")
_TINY = 1e-300  # log(1 - p) floor: p = 1 gives u = 1 exactly in float64


@dataclass(frozen=True)
class Geometry:
    """Blocks of a packed batch and who holds which rows; no per-token arrays except on demand.

    ``N`` blocks, ``P`` ranks. Positions are global token indices of the packed stream.
    """

    seq_lens: tuple[int, ...]
    block: int
    world: int
    layout: str
    block_start: np.ndarray  # [N + 1] int64, first token of each block; the last entry is T
    seq_first: np.ndarray  # [N] int64, first block id of the block's sequence
    held: np.ndarray  # [P, N] float64, rows of block j on rank r (= its queries there)
    last: np.ndarray  # [P, N] int64, last position rank r holds in block j, -1 if none
    pieces: np.ndarray  # [n, 4] int64 (block, rank, start, end): one rank's run inside one block
    pairs: np.ndarray  # [m, 4] int64 (requester, owner, block, rows): own-block prefix rows

    @property
    def tokens(self) -> int:
        return int(self.block_start[-1])

    @property
    def num_blocks(self) -> int:
        return self.seq_first.size

    @property
    def local_tokens(self) -> int:
        return self.tokens // self.world

    @property
    def block_len(self) -> np.ndarray:
        """``[N]`` rows per block (only a sequence's last block may be shorter than B)."""
        return np.diff(self.block_start)

    def candidates(self) -> np.ndarray:
        """``[N]`` number of strictly-past blocks of the same sequence."""
        return np.arange(self.num_blocks) - self.seq_first

    def token_owner(self) -> np.ndarray:
        """``[T]`` int64 rank holding each token (materialises T entries: small T only)."""
        lengths = self.pieces[:, 3] - self.pieces[:, 2]
        order = np.argsort(self.pieces[:, 2], kind="stable")
        return np.repeat(self.pieces[order, 1], lengths[order])


def _rank_intervals(lens: np.ndarray, world: int, layout: str):
    """Token intervals ``[a, b)`` of every rank: (rank, a, b) int64 arrays."""
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    if layout == "contiguous":
        tl = int(lens.sum()) // world
        r = np.arange(world)
        return r, r * tl, (r + 1) * tl
    chunk = lens // (2 * world)
    r = np.repeat(np.arange(world), 2 * lens.size)
    which = np.tile(np.repeat([[0, 1]], lens.size, 0).T.reshape(-1), world)  # 0: early chunk
    s = np.tile(np.tile(np.arange(lens.size), 2), world)
    idx = np.where(which == 0, r, 2 * world - 1 - r)
    a = starts[s] + idx * chunk[s]
    return r, a, a + chunk[s]


def _check(lens: np.ndarray, block: int, world: int, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if block < 1 or world < 1 or lens.size == 0 or (lens < 1).any():
        raise ValueError(f"need block >= 1, world >= 1, lengths >= 1; got {block}, {world}")
    if layout == "contiguous" and lens.sum() % world:
        raise ValueError(f"contiguous needs T % world == 0, got T={lens.sum()}, P={world}")
    if layout == "zigzag" and (lens % (2 * world)).any():
        raise ValueError(f"zigzag needs every sequence length % {2 * world} == 0, got {lens}")


def build_geometry(seq_lens, block: int, world: int, layout: str) -> Geometry:
    """Blocks (B = ``block``) of the packed sequences ``seq_lens`` split over ``world`` ranks."""
    lens = np.asarray(seq_lens, dtype=np.int64).reshape(-1)
    _check(lens, block, world, layout)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    nb = (lens + block - 1) // block
    seq_of = np.repeat(np.arange(lens.size), nb)
    first = np.concatenate([[0], np.cumsum(nb)[:-1]])
    bs = starts[seq_of] + (np.arange(nb.sum()) - first[seq_of]) * block
    block_start = np.concatenate([bs, [lens.sum()]])
    rank, a, b = _rank_intervals(lens, world, layout)
    ja = np.searchsorted(block_start, a, "right") - 1
    cnt = np.searchsorted(block_start, b - 1, "right") - ja
    blk = _ranges(ja, cnt)
    lo = np.maximum(block_start[blk], np.repeat(a, cnt))
    hi = np.minimum(block_start[blk + 1], np.repeat(b, cnt))
    pieces = np.stack([blk, np.repeat(rank, cnt), lo, hi], 1)
    pieces = pieces[np.lexsort((pieces[:, 2], pieces[:, 0]))]
    n = nb.sum()
    held = np.zeros((world, n))
    np.add.at(held, (pieces[:, 1], pieces[:, 0]), pieces[:, 3] - pieces[:, 2])
    last = np.full((world, n), -1, dtype=np.int64)
    np.maximum.at(last, (pieces[:, 1], pieces[:, 0]), pieces[:, 3] - 1)
    pairs = _prefix_pairs(pieces, held, last, n)
    return Geometry(tuple(int(x) for x in lens), block, world, layout, block_start,
                    first[seq_of], held, last, pieces, pairs)  # fmt: skip


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``[starts[i], starts[i] + counts[i])`` as int64 ``[sum(counts)]``."""
    offsets = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    return np.arange(int(counts.sum()), dtype=np.int64) + offsets


def _prefix_pairs(pieces, held, last, n) -> np.ndarray:
    """For every rank r with queries in block j and every other rank's run in j: the rows of that
    run at positions <= last[r, j] (the own-block causal prefix r fetches when j is not a
    selected past block). ``[m, 4]`` (requester, owner, block, rows), rows > 0."""
    first_piece = np.searchsorted(pieces[:, 0], np.arange(n + 1))
    req, blk = np.nonzero(held > 0)
    cnt = first_piece[blk + 1] - first_piece[blk]
    e = np.repeat(np.arange(req.size), cnt)
    pi = _ranges(first_piece[blk], cnt)
    p = pieces[pi]
    rows = np.clip(np.minimum(p[:, 3], last[req[e], blk[e]] + 1) - p[:, 2], 0, None)
    keep = (p[:, 1] != req[e]) & (rows > 0)
    return np.stack([req[e], p[:, 1], blk[e], rows], 1)[keep]


def rows_matrix(geom: Geometry, u: np.ndarray) -> np.ndarray:
    """Expected (row, KV head) pairs moved by the selective fetch, ``[P, P]`` float64:
    ``M[r, o]`` rows rank r receives from owner o, summed over heads. ``u [Hkv, P, N]``."""
    full = np.einsum("grj,oj->ro", u, geom.held)
    np.fill_diagonal(full, 0.0)
    req, own, blk, rows = geom.pairs.T
    not_full = (1.0 - u).sum(0)  # [P, N] heads that fetch only the prefix
    np.add.at(full, (req, own), not_full[req, blk] * rows)
    return full


def exact_union(sel: np.ndarray, geom: Geometry, hkv: int) -> np.ndarray:
    """``u [Hkv, P, N]`` in {0, 1} read from a routing ``sel [T, Hq, K]`` of global block ids."""
    t, h, s = np.nonzero(sel[:, :, 1:] >= 0)
    u = np.zeros((hkv, geom.world, geom.num_blocks))
    u[h // (sel.shape[1] // hkv), geom.token_owner()[t], sel[t, h, s + 1]] = 1.0
    return u


def _water_fill(w: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """Capped proportional probabilities: ``w [C, N] >= 0`` (0 off the candidates) and
    ``budget [C]`` -> ``p [C, N]`` with p <= 1, p proportional to w below the cap."""
    capped = np.zeros(w.shape, dtype=bool)
    scale = np.zeros(w.shape[0])
    for _ in range(int(budget.max(initial=0)) + 1):
        free = np.where(capped, 0.0, w)
        tot, rest = free.sum(1), budget - capped.sum(1)
        scale = np.divide(rest, tot, out=np.zeros_like(tot), where=tot > 0)
        new = (free * scale[:, None] >= 1.0) & (free > 0)
        if not new.any():
            break
        capped |= new
    return np.where(capped, 1.0, np.minimum(1.0, np.where(capped, 0.0, w) * scale[:, None]))


def _candidate_mask(seq_first: np.ndarray) -> np.ndarray:
    idx = np.arange(seq_first.size)
    return (idx[None, :] >= seq_first[:, None]) & (idx[None, :] < idx[:, None])


def inclusion_probs(weights: np.ndarray, seq_first: np.ndarray, topk: int) -> np.ndarray:
    """``p [N, N]``: probability that one (query, head) of block c selects past block j, from
    finite popularity ``weights [N] >= 0`` (water filling, see the module doc)."""
    cand = _candidate_mask(seq_first)
    budget = np.minimum(topk - 1, cand.sum(1)).astype(np.float64)
    w = np.where(cand, weights[None, :], 0.0)
    p = _water_fill(w, budget)
    left = budget - p.sum(1)
    zero = cand & (w == 0)
    nzero = zero.sum(1)
    share = np.divide(left, nzero, out=np.zeros_like(left), where=nzero > 0)
    return p + np.where(zero & (left > 1e-12)[:, None], share[:, None], 0.0)


def top_probs(rank: np.ndarray, seq_first: np.ndarray, topk: int) -> np.ndarray:
    """The alpha = inf limit: ``p [N, N]`` is 1 for the k_c best-ranked candidates of block c
    (``rank [N]``, 0 = most popular; ties to the lower block id), else 0."""
    cand = _candidate_mask(seq_first)
    budget = np.minimum(topk - 1, cand.sum(1))
    order = np.lexsort((np.arange(rank.size), rank))
    in_order = cand[:, order]
    chosen = in_order & (np.cumsum(in_order, 1) <= budget[:, None])
    p = np.zeros(cand.shape)
    p[:, order] = chosen
    return p


def route_probs(rank: np.ndarray, seq_first: np.ndarray, topk: int, alpha: float) -> np.ndarray:
    """Zipf routing model: ``p [N, N]`` for popularity ``w = (rank + 1) ** -alpha``."""
    if math.isinf(alpha):
        return top_probs(rank, seq_first, topk)
    return inclusion_probs((rank + 1.0) ** (-alpha), seq_first, topk)


def model_union(p: np.ndarray, geom: Geometry, group: int) -> np.ndarray:
    """``u [P, N]`` for one KV head: 1 - prod_c (1 - p[c, j]) ** (group * held[r, c])."""
    log1m = np.log(np.clip(1.0 - p, _TINY, 1.0))
    return 1.0 - np.exp(group * (geom.held @ log1m))


def index_rank(geom: Geometry) -> np.ndarray:
    """Popularity rank = block index inside its sequence (early blocks most popular)."""
    return np.arange(geom.num_blocks) - geom.seq_first


def rank_keys(geom: Geometry, topk: int) -> dict[str, np.ndarray]:
    """Per-rank work, ``[P]`` float64 each: ``moba`` keys attended summed over local queries
    (docs/semantics.md density formula), ``own`` the own-block causal part of it, ``dense``
    the causal keys of full attention, ``gate`` the candidate blocks scored."""
    blk, rank, s, e = geom.pieces.T
    bs = geom.block_start[blk]
    seq0 = geom.block_start[geom.seq_first[blk]]

    def tri(lo, hi):  # sum of (t - base + 1) for t in [lo, hi) with base folded in
        return (hi * (hi + 1) - lo * (lo + 1)) / 2.0

    past = geom.candidates()[blk]
    per = {
        "own": tri(s - bs, e - bs),
        "past": (e - s) * np.minimum(topk - 1, past) * float(geom.block),
        "dense": tri(s - seq0, e - seq0),
        "gate": (e - s) * past.astype(np.float64),
    }
    out = {k: np.bincount(rank, v, minlength=geom.world) for k, v in per.items()}
    out["moba"] = out["own"] + out["past"]
    return out


def local_key_share(geom: Geometry, p: np.ndarray, topk: int) -> np.ndarray:
    """``[P]`` expected share of a rank's attended keys that it holds itself: the part of the
    attention that can run while remote rows are in flight. Own blocks count as local."""
    keys = rank_keys(geom, topk)
    picks = geom.held @ p  # [P, N] expected past selections of block j per head
    local_past = (picks * geom.held).sum(1)
    return (keys["own"] + local_past) / np.maximum(keys["moba"], 1.0)


def pair_counts(sel: np.ndarray, geom: Geometry, group: int = 1) -> np.ndarray:
    """Selections ``[Hq / group, N, N]`` (c, j): how often a (query of block c, head of the
    pooled set) picked past block j, from ``sel [T, Hq, K]`` (consecutive heads pooled)."""
    n = geom.num_blocks
    t, h, s = np.nonzero(sel[:, :, 1:] >= 0)
    c = np.searchsorted(geom.block_start, t, "right") - 1
    flat = ((h // group) * n + c) * n + sel[t, h, s + 1]
    sets = sel.shape[1] // group
    return np.bincount(flat, minlength=sets * n * n).reshape(sets, n, n).astype(np.float64)


def _expected_picks(p: np.ndarray, geom: Geometry, group: int) -> np.ndarray:
    """``[N]`` selections of block j predicted by ``p [N, N]`` (every token is a query)."""
    return group * (geom.block_len.astype(np.float64) @ p)


def _scaling_step(lw, counts, geom, topk, group):
    """One multiplicative scaling step on log-weights of the selected blocks (``counts > 0``):
    ``w_j *= counts_j / predicted_j``. Returns the next log-weights and the residual."""
    pos = counts > 0
    w = np.zeros(counts.size)
    w[pos] = np.exp(lw - lw.max())
    pred = _expected_picks(inclusion_probs(w, geom.seq_first, topk), geom, group)[pos]
    resid = float(np.abs(pred - counts[pos]).max() / counts.max())
    return lw + np.log(counts[pos] / np.maximum(pred, 1e-300)), resid


def fit_block_weights(
    counts: np.ndarray, geom: Geometry, topk: int, group: int, iters: int = 300
) -> np.ndarray:
    """Popularity ``w [N]`` whose water-filled probabilities reproduce the measured per-block
    selection counts ``counts [N]`` (selections by ``group`` heads, every token a query).

    A multiplicative fixed point (iterative scaling), accelerated with SQUAREM (squared
    extrapolation, Varadhan & Roland 2008): strongly concentrated routings push the weights of
    rarely picked blocks towards 0, where plain scaling converges only like 1/iterations."""
    pos = counts > 0
    lw = np.log(counts[pos].astype(np.float64))
    for _ in range(iters if pos.any() else 0):
        x1, _ = _scaling_step(lw, counts, geom, topk, group)
        x2, _ = _scaling_step(x1, counts, geom, topk, group)
        r, v = x1 - lw, x2 - 2.0 * x1 + lw
        step = min(-float(np.linalg.norm(r) / max(np.linalg.norm(v), 1e-300)), -1.0)
        lw, resid = _scaling_step(lw - 2.0 * step * r + step * step * v, counts, geom, topk, group)
        if resid < 1e-7:
            break
    w = np.zeros(counts.size)
    if pos.any():
        w[pos] = np.exp(lw - lw.max())
    return w


def popularity_rank(counts: np.ndarray, geom: Geometry, topk: int) -> np.ndarray:
    """``[N]`` popularity rank of each block inside its sequence (0 = most popular): blocks
    ordered by selections per selection expected under uniform routing, ties to lower ids."""
    uniform = _expected_picks(inclusion_probs(np.ones(geom.num_blocks), geom.seq_first, topk),
                              geom, 1)  # fmt: skip
    rate = np.divide(counts, uniform, out=np.zeros_like(uniform), where=uniform > 0)
    order = np.lexsort((np.arange(rate.size), -rate, geom.seq_first))
    pos = np.empty(rate.size, dtype=np.int64)
    pos[order] = np.arange(rate.size)
    # seq_first is the primary sort key, so sequence s fills positions from its first block id.
    return pos - geom.seq_first


def _loglik(pc: np.ndarray, geom: Geometry, rank: np.ndarray, topk: int, alpha: float) -> float:
    """Composite log-likelihood of pair counts ``pc [N, N]`` under the Zipf model at alpha."""
    p = route_probs(rank, geom.seq_first, topk, alpha)
    k = np.maximum(p.sum(1, keepdims=True), 1e-300)
    return float((pc * np.log(np.maximum(p / k, 1e-12))).sum())


def fit_alpha(pc: np.ndarray, geom: Geometry, topk: int, hi: float = 8.0) -> float:
    """Zipf exponent maximising the likelihood of the measured pair counts ``pc [N, N]``, with
    blocks ranked by measured popularity; ``inf`` when the top-k rule fits best."""
    rank = popularity_rank(pc.sum(0), geom, topk)
    grid = np.linspace(0.0, hi, 17)
    ll = [_loglik(pc, geom, rank, topk, a) for a in grid]
    i = int(np.argmax(ll))
    if i == grid.size - 1 and _loglik(pc, geom, rank, topk, math.inf) >= ll[-1]:
        return math.inf
    lo, up = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    g = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(20):  # golden section on the bracket around the grid maximum
        a, b = up - g * (up - lo), lo + g * (up - lo)
        if _loglik(pc, geom, rank, topk, a) >= _loglik(pc, geom, rank, topk, b):
            up = b
        else:
            lo = a
    return (lo + up) / 2.0


def predict_union(sel: np.ndarray, geom: Geometry, hkv: int, topk: int, level: str) -> np.ndarray:
    """``u [Hkv, P, N]`` for a routing ``sel [T, Hq, K]`` at one level of summary: ``exact``
    (the routing itself), ``block`` (per-block selection counts of each KV head's query heads,
    fitted popularity), ``zipf`` (one alpha fitted to the counts pooled over heads)."""
    group = sel.shape[1] // hkv
    if level == "exact":
        return exact_union(sel, geom, hkv)
    if level == "block":
        counts = pair_counts(sel, geom, group).sum(1)  # [Hkv, N]
        probs = [inclusion_probs(fit_block_weights(c, geom, topk, group), geom.seq_first, topk)
                 for c in counts]  # fmt: skip
        return np.stack([model_union(p, geom, group) for p in probs])
    if level == "zipf":
        pooled = pair_counts(sel, geom, sel.shape[1])[0]
        rank = popularity_rank(pooled.sum(0), geom, topk)
        p = route_probs(rank, geom.seq_first, topk, fit_alpha(pooled, geom, topk))
        return np.repeat(model_union(p, geom, group)[None], hkv, 0)
    raise ValueError(f"level must be exact, block or zipf; got {level!r}")


def routing_alphas(path: str, heads_per_group: int = 1) -> list[float]:
    """Fitted alpha per (MoBA layer, pooled head set) of a saved routing (see
    :func:`concentration_from_routing`)."""
    import torch  # only here: the model itself is numpy

    blob = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("cu_seqlens", "block", "topk", "sel"):
        if key not in blob:
            raise ValueError(f"{path}: routing file lacks {key!r} (has {sorted(blob)})")
    cu = blob["cu_seqlens"].to(torch.int64).numpy()
    geom = build_geometry(np.diff(cu), int(blob["block"]), 1, "contiguous")
    out = []
    for sel in blob["sel"]:
        sel = sel.numpy().astype(np.int64)
        if sel.shape[0] != geom.tokens or sel.shape[1] % heads_per_group:
            raise ValueError(f"{path}: sel {tuple(sel.shape)} does not fit T={geom.tokens}, "
                             f"heads_per_group={heads_per_group}")  # fmt: skip
        out += [
            fit_alpha(pc, geom, int(blob["topk"])) for pc in pair_counts(sel, geom, heads_per_group)
        ]
    return out


def concentration_from_routing(path: str, heads_per_group: int = 1) -> float:
    """Concentration alpha of a trained model: the median over MoBA layers and heads of the
    Zipf exponent fitted to the measured per-block selection frequencies of ``routing.pt``
    (``cu_seqlens`` int32, ``block``, ``topk``, ``sel``: one ``[T, Hq, K]`` int32 per layer)."""
    return float(np.median(routing_alphas(path, heads_per_group)))
