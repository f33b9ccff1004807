"""MoBA decode step vs dense SDPA decode on one GPU, as the KV cache grows (issue 19).

    PYTHONPATH=. python benchmarks/decode_bench.py --out benchmarks/results/nvidia-h200/decode

Three measurements per cache length L (one new token per row, batch 1, bf16, random data):

- ``attn``: the attention part of one decode step of one layer: MoBA (gate over the block sums +
  the Triton kernel reading the selected blocks in place + combine) against
  ``F.scaled_dot_product_attention`` over the whole cache (GQA native), each captured in a CUDA
  graph and timed by replay with CUDA events; ``kernel`` is the Triton attention alone.
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
from pathlib import Path

import torch
import torch.nn.functional as F

from moba_dist.integrations.hf_decode import decode_select, moba_decode_step
from moba_dist.kernels.triton_decode import decode_attend_triton

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
        "kernel_us": kern, "dense_sdpa_us": dense,
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/nvidia-h200/decode")
    p.add_argument("--lengths", default="32768,131072,262144,524288")
    p.add_argument("--block", type=int, default=4096)
    p.add_argument("--topk", type=int, default=12)
    args = p.parse_args()
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
                x: shared[x] for x in ("moba_attn_us", "kernel_us", "floor_us", "kernel_over_floor")
            }
            torch.cuda.empty_cache()
            print(name, json.dumps(row), flush=True)
            rows.append(row)
            res["shapes"][name] = rows
            write(res, Path(args.out))  # after every case: a cut-off run keeps what it measured


def write(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(res, indent=1))
    lines = [f"# MoBA decode vs dense SDPA decode, {res['device']}", "",
             f"torch {res['torch']}, bf16, batch 1, block {res['block']}, topk {res['topk']}, "
             f"bandwidth {res['copy_bandwidth_TBps']:.2f} TB/s (measured, the largest of "
             f"{ {x: round(y, 2) for x, y in res['bandwidths_TBps'].items()} }). Times are CUDA "
             "graph replays (us). attn = one layer's attention; step = all layers of the model "
             "body per token.", ""]  # fmt: skip
    for name, rows in res["shapes"].items():
        lines += [f"## {name}", "", "| cache | MoBA attn | kernel | floor | kernel/floor | dense "
                  "attn | attn speedup | MoBA step | dense step | step speedup |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            lines.append(
                f"| {r['L'] // 1024}K | {r['moba_attn_us']:.1f} | {r['kernel_us']:.1f} | "
                f"{r['floor_us']:.1f} | {r['kernel_over_floor']:.2f} | {r['dense_sdpa_us']:.1f} | "
                f"{r['dense_sdpa_us'] / r['moba_attn_us']:.1f}x | {r['moba_step_us']:.1f} | "
                f"{r['dense_step_us']:.1f} | {r['dense_step_us'] / r['moba_step_us']:.1f}x |"
            )
        lines += ["", "Heads of a group routing alike (equal queries; each KV head reads K "
                  "blocks):", "", "| cache | MoBA attn | kernel | floor | kernel/floor | dense "
                  "attn | attn speedup | MoBA step | step speedup |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            sh = r["shared_routing"]
            lines.append(
                f"| {r['L'] // 1024}K | {sh['moba_attn_us']:.1f} | {sh['kernel_us']:.1f} | "
                f"{sh['floor_us']:.1f} | {sh['kernel_over_floor']:.2f} | "
                f"{r['dense_sdpa_us']:.1f} | {r['dense_sdpa_us'] / sh['moba_attn_us']:.1f}x | "
                f"{r['moba_shared_step_us']:.1f} | "
                f"{r['dense_step_us'] / r['moba_shared_step_us']:.1f}x |"
            )
        first, last = rows[0], rows[-1]
        lines += ["", f"MoBA step at {last['L'] // 1024}K / at {first['L'] // 1024}K: "
                  f"{last['moba_step_us'] / first['moba_step_us']:.2f}x independent routing, "
                  f"{last['moba_shared_step_us'] / first['moba_shared_step_us']:.2f}x heads "
                  "routing alike", ""]  # fmt: skip
    lines += [f"transformers generate smoke (tiny random float32 Llama): {res.get('hf_smoke')}"]
    (out / "decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
