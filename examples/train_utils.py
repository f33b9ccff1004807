"""Plumbing for train_cp.py: process groups, mesh, gradient sync, checkpoints, progress, plots."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from devices import select_devices
from torch.distributed.device_mesh import init_device_mesh

from moba_dist.kernels.blocks import BlockLayout
from moba_dist.ops import moba_route
from moba_dist.parallel import unshard


@dataclass
class Dist:
    """This process's place in the (dp, cp) mesh."""

    rank: int
    world: int
    dp: int
    cp: int
    dp_rank: int
    cp_rank: int
    device: torch.device
    backend: str
    cp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    dtype: torch.dtype = torch.float32  # bfloat16 on CUDA (autocast), float32 on the CPU

    def sum_world(self, x: torch.Tensor) -> torch.Tensor:
        """Sum a small tensor over all ranks (moved to the device NCCL needs and back)."""
        y = x.to(self.device)
        dist.all_reduce(y)
        return y.cpu()

    def close(self) -> None:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_dist(dp: int, device: str = "auto", backend: str = "auto") -> Dist:
    """Initialise torch.distributed (torchrun's env, or a 1-process world when run directly).

    Device, backend and dtype come from examples/devices.py's shared decision (one GPU per rank
    with NCCL when there are enough GPUs, else gloo on the CPU); rank 0 prints it in one line.
    A choice that cannot run exits with the fix, before any CUDA call.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    plan, index = select_devices(device, backend, prog="setup_dist")
    dist.init_process_group(plan.backend, timeout=datetime.timedelta(minutes=10))
    world = dist.get_world_size()
    if dp < 1 or world % dp:
        raise SystemExit(f"--dp must divide the world size {world}, got {dp}")
    dev = torch.device("cpu") if index is None else torch.device("cuda", index)
    mesh = init_device_mesh(dev.type, (dp, world // dp), mesh_dim_names=("dp", "cp"))
    return Dist(
        rank=dist.get_rank(), world=world, dp=dp, cp=world // dp,
        dp_rank=mesh.get_local_rank("dp"), cp_rank=mesh.get_local_rank("cp"), device=dev,
        backend=plan.backend, cp_group=mesh.get_group("cp"), dp_group=mesh.get_group("dp"),
        dtype=getattr(torch, plan.dtype),
    )  # fmt: skip


def sync_grads(model: torch.nn.Module, d: Dist) -> None:
    """Sum gradients over the CP group (each rank saw part of the sequence), average over DP."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=d.cp_group)
    if d.dp > 1:
        dist.all_reduce(flat, group=d.dp_group)
        flat /= d.dp
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


@dataclass
class TrainState:
    step: int = 0
    history: list[dict] = field(default_factory=list)


def save_checkpoint(out_dir: str, model, opt, state: TrainState, d: Dist) -> None:
    """Rank 0 writes atomically (a restart never sees a half-written file); all ranks wait."""
    if d.rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "checkpoint.pt")
        blob = {"model": model.state_dict(), "opt": opt.state_dict(), "step": state.step,
                "history": state.history}  # fmt: skip
        torch.save(blob, path + ".tmp")
        os.replace(path + ".tmp", path)
    dist.barrier()


def load_checkpoint(out_dir: str, model, opt, d: Dist) -> TrainState:
    path = os.path.join(out_dir, "checkpoint.pt")
    if not os.path.exists(path):
        return TrainState()
    blob = torch.load(path, map_location=d.device, weights_only=False)
    model.load_state_dict(blob["model"])
    opt.load_state_dict(blob["opt"])
    if d.rank == 0:
        print(f"resumed from {path} at step {blob['step']}", flush=True)
    return TrainState(step=blob["step"], history=blob["history"])


class progress:
    """tqdm bar on rank 0 (plain lines when tqdm is missing) with loss, tokens/s and CP stats."""

    def __init__(self, total: int, initial: int, d: Dist, name: str) -> None:
        self.on, self.bar = d.rank == 0, None
        if self.on:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, desc=name, dynamic_ncols=True)
            except ImportError:
                self.bar = None
        self.name, self.step = name, initial

    def update(self, m: dict, tok_s: float, stats: dict) -> None:
        if not self.on:
            return
        self.step += 1
        info = dict(
            loss=f"{m['loss']:.3f}", acc=f"{m['acc']:.2f}", tok_s=f"{tok_s:.0f}",
            cp=stats.get("strategy", "-"), recv_MB=f"{stats.get('bytes_received', 0) / 1e6:.2f}",
            union=f"{stats.get('union_fraction', 0):.2f}",
        )  # fmt: skip
        if self.bar is not None:
            self.bar.set_postfix(info, refresh=False)
            self.bar.update(1)
        else:
            print(f"{self.name} step {self.step} " + " ".join(f"{k}={v}" for k, v in info.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_curves(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no loss plot (pip install 'moba-dist[examples]')")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        steps = [h["step"] for h in r["history"]]
        ax.plot(
            steps, [h["loss"] for h in r["history"]], label=f"{name} (eval acc {r['eval_acc']:.2f})"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("answer loss")
    ax.set_title("train_cp.py: key-value retrieval")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


@torch.no_grad()
def dump_routing(model, args, d: Dist, out_dir: str, batch, local_inputs) -> None:
    """Save the gate's global choices of every MoBA layer on one batch (DP replica 0)."""
    layers = [a for a in model.attention_layers() if not a.full]
    for a in layers:
        a.capture = []
    tok, pos, _, _, cu = local_inputs(args, d, *batch)
    model(tok, pos, cu)
    sels = []
    for a in layers:
        q, k = a.capture[0]
        a.capture = None
        full = []
        for x in (q.float(), k.float()):
            parts = [torch.empty_like(x) for _ in range(d.cp)]
            dist.all_gather(parts, x.contiguous(), group=d.cp_group)
            full.append(unshard(parts, cu, layout=args.layout))
        layout = BlockLayout.build(cu, args.block)
        sels.append(moba_route(full[0], full[1], layout, args.topk).cpu())
    if d.rank == 0:
        blob = {"cu_seqlens": cu.cpu(), "block": args.block, "topk": args.topk, "sel": sels,
                "kv_heads": args.kv_heads}  # fmt: skip
        torch.save(blob, os.path.join(out_dir, "routing.pt"))
