"""Child-process canaries for ops that could poison the CUDA context of the run.

An illegal memory access is sticky: after one, every CUDA call in the process fails
and the rest of the table is lost. `torch._grouped_mm` is a library kernel whose edge
cases (empty groups — most experts at small M —, one-row groups, sizes that are not a
multiple of 8) we cannot inspect, so before the table uses it we run exactly those
cases in a separate Python process. If the child fails in any way, the baseline is
left out with the child's reason, and the table itself is safe.
"""

from __future__ import annotations

import subprocess
import sys

# Runs in the child: `python -c CHILD dtype device`. Prints "ok" or raises.
_GROUPED_MM_CHILD = """
import sys, torch
dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[sys.argv[1]]
device = sys.argv[2]
torch.manual_seed(0)
for counts in ([0, 3, 0, 1, 13, 0], [0, 0, 0, 2, 0, 0], [40, 0, 7, 0, 0, 1]):
    num_experts, hidden, inter = len(counts), 64, 48
    ends = torch.tensor(counts, device=device).cumsum(0)
    offs = ends.to(torch.int32)
    x = torch.randn(sum(counts), hidden, device=device, dtype=dtype)
    w = torch.randn(num_experts, inter, hidden, device=device, dtype=dtype)
    out = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    if device == "cuda":
        torch.cuda.synchronize()
    starts = [0] + ends.tolist()[:-1]
    ref = torch.cat([x[s:e].float() @ w[g].float().T
                     for g, (s, e) in enumerate(zip(starts, ends.tolist()))])
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert out.shape == ref.shape and err < 2e-2, (counts, err)
print("ok")
"""


def probe_grouped_mm(dtype: str, device: str = "cuda", timeout_s: float = 180) -> str | None:
    """Run `torch._grouped_mm` on its edge cases in a child process.

    Args:
        dtype: "bf16" or "fp16". device: "cuda" (or "cpu", to test the probe itself).
    Returns:
        None when the child printed "ok", else a one-line reason.
    """
    try:
        done = subprocess.run([sys.executable, "-c", _GROUPED_MM_CHILD, dtype, device],
                              capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"grouped_mm probe did not run: {type(exc).__name__}: {exc}"
    if done.returncode == 0 and done.stdout.strip().endswith("ok"):
        return None
    lines = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.strip()]
    return f"grouped_mm probe failed (exit {done.returncode}): " + (lines[-1] if lines else "?")
