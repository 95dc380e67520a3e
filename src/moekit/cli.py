"""The `moekit` command line: one subcommand per job, registered in `COMMANDS`.

Each subcommand names the module that holds its `add_arguments(parser)` and
`run(args) -> exit status`, next to the code it drives (`moekit.bench.command` for
`bench`). Adding `run` or `tune` is one entry in the table. A module that fails to
import (a missing optional dependency) disables only its own subcommand.

A command may be two words (`bench routing`): `main` joins the first two arguments when
together they name a command, so `moekit bench routing --out x` runs the routing table
while `moekit bench --presets …` stays the kernel table (argparse cannot mix a parent's
options with an optional nested subcommand without ambiguity: `--presets routing`).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from collections.abc import Sequence
from typing import NamedTuple


class Command(NamedTuple):
    """A subcommand: one-line help, and where its options and its run function live."""

    help: str
    module: str
    add_arguments: str = "add_arguments"
    run: str = "run"
    aliases: tuple[str, ...] = ()


COMMANDS: dict[str, Command] = {
    "bench": Command(
        "time fused_experts against the roofline and PyTorch baselines (PERF.md's kernel "
        "table; `moekit bench routing` times routing and permute)",
        "moekit.bench.command",
    ),
    "bench routing": Command(
        "time route, dispatch plan, permute and unpermute against the copy bandwidth",
        "moekit.bench.routing_table",
        "add_routing_arguments",
        "run_routing_bench",
        aliases=("bench-routing",),
    ),
    "tune": Command(
        "search tile configurations on this GPU; write the tuned table fused_experts reads",
        "moekit.tuning.command",
    ),
    "run": Command(
        "end-to-end: a real-architecture model with random weights, transformers vs moekit",
        "moekit.e2e",
        "add_run_arguments",
        "run_command",
    ),
}


def _unavailable(name: str, error: Exception):
    def run(args: argparse.Namespace) -> int:
        print(f"moekit {name}: unavailable ({type(error).__name__}: {error})", file=sys.stderr)
        return 1
    return run


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per entry of COMMANDS."""
    parser = argparse.ArgumentParser(
        prog="moekit", description="Mixture-of-Experts kernels: benchmarks and tools.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        sub = subparsers.add_parser(name, aliases=list(cmd.aliases), help=cmd.help,
                                    description=cmd.help, prog=f"{parser.prog} {name}")
        try:
            module = importlib.import_module(cmd.module)
            getattr(module, cmd.add_arguments)(sub)
            sub.set_defaults(_run=getattr(module, cmd.run))
        except Exception as exc:  # keep the other subcommands usable
            sub.set_defaults(_run=_unavailable(name, exc))
    return parser


def join_command_words(argv: Sequence[str]) -> list[str]:
    """["bench", "routing", …] → ["bench routing", …] when the two words name a command."""
    argv = list(argv)
    if len(argv) >= 2 and f"{argv[0]} {argv[1]}" in COMMANDS:
        return [f"{argv[0]} {argv[1]}", *argv[2:]]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `moekit` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(join_command_words(argv))
    args.command_line = "moekit " + shlex.join(argv)
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
