"""Programmatic dependent launch (sm_90): overlap a kernel's start with its predecessor's end.

A kernel launched with `launch_pdl=True` may start once every program of the kernel before
it in the stream has signalled `gdc_launch_dependents` (or exited), and must execute
`gdc_wait` before it reads anything that kernel wrote: its launch, its programs' placement
and whatever it does before the wait (reading ids and router weights written earlier)
then hide under the predecessor's tail. Used between the direct path's GEMMs, where a
launch is a few µs of a layer that streams its weights in tens (bench/NOTES.md, session 27).
"""

from __future__ import annotations

import torch

from moekit import _tma

# On by default; experiments switch it off to measure the launches apart.
ENABLED = True


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on `device` chain by programmatic dependent launch: an sm_90 GPU
    (griddepcontrol), not Triton's CPU interpreter (whose tensors live on the CPU)."""
    return ENABLED and _tma.device_has_tma(device)
