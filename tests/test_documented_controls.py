"""Every `MOEKIT_*` environment variable the library reads is in docs/kernel-paths.md's table.

A switch that changes which kernel runs, and that nobody can find, turns a user's
"moekit got slower" into a hunt; the table says what each one does and when it is read.
"""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
_NAME = re.compile(r"MOEKIT_[A-Z0-9_]*[A-Z0-9]")


def _read_by_the_library() -> set[str]:
    return {name for path in (ROOT / "src" / "moekit").rglob("*.py")
            for name in _NAME.findall(path.read_text())}


def _documented() -> set[str]:
    text = (ROOT / "docs" / "kernel-paths.md").read_text()
    table = text.split("## Environment controls", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in _NAME.findall(row)}


def test_every_environment_control_is_documented():
    assert len(_read_by_the_library()) >= 10, "the scan found too few names to be right"
    missing = sorted(_read_by_the_library() - _documented())
    assert not missing, f"read in src/moekit but not in docs/kernel-paths.md: {missing}"
