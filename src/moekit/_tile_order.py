"""The order in which the Triton GEMMs of the plan path take their tiles.

`_tile_of` groups GROUP_M row tiles and walks their column tiles in turn, so the programs
reading one weight column tile run side by side; its groups cut through experts, whose
row tiles then read their weights once per group. `_expert_tile_of` groups only within
an expert (both in `moekit._experts_kernels`). Which one runs is `expert_groups()`:
staged off until measured on the device; `MOEKIT_EXPERT_GROUPS=1` at import turns it on.
"""

from __future__ import annotations

import os

EXPERT_GROUPS = os.environ.get("MOEKIT_EXPERT_GROUPS") == "1"


def expert_groups() -> bool:
    """Whether the Triton GEMMs take their tiles in groups that never split an expert."""
    return EXPERT_GROUPS
