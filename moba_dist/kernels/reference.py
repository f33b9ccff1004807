"""Pure-PyTorch routed attention: the CPU path and the test oracle of the fast kernels.

"Routed" attention is the one primitive every backend implements. Queries carry their global
token positions, keys carry theirs, and the routing ``sel [Tq, Hq, K]`` names the global blocks
each (query, head) attends to. Query t attends to every key of a selected block whose position is
<= its own: that is the own block's token-level causal mask and a no-op for past blocks. The key
set may be any subset of the stream sorted by position (a whole packed batch, or one CP rank's
local rows, or rows fetched from other ranks); a selected block with no rows in it contributes
nothing, and a query with no keys at all gets ``out = 0`` and ``lse = -inf``.

The loop runs over (block, KV head) groups: each group is one small dense product of the queries
that chose that block with the block's keys, so memory is O(T * H * K + one group) and no
``[T, T]`` matrix ever exists. Accumulation is float32 (float64 for float64 inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moba_dist.kernels.plan_types import RoutedKeys, RoutedProblem

__all__ = ["group_selections", "reference_routed_bwd", "reference_routed_fwd"]


@dataclass(frozen=True)
class _Groups:
    """Selections sorted by (block, KV head): ``th[off[i]:off[i+1]]`` are the flat (t * Hq + h)
    indices of group i = block * Hkv + kv_head. ``live`` lists the non-empty groups (host ints)."""

    th: torch.Tensor
    off: list[int]
    live: list[int]


def group_selections(sel: torch.Tensor, num_blocks: int, hkv: int) -> _Groups:
    """Sort the valid entries of ``sel [Tq, Hq, K]`` by (block, KV head); one host sync."""
    hq, k = sel.shape[1:]
    flat = sel.reshape(-1).to(torch.int64)
    idx = (flat >= 0).nonzero().squeeze(1)
    th = idx // k
    kv_head = (th % hq) // (hq // hkv)
    key = flat[idx] * hkv + kv_head
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num_blocks * hkv)
    off = [0, *torch.cumsum(counts, 0).tolist()]
    live = [i for i in range(num_blocks * hkv) if off[i + 1] > off[i]]
    return _Groups(th=th[order], off=off, live=live)


def _group_scores(qs, ks, qpos, kpos, scale):
    """Scaled scores ``[n, L]`` with keys after the query masked to -inf."""
    s = (qs @ ks.transpose(0, 1)) * scale
    return s.masked_fill_(kpos[None, :] > qpos[:, None], float("-inf"))


def _iter_groups(groups: _Groups, keys: RoutedKeys, hkv: int):
    """Yield (th, rows slice, kv head) for every non-empty group with rows in the key set."""
    rows = keys.block_rows.tolist()
    for gi in groups.live:
        j, g = divmod(gi, hkv)
        if rows[j + 1] > rows[j]:
            yield groups.th[groups.off[gi] : groups.off[gi + 1]], slice(rows[j], rows[j + 1]), g


def reference_routed_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prob: RoutedProblem,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed attention forward: ``q [Tq, Hq, D]``, ``k, v [Tk, Hkv, D]`` -> ``out [Tq, Hq, D]``
    (q's dtype) and ``lse [Hq, Tq]`` float32 (float64 for float64 inputs)."""
    q_pos, keys, sel, softmax_scale = prob.q_pos, prob.keys, prob.sel, prob.softmax_scale
    tq, hq, d = q.shape
    hkv = k.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    m = torch.full((tq * hq,), float("-inf"), dtype=acc, device=q.device)
    lsum = torch.zeros(tq * hq, dtype=acc, device=q.device)
    o = torch.zeros(tq * hq, d, dtype=acc, device=q.device)
    qf = q.reshape(tq * hq, d)
    groups = group_selections(sel, keys.block_rows.numel() - 1, hkv)
    for th, rows, g in _iter_groups(groups, keys, hkv):
        s = _group_scores(
            qf[th].to(acc), k[rows, g].to(acc), q_pos[th // hq], keys.k_pos[rows], softmax_scale
        )
        m_old = m[th]
        m_new = torch.maximum(m_old, s.amax(-1))
        # A query whose keys are all masked keeps m = -inf; shift by 0 there so exp() gives 0
        # instead of NaN from (-inf) - (-inf).
        shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - shift[:, None])
        alpha = torch.exp(m_old - shift)
        lsum[th] = lsum[th] * alpha + p.sum(-1)
        o[th] = o[th] * alpha[:, None] + p @ v[rows, g].to(acc)
        m[th] = m_new
    empty = lsum == 0
    lse = torch.where(empty, torch.full_like(m, float("-inf")), m + torch.log(lsum))
    out = torch.where(empty[:, None], torch.zeros_like(o), o / lsum.clamp_min(1e-300)[:, None])
    return out.view(tq, hq, d).to(q.dtype), lse.view(tq, hq).t().contiguous()


def reference_routed_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    prob: RoutedProblem,
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of routed attention over this key set, FlashAttention style.

    ``out`` and ``lse [Hq, Tq]`` are the *final* (merged) values of the whole attention, which may
    span several key sets: the probabilities ``exp(s - lse)`` and ``delta = rowsum(dout * out)``
    are then exact for this key set's share, so partial backwards sum to the full gradient.
    ``dlse [Hq, Tq]`` is the gradient reaching lse, if any: ``d lse / d s = p``, so it enters
    as ``delta - dlse``. Returns float32 (float64) ``dq [Tq, Hq, D]``, ``dk, dv [Tk, Hkv, D]``.
    """
    q_pos, keys, sel, softmax_scale = prob.q_pos, prob.keys, prob.sel, prob.softmax_scale
    tq, hq, d = q.shape
    hkv = k.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.reshape(tq * hq, d)
    dof = dout.reshape(tq * hq, d).to(acc)
    lse_f = lse.t().reshape(tq * hq).to(acc)
    lse_f = torch.where(torch.isinf(lse_f), torch.full_like(lse_f, float("inf")), lse_f)
    delta = (dof * out.reshape(tq * hq, d).to(acc)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.t().reshape(tq * hq).to(acc)
    dq = torch.zeros(tq * hq, d, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    groups = group_selections(sel, keys.block_rows.numel() - 1, hkv)
    for th, rows, g in _iter_groups(groups, keys, hkv):
        qs, ks, vs = qf[th].to(acc), k[rows, g].to(acc), v[rows, g].to(acc)
        # lse = +inf for key-less queries makes p exactly 0 instead of NaN.
        p = torch.exp(
            _group_scores(qs, ks, q_pos[th // hq], keys.k_pos[rows], softmax_scale)
            - lse_f[th][:, None]
        )
        do_s = dof[th]
        dv[rows, g] += p.transpose(0, 1) @ do_s
        ds = p * (do_s @ vs.transpose(0, 1) - delta[th][:, None])
        dq[th] += (ds @ ks) * softmax_scale
        dk[rows, g] += (ds.transpose(0, 1) @ qs) * softmax_scale
    return dq.view(tq, hq, d), dk, dv
