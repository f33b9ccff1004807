"""Train a small Llama-style decoder with context-parallel MoBA attention.

    torchrun --nproc-per-node 2 examples/train_cp.py                  # CPU (gloo) or GPUs (NCCL)
    torchrun --nproc-per-node 8 examples/train_cp.py --dp 2           # 2 data x 4 context parallel
    torchrun --max-restarts 3 --nproc-per-node 8 examples/train_cp.py --resume

Each sequence is split over the ranks of a context-parallel group (zigzag layout by default);
``--dp`` splits the world into a 2-D (dp, cp) DeviceMesh, gradients are summed over the CP group
and averaged over the DP group. The last ``--full-layers`` layers use full attention (MoBA's
hybrid), and ``--full-attn-final-frac`` switches every layer to full attention for the final
share of steps (the paper's 90/10 recipe).

Data (``--data``): ``stdlib`` (default) is byte-level text built from this Python's standard
library (examples/lm_corpus.py, held-out files never trained on); a file path is byte-level text
with its last 5% held out; ``kv`` is a synthetic key-value retrieval task. Text runs report
held-out bits per byte beside the unigram baseline, and by position bucket (examples/lm_eval.py).
Every run ends with the CP statistics of the first MoBA layer: the strategy taken and why, the
K/V bytes received against what an all-gather moves, and the worst rank's union fraction.
Writes checkpoints, ``metrics.json``, ``loss.png`` and ``routing.pt`` to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from kv_data import VALUES, VOCAB, kv_batch, text_batch
from lm_corpus import Corpus, build_stdlib_corpus, file_corpus
from lm_eval import LossSums, plot_training, unigram_bits_per_byte
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

EVAL_SEED, ROUTING_SEED = 10_000_000, 20_000_000


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
    a("--dense-full", action="store_true", help="full layers through dense SDPA (CP size 1 only)")
    a("--dp", type=int, default=1, help="data-parallel size; world / dp ranks per CP group")
    a("--layout", choices=("contiguous", "zigzag"), default="zigzag")
    a("--strategy", choices=("auto", "selective", "allgather"), default="auto")
    a("--backend", choices=("auto", "reference", "triton"), default="auto")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto",
      help="auto: one GPU per rank with NCCL when there are enough GPUs, else CPU with gloo; "
           "cpu/cuda force it (cuda errors clearly if it cannot run)")  # fmt: skip
    a("--steps", type=int, default=500)
    a("--lr", type=float, default=8e-3, help="peak learning rate (linear warmup, cosine decay)")
    a("--warmup", type=int, default=20, help="warmup steps")
    a("--local-warmup", type=int, default=0, help="first N steps: every layer own block only")
    a("--pairs", type=int, default=8, help="key-value pairs per sequence (--data kv)")
    a("--queries", type=int, default=8, help="queries per sequence (--data kv)")
    a("--data", default="stdlib", help="'stdlib' (default), 'kv' (retrieval task) or a text file")
    a("--eval-batches", type=int, default=4, help="held-out sequences per replica = this x batch")
    a("--eval-every", type=int, default=100, help="held-out evaluation every N steps (text)")
    a("--out-dir", default="runs/train_cp")
    a("--resume", action="store_true", help="continue from --out-dir/checkpoint.pt if present")
    a("--save-every", type=int, default=50)
    a("--compare-full", action="store_true", help="also train a full-attention model")
    a("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.full_layers > args.layers or not 0.0 <= args.full_attn_final_frac <= 1.0:
        p.error("--full-layers must be <= --layers and --full-attn-final-frac in [0, 1]")
    if args.data not in ("stdlib", "kv") and not os.path.isfile(args.data):
        p.error(f"--data must be 'stdlib', 'kv' or an existing file, got {args.data!r}")
    return args


def load_corpus(args) -> Corpus | None:
    if args.data == "kv":
        return None
    return build_stdlib_corpus() if args.data == "stdlib" else file_corpus(args.data)


def make_batch(args, d: Dist, step: int, corpus, split: str = "train"):
    """One DP replica's batch, identical on its CP ranks: seeded by (seed, step, dp rank)."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 4099 + d.dp_rank)
    if corpus is not None:
        return text_batch(getattr(corpus, split), args.batch_size, args.seq_len, gen)
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


def forward(model, d: Dist, tok, pos, cu):
    with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=d.device.type == "cuda"):
        return model(tok, pos, cu)


