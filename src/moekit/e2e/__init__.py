"""End-to-end model runs: a real-width MoE model with transformers' experts vs moekit's.

    families.py   the model families and the widths of their published checkpoints
    model.py      building one with random weights on the device
    decode.py     timed prefill + greedy decode, and token agreement between two runs
    check.py      the accuracy check: bf16 implementations against a float32 run
    results.py    JSON + Markdown result files with device, versions, date, command
    command.py    `moekit run`: `add_run_arguments(parser)` and `run_command(args)`

Needs transformers (`moekit[transformers]`); only `run_command` imports it.
"""

from moekit.e2e.command import add_run_arguments, run_command

__all__ = ["add_run_arguments", "run_command"]
