"""Command line of the benchmark tool: parse, run one job's cases, write the run folder."""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from .cases import select_cases
from .common import device_slug
from .dense import YARDSTICK, dense_backends
from .report import write_run

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parents[1] / "results"
JOBS = ("local", "cp", "decode", "accuracy")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.moba_bench",
        description="MoBA benchmark tool: one folder per run.",
    )
    ap.add_argument("job", choices=JOBS)
    ap.add_argument("--cases", help="comma-separated case names (default: all of the job)")
    ap.add_argument("--tag", default="", help="folder suffix: <yyyy-mm-dd>-<tag>")
    ap.add_argument("--date", help="folder date (default: today, UTC): jobs of one run share it")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: tiny cases, reference op")
    ap.add_argument("--backend", help="MoBA backend (default: triton; reference with --quick)")
    ap.add_argument(
        "--reps", type=int, help="timed calls per measurement, median (default 5; 1 with --quick)"
    )
    ap.add_argument("--budget-s", type=float, default=90.0, help="seconds per case at most")
    ap.add_argument(
        "--dense-long",
        action="store_true",
        help="also time dense baselines on sequences >= 512K tokens (slow)",
    )
    ap.add_argument(
        "--baselines",
        type=lambda s: tuple(s.split(",")),
        help="local job: the dense baselines to time, comma-separated (default: all; the "
        "faster of those timed is the run's dense), e.g. dense-fa2 for FA2-relative targets",
    )
    ap.add_argument(
        "--profile",
        help="local job: cases whose MoBA fwd+bwd is also profiled "
        "per kernel (profile_<case>.txt in the run folder)",
    )
    ap.add_argument("--acc-tokens", type=int, default=16384, help="accuracy cases cut to this")
    ap.add_argument("--layouts", default="contiguous,zigzag", help="cp job: sequence layouts")
    ap.add_argument(
        "--commit",
        default=os.environ.get("MOBA_BENCH_COMMIT"),
        help="commit of the tree (default: git rev-parse HEAD, env MOBA_BENCH_COMMIT)",
    )
    ap.add_argument("--allow-mixed-commits", action="store_true")
    ap.add_argument("--out-root", type=Path, default=RESULTS, help="results root")
    return ap


def _commit(given: str | None) -> str:
    if given:
        return given
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
            check=True,
        )
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no .git: pass --commit or MOBA_BENCH_COMMIT)"


def _rows(a, device, log) -> list[dict] | None:
    if a.job == "cp":
        from .cp import run_cp

        return run_cp(a.cases, a.layouts, a.reps, log)
    backend = a.backend or ("reference" if a.quick else "triton")
    rows = []
    for case in select_cases(a.job, a.cases, a.quick):
        log(f"{a.job} {case.name}", flush=True)
        try:
            rows += _case_rows(a, case, device, backend, log)
        except Exception as e:  # a case that fails before any backend ran (inputs: OOM)
            rows.append(
                dict(
                    job=a.job,
                    case=case.name,
                    kind=case.kind,
                    backend=backend,
                    error=f"{type(e).__name__}: {str(e)[:300]}",
                )
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _case_rows(a, case, device, backend, log) -> list[dict]:
    if a.job == "local":
        from .local import run_local_case

        return run_local_case(
            case, device, backend, a.reps, a.budget_s, a.dense_long, log, a.baselines
        )
    if a.job == "decode":
        from .decode import run_decode_case

        return run_decode_case(case, device, backend, a.reps, a.budget_s, log)
    from .accuracy import run_accuracy_case

    return run_accuracy_case(case, device, backend, a.acc_tokens, log)


def _profiles(a, device, folder: Path, log) -> None:
    from .local import profile_table

    backend = a.backend or ("reference" if a.quick else "triton")
    for case in select_cases("local", a.profile, a.quick):
        try:
            text = profile_table(case, device, backend)
        except Exception as e:  # the timings are already written
            text = f"profile failed: {type(e).__name__}: {str(e)[:300]}"
        (folder / f"profile_{case.name}.txt").write_text(text + "\n")
        log(f"profile {case.name}:\n{text}")


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    a.reps = a.reps if a.reps is not None else (1 if a.quick else 5)
    if a.reps < 1 or a.budget_s <= 0 or a.acc_tokens < 1:
        ap.error(
            f"--reps, --budget-s and --acc-tokens must be > 0, got {a.reps}, "
            f"{a.budget_s}, {a.acc_tokens}"
        )
    known = (*dense_backends(torch.device("cuda")), *dense_backends(torch.device("cpu")), YARDSTICK)
    if a.baselines and not set(a.baselines) <= set(known):
        ap.error(f"--baselines takes names from {', '.join(known)}, got {','.join(a.baselines)}")
    if a.quick and a.job == "cp":
        ap.error("--quick has no cp job (the cp job needs NCCL GPUs under torchrun)")
    if not a.quick and not torch.cuda.is_available() and a.job != "cp":
        ap.error("no CUDA device: use --quick for the CPU smoke run")
    try:
        select_cases(a.job, a.cases, a.quick) if a.job != "cp" else None
    except ValueError as e:
        ap.error(str(e))
    device = torch.device("cpu" if a.quick else "cuda")
    started = datetime.datetime.now(datetime.UTC)
    log = lambda *x, **k: print(*x, **{"flush": True, **k})  # noqa: E731
    log(f"torch {torch.__version__}, device {device_slug(device)}")
    rows = _rows(a, device, log)
    if rows is None:  # a cp rank other than 0
        return 0
    folder = a.out_root / device_slug(device if a.job != "cp" else torch.device("cuda"))
    folder = folder / ((a.date or started.strftime("%Y-%m-%d")) + (f"-{a.tag}" if a.tag else ""))
    world = int(os.environ.get("WORLD_SIZE", 1))
    launcher = f"torchrun --nproc-per-node {world}" if a.job == "cp" else "python"
    meta = dict(
        job=a.job,
        command=f"PYTHONPATH=. {launcher} -m benchmarks.moba_bench "
        + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])),
        commit=_commit(a.commit),
        gpu=folder.parent.name,
        torch=torch.__version__,
        started=started.isoformat(timespec="seconds"),
        allow_mixed=a.allow_mixed_commits,
        world=world,
    )
    write_run(folder, meta, rows)
    if a.job == "local" and a.profile:
        _profiles(a, device, folder, log)
    log(f"wrote {folder} ({len(rows)} rows, {sum('error' in r for r in rows)} with errors)")
    return 0
