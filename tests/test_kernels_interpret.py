"""SLA / SageSLA Triton kernels on the CPU interpreter (TRITON_INTERPRET=1) at tiny sizes.

The kernels run in a child process (tests/attention_interpret_cases.py; Triton picks interpreted vs
compiled when a kernel is decorated). The interpreter computes INT8 and FP8 dots exactly and bf16 dots are
done in fp32 there (KERNELS.md §4.9), so these tests check indexing, masking, LUT logic, quantisation and
the linear branch; GPU numerics are checked by bench/attention.py on the lent GPU.
"""

from __future__ import annotations

import pytest
from triton_children import INTERPRETER, json_report

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def measured() -> dict:
    return json_report("attention_interpret_cases.py", INTERPRETER, timeout=900)


def test_prepass_quantises_exactly_like_the_reference(measured):
    prepass = measured["prepass"]
    assert prepass["q8_mismatch"] == 0 and prepass["k8_mismatch"] == 0 and prepass["v8_mismatch"] == 0
    assert prepass["v_pad_nonzero"] == 0, "the padding of the transposed FP8 V must be zeros"
    # The keys are interleaved within each 16 (the order of the kernel's register operand), not natural.
    assert not prepass["v_columns_in_key_order"]
    assert prepass["q_scale_err"] < 1e-6 and prepass["k_scale_err"] < 1e-6 and prepass["v_scale_err"] < 1e-6
    assert prepass["pooled_err"] < 1e-5


def test_linear_branch_state_matches_float64(measured):
    state = measured["linear_state"]
    assert state["k_mean_err"] < 1e-5
    assert state["z_rel"] < 1e-6
    assert state["kv_proj_rel"] < 5e-3  # KV' is stored in bf16


def test_block_selection_equals_float64_top_k(measured):
    selection = measured["selection"]
    assert selection.pop("ties_keep_lowest_ids")
    for name, case in selection.items():
        assert case["k_sel"] > 0, name
        assert case["mismatches"] == 0, name
        assert case["ascending"] and case["counts_ok"], name


@pytest.mark.parametrize("kind", ["random", "dit"])
def test_quantised_sparse_attention_within_kernel_tolerances(measured, kind):
    """KERNELS.md §1.9: INT8+FP8 rel-L2 <= 0.05, cos >= 0.9985; INT8+FP16 rel-L2 <= 0.04, cos >= 0.999."""
    for pv, (rel_bound, cos_bound) in {"fp8": (0.05, 0.9985), "fp16": (0.04, 0.999)}.items():
        case = measured["attention"][f"{kind}/sagesla-{pv}"]
        assert case["unwritten"] == 0
        assert case["rel_l2"] <= rel_bound and case["cos"] >= cos_bound, case
        assert case["rel_l2_vs_emulation"] < 0.01, case  # same quantisation as the PyTorch emulation
        assert case["descriptor_equals_pointer"], "TMA-descriptor and pointer loads must agree bitwise"
        assert case["full_rel_l2"] <= rel_bound, case
        # Row sums from the tensor cores (P̃ · ones; ignored by the FP16 P·V path): same bounds.
        assert case["row_sum_mma_unwritten"] == 0
        assert case["row_sum_mma_rel_l2"] <= rel_bound, case
        assert case["row_sum_mma_rel_l2_vs_emulation"] < 0.01, case


@pytest.mark.parametrize("kind", ["random", "dit"])
def test_bf16_sparse_and_dense_kernels(measured, kind):
    sla = measured["attention"][f"{kind}/sla"]
    assert sla["unwritten"] == 0 and sla["rel_l2"] < 5e-3
    assert sla["full_rel_l2"] < 1e-2  # sparse and linear branch each rounded to bf16 once, as the reference
    dense = measured["attention"][f"{kind}/dense"]
    assert dense["unwritten"] == 0 and dense["rel_l2"] <= 0.05


def test_ragged_lengths_and_empty_selection(measured):
    for name, case in measured["ragged"].items():
        assert case["unwritten"] == 0, name
        assert case["sagesla_rel_l2"] <= 0.05 and case["sla_rel_l2"] < 1e-2, (name, case)
