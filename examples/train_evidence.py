"""Does MoBA train? A fair sweep of attention variants on held-out real text.

    torchrun --nproc-per-node 2 examples/train_evidence.py --out-dir benchmarks/results/x

Every variant trains the same model shape from the same initial weights on the same batches
(train_cp.py's seeded windows of ``--data``, by default the standard-library corpus), once per
learning rate of ``--lrs``; the learning rate with the lowest final held-out loss is kept. The
variants are MoBA's (arXiv 2502.13189): ``moba`` (every layer MoBA), ``full`` (full causal
attention), ``hybrid_last`` (the last ``--hybrid-layers`` layers full), ``hybrid_final`` (full
attention for the final ``--final-frac`` of steps) and ``topk1`` (own block only: a local-only
baseline that cannot read earlier blocks). Writes ``metrics.json``, ``command.txt``,
``heldout_bpb.png`` (held-out bits per byte vs tokens, best learning rate per variant) and
``loss_by_position.png`` (held-out bits per byte within the first block vs beyond 2 blocks).
Any train_cp.py option after ``--`` applies to every run (model size, context, steps, ...).
``--merge DIR...`` combines sweeps of disjoint ``--variants`` (e.g. one GPU call each) into
``--out-dir`` without training.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from lm_eval import plot_buckets, plot_heldout_curves, unigram_bits_per_byte
from train_cp import load_corpus, train
from train_cp import parse_args as train_args
from train_utils import setup_dist

__all__ = ["VARIANTS", "main", "merge", "variant_args"]

VARIANTS = ("moba", "full", "hybrid_last", "hybrid_final", "topk1")


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lrs", default="2e-3,4e-3,8e-3", help="comma-separated learning-rate grid")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--hybrid-layers", type=int, default=1, help="hybrid_last: full layers")
    p.add_argument("--final-frac", type=float, default=0.2, help="hybrid_final: full share")
    p.add_argument("--out-dir", default="runs/train_evidence")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="combine finished sweeps, no training")
    args = p.parse_args(argv[:split])
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.variants = args.variants.split(",")
    if len(args.lrs) < 1 or any(lr <= 0 for lr in args.lrs):
        p.error(f"--lrs must be positive numbers, got {args.lrs}")
    if not set(args.variants) <= set(VARIANTS):
        p.error(f"--variants must be drawn from {VARIANTS}, got {args.variants}")
    return args, argv[split + 1 :]


def variant_args(variant: str, lr: float, base: list[str], ev: argparse.Namespace):
    """train_cp.py arguments of one run, and whether every layer is full attention."""
    extra = {
        "moba": ["--full-layers", "0"],
        "full": ["--full-layers", "0"],
        "hybrid_last": ["--full-layers", str(ev.hybrid_layers)],
        "hybrid_final": ["--full-layers", "0", "--full-attn-final-frac", str(ev.final_frac)],
        "topk1": ["--full-layers", "0", "--topk", "1"],
    }[variant]
    args = train_args([*base, *extra, "--lr", str(lr)])
    args.save_every = args.steps  # one checkpoint at the end: the sweep never resumes
    return args, variant == "full"


def run_all(ev, base: list[str], d, corpus) -> dict:
    runs: dict = {}
    for variant in ev.variants:
        for lr in ev.lrs:
            args, full = variant_args(variant, lr, base, ev)
            scratch = os.path.join(ev.out_dir, "scratch", f"{variant}_lr{lr:g}")
            t0 = time.perf_counter()
            r = train(args, d, full, scratch, corpus)
            runs.setdefault(variant, {})[f"{lr:g}"] = {
                "lr": lr, "final_bpb": r["final"]["bpb"], "evals": r["evals"],
                "cp": r["cp"], "seconds": time.perf_counter() - t0,
                "train_loss_last": r["history"][-1]["loss"],
            }  # fmt: skip
            if d.rank == 0:  # partial results survive an interrupted sweep
                print(f"{variant} lr {lr:g}: held-out {r['final']['bpb']}", flush=True)
                with open(os.path.join(ev.out_dir, "partial.json"), "w") as f:
                    json.dump(runs, f)
    return runs


def summarize(runs: dict) -> dict:
    """Best learning rate of each variant (lowest final held-out bits per byte) and its numbers."""
    best = {}
    for variant, by_lr in runs.items():
        lr, r = min(by_lr.items(), key=lambda kv: kv[1]["final_bpb"]["all"])
        best[variant] = {"lr": float(lr), **r["final_bpb"]}
    return best


def write_outputs(blob: dict, out_dir: str) -> None:
    """metrics.json, both plots and the table, from the sweep's record alone (also for --merge)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(blob, f, indent=1)
    p, best, runs, unigram = (argparse.Namespace(**blob["train_cp_args"]), blob["best"],
                              blob["runs"], blob["unigram_bpb"])  # fmt: skip
    shape = (f"{p.layers} layers, dim {p.dim}, context {p.seq_len}, block {p.block}, "
             f"topk {p.topk}, {p.steps} steps, {blob['world'] // p.dp} CP ranks, "
             f"{blob['device']}")  # fmt: skip
    curves = {}
    for v, b in best.items():
        evals = runs[v][f"{b['lr']:g}"]["evals"]
        curves[f"{v} (lr {b['lr']:g})"] = [(e["tokens"], e["bpb"]["all"]) for e in evals]
    plot_heldout_curves(curves, os.path.join(out_dir, "heldout_bpb.png"), unigram,
                        f"Held-out bits per byte, {args_label(p)}\n{shape}")  # fmt: skip
    plot_buckets({f"{v} (lr {b['lr']:g})": b for v, b in best.items()},
                 os.path.join(out_dir, "loss_by_position.png"), p.block,
                 f"Held-out loss by position in the window\n{shape}")  # fmt: skip
    for v, b in best.items():
        print(f"{v:13s} lr {b['lr']:<7g} held-out {b['all']:.4f} bits/byte, first block "
              f"{b['first_block']:.4f}, beyond 2 blocks {b['beyond_2_blocks']:.4f}")  # fmt: skip
    print(f"unigram baseline {unigram:.4f} bits/byte", flush=True)


