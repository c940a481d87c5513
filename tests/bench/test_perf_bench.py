"""bench/perf.py's bookkeeping (no GPU): kernel kinds of the profile split, the float8 rows' ratio to the same
plan in bf16."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import perf  # noqa: E402


def test_kernel_names_fall_into_their_kinds():
    assert perf.kernel_kind("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128") == "matmul fp8"
    assert perf.kernel_kind("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT") == "matmul bf16"
    assert perf.kernel_kind("nvjet_sm90_qqtst_128x128_128x6_1x1_h_bz_coopA_algo2_ovscale_TNT") == "matmul fp8"
    assert perf.kernel_kind("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN") == "matmul bf16"
    assert perf.kernel_kind("flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel") == "attention"
    assert perf.kernel_kind("triton_per_fused__to_copy_mul_0") == "fused (triton)"
    assert perf.kernel_kind("void at::native::vectorized_elementwise_kernel") == "other"


def test_a_float8_row_is_compared_with_its_own_plan_in_bf16():
    rows = [{"row": "memory", "resolution": 1024, "median_s": 0.55},
            {"row": "memory-fp8mm", "resolution": 1024, "median_s": 0.44},
            {"row": "fa4", "resolution": 1024, "median_s": 0.34},
            {"row": "fp8mm", "resolution": 1024, "median_s": 0.30},
            {"row": "fp8mm", "resolution": 512, "median_s": 0.20}]      # no bf16 row at 512²: no ratio
    perf.analyse(rows)
    assert rows[1]["vs_bf16_row"] == 0.55 / 0.44
    assert rows[3]["vs_bf16_row"] == 0.34 / 0.30
    assert "vs_bf16_row" not in rows[4] and "vs_bf16_row" not in rows[0]
    text = perf.markdown({}, rows, {}, "perf-x.json")
    assert "memory-fp8mm at 1024²: 1.25× the same plan without float8 matmuls" in text
