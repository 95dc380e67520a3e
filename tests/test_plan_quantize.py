"""The dispatch plan's place kernel and the fp8 row quantiser in one launch: every output
bitwise what the two launches write apart (interpreter)."""

import pytest
import torch

from helpers import poison_, random_routing
from moekit import reference
from moekit._fp8_quantize import launch_plan_and_quantize, quantize_rows_launch
from moekit.dispatch import prepared_plan
from moekit.quant import QuantScheme
from moekit.quant.fp8 import quantize_activation

PLAN_FIELDS = ("sorted_pairs", "block_experts", "expert_offsets", "pair_slots", "tiles")


def quantiser(hidden, mode, group=1, partials=None, clear=None):
    """Poisoned outputs for `mode` and the launch that fills them."""
    rows, cols = hidden.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    q.view(torch.uint8).fill_(0x7F)  # NaN: any value left unwritten shows
    scale = poison_(torch.empty({"group": (rows, -(-cols // group)), "token": (rows,)}
                                .get(mode, (1,))))
    stride = scale.stride(0) if scale.dim() == 2 else int(mode == "token")
    return q, scale, quantize_rows_launch(hidden, q, scale, stride, mode, group, partials,
                                          clear=clear)


@pytest.mark.interpreter
@pytest.mark.parametrize("M,E,k,block_m,tile_m,mode", [
    (12, 8, 2, 16, None, "group"),
    (6, 40, 8, 16, None, "tensor_rows"),
    (40, 16, 4, 32, 64, "token"),
    (700, 64, 8, 64, None, "group"),  # 5,600 pairs: the count and scan launches first
])
def test_one_launch_writes_what_two_do_interpreter(M, E, k, block_m, tile_m, mode):
    hidden = torch.randn(M, 320, dtype=torch.float16)
    ids, _ = random_routing(M, E, k)
    ids.view(-1)[::5] = -1  # dropped pairs
    group = 64 if mode == "group" else 1

    plan, place = prepared_plan(ids, E, block_m, tile_m=tile_m)
    for field in PLAN_FIELDS:
        if getattr(plan, field) is not None:
            getattr(plan, field).fill_(-0x2152411)
    clear = torch.full((300,), 7, dtype=torch.int32)
    q, scale, quantize = quantiser(hidden, mode, group, clear=clear)
    launch_plan_and_quantize(place, quantize)

    expected = reference.dispatch_plan(ids, E, block_m, tile_m=tile_m)
    for field in PLAN_FIELDS:
        if getattr(expected, field) is not None:
            assert torch.equal(getattr(plan, field), getattr(expected, field)), field
    q_apart, scale_apart, apart = quantiser(hidden, mode, group)
    launch_plan_and_quantize(None, apart)
    assert torch.equal(q.view(torch.uint8), q_apart.view(torch.uint8))
    assert torch.equal(scale, scale_apart)
    assert (clear == 0).all()


@pytest.mark.interpreter
def test_a_scattering_quantiser_keeps_its_own_launch_interpreter():
    # Writing rows to their plan slots reads the plan: it cannot share the plan's launch.
    ids, _ = random_routing(4, 8, 2)
    plan, place = prepared_plan(ids, 8, 16)
    hidden = torch.randn(4, 64)
    q = torch.empty(plan.capacity, 64, dtype=torch.float8_e4m3fn)
    scale = torch.empty(plan.capacity)
    quantize = quantize_rows_launch(hidden, q, scale, 1, "token", 1, None, plan.pair_slots)
    with pytest.raises(ValueError, match="^quantize: a scattering quantiser"):
        launch_plan_and_quantize(place, quantize)


@pytest.mark.interpreter
@pytest.mark.parametrize("rows,row,col,why", [
    (11, 10, 1199, "the last value: the second step of rows, the second of columns"),
    (11, 7, 1100, "the first step of rows' last row, the second (part-masked) of columns"),
    (11, 8, 0, "the second step of rows' first row (3 of its 8 rows masked)"),
    (11, 0, 0, "the first value"),
    (1, 0, 1199, "one row: a step of one row"),
    (5, 4, 1199, "one [8, 2048] load of all rows: its last row and column"),
    (5, 4, 0, "one load: the last row's first value"),
    (3, 0, 1199, "one [4, 2048] load: the first row's last value"),
    (3, 2, 600, "one load: the last row (the one masked row after it)"),
])
def test_few_rows_tensor_amax_reads_every_value_interpreter(rows, row, col, why):
    # "tensor_rows": every program reads all rows for the per-tensor amax, in one load where
    # [next_pow2(M), next_pow2(K)] holds at most 16,384 values (M = 3, 5), else in tiles of
    # up to 8 rows × 1024 columns; rows 1,200 wide inside a buffer 1,300 wide (a row stride
    # that is not the width), so a tile that ignored the stride would read the gaps' values.
    buffer = torch.randn(rows, 1300, dtype=torch.float16)
    buffer[:, 1200:] = 1000.0  # the gaps: read by mistake, they would set the amax
    x = buffer[:, :1200]
    x[row, col] = -37.0  # the largest magnitude, at the place under test
    q, scale, quantize = quantiser(x, "tensor_rows")
    assert quantize.constexprs["AMAX_WHOLE"] == (rows in (3, 5)), why  # the path under test
    launch_plan_and_quantize(None, quantize)
    _, scale_ref = quantize_activation(x, QuantScheme.fp8_tensor().activation)
    assert torch.equal(scale, scale_ref), why
    # The values themselves only as written: the interpreter's fp8 cast drops the carry of
    # a mantissa that rounds up into the next binade (1.97 → 1, not 2), so its q is not
    # the reference's bit for bit; the fp8 tests compare whole layers with a tolerance.
    assert not q.float().isnan().any(), why
