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
    "GLOO_CARRIES_CUDA",
    "StagedWork",
    "Work",
    "all_gather_flag",
    "all_gather_into",
    "all_gather_rows",
    "all_reduce_min_int",
    "all_reduce_sum",
    "all_to_all_counts",
    "all_to_all_rows",
    "all_to_all_single_into",
    "all_to_all_variable",
    "backend_name",
    "comm_device",
    "exchange_rows_async",
    "group_rank_and_size",
    "group_size",
    "needs_staging",
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


# --- collectives on rows ---


def all_gather_rows(x: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False):
    """Equal-size all-gather: ``x [n, ...]`` -> ``[P, n, ...]`` (and the work handle if async)."""
    size = dist.get_world_size(group)
    out = torch.empty((size, *x.shape), dtype=x.dtype, device=x.device)
    work = all_gather_into(out, x, group, async_op=async_op)
    return (out, work) if async_op else out


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """In-place sum over the group; returns ``x`` (gloo reduces CUDA tensors itself)."""
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def all_to_all_counts(send_counts: list[int], group: dist.ProcessGroup, device) -> list[int]:
    """Exchange one int per peer: returns what each peer sent to this rank."""
    send = torch.tensor(send_counts, dtype=torch.int64, device=device)
    recv = torch.empty_like(send)
    all_to_all_single_into(recv, send, None, None, group)
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
    work = all_to_all_single_into(recv, send, recv_counts, send_counts, group, async_op)
    return recv, work


# --- CUDA tensors on gloo groups ---
# gloo moves CUDA tensors itself only for broadcast and all_reduce. For all_gather and
# all_to_all the helpers below copy CUDA inputs to the host, run gloo there and copy the result
# back, so several processes can share one GPU over a gloo group. Every other (backend, device)
# pair goes straight to torch.distributed. A staged call costs a device-to-host copy (a host
# sync) per call: meant for tests and one-GPU checks, not for speed.

#: Gloo groups carry CUDA tensors through these helpers (``examples/devices.py`` reads it).
GLOO_CARRIES_CUDA = True


def needs_staging(x: torch.Tensor, group: dist.ProcessGroup) -> bool:
    """True when ``x`` lives off the CPU and ``group`` is gloo: the collective is staged."""
    return x.device.type != "cpu" and backend_name(group) == "gloo"


class StagedWork:
    """Handle of a staged collective: ``wait()`` waits for gloo, then copies the host result
    into the device output (the caller reads the output only after ``wait()``, as with
    ``dist.Work``)."""

    def __init__(self, work, host: torch.Tensor, out: torch.Tensor) -> None:
        self._work, self._host, self._out = work, host, out

    def wait(self) -> bool:
        if self._work is not None:
            self._work.wait()
            self._work = None
            self._out.copy_(self._host)
        return True


def all_gather_into(
    out: torch.Tensor, x: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False
):
    """``dist.all_gather`` of ``x [n, ...]`` into the rows of ``out [P, n, ...]``, staged through
    the host for CUDA tensors on gloo. Returns the work handle (``None`` unless ``async_op``)."""
    x = x.contiguous()
    if not needs_staging(x, group):
        return dist.all_gather(list(out.unbind(0)), x, group=group, async_op=async_op)
    host = torch.empty(out.shape, dtype=out.dtype)
    work = dist.all_gather(list(host.unbind(0)), x.cpu(), group=group, async_op=True)
    return _finish(StagedWork(work, host, out), async_op)


def all_to_all_single_into(
    recv: torch.Tensor,
    send: torch.Tensor,
    recv_counts: list[int] | None,
    send_counts: list[int] | None,
    group: dist.ProcessGroup,
    async_op: bool = False,
):
    """``dist.all_to_all_single`` of rows (``None`` counts: equal splits), staged through the
    host for CUDA tensors on gloo. Returns the work handle (``None`` unless ``async_op``)."""
    send = send.contiguous()
    kw = dict(output_split_sizes=recv_counts, input_split_sizes=send_counts, group=group)
    if not needs_staging(send, group):
        return dist.all_to_all_single(recv, send, async_op=async_op, **kw)
    host = torch.empty(recv.shape, dtype=recv.dtype)
    work = dist.all_to_all_single(host, send.cpu(), async_op=True, **kw)
    return _finish(StagedWork(work, host, recv), async_op)


def _finish(work: StagedWork, async_op: bool):
    if async_op:
        return work
    work.wait()
    return None


def all_to_all_variable(
    send: torch.Tensor,
    send_counts: list[int],
    recv_counts: list[int],
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """Blocking variable-size all-to-all of rows ``send [sum(send_counts), ...]`` (grouped by
    destination) -> ``[sum(recv_counts), ...]`` grouped by source (the head-parallel exchanges
    of ``moba_dist.parallel.heads``: a name of their own, so tests can count their bytes)."""
    return all_to_all_rows(send, send_counts, recv_counts, group)[0]


# --- exchanges of the streamed strategy and its agreement ---
# The exchanges of ``strategy="streamed"`` (``moba_dist.parallel.streamed``): one variable-size
# all-to-all per piece, launched async so the next piece flies while one is attended (on NCCL
# the collective runs on the process group's stream and ``wait`` orders the compute stream after
# it without blocking the host), plus the budget agreement and the end-of-pass flags.


def all_reduce_min_int(value: int, group: dist.ProcessGroup) -> int:
    """The smallest of every rank's ``value`` (one all-reduce, one host read)."""
    x = torch.tensor([value], dtype=torch.int64, device=comm_device(group))
    dist.all_reduce(x, op=dist.ReduceOp.MIN, group=group)
    return int(x.item())


def exchange_rows_async(
    send: torch.Tensor, send_counts: list[int], recv_counts: list[int], group: dist.ProcessGroup
):
    """Launch a variable-size all-to-all of rows (as :func:`all_to_all_rows`, staged through the
    host for CUDA tensors on gloo); returns ``(recv, work)``, ``recv`` valid after ``wait()``."""
    return all_to_all_rows(send, send_counts, recv_counts, group, async_op=True)


def all_gather_flag(flag: int, group: dist.ProcessGroup) -> list[int]:
    """Every rank's ``flag`` (one int each; one all-gather, one host read)."""
    x = torch.tensor([flag], dtype=torch.int64, device=comm_device(group))
    return all_gather_rows(x, group).reshape(-1).tolist()
