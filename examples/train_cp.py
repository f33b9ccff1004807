"""Train a small Llama-style decoder with context-parallel MoBA attention.

    torchrun --nproc-per-node 2 examples/train_cp.py                  # CPU (gloo) or GPUs (NCCL)
    torchrun --nproc-per-node 8 examples/train_cp.py --dp 2           # 2 data x 4 context parallel
    torchrun --max-restarts 3 --nproc-per-node 8 examples/train_cp.py --resume

Each sequence is split over the ranks of a context-parallel group (zigzag layout by default);
``--dp`` splits the world into a 2-D (dp, cp) DeviceMesh, gradients are summed over the CP group
and averaged over the DP group. The last ``--full-layers`` layers use full attention (MoBA's
hybrid), and ``--full-attn-final-frac`` switches every layer to full attention for the final
share of steps (the paper's 90/10 recipe). Data: a key-value retrieval task made on the fly, or
byte-level text from ``--data``. Writes checkpoints, ``metrics.json``, ``loss.png`` and
``routing.pt`` (the gate's choices on one batch) to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from kv_data import VALUES, VOCAB, kv_batch, load_text, text_batch
from tiny_llama import ModelConfig, TinyLlama
from train_utils import (
    Dist,
    TrainState,
    dump_routing,
    load_checkpoint,
    plot_curves,
    progress,
    save_checkpoint,
    setup_dist,
    sync_grads,
)

from moba_dist.parallel import local_positions, shard


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--seq-len", type=int, default=1024, help="global tokens per sequence")
    a("--batch-size", type=int, default=4, help="sequences per data-parallel replica")
    a("--layers", type=int, default=2)
    a("--dim", type=int, default=64)
    a("--heads", type=int, default=4)
    a("--kv-heads", type=int, default=2)
    a("--block", type=int, default=64, help="moba_chunk_size")
    a("--topk", type=int, default=3, help="moba_topk")
    a("--full-layers", type=int, default=1, help="last N layers use full attention")
    a("--full-attn-final-frac", type=float, default=0.0, help="final share of steps at full attn")
    a("--dp", type=int, default=1, help="data-parallel size; world / dp ranks per CP group")
    a("--layout", choices=("contiguous", "zigzag"), default="zigzag")
    a("--strategy", choices=("auto", "selective", "allgather"), default="auto")
    a("--backend", choices=("auto", "reference", "triton"), default="auto")
    a("--steps", type=int, default=200)
    a("--lr", type=float, default=3e-3)
    a("--pairs", type=int, default=8, help="key-value pairs per sequence (retrieval task)")
    a("--queries", type=int, default=8, help="queries per sequence (retrieval task)")
    a("--data", default=None, help="byte-level text file instead of the retrieval task")
    a("--eval-batches", type=int, default=4)
    a("--out-dir", default="runs/train_cp")
    a("--resume", action="store_true", help="continue from --out-dir/checkpoint.pt if present")
    a("--save-every", type=int, default=50)
    a("--compare-full", action="store_true", help="also train a full-attention model")
    a("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.full_layers > args.layers or not 0.0 <= args.full_attn_final_frac <= 1.0:
        p.error("--full-layers must be <= --layers and --full-attn-final-frac in [0, 1]")
    return args


def make_batch(args, d: Dist, step: int, text) -> tuple[torch.Tensor, torch.Tensor]:
    """One DP replica's batch, identical on its CP ranks: seeded by (seed, step, dp rank)."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 4099 + d.dp_rank)
    if text is not None:
        return text_batch(text, args.batch_size, args.seq_len, gen)
    return kv_batch(args.batch_size, args.seq_len, args.pairs, args.queries, gen)


def local_inputs(args, d: Dist, tokens, mask):
    """This CP rank's tokens, in-sequence positions, next-token labels and loss mask."""
    b, s = tokens.shape
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32)
    labels = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)  # last position masked anyway
    pos = local_positions(cu, rank=d.cp_rank, world_size=d.cp, layout=args.layout)
    sh = dict(cu_seqlens=cu, rank=d.cp_rank, world_size=d.cp, layout=args.layout)
    parts = [shard(x.reshape(-1), **sh).to(d.device) for x in (tokens, labels, mask)]
    return parts[0], (pos % s).to(d.device), parts[1], parts[2], cu.to(d.device)