def merge(dirs: list[str], out_dir: str) -> None:
    """One record from sweeps of disjoint variants run separately (e.g. one GPU call each)."""
    parts = []
    for d in dirs:
        with open(os.path.join(d, "metrics.json")) as f:
            parts.append(json.load(f))
    blob = parts[0]
    for d, other in zip(dirs[1:], parts[1:], strict=True):
        for key in ("train_cp_args", "corpus", "lrs"):
            if other[key] != blob[key]:
                raise SystemExit(f"--merge: {d} differs from {dirs[0]} in {key!r}")
        blob["variants"] += other["variants"]
        blob["runs"].update(other["runs"])
    blob["best"] = summarize(blob["runs"])
    write_outputs(blob, out_dir)


def main(argv=None) -> None:
    ev, base = parse_args(argv)
    if ev.merge:
        merge(ev.merge, ev.out_dir)
        return
    probe = train_args(base)
    d = setup_dist(probe.dp, device=probe.device)
    corpus = load_corpus(probe)
    if corpus is None:
        raise SystemExit("train_evidence.py needs text: --data stdlib or a file, not kv")
    unigram = unigram_bits_per_byte(corpus.train, corpus.heldout)
    runs = run_all(ev, base, d, corpus)
    if d.rank == 0:
        blob = {"train_cp_args": vars(probe), "lrs": ev.lrs, "variants": ev.variants,
                "hybrid_layers": ev.hybrid_layers, "final_frac": ev.final_frac,
                "world": d.world, "device": d.device.type, "corpus": corpus.info,
                "unigram_bpb": unigram, "best": summarize(runs), "runs": runs}  # fmt: skip
        write_outputs(blob, ev.out_dir)
        shutil.rmtree(os.path.join(ev.out_dir, "scratch"), ignore_errors=True)
        os.remove(os.path.join(ev.out_dir, "partial.json"))
    d.close()


def args_label(args) -> str:
    return "Python stdlib source" if args.data == "stdlib" else os.path.basename(args.data)


if __name__ == "__main__":
    main()
