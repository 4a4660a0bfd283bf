"""The README and docs/*.md stay true to the repository: what their Python examples import exists, their relative
links point at files, folders and headings that exist, the repository paths they name in code exist, and every
page of docs/ is linked from the README. Only imports and file checks: no model runs."""

from __future__ import annotations

import ast
import importlib
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
PACKAGES = ("swift_kernels", "swift_model")
# the top-level folders whose paths the pages name in code (`swift_model/nets/vae_tiling.py`, `tests/...`)
REPO_FOLDERS = ("swift_kernels", "swift_model", "csrc", "benchmarks", "tests", "docs")
# named in the pages but made by a run, not kept in the repository
MADE_BY_RUNS = {"benchmarks/results"}

FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
REPO_PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*)" % "|".join(REPO_FOLDERS))


def _ids(pages):
    return [str(p.relative_to(ROOT)) for p in pages]


def split_fences(text: str):
    """``(prose_lines, blocks)``: prose as ``(line number, line)`` outside fenced code, blocks as ``(info, first
    line number, [lines])``; line numbers count from 1."""
    prose, blocks, block = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if block is None:
            if m:
                block = (m.group(1), m.group(2).lower(), number + 1, [])
            else:
                prose.append((number, line))
        elif m and m.group(1).startswith(block[0]) and not m.group(2):
            blocks.append(block[1:])
            block = None
        else:
            block[3].append(line)
    if block is not None:
        blocks.append(block[1:])
    return prose, blocks


# -- the names the Python examples import ------------------------------------------------------------------------


def import_statements(code_lines: list[str], first_line: int):
    """``(line number, statement)`` for each ``import``/``from ... import`` statement in a code block, with
    parenthesised or backslash-continued statements joined."""
    i = 0
    while i < len(code_lines):
        line = code_lines[i]
        start = i
        if re.match(r"\s*(from\s+\S+\s+import\b|import\s)", line):
            stmt = line
            while (stmt.count("(") > stmt.count(")") or stmt.rstrip().endswith("\\")) and i + 1 < len(code_lines):
                i += 1
                stmt = stmt.rstrip().rstrip("\\") + " " + code_lines[i].strip()
            yield first_line + start, stmt.strip()
        i += 1


def imported_names(page: Path):
    """``(line number, statement, module, name)`` for every name of ours a page's ```python blocks import;
    ``name`` is None for ``import module``."""
    _, blocks = split_fences(page.read_text(encoding="utf-8"))
    for info, first, lines in blocks:
        if info not in ("python", "py"):
            continue
        for number, stmt in import_statements(lines, first):
            try:
                tree = ast.parse(stmt)
            except SyntaxError:
                yield number, stmt, None, None  # reported as unreadable
                continue
            for node in tree.body:
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    if node.module.split(".")[0] in PACKAGES:
                        for alias in node.names:
                            yield number, stmt, node.module, alias.name
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name.split(".")[0] in PACKAGES:
                            yield number, stmt, alias.name, None


def import_error(module: str, name: str | None) -> str | None:
    """Why ``from module import name`` (or ``import module``) fails; None when it works."""
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure is the report
        return f"{type(exc).__name__}: {exc}"
    if name is None or name == "*":
        return None
    try:
        getattr(mod, name)
        return None
    except AttributeError:
        pass
    except Exception as exc:  # noqa: BLE001 - a lazy attribute that fails to import
        return f"{type(exc).__name__}: {exc}"
    try:  # a submodule: from swift_model.nets import vae_tiling
        importlib.import_module(f"{module}.{name}")
        return None
    except ModuleNotFoundError:
        return f"{module} has no name {name!r}"
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


def test_the_pages_python_examples_import_something():
    """The parser finds the examples' imports (so the next test cannot pass by finding none)."""
    found = [(m, n) for page in PAGES for _, _, m, n in imported_names(page) if m]
    assert any(m.startswith("swift_kernels") for m, _ in found), "no swift_kernels import found in a ```python block"
    assert any(m.startswith("swift_model") for m, _ in found), "no swift_model import found in a ```python block"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_name_the_python_examples_import_exists(page):
    failures = []
    for number, stmt, module, name in imported_names(page):
        where = f"{page.relative_to(ROOT)}:{number}: {stmt}"
        if module is None:
            failures.append(f"{where}\n    not Python")
            continue
        error = import_error(module, name)
        if error is not None:
            failures.append(f"{where}\n    {name or module}: {error}")
    assert not failures, "names the examples import that do not exist:\n" + "\n".join(failures)


# -- links and named paths -----------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose, _ = split_fences(page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose:
        m = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(page: Path):
    """``(line number, target)`` of every link in a page's prose (not in code)."""
    prose, _ = split_fences(page.read_text(encoding="utf-8"))
    for number, line in prose:
        line = INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)
        for m in LINK.finditer(line):
            yield number, m.group(1)
        m = REF_LINK.match(line)
        if m:
            yield number, m.group(1)


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def resolve(page: Path, target: str) -> tuple[Path, str]:
    """The file a relative link points at and its anchor ('' when none)."""
    path, _, anchor = target.partition("#")
    return (page if not path else Path(os.path.normpath(page.parent / path))), anchor


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_relative_link_points_at_something_that_exists(page):
    failures = []
    for number, target in links(page):
        if is_external(target):
            continue
        where = f"{page.relative_to(ROOT)}:{number}: ({target})"
        path, anchor = resolve(page, target)
        if ROOT != path and ROOT not in path.parents:
            failures.append(f"{where}: outside the repository")
        elif not path.exists():
            failures.append(f"{where}: {path.relative_to(ROOT)} does not exist")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            failures.append(f"{where}: {path.relative_to(ROOT)} has no heading #{anchor}")
    assert not failures, "broken links:\n" + "\n".join(failures)


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_repository_path_named_in_code_exists(page):
    """Paths such as `swift_model/nets/vae_tiling.py` or `tests/x.py::test_y`, in inline code and code blocks."""
    text = page.read_text(encoding="utf-8")
    prose, blocks = split_fences(text)
    spans = [(n, m.group(2)) for n, line in prose for m in INLINE_CODE.finditer(line)]
    spans += [(first + i, line) for _, first, lines in blocks for i, line in enumerate(lines)]
    failures = []
    for number, span in spans:
        for m in REPO_PATH.finditer(span):
            rest = span[m.end():]
            if rest.startswith("<"):  # a placeholder: benchmarks/results/<device>-<date>.json
                continue
            path = m.group(1).rstrip(".")
            if path.rstrip("/") not in MADE_BY_RUNS and not (ROOT / path).exists():
                failures.append(f"{page.relative_to(ROOT)}:{number}: {path} does not exist")
    assert not failures, "paths named that do not exist:\n" + "\n".join(failures)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {resolve(README, t)[0] for _, t in links(README) if not is_external(t)}
    missing = [str(p.relative_to(ROOT)) for p in PAGES[1:] if p not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"
