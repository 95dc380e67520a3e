"""The result files of a `bench/scripts` experiment: `<stem>.json` and `<stem>.md`.

Every experiment records the same environment (device, torch, triton, date, the command,
the commit from $MOEKIT_GIT_COMMIT, since a working tree copied to a lent GPU machine may
carry a stale .git) and writes a JSON record beside a Markdown page that opens with it.
The kernel table's own files are `moekit.bench.results`'; these are the scripts' lighter
form, one dict per row and a table the script lays out itself (`rows_table` where the
rows' own keys are its columns).
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch


def experiment_meta(**extra) -> dict:
    """The run's environment, plus `extra` keys (after the standard ones)."""
    import triton

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
            "code": os.environ.get("MOEKIT_GIT_COMMIT", "?"), **extra}


def write_experiment(out_dir: str, stem: str, meta: dict, rows: list[dict], title: str,
                     notes: list[str], table: list[str]) -> None:
    """`<stem>.json` ({"meta", "rows"}) and `<stem>.md`: "# title — device, date", the
    command and versions, then `notes` (whole Markdown lines), a blank line and `table`."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# {title} — {meta['device']}, {meta['date']}", "",
             f"- command: `{meta['command']}` (code {meta['code']})",
             f"- torch {meta['torch']}, triton {meta['triton']}", *notes, "", *table]
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def rows_table(rows: list[dict], keys: list[str]) -> list[str]:
    """A Markdown table of `rows`, one column per key of `keys` (values as `str` gives them)."""
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return lines + ["| " + " | ".join(str(row[key]) for key in keys) + " |" for row in rows]
