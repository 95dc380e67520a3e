"""Short names for devices, used in result files and tuned-table file names."""

from __future__ import annotations

import re


def device_slug(name: str) -> str:
    """A short file-name slug for a device name.

    "NVIDIA H100 80GB HBM3" → "h100-sxm", "NVIDIA H100 PCIe" → "h100-pcie",
    "NVIDIA H200" → "h200", "cpu" → "cpu"; anything else → its lower-cased words.
    """
    low = name.lower()
    for chip in ("h100", "h200", "h20", "h800", "gh200", "b200", "b300", "a100"):
        if re.search(rf"\b{chip}\b", low):
            for form in ("pcie", "nvl"):
                if form in low:
                    return f"{chip}-{form}"
            sxm = chip in ("h100", "a100") and ("hbm3" in low or "sxm" in low)
            return f"{chip}-sxm" if sxm else chip
    slug = re.sub(r"[^a-z0-9]+", "-", low.replace("nvidia", "")).strip("-")
    return slug or "device"
