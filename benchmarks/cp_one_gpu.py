"""Context-parallel MoBA with several ranks on one GPU: P processes share the GPU over gloo.

    PYTHONPATH=. python benchmarks/cp_one_gpu.py --out benchmarks/results/nvidia-h200/cp_one_gpu
    PYTHONPATH=. python benchmarks/cp_one_gpu.py --device cpu --tiny          # CPU check

For P = 2, 3, 4 (``--worlds``), every strategy (the CP module's names, ``heads``, and on P = 4
``hybrid`` as 2 x 2: heads inside rank pairs, sequence CP across), both layouts and a packed
batch whose sequences cross rank boundaries, each rank runs the CP op on its shard and compares
its out, dq, dk, dv with the single-device op on the whole batch. On the GPU: the triton backend
in bf16, graded against the float32 reference backend; the yardstick is the single-device op's
own bf16 error on the same rows, and a CP result passes within 2x of it (errors are relative
Frobenius norms; 16 float32 epsilons is the floor of the yardstick). On the
CPU (``--device cpu``): float32 against float64, the reference backend.

Near ties: a (query, head) whose K-th and (K+1)-th best past blocks score within ``--tie-rtol``
of each other (float64 scores of the full batch) may flip between the single-device op and CP
(partial centroid sums add in another order). Those rows are left out of the out and dq errors
and counted in the table; dk and dv are graded on every row.

Gloo moves CUDA tensors itself only for broadcast and all_reduce; ``moba_dist.parallel.comm``
stages all_gather and all_to_all through the host. Every rank writes its rows to
``OUT/rows_P{P}_rank{r}.json``; the parent merges them into ``OUT/cp_one_gpu.{json,md}`` and
exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

NAMES = ("out", "dq", "dk", "dv")
LAYOUTS = ("contiguous", "zigzag")


def known_strategies() -> tuple[str, ...]:
    """The CP op's strategy names (``parallel.config`` holds the one list)."""
    from moba_dist.parallel.config import STRATEGIES

    return STRATEGIES


def strategies(world: int) -> list[str]:
    """Every strategy the CP op knows, plus the head-parallel ones where they are separate
    (``hybrid`` where the world splits into 2 x P/2: P = 4)."""
    known = known_strategies()
    names = [s for s in known if s != "auto"] + (["auto"] if "auto" in known else [])
    extra = ["heads"] + (["hybrid"] if world == 4 else [])
    return names + [n for n in extra if n not in names]


