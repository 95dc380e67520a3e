"""bench/scripts/ncu_stall_summary.py on a small CSV in Nsight Compute's source-page form."""

from helpers import bench_script

COLUMNS = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
           "L2 Theoretical Sectors Global Excessive", "L2 Theoretical Sectors Global",
           "stall_long_sb", "stall_barrier", "stall_long_sb (Not Issued)"]
ROWS = [["0x7f0000a0", "  @!P0 BRA 0x7f000080", "30", "10", "0", "0", "29", "1", "99"],
        ["0x7f0000b0", "  WARPGROUP.DEPBAR.LE gsb0, 0x0", "10", "10", "0", "0", "0", "10", "0"],
        ["0x7f0000c0", "  STG.E desc[UR4][R2.64], R5", "0", "4", "1,536", "2,048", "-", "-", "-"]]


def test_summary_counts_reasons_instructions_and_excess_sectors(tmp_path):
    module = bench_script("ncu_stall_summary")
    path = tmp_path / "sass.csv"
    quoted = lambda row: ",".join(f'"{cell}"' for cell in row)
    path.write_text("==PROF== preamble\n" + "\n".join(quoted(r) for r in [COLUMNS, *ROWS]) + "\n")
    lines = module.summary(module.read_rows(str(path)), top=2)
    assert lines[0] == "3 SASS instructions, 40 stall samples"
    assert "stall_long_sb" in lines[3] and "72.5%" in lines[3]  # 29 of 40, Not Issued apart
    assert "stall_barrier" in lines[4] and "27.5%" in lines[4]
    branch = next(line for line in lines if "BRA" in line)
    assert branch.split()[:2] == ["000a0", "30"] and "stall_long_sb=29" in branch
    assert any("STG.E" in line and "1,536 / 2,048" in line for line in lines)
