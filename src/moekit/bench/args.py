"""argparse types shared by the benchmark commands: preset names and token counts.

Both accept space- or comma-separated lists and fail with a message naming the bad item.
"""

from __future__ import annotations

import argparse

from moekit.bench.presets import get_preset


def split_list(text: str) -> list[str]:
    """"a,b c" → ["a", "b", "c"]."""
    return [part for part in text.replace(",", " ").split() if part]


def preset_names(text: str) -> list[str]:
    """One or more preset names, checked against the registry."""
    names = split_list(text)
    for name in names:
        try:
            get_preset(name)
        except KeyError as exc:
            raise argparse.ArgumentTypeError(exc.args[0]) from None
    return names


def token_counts(text: str) -> list[int]:
    """One or more positive token counts."""
    counts = []
    for part in split_list(text):
        try:
            m = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"token count {part!r} is not an integer") from None
        if m < 1:
            raise argparse.ArgumentTypeError(f"token count must be ≥ 1, got {m}")
        counts.append(m)
    return counts
