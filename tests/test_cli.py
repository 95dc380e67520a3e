"""Tests of the `moekit` command line: option parsing, clear errors, and a tiny CPU run."""

from __future__ import annotations

import json

import pytest

from moekit.bench.command import NO_CUDA_LINE
from moekit.bench.presets import PRESETS
from moekit.bench.results import REQUIRED_ROW_KEYS
from moekit.cli import COMMANDS, build_parser, main


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_bench_defaults():
    args = parse("bench")
    assert args.presets is None and args.tokens is None  # resolved per device at run time
    assert (args.dtype, args.routing, args.graph, args.baselines) == ("bf16", "balanced", True,
                                                                     True)
    assert args.out == "bench/results" and args.graph_max_m == 512
    assert args.l2_flush == "read"  # clean lines; "zero" is do_bench's dirty memset


def test_bench_options():
    args = parse("bench", "--presets", "qwen3-30b-a3b,olmoe-1b-7b", "deepseek-v3",
                 "--tokens", "1,8", "64", "--dtype", "fp16", "--no-graph", "--no-baselines",
                 "--routing", "skewed", "--out", "/tmp/x", "--rep-ms", "50", "--l2-flush", "zero")
    assert args.presets == [["qwen3-30b-a3b", "olmoe-1b-7b"], ["deepseek-v3"]]
    assert args.tokens == [[1, 8], [64]]
    assert (args.dtype, args.graph, args.baselines, args.routing) == ("fp16", False, False,
                                                                     "skewed")
    assert args.out == "/tmp/x" and args.rep_ms == 50.0 and args.l2_flush == "zero"


# Each case: argv, a fragment of the error message, and why.
ERROR_CASES = [
    (["bench", "--presets", "mixtral-8x22b"], "unknown preset 'mixtral-8x22b'", "typo'd preset"),
    (["bench", "--dtype", "fp8"], "invalid choice: 'fp8'", "dtype not supported yet"),
    (["bench", "--tokens", "0"], "token count must be ≥ 1", "M = 0 is not a table cell"),
    (["bench", "--tokens", "eight"], "is not an integer", "not a number"),
    (["bench", "--routing", "zipf"], "invalid choice: 'zipf'", "unknown routing"),
    (["bench", "--l2-flush", "none"], "invalid choice: 'none'", "a flush that keeps weights in L2"),
    (["frobnicate"], "invalid choice: 'frobnicate'", "unknown command"),
    ([], "required", "no command at all"),
]


@pytest.mark.parametrize("argv,fragment,why", ERROR_CASES, ids=[c[2] for c in ERROR_CASES])
def test_bad_options_exit_with_a_clear_message(argv, fragment, why, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert fragment in capsys.readouterr().err


def test_unknown_preset_lists_known_ones(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--presets", "nope"])
    err = capsys.readouterr().err
    assert all(name in err for name in PRESETS)


def test_commands_table_has_bench():
    assert "bench" in COMMANDS and COMMANDS["bench"].help


def test_broken_subcommand_module_only_disables_itself(monkeypatch, capsys):
    from moekit.cli import Command

    monkeypatch.setitem(COMMANDS, "tune", Command("tune kernels", "moekit._no_such_module"))
    assert main(["tune"]) == 1
    assert "moekit tune: unavailable (ModuleNotFoundError" in capsys.readouterr().err
    assert parse("bench").dtype == "bf16"  # bench still parses


def test_cpu_bench_end_to_end_writes_both_files(tmp_path, capsys):
    status = main(["bench", "--cpu", "--presets", "granite-3.0-3b-a800m", "--tokens", "1,4",
                   "--rep-ms", "2", "--out", str(tmp_path)])
    assert status == 0
    captured = capsys.readouterr()
    assert "not a performance result" in captured.err
    assert "[6/6]" in captured.err  # 2 token counts × 3 implementations, one line each
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith("cpu-")
    assert files[0].endswith("-kernels-bf16.json") and files[1].endswith("-kernels-bf16.md")
    doc = json.loads((tmp_path / files[0]).read_text())
    assert doc["command"].startswith("moekit bench --cpu") and doc["cpu"] is True
    assert doc["timing"]["l2_flush"] is None  # nothing is flushed on the CPU
    assert {"read_GBps", "mem_GBps", "copy_GBps", "bf16_TFLOPs", "fp8_TFLOPs"} <= doc[
        "ceilings"].keys()
    assert len(doc["rows"]) == 6 and all(set(REQUIRED_ROW_KEYS) <= r.keys() for r in doc["rows"])
    md = (tmp_path / files[1]).read_text()
    assert "not a performance result" in md and "| granite-3.0-3b-a800m |" in md
    assert md.strip() in captured.out  # the table is also printed


def test_out_dash_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--cpu", "--presets", "olmoe-1b-7b", "--tokens", "2",
                 "--no-baselines", "--rep-ms", "1", "--out", "-"]) == 0
    assert list(tmp_path.iterdir()) == []
    assert "| olmoe-1b-7b |" in capsys.readouterr().out


def test_no_cuda_line_is_one_line():
    assert "\n" not in NO_CUDA_LINE and "not a performance result" in NO_CUDA_LINE


# `moekit bench routing` is a two-word command; `bench-routing` stays as an alias.
ROUTING_ARGV = [
    (["bench", "routing"], "the issue's spelling"),
    (["bench-routing"], "the old spelling, kept as an alias"),
]


@pytest.mark.parametrize("words,why", ROUTING_ARGV, ids=[c[1] for c in ROUTING_ARGV])
def test_bench_routing_parses(words, why):
    from moekit.bench.routing_table import run_routing_bench
    from moekit.cli import join_command_words

    args = build_parser().parse_args(join_command_words(
        [*words, "--presets", "olmoe-1b-7b", "--ops", "permute", "unpermute", "--sets", "4"]))
    assert args._run is run_routing_bench
    assert args.presets == [["olmoe-1b-7b"]] and args.ops == ["permute", "unpermute"]
    assert args.sets == 4 and args.out == "bench/results"


def test_bench_options_still_reach_the_kernel_table():
    # Joining words must not steal `bench`'s own options, even a value named like a command.
    from moekit.bench.command import run
    from moekit.cli import join_command_words

    args = build_parser().parse_args(join_command_words(["bench", "--presets", "deepseek-v3"]))
    assert args._run is run and args.presets == [["deepseek-v3"]]
    with pytest.raises(SystemExit):
        main(["bench", "--presets", "routing"])  # a preset named "routing" does not exist


def test_bench_routing_without_cuda_says_so(capsys):
    import torch

    from moekit.bench.routing_table import NO_CUDA_LINE

    if torch.cuda.is_available():
        pytest.skip("with CUDA the command times the table")
    assert main(["bench", "routing", "--tokens", "1"]) == 0
    assert NO_CUDA_LINE in capsys.readouterr().err
