"""The docs stand alone: every repository path they name exists, and they cite nothing outside.

Scans the Markdown files of the repository (README.md, docs/, kernels/, cli/) for backticked
paths, paths in fenced code blocks and relative links, and every tracked Markdown, Python,
YAML and shell file for the names of design notes that were never part of the repository.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PATH_SUFFIXES = (".md", ".py", ".yaml", ".sh")
# Example locations on the user's side, named in commands but never shipped.
USER_SIDE_PREFIXES = ("runs/", "corpus/", "notes/", "c4/", "shared/")
# Design notes that lived outside the repository; their names are built from parts so that
# this file does not mention them itself.
OUTSIDE_DOCS = re.compile(r"\b(?:" + "|".join(("MODA_SPEC", "CONVENTIONS", "METHOD", "HOPPER")) + r")\.md\b")
WORK_ROUND_WORDS = re.compile(r"\bsessions?\b|\bthe issue\b|\bissue \d+\b", re.IGNORECASE)

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_SPLIT = re.compile(r"[\s=,;:()\[\]{}\"'|]+")


@dataclass(frozen=True)
class RepoIndex:
    """The repository's files and folders, as paths relative to its root with '/' separators."""

    files: frozenset[str]
    dirs: frozenset[str]

    @property
    def top_level(self) -> frozenset[str]:
        return frozenset(path.split("/")[0] for path in self.dirs if "/" not in path)

    def has(self, path: str) -> bool:
        path = path.rstrip("/")
        return path in self.files or path in self.dirs