def hybrid_groups(rank: int, world: int):
    """(inner, outer) groups of ``hybrid`` on 2 x (P / 2) ranks: heads inside pairs of
    consecutive ranks, sequence CP across them. Every rank creates every group, in order."""
    sub = 2
    inner = [dist.new_group(list(range(g * sub, (g + 1) * sub))) for g in range(world // sub)]
    outer = [dist.new_group(list(range(i, world, sub))) for i in range(sub)]
    return inner[rank // sub], outer[rank % sub]


def batch_lens(base: list[int], world: int, layout: str) -> list[int]:
    """``base`` rounded to fit the layout: every length a multiple of 2P (zigzag), or the last
    grown so that P divides the total (contiguous). Sequence ends fall inside rank shards."""
    if layout == "zigzag":
        return [-(-n // (2 * world)) * 2 * world for n in base]
    return [*base[:-1], base[-1] + (-sum(base)) % world]


def make_batch(a, lens: list[int], device):
    """Inputs drawn in float32 and rounded to the low dtype, so every path sees equal values."""
    g = torch.Generator().manual_seed(a.seed)
    t = sum(lens)
    low = torch.bfloat16 if a.dtype == "bfloat16" else torch.float32
    x = [torch.randn(t, h, a.head_dim, generator=g).to(low) for h in (a.hq, a.hkv, a.hkv, a.hq)]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return [y.to(device) for y in x], cu.to(device)


def single_device(x, cu, a, dtype, backend: str) -> list[torch.Tensor]:
    """out, dq, dk, dv of the single-device op on the whole batch."""
    from moba_dist import moba_attn_varlen

    q, k, v, dout = (y.to(dtype) for y in x)
    leaves = [y.clone().requires_grad_() for y in (q, k, v)]
    longest = int((cu[1:] - cu[:-1]).max())
    out = moba_attn_varlen(*leaves, cu, longest, moba_chunk_size=a.block, moba_topk=a.topk,
                           backend=backend)  # fmt: skip
    out.backward(dout)
    return [out.detach(), *(y.grad for y in leaves)]


def near_ties(x, cu, a) -> torch.Tensor:
    """``[T, Hq]`` bool: the K-th and (K+1)-th best past blocks score within ``tie_rtol``."""
    from moba_dist.kernels.blocks import BlockLayout

    q, k = (y.double().cpu() for y in x[:2])
    blocks = BlockLayout.build(cu.cpu(), a.block)
    tok = blocks.token_block.cpu()
    n = blocks.num_blocks
    sums = torch.zeros(n, k.shape[1], k.shape[2], dtype=torch.float64).index_add_(0, tok, k)
    cent = sums / (blocks.block_starts[1:] - blocks.block_starts[:-1]).double().view(-1, 1, 1)
    cent = cent.repeat_interleave(a.hq // a.hkv, dim=1)  # [N, Hq, D]
    scores = torch.einsum("thd,nhd->thn", q, cent)
    j = torch.arange(n)
    past = (j[None] < tok[:, None]) & (j[None] >= blocks.block_seq_first[tok][:, None])
    scores = torch.where(past[:, None, :], scores, -torch.inf)
    kth = a.topk - 1  # past blocks chosen
    if kth < 1 or kth >= n:
        return torch.zeros(q.shape[:2], dtype=torch.bool)
    top = scores.topk(kth + 1, dim=-1).values
    chosen, first_out = top[..., kth - 1], top[..., kth]
    scale = scores.where(past[:, None, :], 0.0).abs().amax(-1).clamp_min(1e-30)
    return torch.isfinite(first_out) & ((chosen - first_out) <= a.tie_rtol * scale)


def run_cp(name: str, local, cu, a, layout: str, groups):
    """out, dq, dk, dv of this rank's shard through strategy ``name``."""
    from moba_dist.parallel.cp import moba_cp_attn_varlen
    from moba_dist.parallel.heads import moba_heads_attn_varlen, moba_hybrid_attn_varlen

    leaves = [y.clone().requires_grad_() for y in local[:3]]
    kw = dict(moba_chunk_size=a.block, moba_topk=a.topk, layout=layout, backend=a.backend)
    # heads and hybrid run their own functions (``heads`` is also a module strategy; the
    # function is what its adapter calls, and it checks no device/backend pairing itself).
    if name == "hybrid":
        inner, outer = groups
        out = moba_hybrid_attn_varlen(*leaves, cu, inner_group=inner, outer_group=outer, **kw)
    elif name == "heads":
        out = moba_heads_attn_varlen(*leaves, cu, **kw)
    else:
        out = moba_cp_attn_varlen(*leaves, cu, strategy=name, **kw)
    out.backward(local[3])
    return [out.detach(), *(y.grad for y in leaves)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    return ((a64 - b64).norm() / b64.norm().clamp_min(1e-300)).item()


def grade(got, base, want, ties_local) -> dict:
    """Errors of CP (``got``) and of the single-device low-precision op (``base``) against the
    high-precision op (``want``), all this rank's shard; out and dq without near-tie rows."""
    row, floor, ok = {}, 16 * torch.finfo(torch.float32).eps, True
    keep = ~ties_local
    for name, g, b, w in zip(NAMES, got, base, want, strict=True):
        if name in ("out", "dq"):
            g, b, w = g[keep], b[keep], w[keep]
        row[f"{name}_err"], row[f"{name}_base"] = rel_err(g, w), rel_err(b, w)
        ok &= row[f"{name}_err"] <= 2 * max(row[f"{name}_base"], floor)
    return row | dict(near_ties=int(ties_local.sum()), ok=bool(ok))


def _cases(a, rank: int, world: int, groups, device) -> list[dict]:
    from moba_dist.parallel import local_positions, shard

    rows, high = [], torch.float32 if a.dtype == "bfloat16" else torch.float64
    for layout in LAYOUTS:
        lens = batch_lens(a.lens, world, layout)
        x, cu = make_batch(a, lens, device)
        want = single_device(x, cu, a, high, "reference")
        base = single_device(x, cu, a, x[0].dtype, a.backend)
        pos = local_positions(cu.cpu(), rank=rank, world_size=world, layout=layout)
        ties = near_ties(x, cu, a)[pos].to(device)
        sh = dict(rank=rank, world_size=world, layout=layout)
        local = [shard(y, cu, **sh) for y in x]
        mine = [shard(y, cu, **sh) for y in want], [shard(y, cu, **sh) for y in base]
        for name in [n for n in a.strategies or strategies(world) if n in strategies(world)]:
            row = dict(world=world, rank=rank, layout=layout, strategy=name, lens=lens)
            try:
                row |= grade(run_cp(name, local, cu, a, layout, groups), mine[1], mine[0], ties)
            except Exception as e:  # one strategy failing must not hide the others' numbers
                row |= dict(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
            rows.append(row)
    return rows


def _worker(rank: int, world: int, a, store: str, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    device = torch.device("cuda", 0) if a.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store, world),
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=a.pg_timeout),
    )
    try:
        groups = hybrid_groups(rank, world) if world == 4 else None
        rows = _cases(a, rank, world, groups, device)
    except Exception:
        rows = [dict(world=world, rank=rank, ok=False, error=traceback.format_exc()[-2000:])]
    Path(out, f"rows_P{world}_rank{rank}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()
    os._exit(0)  # skip gloo's teardown races; the rows are written


def run_world(world: int, a) -> list[dict]:
    """Spawn ``world`` ranks, wait (``--timeout``), read every rank's rows."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(r, world, a, f"{tmp}/store", str(a.out)))
                 for r in range(world)]  # fmt: skip
        for p in procs:
            p.start()
        for p in procs:
            p.join(a.timeout)
        rows = []
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
            f = a.out / f"rows_P{world}_rank{r}.json"
            rows += json.loads(f.read_text()) if f.is_file() else [
                dict(world=world, rank=r, ok=False, error=f"no rows (exit code {p.exitcode})")
            ]  # fmt: skip
    return rows


def markdown(rows: list[dict], a) -> str:
    """One line per (P, layout, strategy): worst rank's error / yardstick per tensor."""
    head = (f"# CP MoBA, several ranks on one {a.device} device over gloo\n\n"
            f"`{' '.join(sys.argv)}`: {a.dtype}, backend {a.backend}, Hq={a.hq} Hkv={a.hkv} "
            f"D={a.head_dim} B={a.block} K={a.topk}, base lengths {a.lens}.\n"
            "Cells: max over ranks of rel. Frobenius error (CP) / the single-device op's own "
            "error, on the same rows; pass: CP <= 2x the op's.\n\n"
            "| P | layout | strategy | out | dq | dk | dv | near ties | pass |\n"
            "|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    lines, keys = [head], sorted({(r["world"], r.get("layout", "-"), r.get("strategy", "-"))
                                  for r in rows})  # fmt: skip
    for w, lay, s in keys:
        group = [r for r in rows if (r["world"], r.get("layout", "-"), r.get("strategy", "-"))
                 == (w, lay, s)]  # fmt: skip
        err = next((r["error"] for r in group if "error" in r), None)
        cells = ([err.splitlines()[-1][:120]] + [""] * 3 if err else
                 [f"{max(r[f'{n}_err'] for r in group):.2e} / "
                  f"{max(r[f'{n}_base'] for r in group):.2e}" for n in NAMES])  # fmt: skip
        ties = sum(r.get("near_ties", 0) for r in group)
        ok = "yes" if all(r["ok"] for r in group) else "NO"
        lines.append(f"| {w} | {lay} | {s} | " + " | ".join(cells) + f" | {ties} | {ok} |")
    return "\n".join(lines) + "\n"


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="small sizes (the CPU check)")
    p.add_argument("--worlds", default="2,3,4")
    p.add_argument("--strategies", default="", help="comma-separated (default: every one)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cp_one_gpu"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tie-rtol", type=float, default=1e-3)
    p.add_argument("--timeout", type=float, default=500.0, help="join timeout per world, s")
    p.add_argument("--pg-timeout", type=float, default=120.0, help="gloo timeout, s")
    a = p.parse_args(argv)
    gpu = a.device == "cuda"
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda but no GPU is visible; use --device cpu")
    a.dtype, a.backend = ("bfloat16", "triton") if gpu else ("float32", "reference")
    # Hq = 12 splits over 2, 3 and 4 ranks (heads); Hkv = 4 is split (P = 2, 4) or replicated.
    a.hq, a.hkv = 12, 4
    a.head_dim, a.block, a.topk = (16, 8, 3) if a.tiny else (64, 128, 3)
    a.lens = [29, 61, 17] if a.tiny else [1000, 2600, 500]
    a.worlds = [int(w) for w in a.worlds.split(",")]
    a.strategies = [x for x in a.strategies.split(",") if x]
    return a


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = [r for w in a.worlds for r in run_world(w, a)]
    (a.out / "cp_one_gpu.json").write_text(json.dumps(rows, indent=1))
    (a.out / "cp_one_gpu.md").write_text(md := markdown(rows, a))
    for f in a.out.glob("rows_P*_rank*.json"):
        f.unlink()
    print(md)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
