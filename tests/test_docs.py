"""Every reference in the repository resolves inside the repository.

Code, configs and docs cite the design notes as `docs/<name>.md#<anchor>`, where <anchor> is the
GitHub anchor of a heading of that file (lower case, punctuation dropped, spaces as hyphens).
The scan covers the repository's text files as git lists them (tracked, plus new files that are
not ignored) and checks:
  - no mention of documents outside the repository (the design page and reference notes the
    project started from);
  - every repo-relative file path (docs/, configs/, benchmarks/, data_pipelines/, fbnet_jax/,
    tests/, and the top-level README/BENCHMARKS/EXPERIMENTS pages) exists;
  - every `docs/<name>.md#<anchor>` citation, markdown link and in-page `(#anchor)` link names a
    heading that exists; the style "docs/<name>.md, section X" is not used.
It also checks that the relatedness tables and RAF-DB class order in docs/paper.md are the data
of fbnet_jax/core/taxonomy.py.
"""

from __future__ import annotations

import io
import posixpath
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

from fbnet_jax.core import taxonomy

REPO = Path(__file__).resolve().parents[1]
THIS_FILE = Path(__file__).resolve().relative_to(REPO).as_posix()  # holds the patterns themselves

SCANNED_SUFFIXES = (".py", ".md", ".cfg", ".toml")
SCANNED_NAMES = ("Makefile", ".ci/run")

# Documents that live outside the repository.
OUTSIDE = [
    (re.compile(r"DESIGN\.md|\bDESIGN\s+(?:section|§)"), "the design page outside the repository"),
    (re.compile(r"(?<![\w.-])shared/"), "a path under shared/, outside the repository"),
    (re.compile(r"(?<![\w.-])reference/"), "a path under reference/, outside the repository"),
    (re.compile(r"(?<![\w/.-])(?:paper|datasets|stack)\.md"),
     "a bare notes file name; cite docs/<name>.md#<anchor>"),
]
PATH = re.compile(
    r"(?<![\w/.-])((?:docs|configs|benchmarks|data_pipelines|fbnet_jax|tests)/(?:[\w.-]+/)*"
    r"[\w-]+\.(?:py|md)|(?:README|BENCHMARKS|EXPERIMENTS)\.md)(?![\w/-])")
CITATION = re.compile(
    r"(?<![\w/.-])((?:docs/[\w.-]+|README|BENCHMARKS|EXPERIMENTS)\.md)#([\w-]+)")
WRONG_STYLE = re.compile(r"(?<![\w/.-])docs/[\w.-]+\.md,?\s+(?:section|§)")
MARKDOWN_LINK = re.compile(r"\]\(([^()\s]+)\)")


def _scanned_files() -> list[str]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
            capture_output=True, text=True, check=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"not a git checkout: {error}")
    return sorted({path for path in listed
                   if (path.endswith(SCANNED_SUFFIXES) or path in SCANNED_NAMES)
                   and path != THIS_FILE and (REPO / path).is_file()})


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _lines_outside_code_blocks(path: Path):
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def headings(path: Path) -> set[str]:
    """The anchors of a markdown file's headings (repeats get GitHub's -1, -2 suffixes)."""
    anchors, seen = set(), {}
    for _, line in _lines_outside_code_blocks(path):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            anchor = github_anchor(match.group(1))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            anchors.add(anchor if count == 0 else f"{anchor}-{count}")
    return anchors


def _blank_string_literals(source: str) -> str:
    """`source` with every string literal except docstrings blanked out (lines kept)."""
    lines = source.splitlines()
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return source
    statement_start = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT,
                       tokenize.ENCODING, tokenize.COMMENT}
    fstring_start, fstring_end = (getattr(tokenize, "FSTRING_START", None),
                                  getattr(tokenize, "FSTRING_END", None))  # Python >= 3.12
    previous = tokenize.NEWLINE
    spans, opened, depth = [], None, 0
    for token in tokens:
        if token.type == tokenize.STRING and previous not in statement_start and not depth:
            spans.append((token.start, token.end))
        elif token.type == fstring_start:
            if not depth:
                opened = token.start if previous not in statement_start else None
            depth += 1
        elif token.type == fstring_end:
            depth -= 1
            if not depth and opened is not None:
                spans.append((opened, token.end))
        if token.type not in (tokenize.NL, tokenize.COMMENT):
            previous = token.type
    for (row, col), (end_row, end_col) in reversed(spans):
        for r in range(row, end_row + 1):
            line = lines[r - 1]
            start = col if r == row else 0
            stop = end_col if r == end_row else len(line)
            lines[r - 1] = line[:start] + " " * (stop - start) + line[stop:]
    return "\n".join(lines)


