"""The routing result every stage agrees on: which experts each token uses, and how much.

`ids` is int32 [M, k]; `weights` is float32 [M, k]. An id outside [0, E) (−1 by
convention, or a sentinel ≥ E from expert parallelism) means "no expert": that slot
contributes nothing to the output.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TopK(NamedTuple):
    """Top-k routing of M tokens: `ids` int32 [M, k], `weights` float32 [M, k]."""

    ids: torch.Tensor
    weights: torch.Tensor