def lr_at(args, step: int) -> float:
    """Linear warmup to ``--lr``, cosine decay to a tenth of it at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, t))))


def train_step(model, opt, args, d: Dist, step: int, corpus) -> dict:
    tokens, mask = make_batch(args, d, step, corpus)
    tok, pos, labels, lmask, cu = local_inputs(args, d, tokens, mask)
    count = max(1, int(mask.sum()))  # targets in the whole sequence batch, over all CP ranks
    logits = forward(model, d, tok, pos, cu)
    loss = F.cross_entropy(logits[lmask].float(), labels[lmask], reduction="sum") / count
    loss.backward()
    sync_grads(model, d)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for g in opt.param_groups:
        g["lr"] = lr_at(args, step)
    opt.step()
    opt.zero_grad(set_to_none=True)
    correct = (logits[lmask].argmax(-1) == labels[lmask]).sum()
    totals = d.sum_world(torch.stack([loss.detach().float() * count, correct.float()]).cpu())
    return {"loss": totals[0].item() / (count * d.dp), "acc": totals[1].item() / (count * d.dp)}


@torch.no_grad()
def evaluate(model, args, d: Dist, corpus) -> dict:
    """Text: held-out bits per byte, overall and by position bucket. kv: answer accuracy."""
    sums, correct, total = LossSums(), 0.0, 0.0
    for i in range(args.eval_batches):
        batch = make_batch(args, d, EVAL_SEED + i, corpus, "heldout")
        tok, pos, labels, lmask, cu = local_inputs(args, d, *batch)
        logits = forward(model, d, tok, pos, cu)[lmask].float()
        sums.add(F.cross_entropy(logits, labels[lmask], reduction="none"), pos[lmask], args.block)
        correct += float((logits.argmax(-1) == labels[lmask]).sum())
        total += float(lmask.sum())
    acc = d.sum_world(torch.tensor([correct, total], dtype=torch.float64))
    out = {"acc": float(acc[0] / acc[1].clamp_min(1))}
    if corpus is not None:
        out["bpb"] = sums.bits_per_byte(d.sum_world(sums.total))
    return out


class CPTally:
    """Forward K/V traffic of the first MoBA layer over the run, against an all-gather's."""

    def __init__(self, args, d: Dist) -> None:
        t_local = args.batch_size * args.seq_len // d.cp
        elem = 2 if d.device.type == "cuda" else 4  # bf16 under autocast, float32 on CPU
        row = 2 * (args.dim // args.heads) * elem  # one K row plus one V row
        self.allgather_bytes = (d.cp - 1) * t_local * args.kv_heads * row
        self.steps, self.recv, self.strategies, self.unions = 0, 0, {}, []
        self.auto_ms: dict[str, float] = {}  # the last call's predicted ms per auto candidate

    def add(self, stats: dict) -> None:
        if not stats:
            return
        self.steps += 1
        self.recv += stats["bytes_received"]
        self.strategies[stats["strategy"]] = self.strategies.get(stats["strategy"], 0) + 1
        self.unions.append(stats["union_fraction_max"])
        costs = stats.get("auto_costs") or {}
        self.auto_ms = {n: c["fwd_ms"] + c["bwd_ms"] for n, c in costs.items()}

    def summary(self, strategy: str, d: Dist) -> dict:
        """Bytes are averaged over all ranks (each receives a different amount under selective);
        the union is already the worst rank's on every rank."""
        n = max(1, self.steps)
        recv = float(d.sum_world(torch.tensor([self.recv], dtype=torch.float64))) / d.world
        return {
            "steps": self.steps, "strategies": self.strategies,
            "bytes_received_per_step": recv / n,
            "allgather_bytes_per_step": self.allgather_bytes,
            "union_fraction_max_mean": sum(self.unions) / max(1, len(self.unions)),
            "union_fraction_max_min": min(self.unions, default=math.nan), "requested": strategy,
            "auto_predicted_ms": self.auto_ms,
        }  # fmt: skip


def describe_cp(s: dict, world: int) -> str:
    """The CP lines printed at the end of a run (see README, 'What the CP statistics mean')."""
    if world == 1:
        return "CP: world size 1, nothing exchanged"
    taken = ", ".join(f"{k} on {v}/{s['steps']} steps" for k, v in s["strategies"].items())
    u = s["union_fraction_max_mean"]
    if s["requested"] == "auto":
        low = s["union_fraction_max_min"]
        pred = ", ".join(f"{n} {ms:.3f}" for n, ms in sorted(s["auto_predicted_ms"].items()))
        why = (f"auto: the cost model's cheapest strategy that fits, predicted fwd+bwd ms {pred}; "
               f"worst rank's union averaged {u:.2f}, lowest {low:.2f}")  # fmt: skip
    else:
        why = f"forced by --strategy {s['requested']}; worst rank's union averaged {u:.2f}"
    recv, full = s["bytes_received_per_step"] / 1e6, s["allgather_bytes_per_step"] / 1e6
    ratio = recv / max(1e-12, full)
    lines = [
        f"CP (first MoBA layer, forward): {taken} ({why})",
        (
            f"CP K/V received per step (mean over ranks): {recv:.3f} MB, "
            f"an all-gather moves {full:.3f} MB ({ratio:.2f}x)"
        ),
    ]
    if ratio >= 0.999:
        lines.append(
            "CP: selective saves no bytes here: together the queries of a rank select (almost) "
            "every remote block of this small, briefly trained model. A gate concentrated on a "
            "few blocks fetches far less: torchrun --nproc-per-node 2 benchmarks/cp_bytes.py"
        )
    return "\n".join(lines)


def build_model(args, d: Dist, full_everywhere: bool) -> TinyLlama:
    cfg = ModelConfig(
        vocab=VOCAB, dim=args.dim, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
        block=args.block, topk=args.topk, full_layers=args.layers if full_everywhere else
        args.full_layers, max_seq_len=args.seq_len, layout=args.layout, strategy=args.strategy,
        backend=args.backend, dense_full=args.dense_full,
    )  # fmt: skip
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    return TinyLlama(cfg, cp_group=d.cp_group).to(d.device)


def train(args, d: Dist, full_everywhere: bool, out_dir: str, corpus) -> dict:
    model = build_model(args, d, full_everywhere)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    state = load_checkpoint(out_dir, model, opt, d) if args.resume else TrainState()
    switch = int(args.steps * (1.0 - args.full_attn_final_frac))
    name = "full" if full_everywhere else "moba"
    bar, tally = progress(args.steps, state.step, d, name), CPTally(args, d)
    moba = [a for a in model.attention_layers() if not a.full] or model.attention_layers()
    start, seen = time.perf_counter(), 0
    per_step = args.batch_size * args.seq_len * d.dp
    for step in range(state.step, args.steps):
        model.set_full_attention(step >= switch)
        if step < args.local_warmup:  # short context first: full attention's slow start
            model.set_local_attention()
        entry = {"step": step, "tokens": (step + 1) * per_step, **train_step(
            model, opt, args, d, step, corpus)}  # fmt: skip
        state.step, seen = step + 1, seen + per_step
        if corpus is not None and (state.step % args.eval_every == 0 or state.step == args.steps):
            entry["eval"] = evaluate(model, args, d, corpus)
        state.history.append(entry)
        stats = moba[0].attn.last_stats
        tally.add(stats)
        # The bar's "union" is the worst rank's: the all-gather decision depends on it.
        shown = {**stats, "union_fraction": stats.get("union_fraction_max", 0.0)}
        bar.update(entry, seen / (time.perf_counter() - start), shown)
        if state.step % args.save_every == 0 or state.step == args.steps:
            save_checkpoint(out_dir, model, opt, state, d)
    bar.close()
    final = evaluate(model, args, d, corpus)
    if not full_everywhere:
        batch = make_batch(args, d, ROUTING_SEED, corpus)
        dump_routing(model, args, d, out_dir, batch, local_inputs)
    evals = [{"tokens": h["tokens"], **h["eval"]} for h in state.history if "eval" in h]
    return {"history": state.history, "evals": evals, "eval_acc": final["acc"],
            "final": final, "cp": tally.summary(args.strategy, d)}  # fmt: skip


def report(name: str, r: dict, d: Dist, unigram: float | None) -> str:
    f = r["final"]
    if unigram is None:
        head = f"{name}: eval accuracy {f['acc']:.3f} (chance {1.0 / (VALUES[1] - VALUES[0]):.3f})"
    else:
        b = f["bpb"]
        head = (f"{name}: held-out {b['all']:.3f} bits/byte vs unigram baseline {unigram:.3f} "
                f"({b['all'] / unigram:.2f}x); by position: first block {b['first_block']:.3f}, "
                f"beyond 2 blocks {b['beyond_2_blocks']:.3f}")  # fmt: skip
    return head + "\n" + describe_cp(r["cp"], d.cp)


def main(argv=None) -> None:
    args = parse_args(argv)
    d = setup_dist(args.dp, device=args.device)
    corpus = load_corpus(args)
    unigram = None if corpus is None else unigram_bits_per_byte(corpus.train, corpus.heldout)
    if d.rank == 0:
        data = "kv retrieval" if corpus is None else f"{args.data} ({corpus.info['train_bytes']} B)"
        print(
            f"world {d.world} = dp {d.dp} x cp {d.cp} on {d.device.type} ({d.backend}); "
            f"data {data}; seq {args.seq_len}, block {args.block}, topk {args.topk}, "
            f"{args.layers} layers ({args.full_layers} full)",
            flush=True,
        )
    results = {"moba": train(args, d, False, args.out_dir, corpus)}
    if args.compare_full:
        results["full"] = train(args, d, True, os.path.join(args.out_dir, "full"), corpus)
    if d.rank == 0:
        meta = {"corpus": None if corpus is None else corpus.info, "unigram_bpb": unigram}
        with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:
            json.dump({"args": vars(args), **meta, "results": results}, f)
        png = os.path.join(args.out_dir, "loss.png")
        if corpus is None:
            plot_curves(results, png)
        else:
            label = "Python stdlib source" if args.data == "stdlib" else os.path.basename(args.data)
            plot_training(results, png, unigram, label)
        for name, r in results.items():
            print(report(name, r, d, unigram), flush=True)
    d.close()


if __name__ == "__main__":
    main()