def _index(paths: list[str]) -> RepoIndex:
    dirs = {"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 1)}
    return RepoIndex(frozenset(paths), frozenset(dirs))


def _repo_paths() -> list[str]:
    """Tracked files plus new files git does not ignore; a plain walk where there is no git."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout
        paths = [p for p in out.splitlines() if p]
    except (OSError, subprocess.CalledProcessError):
        skip = {".venv", "__pycache__", ".git", ".pytest_cache"}
        paths = []
        for folder, subdirs, names in os.walk(ROOT):
            subdirs[:] = [d for d in subdirs if d not in skip and not d.endswith(".egg-info")]
            rel = Path(folder).relative_to(ROOT).as_posix()
            paths += [name if rel == "." else f"{rel}/{name}" for name in names]
    # Files deleted in the working tree are still in git's index until the deletion is staged.
    return sorted(p for p in paths if (ROOT / p).exists() and not p.startswith("."))


def _markdown_files(index: RepoIndex) -> list[str]:
    return sorted(p for p in index.files if p.endswith(".md") and not p.startswith("tests/"))


def _path_candidates(text: str, top_level: frozenset[str]) -> list[str]:
    """Tokens of ``text`` that look like repository paths (globs and placeholders left out)."""
    found = []
    for piece in _SPLIT.split(_URL.sub(" ", text)):
        piece = piece.rstrip(".")
        if piece.startswith("./"):
            piece = piece[2:]
        if "/" not in piece or piece.startswith(("/", "~")) or any(c in piece for c in "*?<>$`\\"):
            continue
        if "..." in piece or piece.startswith(USER_SIDE_PREFIXES):
            continue
        if piece.split("/")[0] in top_level or piece.endswith(PATH_SUFFIXES):
            found.append(piece)
    return found


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def missing_references(md_path: str, text: str, index: RepoIndex) -> list[str]:
    """Every path or relative link in one Markdown file that names nothing in ``index``.

    A backticked or code-block path may be relative to the repository root or to the file's
    folder; a link is relative to the file's folder, as Markdown renderers read it.
    """
    here = os.path.dirname(md_path)

    def resolves(path: str, root_relative: bool = True) -> bool:
        tries = [os.path.normpath(os.path.join(here, path))]
        if root_relative:
            tries.append(os.path.normpath(path))
        return any(index.has(p.replace(os.sep, "/")) for p in tries)

    problems = []
    prose_lines, code = [], []
    in_fence = False
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
            prose_lines.append("")
        elif in_fence:
            code.append((lineno, line))
            prose_lines.append("")
        else:
            prose_lines.append(line)
    prose = "\n".join(prose_lines)

    pieces = [(_line_of(prose, m.start()), m.group(2)) for m in _SPAN.finditer(prose)] + code
    for lineno, piece in pieces:
        for path in _path_candidates(piece, index.top_level):
            if not resolves(path):
                problems.append(f"{md_path}:{lineno}: `{path}` names no file or folder in the repository")
    for m in _LINK.finditer(_SPAN.sub(lambda s: " " * len(s.group(0)), prose)):
        target = m.group(1).split("#")[0]
        if not target or _URL.match(target) or target.startswith(("mailto:", "/")):
            continue
        if not resolves(target, root_relative=False):
            problems.append(f"{md_path}:{_line_of(prose, m.start())}: link target {target!r} does not exist")
    return problems


def _matches(pattern: re.Pattern[str], path: str) -> list[str]:
    text = (ROOT / path).read_text(encoding="utf-8", errors="replace")
    return [
        f"{path}:{lineno}: {m.group(0)!r}"
        for lineno, line in enumerate(text.splitlines(), start=1)
        for m in pattern.finditer(line)
    ]


# --- the checker itself, on made-up files -------------------------------------------------

_TOY = _index(["README.md", "docs/model.md", "benchmarks/train_memory.py", "configs/default.yaml"])


def test_checker_flags_missing_paths_and_links():
    text = (
        "See `docs/method.md` and `benchmarks/kernel_attention.py --quick`.\n"
        "```bash\nmoda fit --config configs/tiny.yaml\n```\n"
        "Read [the model](model.md), [the flops](flops.md) and [home](../README.md#set-up).\n"
    )
    assert missing_references("docs/x.md", text, _TOY) == [
        "docs/x.md:1: `docs/method.md` names no file or folder in the repository",
        "docs/x.md:1: `benchmarks/kernel_attention.py` names no file or folder in the repository",
        "docs/x.md:3: `configs/tiny.yaml` names no file or folder in the repository",
        "docs/x.md:5: link target 'flops.md' does not exist",
    ]


def test_checker_ignores_globs_placeholders_and_user_paths():
    text = (
        "`moda fit --config configs/<name>.yaml --data.files='corpus/*.jsonl'`, `configs/*.yaml`,\n"
        "`runs/default/version_0/`, `docs/...`, `PYTHONPATH=kernels:. python benchmarks/train_memory.py`,\n"
        "`--data.cache_dir=/shared/cache/moda`, `h // G`, `T/2`, `16384 / T`, `notes/a.md`,\n"
        "[the paper](https://arxiv.org/abs/2603.15619), `https://github.com/hustvl/MoDA/README.md`,\n"
        "`configs/default.yaml`, `./docs/model.md`, `model.md` (no folder: not a path).\n"
    )
    assert missing_references("docs/x.md", text, _TOY) == []


def test_checker_finds_outside_document_names_and_work_round_words():
    assert OUTSIDE_DOCS.search("see " + "MODA_SPEC" + ".md, section 2")
    assert not OUTSIDE_DOCS.search("see docs/method.md")
    assert WORK_ROUND_WORDS.search("measured in the third Session")
    assert WORK_ROUND_WORDS.search("targets from the issue's author")
    assert not WORK_ROUND_WORDS.search("issued two launches; tissue")


# --- the repository -----------------------------------------------------------------------


def test_markdown_references_resolve():
    index = _index(_repo_paths())
    files = _markdown_files(index)
    assert "docs/method.md" in files and "README.md" in files
    problems = [p for md in files for p in missing_references(md, (ROOT / md).read_text(encoding="utf-8"), index)]
    assert not problems, "Markdown names paths that do not exist:\n" + "\n".join(problems)


def test_nothing_cites_documents_outside_the_repository():
    paths = [p for p in _repo_paths() if p.endswith((".md", ".py", ".yaml", ".sh"))]
    problems = [hit for path in paths for hit in _matches(OUTSIDE_DOCS, path)]
    assert not problems, (
        "these files cite design notes that are not in the repository; cite docs/method.md or the "
        "paper's sections instead:\n" + "\n".join(problems)
    )


def test_markdown_labels_work_by_date_not_by_rounds():
    problems = [hit for md in _markdown_files(_index(_repo_paths())) for hit in _matches(WORK_ROUND_WORDS, md)]
    assert not problems, (
        "label measurements by date, device and commit, and state targets as the project's own:\n"
        + "\n".join(problems)
    )
