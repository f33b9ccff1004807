"""The shipped documentation holds up: links resolve, README's Python snippets run as written.

- Every relative link in README.md and docs/*.md names a file (or folder) inside the repository
  that exists, and an ``#anchor`` into a Markdown file names one of its headings (GitHub's
  slugs). No link climbs out of the repository (a path into a sibling checkout, a CI scratch
  directory). External links are http(s) to a public host, never localhost or a file:// URL.
- Every ```python block of README.md passes ``ruff`` (undefined names, unused imports) and runs
  on CPU in a fresh process from an empty directory. A block that calls
  ``init_process_group`` is a script for ``torchrun``: it runs on 2 gloo ranks. Blocks needing
  an optional package that is not installed (transformers, megatron-core) are skipped.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)
_PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def _prose(text: str) -> str:
    """Markdown without code blocks and inline code (links there are not links)."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def links(path: Path) -> list[str]:
    prose = _prose(path.read_text(encoding="utf-8"))
    return _LINK.findall(prose) + _HTML_LINK.findall(prose)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|<[^>]+>", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    headings = re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", _FENCE.sub("", path.read_text()), re.M)
    found: set[str] = set()
    for h in headings:
        base, n = slug(h), 1
        name = base
        while name in found:  # repeated headings get -1, -2, ...
            name, n = f"{base}-{n}", n + 1
        found.add(name)
    return found


def _private_host(host: str) -> bool:
    if host in ("localhost", "") or host.endswith((".local", ".internal", ".localhost")):
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_reserved


def check_link(doc: Path, target: str) -> str | None:
    """Why ``target`` (a link in ``doc``) is broken, or None."""
    url = urlparse(target)
    if url.scheme:
        if url.scheme not in ("http", "https"):
            return f"only http(s) external links are allowed, got scheme {url.scheme!r}"
        if _private_host(url.hostname or ""):
            return f"external link to a non-public host {url.hostname!r}"
        return None
    if target.startswith("//"):
        return "protocol-relative link"
    file_part, _, anchor = target.partition("#")
    dest = doc if not file_part else (doc.parent / unquote(file_part)).resolve()
    if file_part.startswith("/") or not dest.is_relative_to(ROOT):
        return f"leaves the repository (resolves to {dest})"
    if not dest.exists():
        return f"{dest.relative_to(ROOT)} does not exist"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"no heading with anchor #{anchor} in {dest.relative_to(ROOT)}"
    return None


def test_slug_follows_github_rules():
    assert slug("topk = 1: the own block only") == "topk--1-the-own-block-only"
    assert (
        slug("Set-up: two commands on a fresh machine") == "set-up-two-commands-on-a-fresh-machine"
    )
    assert slug("`last_stats` fields") == "last_stats-fields"


def test_link_checker_rejects_what_it_should(tmp_path):
    doc = ROOT / "docs" / "semantics.md"
    assert check_link(doc, "design.md") is None
    assert check_link(doc, "../README.md#api") is None
    assert "does not exist" in check_link(doc, "nothere.md")
    assert "leaves the repository" in check_link(doc, "../../shared/docs/moba_semantics.md")
    assert "leaves the repository" in check_link(doc, "/tmp/ci/runs/train_cp")
    assert "no heading" in check_link(doc, "design.md#no-such-section")
    assert "scheme" in check_link(doc, "file:///etc/passwd")
    assert "non-public" in check_link(doc, "http://localhost:8000/x")
    assert "non-public" in check_link(doc, "http://10.1.2.3/x")
    assert check_link(doc, "https://arxiv.org/abs/2502.13189") is None
    assert links_of(
        "see [a](x.md) and `[b](y.md)` and ![c](z.png)\n```\n[d](w.md)\n```\n", tmp_path
    ) == [
        "x.md",
        "z.png",
    ]


def links_of(text: str, tmp_path: Path) -> list[str]:
    p = tmp_path / "t.md"
    p.write_text(text)
    return links(p)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_inside_the_repository(doc):
    found = links(doc)
    broken = [f"{t}: {why}" for t in found if (why := check_link(doc, t))]
    assert not broken, f"{doc.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_readme_links_the_shipped_docs():
    targets = set(links(ROOT / "README.md"))
    for name in ("semantics.md", "design.md", "megatron.md", "scale_model.md", "long_context.md"):
        assert f"docs/{name}" in targets or any(t.startswith(f"docs/{name}#") for t in targets), (
            name
        )


# ---- README snippets ---------------------------------------------------------------------------
SNIPPETS = _PYTHON_BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))
_NEEDS = {"transformers": "transformers", "megatron": "megatron.core"}


def _snippet_id(i: int) -> str:
    code = SNIPPETS[i]
    for mod in _NEEDS:
        if re.search(rf"^\s*(from|import) {mod}\b", code, re.M):
            return f"{i}-{mod}"
    return f"{i}-{'torchrun' if 'init_process_group' in code else 'python'}"


def _installed(module: str) -> bool:
    parent = module.split(".")[0]
    return (
        importlib.util.find_spec(parent) is not None
        and importlib.util.find_spec(module) is not None
    )


def test_readme_has_python_snippets():
    assert len(SNIPPETS) >= 3, "expected the API, context-parallel and integration snippets"


@pytest.mark.parametrize("i", range(len(SNIPPETS)), ids=_snippet_id)
def test_readme_snippet_is_clean(i, tmp_path):
    pytest.importorskip("ruff")
    path = tmp_path / f"snippet_{i}.py"
    path.write_text(SNIPPETS[i])
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--no-cache",
            "--isolated",
            "--select",
            "F",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, f"README snippet {i}:\n{SNIPPETS[i]}\n{res.stdout}{res.stderr}"


@pytest.mark.parametrize("i", range(len(SNIPPETS)), ids=_snippet_id)
def test_readme_snippet_runs(i, tmp_path):
    code = SNIPPETS[i]
    for mod, spec in _NEEDS.items():
        if re.search(rf"^\s*(from|import) {mod}\b", code, re.M) and not _installed(spec):
            pytest.skip(f"{spec} is not installed")
    path = tmp_path / f"snippet_{i}.py"
    path.write_text(code)
    cmd = [sys.executable, str(path)]
    if "init_process_group" in code:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    res = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400, check=False
    )
    assert res.returncode == 0, f"README snippet {i} failed:\n{code}\n{res.stdout}\n{res.stderr}"
