"""MoBA decode step vs dense SDPA decode on one GPU, as the KV cache grows (issue 19).

    PYTHONPATH=. python -m benchmarks.moba_bench decode       # the tool's cases, via bench_rows
    PYTHONPATH=. python benchmarks/decode_bench.py --out benchmarks/results/nvidia-h200/decode

:func:`bench_rows` is the benchmark tool's decode hook (its rows: see its docstring). Run as a
script, three measurements per cache length L (one new token per row, batch 1, bf16, random
data):

- ``attn``: the attention part of one decode step of one layer: MoBA (Triton gate over the block
  sums, attention reading the selected blocks in place, merge: three launches) against
  ``F.scaled_dot_product_attention`` over the whole cache (GQA native), each captured in a CUDA
  graph and timed by replay with CUDA events; ``kernel`` is the attention and merge alone,
  ``gate`` the gate alone.
- ``floor``: bytes a MoBA step must read (the selected blocks' K and V, each KV head's union of
  its query heads' choices counted once, the own block up to the query, plus the block sums
  scored by the gate) over the device-to-device copy bandwidth measured here.
- ``step``: a random Llama-like decoder stack (RMSNorm, QKV, RoPE, cache append at a device-side
  position, incremental block sum, attention, output projection, SwiGLU MLP), every layer, as one
  CUDA graph: the per-token latency of the model body (no embedding / LM head).

Transformers' ``generate`` is not used: its per-step Python overhead (~10 ms) would hide what the
cache does; the same library call (:func:`moba_decode_step`) serves MoBACache decoding.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moba_dist.integrations.hf_decode import decode_select, moba_decode_step
from moba_dist.kernels.triton_decode import DecodeConfig, decode_attend_triton, decode_gate_triton

__all__ = ["bench_rows", "main"]

# The tool's dense baselines (benchmarks/moba_bench/dense.py names them), each alone.
_DENSE = {"dense-cudnn": SDPBackend.CUDNN_ATTENTION, "dense-fa2": SDPBackend.FLASH_ATTENTION}

SHAPES = {
    # name: (layers, hidden, q heads, kv heads, head dim, mlp width)
    "llama-2048-16x4": (4, 2048, 16, 4, 128, 5632),
    "llama3-8b-layer": (1, 4096, 32, 8, 128, 14336),
}


def graph_time_us(fn, reps: int = 50) -> float:
    """Mean microseconds of one replay of ``fn`` captured in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / reps


