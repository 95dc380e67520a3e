"""Every result file that README.md, docs/ and bench/{NOTES,HISTORY}.md cite is in bench/results/.

A number quoted from a file nobody can open is a claim nobody can check. Citations are
backquoted names with a device prefix (`h100-sxm-…`, `h200-…`): full names, braces
(`…-s30{,-b}.md`), globs (`…-r*.md`), `logs/` names, and the abbreviation `…-tail`
(any file ending so). Tuning tables live under src/ and are checked there.
"""

import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "bench" / "results"
TABLES = ROOT / "src" / "moekit" / "tuning" / "tables"
CITING = ["README.md", "bench/NOTES.md", "bench/HISTORY.md", "docs/kernel-paths.md",
          "docs/tuned-tables.md"]
_CITATION = re.compile(r"`([^`\s]*(?:h100|h200)[^`\s]*\.(?:json|md|txt|csv)|…-[^`\s]+)`")


def _expand_braces(name: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", name)
    if match is None:
        return [name]
    head, tail = name[:match.start()], name[match.end():]
    return [out for alt in match.group(1).split(",") for out in _expand_braces(head + alt + tail)]


def _known_files() -> list[str]:
    names = [p.relative_to(RESULTS).as_posix() for p in RESULTS.rglob("*") if p.is_file()]
    return names + [p.name for p in TABLES.glob("*.json")]


def _resolves(name: str, known: list[str]) -> bool:
    name = name.split("bench/results/")[-1].split("tuning/tables/")[-1]
    if "<" in name:  # a pattern described in words (`…-e2e-<family>-fp8.*`)
        return True
    if name.startswith("…"):
        name = "*" + name[1:] + ("" if Path(name).suffix in {".md", ".json", ".txt"} else "*")
    if not any(ch in name for ch in "*?["):
        return name in known or any(k.endswith("/" + name) for k in known)
    return any(fnmatch.fnmatch(k, name) or fnmatch.fnmatch(k, "*/" + name) for k in known)


def _citations(path: Path):
    text = path.read_text()
    for match in _CITATION.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        for name in _expand_braces(match.group(1)):
            yield line, name


@pytest.mark.parametrize("doc", CITING)
def test_every_cited_result_file_exists(doc):
    known = _known_files()
    missing = [f"{doc}:{line}: {name}" for line, name in _citations(ROOT / doc)
               if not _resolves(name, known)]
    assert not missing, "cited result files not found:\n" + "\n".join(missing)


def test_the_check_finds_a_missing_file():
    """The rule catches what it is for: a misnamed file, a wrong brace part, a bad glob."""
    known = ["h200-20261203-a-s30.md", "h200-20261203-a-expandable-s30.md", "logs/h200-x.txt"]
    assert _resolves("h200-20261203-a-s30.md", known)
    assert _resolves("logs/h200-x.txt", known) and _resolves("h200-x.txt", known)
    assert all(_resolves(n, known) for n in _expand_braces("h200-20261203-a{,-expandable}-s30.md"))
    assert not all(_resolves(n, known) for n in _expand_braces("h200-20261203-a-s30{,-b}.md"))
    assert _resolves("…-expandable-s30.md", known) and _resolves("…-a-s30", known)
    assert not _resolves("h200-20261204-a-s30.md", known)
    assert not _resolves("h200-*-b-s30.md", known)