def train_step(model, opt, args, d: Dist, step: int, text) -> dict:
    tokens, mask = make_batch(args, d, step, text)
    tok, pos, labels, lmask, cu = local_inputs(args, d, tokens, mask)
    count = max(1, int(mask.sum()))  # answers in the whole sequence batch, over all CP ranks
    with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=d.device.type == "cuda"):
        logits = model(tok, pos, cu)
    loss = F.cross_entropy(logits[lmask].float(), labels[lmask], reduction="sum") / count
    loss.backward()
    sync_grads(model, d)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    correct = (logits[lmask].argmax(-1) == labels[lmask]).sum()
    totals = d.sum_world(torch.stack([loss.detach().float() * count, correct.float()]).cpu())
    return {"loss": totals[0].item() / (count * d.dp), "acc": totals[1].item() / (count * d.dp)}


@torch.no_grad()
def evaluate(model, args, d: Dist, text) -> float:
    correct = total = 0.0
    for i in range(args.eval_batches):
        tokens, mask = make_batch(args, d, 10_000_000 + i, text)
        tok, pos, labels, lmask, cu = local_inputs(args, d, tokens, mask)
        with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=d.device.type == "cuda"):
            logits = model(tok, pos, cu)
        hits = (logits[lmask].argmax(-1) == labels[lmask]).sum().float()
        correct += d.sum_world(hits.cpu()).item()
        total += int(mask.sum()) * d.dp
    return correct / max(1.0, total)


def train(args, d: Dist, full_everywhere: bool, out_dir: str, text) -> dict:
    cfg = ModelConfig(
        vocab=VOCAB, dim=args.dim, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
        block=args.block, topk=args.topk, full_layers=args.layers if full_everywhere else
        args.full_layers, max_seq_len=args.seq_len, layout=args.layout, strategy=args.strategy,
        backend=args.backend,
    )  # fmt: skip
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = TinyLlama(cfg, cp_group=d.cp_group).to(d.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    state = load_checkpoint(out_dir, model, opt, d) if args.resume else TrainState()
    switch = int(args.steps * (1.0 - args.full_attn_final_frac))
    bar = progress(args.steps, state.step, d, "full" if full_everywhere else "moba")
    start, tokens_done = time.perf_counter(), 0
    for step in range(state.step, args.steps):
        model.set_full_attention(step >= switch)
        m = train_step(model, opt, args, d, step, text)
        tokens_done += args.batch_size * args.seq_len * d.dp
        state.history.append({"step": step, **m})
        state.step = step + 1
        stats = model.attention_layers()[0].attn.last_stats
        bar.update(m, tokens_done / (time.perf_counter() - start), stats)
        if state.step % args.save_every == 0 or state.step == args.steps:
            save_checkpoint(out_dir, model, opt, state, d)
    bar.close()
    acc = evaluate(model, args, d, text)
    if not full_everywhere:
        dump_routing(model, args, d, out_dir, make_batch(args, d, 20_000_000, text), local_inputs)
    return {"history": state.history, "eval_acc": acc, "chance": 1.0 / (VALUES[1] - VALUES[0])}


def main(argv=None) -> None:
    args = parse_args(argv)
    d = setup_dist(args.dp)
    text = load_text(args.data) if args.data else None
    if d.rank == 0:
        print(
            f"world {d.world} = dp {d.dp} x cp {d.cp} on {d.device.type} ({d.backend}); "
            f"seq {args.seq_len}, block {args.block}, topk {args.topk}, "
            f"{args.layers} layers ({args.full_layers} full)",
            flush=True,
        )
    results = {"moba": train(args, d, False, args.out_dir, text)}
    if args.compare_full:
        results["full"] = train(args, d, True, os.path.join(args.out_dir, "full"), text)
    if d.rank == 0:
        summary = {
            k: {"eval_acc": r["eval_acc"], "chance": r["chance"]} for k, r in results.items()
        }
        with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:
            json.dump({"args": vars(args), "results": results}, f)
        plot_curves(results, os.path.join(args.out_dir, "loss.png"))
        print("eval accuracy: " + json.dumps(summary), flush=True)
    d.close()


if __name__ == "__main__":
    main()
