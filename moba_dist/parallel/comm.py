"""Every torch.distributed call of moba_dist lives here.

Only collectives that both gloo (CPU) and NCCL (CUDA) provide: ``all_gather`` with equal sizes,
``all_reduce``, and ``all_to_all_single`` (gloo handles uneven splits there, but not in list-form
``all_to_all``/``all_gather``). Every rank must call these in the same order, including ranks with
nothing to send: callers never skip one on a rank-local condition. Split sizes are host ints;
NCCL needs them on the host, so each variable exchange costs one device-to-host copy of a
``[P]`` count vector. Timeouts come from the process group (``init_process_group(timeout=...)``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "Work",
    "all_gather_rows",
    "all_reduce_sum",
    "all_to_all_counts",
    "all_to_all_rows",
    "backend_name",
    "comm_device",
    "group_rank_and_size",
    "group_size",
    "resolve_group",
]

Work = object  # the handle returned by async collectives (``dist.Work``); only ``wait()`` is used


def resolve_group(process_group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """``None`` means torch.distributed's default group, as in torch's own APIs."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "context-parallel MoBA needs torch.distributed initialised "
            "(torch.distributed.init_process_group) or an explicit process_group"
        )
    return process_group if process_group is not None else dist.group.WORLD


def group_rank_and_size(group: dist.ProcessGroup) -> tuple[int, int]:
    """This process's rank inside ``group`` (not its global rank) and the group size."""
    return dist.get_rank(group), dist.get_world_size(group)


def group_size(group: dist.ProcessGroup) -> int:
    """Number of ranks of ``group``."""
    return dist.get_world_size(group)


def comm_device(group: dist.ProcessGroup) -> torch.device:
    """Device for small metadata tensors: NCCL only moves CUDA tensors, gloo CPU ones."""
    if backend_name(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend_name(group: dist.ProcessGroup) -> str:
    """``"nccl"``, ``"gloo"``, ... of ``group``."""
    return dist.get_backend(group)


def all_gather_rows(x: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False):
    """Equal-size all-gather: ``x [n, ...]`` -> ``[P, n, ...]`` (and the work handle if async)."""
    size = dist.get_world_size(group)
    out = torch.empty((size, *x.shape), dtype=x.dtype, device=x.device)
    work = dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group, async_op=async_op)
    return (out, work) if async_op else out


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """In-place sum over the group; returns ``x``."""
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def all_to_all_counts(send_counts: list[int], group: dist.ProcessGroup, device) -> list[int]:
    """Exchange one int per peer: returns what each peer sent to this rank."""
    send = torch.tensor(send_counts, dtype=torch.int64, device=device)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.tolist()


def all_to_all_rows(
    send: torch.Tensor,
    send_counts: list[int],
    recv_counts: list[int],
    group: dist.ProcessGroup,
    async_op: bool = False,
):
    """Variable-size all-to-all of rows ``send [sum(send_counts), ...]``, grouped by destination,
    into ``[sum(recv_counts), ...]`` grouped by source. Returns ``(recv, work or None)``."""
    recv = torch.empty((sum(recv_counts), *send.shape[1:]), dtype=send.dtype, device=send.device)
    work = dist.all_to_all_single(
        recv, send.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts,
        group=group, async_op=async_op,
    )  # fmt: skip
    return recv, work