def copy_bandwidth() -> dict:
    """Memory bandwidth in bytes/s on 2 GiB buffers: a copy (bytes read + written) as a graph
    memcpy node and as a kernel (``add``), and a read-only reduction; the largest is the floor's."""
    x = torch.ones(1 << 30, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    nbytes = x.numel() * 2
    bws = {
        "copy_memcpy": 2 * nbytes / (graph_time_us(lambda: y.copy_(x), reps=20) * 1e-6),
        "copy_kernel": 2 * nbytes / (graph_time_us(lambda: torch.add(x, 1, out=y), 20) * 1e-6),
        "read_sum": nbytes / (graph_time_us(lambda: x.sum(), reps=20) * 1e-6),
    }
    return {**bws, "used": max(bws.values())}


def make_cache(hkv: int, length: int, d: int, block: int):
    """Random K/V with capacity ``length`` rounded up to blocks, and their exact block sums."""
    cap = -(-length // block) * block
    k = torch.randn(1, hkv, cap, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    sums = k.float().view(1, hkv, cap // block, block, d).sum(3)
    return k, v, sums


def floor_bytes(sel: torch.Tensor, hkv: int, t: int, block: int, d: int, n_blocks: int) -> int:
    """Bytes one MoBA step must read: union of selected blocks per KV head (K and V, bf16), the
    own block up to the query only, plus the float32 block sums the gate scores."""
    bt = sel.shape[0]
    per_kv = sel.view(bt, hkv, -1)
    own = t // block
    keys = 0
    for h in range(hkv):
        for j in set(per_kv[0, h].tolist()) - {-1}:
            keys += (t - own * block + 1) if j == own else block
    return keys * d * 2 * 2 + hkv * min(own, n_blocks) * d * 4


def _dense_graph_ms(name: str, q, k, v) -> tuple[float, str]:
    """Fastest CUDA-graph replay (ms) of dense SDPA decode restricted to backend ``name``, over
    two layouts: GQA native (``enable_gqa``) and the G query heads of a KV head as G queries of
    that head (no repeat, no mask: every cached key is in the past)."""
    hkv, g, d = k.shape[1], q.shape[1] // k.shape[1], q.shape[-1]
    layouts = {
        "gqa": lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True),
        "grouped": lambda: F.scaled_dot_product_attention(q.view(1, hkv, g, d), k, v),
    }
    best, errors = None, []
    for layout, fn in layouts.items():
        try:
            with sdpa_kernel([_DENSE[name]]):
                ms = graph_time_us(fn) / 1e3
        except RuntimeError as e:  # this backend does not take this layout
            errors.append(f"{layout}: {str(e)[:120]}")
            continue
        best = (ms, layout) if best is None or ms < best[0] else best
    if best is None:
        raise RuntimeError("; ".join(errors))
    return best


def bench_rows(case, reps: int, device: torch.device) -> list[dict]:
    """Rows of one decode case of the benchmark tool (``benchmarks/moba_bench/decode.py`` calls
    this hook): one query token at position L - 1 of a cache of ``L = case.tokens`` random
    tokens, batch 1, bf16 on CUDA (float32 on CPU), the complete blocks' key sums given.

    Backends (``step_ms`` each): ``moba-decode`` (:func:`moba_decode_step`: on CUDA the Triton
    gate, attention and merge, timed as CUDA-graph replays, the way a compiled generation loop
    runs it; the PyTorch twin on CPU), ``moba-decode-minimal`` (the tool's own PyTorch step,
    eager) and the dense baselines (CUDA-graph replays, the faster of two layouts each). On CUDA
    also ``moba-decode-eager`` (the same step launched from Python) and
    ``moba-decode-alike-heads`` (the query heads of a group equal, so each KV head reads K blocks
    instead of a union of up to G (K - 1) + 1). MoBA rows on CUDA carry ``gate_equals_twin``,
    ``rel_err_vs_twin`` (relative Frobenius error against the PyTorch twin on the same inputs),
    ``read_bytes`` (the bytes the step must read: each KV head's selected blocks, the own block
    up to the query, the block sums) and ``read_TBps`` (those bytes over ``step_ms``).
    """
    from benchmarks.moba_bench.common import median_ms
    from benchmarks.moba_bench.decode import moba_decode_step as minimal_step
    from benchmarks.moba_bench.dense import dense_backends, sdpa_call

    cuda = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    length, block, topk, d = case.tokens, case.block, case.topk, case.d
    shape = (1, case.hkv, length, d)
    dt = torch.bfloat16 if cuda else torch.float32
    k, v = (torch.randn(shape, device=device, dtype=dt, generator=gen) for _ in range(2))
    q = torch.randn(1, case.hq, d, device=device, dtype=dt, generator=gen)
    n = length // block
    sums = k[:, :, : n * block].float().view(1, case.hkv, n, block, d).sum(3)
    starts = torch.zeros(1, dtype=torch.int64, device=device)
    t = torch.full((1,), length - 1, dtype=torch.int64, device=device)
    scale = d**-0.5

    def step(qq: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        return moba_decode_step(qq, k, v, sums, starts, t, block, topk, scale, backend)

    def timed(fn) -> dict:
        if cuda:
            return {"step_ms": graph_time_us(fn, max(20, reps)) / 1e3, "timing": "cuda-graph"}
        return {"step_ms": median_ms(fn, reps, device), "timing": "eager"}

    cent = sums[0] / block
    rows = [
        dict(backend="moba-decode", **timed(lambda: step(q))),
        dict(backend="moba-decode-minimal", timing="eager",
             step_ms=median_ms(lambda: minimal_step(q[0], k[0], v[0], cent, block, topk), reps,
                               device)),
    ]  # fmt: skip
    if cuda:
        rows[0].update(_moba_checks(q, step, sums, t, block, topk, length))
        alike = q.view(1, case.hkv, -1, d)[:, :, :1].expand(-1, -1, case.hq // case.hkv, -1)
        alike = alike.reshape(q.shape)
        rows.append(dict(backend="moba-decode-alike-heads", **timed(lambda: step(alike))))
        rows[-1].update(_moba_checks(alike, step, sums, t, block, topk, length))
        rows.append(dict(backend="moba-decode-eager", timing="eager",
                         step_ms=median_ms(lambda: step(q), reps, device)))  # fmt: skip
    for row in rows:
        if "read_bytes" in row:
            row["read_TBps"] = row["read_bytes"] / row["step_ms"] / 1e9
    for name in dense_backends(device):
        row = {"backend": name}
        try:
            if cuda:
                row["step_ms"], row["layout"] = _dense_graph_ms(name, q, k, v)
                row["timing"] = "cuda-graph"
            else:
                fn = lambda name=name: sdpa_call(name, q[:, :, None], k, v, causal=False)  # noqa: E731
                row.update(timed(fn))
        except Exception as e:  # keep the other backends' numbers
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
    return rows


def _moba_checks(q, step, sums, t, block: int, topk: int, length: int) -> dict:
    """The Triton step against its PyTorch twin on the same bf16 inputs, and its read bytes."""
    sel = decode_gate_triton(q, sums, t, block, topk)
    twin_sel = decode_select(q[:, :, None], sums, t[:, None], block, topk, sums.shape[2])[:, 0]
    got, want = step(q).double(), step(q, "torch").double()
    nbytes = floor_bytes(sel, sums.shape[1], length - 1, block, q.shape[-1], sums.shape[2])
    return {
        "gate_equals_twin": bool(torch.equal(sel.long(), twin_sel)),
        "rel_err_vs_twin": ((got - want).norm() / want.norm()).item(),
        "read_bytes": nbytes,
    }


def attn_case(hq, hkv, d, length, block, topk, bw, shared: bool = False) -> dict:
    """One layer's attention; ``shared``: the query heads of a group are equal, so they route
    alike and each KV head reads K blocks (random independent heads read a union of up to
    G * (K - 1) + 1, most of a 128K cache)."""
    k, v, sums = make_cache(hkv, length, d, block)
    q = torch.randn(1, hq, d, device="cuda", dtype=torch.bfloat16)
    if shared:
        q = q[:, :: hq // hkv].repeat_interleave(hq // hkv, 1)
    t = torch.tensor([length - 1], device="cuda")
    starts = torch.zeros(1, dtype=torch.int64, device="cuda")
    scale = d**-0.5
    sel = decode_select(q[:, :, None], sums, t[:, None], block, topk, sums.shape[2])[:, 0]
    moba = graph_time_us(lambda: moba_decode_step(q, k, v, sums, starts, t, block, topk, scale))
    kern = graph_time_us(
        lambda: decode_attend_triton(q, k, v, sel, starts, t, block, scale, sums.shape[2])
    )
    gate = graph_time_us(lambda: decode_gate_triton(q, sums, t, block, topk))
    kd, vd = k[:, :, :length], v[:, :, :length]
    # Dense decode two ways, the faster counted: GQA-native SDPA, and the G query heads of a KV
    # head as G queries (no mask needed: every cached key is in the past).
    dense = min(
        graph_time_us(lambda: F.scaled_dot_product_attention(q[:, :, None], kd, vd,
                                                              enable_gqa=True)),
        graph_time_us(lambda: F.scaled_dot_product_attention(q.view(1, hkv, hq // hkv, d), kd, vd)),
    )  # fmt: skip
    nbytes = floor_bytes(sel, hkv, length - 1, block, d, sums.shape[2])
    got = moba_decode_step(q, k, v, sums, starts, t, block, topk, scale).float()
    twin = moba_decode_step(q, k, v, sums, starts, t, block, topk, scale, backend="torch").float()
    return {
        "L": length, "routing": "shared" if shared else "independent", "moba_attn_us": moba,
        "kernel_us": kern, "gate_us": gate, "dense_sdpa_us": dense,
        "floor_bytes": nbytes, "floor_us": nbytes / bw * 1e6, "kernel_over_floor": kern /
        (nbytes / bw * 1e6), "max_abs_diff_vs_torch_twin": (got - twin).abs().max().item(),
    }  # fmt: skip


class Stack:
    """Random Llama-like decoder layers with preallocated MoBA (or dense) caches."""

    def __init__(self, shape, length, block, topk, moba: bool, shared: bool = False):
        n_layers, hidden, hq, hkv, d, mlp = shape
        self.hq, self.hkv, self.d, self.block, self.topk, self.moba = hq, hkv, d, block, topk, moba
        self.shared = shared
        dev, dt = "cuda", torch.bfloat16

        def w(*s):
            return torch.randn(*s, device=dev, dtype=dt) / math.sqrt(s[-1])

        self.layers = []
        for _ in range(n_layers):
            k, v, sums = make_cache(hkv, length + 1, d, block)
            self.layers.append({
                "qkv": w((hq + 2 * hkv) * d, hidden), "o": w(hidden, hq * d),
                "up": w(2 * mlp, hidden), "down": w(hidden, mlp), "k": k, "v": v, "sums": sums,
            })  # fmt: skip
        self.x = torch.randn(1, hidden, device=dev, dtype=dt)
        self.t = torch.tensor([length], device=dev)  # the new token's position (= its slot)
        self.starts = torch.zeros(1, dtype=torch.int64, device=dev)
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=dev).float() / d))
        self.inv_freq = inv

    def rope(self, x):
        ang = self.t.float()[:, None] * self.inv_freq[None]  # [1, D/2]
        cos, sin = ang.cos()[:, None].to(x.dtype), ang.sin()[:, None].to(x.dtype)
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)

    def step(self):
        x, hq, hkv, d = self.x, self.hq, self.hkv, self.d
        for lay in self.layers:
            h = F.rms_norm(x, (x.shape[-1],))
            q, k, v = (h @ lay["qkv"].T).split([hq * d, hkv * d, hkv * d], -1)
            q, k = self.rope(q.view(1, hq, d)), self.rope(k.view(1, hkv, d))
            if self.shared:  # the heads of a group route alike (see attn_case)
                q = q[:, :: hq // hkv].repeat_interleave(hq // hkv, 1)
            lay["k"].index_copy_(2, self.t, k[:, :, None])
            lay["v"].index_copy_(2, self.t, v.view(1, hkv, 1, d))
            if self.moba:
                lay["sums"].index_add_(2, self.t // self.block, k[:, :, None].float())
                a = moba_decode_step(q, lay["k"], lay["v"], lay["sums"], self.starts, self.t,
                                     self.block, self.topk, d**-0.5)  # fmt: skip
            else:
                # Dense reads the whole allocated cache (length + up to a block); GQA-native
                # SDPA is the fast dense decode here (see attn_case).
                a = F.scaled_dot_product_attention(
                    q[:, :, None], lay["k"], lay["v"], enable_gqa=True
                )[:, :, 0]
            x = x + a.reshape(1, hq * d) @ lay["o"].T
            gate, up = (F.rms_norm(x, (x.shape[-1],)) @ lay["up"].T).chunk(2, -1)
            x = x + (F.silu(gate) * up) @ lay["down"].T
        return x


def step_case(shape, length, block, topk) -> dict:
    out = {"L": length}
    for name, moba, shared in (("moba", True, False), ("dense", False, False),
                               ("moba_shared", True, True)):  # fmt: skip
        stack = Stack(shape, length, block, topk, moba, shared)
        out[f"{name}_step_us"] = graph_time_us(stack.step, reps=20)
        del stack
        torch.cuda.empty_cache()
    return out


def hf_smoke() -> dict:
    """Tiny random float32 Llama through transformers' generate on this GPU (the Triton decode
    kernel inside MoBACache / MoBAStaticCache decoding): tokens vs cache-less recomputation."""
    import transformers

    from moba_dist.integrations.hf import CACHE_ARG, MoBACache, MoBAStaticCache, register_moba

    cfg = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        initializer_range=0.2,
    )  # fmt: skip
    cfg._attn_implementation = register_moba(64, 3)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).cuda().eval()
    ids = torch.randint(1, 512, (2, 600), device="cuda")  # 0 is the pad id
    kw = {"max_new_tokens": 40, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        fresh = model.generate(ids, use_cache=False, **kw)
        dyn = model.generate(ids, **{CACHE_ARG: MoBACache(cfg)}, **kw)
        static = model.generate(ids, **{CACHE_ARG: MoBAStaticCache(cfg, max_cache_len=640)}, **kw)
    return {
        "transformers": transformers.__version__, "cache_arg": CACHE_ARG,
        "dynamic_equals_no_cache": bool(torch.equal(dyn, fresh)),
        "static_equals_no_cache": bool(torch.equal(static, fresh)),
        "first_mismatch_dynamic": int((dyn != fresh).any(0).float().argmax()),
    }  # fmt: skip


def sweep(out: Path, lengths=(131072, 524288)) -> dict:
    """Attention launch configs of the Llama-3-8B-shaped layer (32/8 heads, block 4096, topk 12)
    timed as CUDA-graph replays, both routings, plus the launches and host syncs of one step."""
    from benchmarks.moba_bench.common import sync_sites

    configs = {f"min_chunk={c}": DecodeConfig(min_chunk=c) for c in (256, 512, 1024, 4096)}
    configs["block_n=128,stages=2"] = DecodeConfig(block_n=128, num_stages=2)
    res: dict = {
        "device": torch.cuda.get_device_name(),
        "default": repr(DecodeConfig()),
        "rows": [],
    }
    for length in lengths:
        k, v, sums = make_cache(8, length, 128, 4096)
        q = torch.randn(1, 32, 128, device="cuda", dtype=torch.bfloat16)
        t = torch.tensor([length - 1], device="cuda")
        starts = torch.zeros(1, dtype=torch.int64, device="cuda")
        step = partial(moba_decode_step, k=k, v=v, sums=sums, starts=starts, t=t, block=4096,
                       topk=12, scale=0.088)  # fmt: skip
        for routing, qq in (("independent", q), ("alike", q[:, ::4].repeat_interleave(4, 1))):
            for name, cfg in configs.items():
                us = graph_time_us(partial(step, qq, config=cfg))
                res["rows"].append({"L": length, "routing": routing, "config": name, "step_us": us})
                print(res["rows"][-1], flush=True)
        try:  # a profiler failure must not lose the timings
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                step(q)
                torch.cuda.synchronize()
            res[f"launches_{length}"] = [
                e.name for e in prof.events() if e.device_type.name == "CUDA"
            ]
            res[f"host_syncs_{length}"] = sync_sites(partial(step, q))
        except Exception as exc:
            res[f"profile_error_{length}"] = repr(exc)
        torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(res, indent=1))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/nvidia-h200/decode")
    p.add_argument("--lengths", default="32768,131072,262144,524288")
    p.add_argument("--block", type=int, default=4096)
    p.add_argument("--topk", type=int, default=12)
    p.add_argument("--sweep", action="store_true", help="only time attention launch configs")
    args = p.parse_args()
    if args.sweep:
        sweep(Path(args.out))
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    torch.manual_seed(0)
    bws = copy_bandwidth()
    bw = bws["used"]
    res = {"bandwidths_TBps": {x: y / 1e12 for x, y in bws.items()},
           "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "python": platform.python_version(), "block": args.block, "topk": args.topk,
           "copy_bandwidth_TBps": bw / 1e12, "argv": sys.argv, "shapes": {}}  # fmt: skip
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    try:
        res["hf_smoke"] = hf_smoke()
    except Exception as exc:  # the smoke result is recorded, not fatal
        res["hf_smoke"] = {"error": repr(exc)}
    print("hf smoke", res["hf_smoke"], flush=True)
    for name, shape in SHAPES.items():
        _, _, hq, hkv, d, _ = shape
        rows = []
        for length in lengths:
            row = attn_case(hq, hkv, d, length, args.block, args.topk, bw)
            torch.cuda.empty_cache()
            row.update(step_case(shape, length, args.block, args.topk))
            torch.cuda.empty_cache()
            shared = attn_case(hq, hkv, d, length, args.block, args.topk, bw, shared=True)
            row["shared_routing"] = {
                x: shared[x]
                for x in ("moba_attn_us", "gate_us", "kernel_us", "floor_us", "kernel_over_floor")
            }
            torch.cuda.empty_cache()
            print(name, json.dumps(row), flush=True)
            rows.append(row)
            res["shapes"][name] = rows
            write(res, Path(args.out))  # after every case: a cut-off run keeps what it measured


def _table(rows: list[dict], alike: bool) -> list[str]:
    """One markdown table of ``rows``: independent routing, or the heads of a group alike."""
    lines = ["| cache | MoBA attn | gate | attn+merge kernels | floor | kernels/floor | dense "
             "attn | attn speedup | MoBA step | dense step | step speedup |",
             "|---" * 11 + "|"]  # fmt: skip
    for r in rows:
        x = r["shared_routing"] if alike else r
        step = r["moba_shared_step_us"] if alike else r["moba_step_us"]
        lines.append(
            f"| {r['L'] // 1024}K | {x['moba_attn_us']:.1f} | {x['gate_us']:.1f} | "
            f"{x['kernel_us']:.1f} | {x['floor_us']:.1f} | {x['kernel_over_floor']:.2f} | "
            f"{r['dense_sdpa_us']:.1f} | {r['dense_sdpa_us'] / x['moba_attn_us']:.1f}x | "
            f"{step:.1f} | {r['dense_step_us']:.1f} | {r['dense_step_us'] / step:.1f}x |"
        )
    return lines


def _sweep_lines(out: Path) -> list[str]:
    """The launch-config sweep (``--sweep``) of this folder, if one was run, as a table."""
    if not (out / "sweep.json").exists():
        return []
    sw = json.loads((out / "sweep.json").read_text())
    cols = sorted({(r["L"], r["routing"]) for r in sw["rows"]})
    lines = ["", f"## Launch configs (--sweep; default {sw['default']})", "",
             "Llama-3-8B-shaped layer, MoBA attention of one layer, us (CUDA-graph replay).", "",
             "| config | " + " | ".join(f"{n // 1024}K {rt}" for n, rt in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]  # fmt: skip
    for cfg in dict.fromkeys(r["config"] for r in sw["rows"]):
        us = {(r["L"], r["routing"]): r["step_us"] for r in sw["rows"] if r["config"] == cfg}
        lines.append(f"| {cfg} | " + " | ".join(f"{us[c]:.1f}" for c in cols) + " |")
    for key in sorted(k for k in sw if k.startswith(("launches_", "host_syncs_"))):
        lines.append(f"\n{key}: {sw[key]}")
    return lines


def write(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(res, indent=1))
    lines = [f"# MoBA decode vs dense SDPA decode, {res['device']}", "",
             f"torch {res['torch']}, bf16, batch 1, block {res['block']}, topk {res['topk']}, "
             f"bandwidth {res['copy_bandwidth_TBps']:.2f} TB/s (measured, the largest of "
             f"{ {x: round(y, 2) for x, y in res['bandwidths_TBps'].items()} }). Times are CUDA "
             "graph replays (us). attn = one layer's attention (gate + attention and merge "
             "kernels); step = all layers of the model body per token.", ""]  # fmt: skip
    for name, rows in res["shapes"].items():
        first, last = rows[0], rows[-1]
        lines += [f"## {name}", "", *_table(rows, alike=False), "",
                  "Heads of a group routing alike (equal queries; each KV head reads K blocks):",
                  "", *_table(rows, alike=True), "",
                  f"MoBA step at {last['L'] // 1024}K / at {first['L'] // 1024}K: "
                  f"{last['moba_step_us'] / first['moba_step_us']:.2f}x independent routing, "
                  f"{last['moba_shared_step_us'] / first['moba_shared_step_us']:.2f}x heads "
                  "routing alike", ""]  # fmt: skip
    lines += [f"transformers generate smoke (tiny random float32 Llama): {res.get('hf_smoke')}"]
    lines += _sweep_lines(out)
    (out / "decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
