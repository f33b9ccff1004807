"""A run folder ``benchmarks/results/<gpu>/<yyyy-mm-dd>[-tag]/``: ``rows.json`` (every job's
rows and commands), ``table.md`` (the tables), labelled PNGs and ``command.txt``. Up to a few
jobs at one commit append to the same folder; a row replaces an older row of the same
(job, case, backend, layout)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["SCHEMA", "markdown", "merge_rows", "write_run"]

SCHEMA = 1
ROW_KEYS = ("job", "case", "backend")  # every row has them (rows.json schema)


def _key(r: dict) -> tuple:
    return (r["job"], r["case"], r["backend"], r.get("layout"))


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` rows not replaced by ``new`` ones, then ``new`` (same key: newer wins)."""
    keys = {_key(r) for r in new}
    return [r for r in old if _key(r) not in keys] + new


def write_run(folder: Path, meta: dict, rows: list[dict]) -> dict:
    """Append one job (``meta``: job, command, commit, device, ...) and its rows to ``folder``;
    rewrite the tables and plots from every row. Refuses a job at another commit."""
    for r in rows:
        missing = [k for k in ROW_KEYS if k not in r]
        if missing:
            raise ValueError(f"row lacks {missing}: {r}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "rows.json"
    run = json.loads(path.read_text()) if path.exists() else dict(schema=SCHEMA, jobs=[], rows=[])
    if run.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {run.get('schema')}, this tool writes {SCHEMA}")
    if run["jobs"] and run.get("commit") != meta["commit"] and not meta.get("allow_mixed"):
        raise ValueError(
            f"{folder} holds commit {run.get('commit')}, this job is at "
            f"{meta['commit']}: use another --tag (or --allow-mixed-commits)"
        )
    run["commit"] = run.get("commit") or meta["commit"]
    run["gpu"] = meta["gpu"]
    run["jobs"].append(meta)
    run["rows"] = merge_rows(run["rows"], rows)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(run, indent=1, default=str))
    tmp.replace(path)
    (folder / "command.txt").write_text(
        "".join(
            f"# job {j['job']} at {j['started']} (commit {j['commit']})\n{j['command']}\n"
            for j in run["jobs"]
        )
    )
    from .plots import plot_all

    try:
        pngs = plot_all(run["rows"], folder)
    except Exception as e:  # the tables and rows matter more than the pictures
        print(f"plots failed: {type(e).__name__}: {e}")
        pngs = []
    (folder / "table.md").write_text(markdown(run, pngs))
    return run


def _f(r: dict, key: str, fmt: str | None = None) -> str:
    """A cell: ``fmt`` for numbers (default: 2 decimals for floats, ints as they are)."""
    v = r.get(key)
    if v is None:
        return ""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    return (fmt or ("{:.2f}" if isinstance(v, float) else "{}")).format(v)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(c) + " |" for c in rows),
    ]


def _err(r: dict) -> str:
    return r.get("error", "").replace("|", "/")[:120]


def _col(key: str, fmt: str | None = None):
    return lambda r: _f(r, key, fmt)


def _syncs(r: dict) -> str:
    return f"{r['syncs_fwd']}/{r['syncs_bwd']}" if "syncs_fwd" in r else ""


_ERRS = [(n, _col(f"{n}_err", "{:.2e}")) for n in ("out", "dq", "dk", "dv")]
# (title, job, kind or None, [(header, cell of a row)]): one markdown table each.
SECTIONS = [
    ("Op (single device)", "local", "op", [
        ("case", _col("case")), ("density", _col("density", "{:.3f}")),
        ("backend", _col("backend")), ("fwd ms", _col("fwd_ms")),
        ("fwd+bwd ms", _col("fwdbwd_ms")), ("fwd x dense", _col("speedup_fwd")),
        ("f+b x dense", _col("speedup_fwdbwd")), ("TFLOP/s fwd", _col("tflops_fwd", "{:.3g}")),
        ("TFLOP/s f+b", _col("tflops_fwdbwd", "{:.3g}")), ("gate ms", _col("gate_ms")),
        ("syncs fwd/bwd", _syncs), ("peak GiB", _col("peak_gib")), ("error", _err)]),
    ("Transformer layer step (fwd+bwd)", "local", "layer", [
        ("case", _col("case")), ("tokens", _col("T")), ("backend", _col("backend")),
        ("fwd ms", _col("fwd_ms")), ("fwd+bwd ms", _col("fwdbwd_ms")),
        ("tokens/s", _col("tokens_per_s", "{:,.0f}")), ("x dense", _col("speedup_fwdbwd")),
        ("peak GiB", _col("peak_gib")), ("error", _err)]),
    ("Decode step (batch 1, one token)", "decode", None, [
        ("case", _col("case")), ("cache", _col("T")), ("block", _col("block")),
        ("topk", _col("topk")), ("backend", _col("backend")),
        ("step ms", _col("step_ms", "{:.3f}")), ("x dense", _col("speedup_step")),
        ("error", _err)]),
    ("Accuracy (relative Frobenius error vs float32)", "accuracy", None, [
        ("case", _col("case")), ("tokens", _col("T")), ("backend", _col("backend")), *_ERRS,
        ("within 2x bf16 ref", _col("within_2x_bf16_reference")), ("error", _err)]),
    ("Context parallel (slowest rank)", "cp", None, [
        ("case", _col("case")), ("P", _col("P")), ("layout", _col("layout")),
        ("strategy", _col("backend")), ("fwd ms", _col("fwd_ms")),
        ("fwd+bwd ms", _col("fwdbwd_ms")), ("peak GiB", _col("peak_gib")),
        ("union", _col("union_fraction")), ("error", _err)]),
    ("Context-parallel correctness", "cp-check", None, [
        ("check", _col("case")), ("P", _col("P")), ("ok on all ranks", _col("ok_all_ranks")),
        ("errs (out, dq, dk, dv)", _col("errs"))]),
]  # fmt: skip


def markdown(run: dict, pngs: list[str]) -> str:
    """Tables of every job in ``run``, conventions and commands first."""
    lines = [
        f"# MoBA benchmark run on {run['gpu']}",
        "",
        f"Commit `{run['commit']}`. Conventions (benchmarks/moba_bench/common.py): fwd+bwd "
        "FLOPs = 3.5x forward; useful FLOPs from MoBA's density; dense = the faster of cuDNN "
        "SDPA and FA2 in the same run; accuracy = relative Frobenius error against float32.",
        "",
        "Jobs:",
        "",
        *(f"    {j['command']}" for j in run["jobs"]),
        *(f"\n![{p}]({p})" for p in pngs),
    ]
    for title, job, kind, cols in SECTIONS:
        rows = [r for r in run["rows"] if r["job"] == job and kind in (None, r.get("kind"))]
        if rows:
            lines += ["", f"## {title}"]
            lines += _table([h for h, _ in cols], [[c(r) for _, c in cols] for r in rows])
    return "\n".join(lines) + "\n"