def find_bad_references(files: list[str], root: Path = REPO) -> list[str]:
    """One 'file:line: problem' entry per bad reference in `files` (paths relative to `root`)."""
    problems = []
    anchors_of = {}

    def check_anchor(where: str, target: str, anchor: str, shown: str) -> None:
        if not (root / target).is_file():
            return  # reported as a missing path
        if target not in anchors_of:
            anchors_of[target] = headings(root / target)
        if anchor not in anchors_of[target]:
            problems.append(f"{where}: {shown}: no heading with anchor #{anchor} in {target}")

    for name in files:
        try:
            text = (root / name).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        # Tests may name missing files on purpose (as data): there, only comments and docstrings
        # are checked for paths.
        path_text = _blank_string_literals(text) if name.startswith("tests/") else text
        for number, (line, path_line) in enumerate(
                zip(text.splitlines(), path_text.splitlines()), start=1):
            where = f"{name}:{number}"
            for pattern, what in OUTSIDE:
                for match in pattern.finditer(line):
                    problems.append(f"{where}: {match.group(0)!r}: {what}")
            for match in PATH.finditer(path_line):
                if not (root / match.group(1)).exists():
                    problems.append(f"{where}: {match.group(1)}: no such file in the repository")
            for match in CITATION.finditer(line):
                check_anchor(where, match.group(1), match.group(2), match.group(0))
            for match in WRONG_STYLE.finditer(line):
                problems.append(f"{where}: {match.group(0)!r}: cite as docs/<name>.md#<anchor>")
        if name.endswith(".md"):
            for number, line in _lines_outside_code_blocks(root / name):
                for match in MARKDOWN_LINK.finditer(line):
                    link = match.group(1)
                    if re.match(r"[a-z][a-z0-9+.-]*:", link):  # http:, mailto:, ...
                        continue
                    file_part, _, anchor = link.partition("#")
                    target = (posixpath.normpath(posixpath.join(posixpath.dirname(name),
                                                                file_part))
                              if file_part else name)
                    where = f"{name}:{number}"
                    if target.startswith("../") or not (root / target).exists():
                        problems.append(f"{where}: link ({link}): no such file in the repository")
                    elif anchor and target.endswith(".md"):
                        check_anchor(where, target, anchor, f"link ({link})")
    return problems


def test_references_resolve_inside_the_repository():
    files = _scanned_files()
    assert files, "found no files to scan"
    problems = find_bad_references(files)
    assert not problems, f"{len(problems)} bad reference(s):\n" + "\n".join(problems)


def test_the_checker_flags_planted_references(tmp_path):
    """Each kind of bad reference is reported with its file:line; good ones are not."""
    for top in ("docs", "configs", "fbnet_jax"):
        (tmp_path / top).symlink_to(REPO / top, target_is_directory=True)
    (tmp_path / "planted.py").write_text(
        "# see shared/reference/paper.md\n"
        "# DESIGN.md section 5\n"
        "# fbnet_jax/no_such_module.py\n"
        "# docs/design.md#no-such-heading\n"
        "# docs/design.md, section Losses\n"
        "# fine: docs/design.md#losses, configs/synthetic.py:tiny, fbnet_jax/model/__init__.py\n",
        encoding="utf-8")
    (tmp_path / "planted.md").write_text(
        "# Title\n[ok](#title) [bad](#nothing) [gone](docs/none.md) [ok](docs/paper.md#losses)\n"
        "```\n# not a heading\n```\n", encoding="utf-8")
    problems = find_bad_references(["planted.py", "planted.md"], root=tmp_path)
    flagged = sorted({p.split(": ")[0] for p in problems})
    assert flagged == ["planted.md:2", "planted.py:1", "planted.py:2", "planted.py:3",
                       "planted.py:4", "planted.py:5"], problems
    # (#nothing), and docs/none.md both as a link and as a path.
    assert sum(p.startswith("planted.md:2") for p in problems) == 3, problems


def test_headings_use_github_anchors():
    assert github_anchor("Metrics used in the literature") == "metrics-used-in-the-literature"
    assert github_anchor("The `fbnet` command") == "the-fbnet-command"
    assert github_anchor("RAF-DB compound classes") == "raf-db-compound-classes"


def _table_under(path: Path, heading: str) -> list[list[str]]:
    """Body rows of the first markdown table after `heading`, as lists of cell texts."""
    rows, inside = [], False
    for _, line in _lines_outside_code_blocks(path):
        if line.startswith("#"):
            if inside and rows:
                break
            inside = github_anchor(line.lstrip("#")) == heading
            continue
        if inside and line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif inside and rows:
            break
    return rows[1:]  # without the header row


def _parse_relatedness(rows: list[list[str]]) -> dict[str, tuple]:
    table = {}
    for name, prototypical, observational in rows:
        table[name] = (tuple(int(a) for a in prototypical.split(",")),
                       {int(a): float(w) for a, w in re.findall(r"(\d+) \(([\d.]+)\)",
                                                                observational)})
    return table


@pytest.mark.parametrize("heading,rows", [
    ("basic-expressions", taxonomy.BASIC_RELATEDNESS),
    ("compound-expressions", taxonomy.COMPOUND_RELATEDNESS),
])
def test_paper_tables_match_taxonomy(heading, rows):
    documented = _parse_relatedness(_table_under(REPO / "docs" / "paper.md", heading))
    expected = {row.name: (row.prototypical, dict(row.observational)) for row in rows}
    assert list(documented) == list(expected)
    assert documented == expected


def test_paper_raf_compound_order_matches_taxonomy():
    rows = _table_under(REPO / "docs" / "paper.md", "raf-db-compound-classes")
    assert [(int(label), name) for label, name in rows] == [
        (k + 1, name) for k, name in enumerate(taxonomy.RAF_COMPOUND_CLASSES)]
