"""The attention entry point: backend names, the fallback planner and its warn-once logging (CPU)."""

from __future__ import annotations

import logging

import attention_formulas as F
import pytest
import torch
from attention_inputs import random_projection, random_qkv
from comfyui_turbodiffusion.turbo_kernels import sla_reference as R
from comfyui_turbodiffusion.wan_models import make_self_attention, sdpa_attention
from comfyui_turbodiffusion.wan_models.attention import (
    SparseLinearSelfAttention,
    plan_attention,
)

LOGGER = "comfyui_turbodiffusion.wan_models.attention"
CUDA = torch.device("cuda", 0)


def plan(backend, capability=(9, 0), triton=(3, 6), head_dim=128, device=CUDA):
    return plan_attention(backend, device, head_dim, triton_version=triton, capability=capability)


def test_sdpa_is_dense_softmax_attention():
    q, k, v = random_qkv(2, 300, 3, 32, seed=1, dtype=torch.float64)
    out = make_self_attention("sdpa")(q, k, v, None)
    assert make_self_attention("sdpa") is sdpa_attention
    torch.testing.assert_close(out, F.masked_attention(q, k, v, None, 1, 1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["sla", "sagesla"])
def test_sparse_backends_on_cpu_run_the_reference_with_one_warning(name, caplog):
    q, k, v = random_qkv(1, 700, 2, 64, seed=2, dtype=torch.float32)
    proj = random_projection(64, seed=3)
    attention = make_self_attention(name, sla_topk=0.2)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        first = attention(q, k, v, proj)
        second = attention(q, k, v, proj)
    expected = (
        R.sla_attention_reference(q, k, v, proj, 0.2)
        if name == "sla"
        else R.sagesla_attention_reference(q, k, v, proj, 0.2, R.HOPPER_RECIPE)
    )
    assert first.shape == q.shape and first.dtype == q.dtype
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, first)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "no CUDA GPU" in messages[0]


def test_missing_proj_l_warns_once_and_runs_the_sparse_branch(caplog):
    q, k, v = random_qkv(1, 700, 2, 64, seed=4, dtype=torch.float64)
    attention = make_self_attention("sla", sla_topk=0.2)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        outs = [attention(q, k, v, None) for _ in range(3)]
    untrained = [r for r in caplog.records if "not trained for SLA" in r.getMessage()]
    assert len(untrained) == 1
    mask = F.block_mask(q, k, 128, 64, 0.2)
    torch.testing.assert_close(outs[-1], F.masked_attention(q, k, v, mask, 128, 64), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"device": torch.device("cpu"), "capability": None}, "no CUDA GPU"),
        ({"triton": None}, "Triton is not installed"),
        ({"triton": (3, 1)}, "older than 3.2"),
        ({"capability": (7, 5)}, "older than Ampere"),
        ({"head_dim": 96}, "head dim 96"),
    ],
)
def test_planner_falls_back_to_the_reference(kwargs, reason):
    for backend in ("sla", "sagesla"):
        decided = plan(backend, **kwargs)
        assert decided.path == "reference" and reason in decided.reason


def test_planner_picks_the_architecture_recipe():
    assert plan("sla").path == "triton" and plan("sla").recipe is None
    assert plan("sagesla").recipe == R.SageRecipe(64, 128, "fp8")
    ampere = plan("sagesla", capability=(8, 6))
    assert (
        ampere.path == "triton" and ampere.recipe == R.SageRecipe(128, 64, "fp16") and "fp16" in ampere.reason
    )
    assert plan("sagesla", capability=(8, 9)).recipe == R.SageRecipe(128, 64, "fp8")
    assert plan("sagesla", capability=(12, 0)).recipe == R.SageRecipe(128, 64, "fp8")
    # The reference keeps the numerics of the GPU it stands in for.
    assert plan("sagesla", capability=(7, 5)).recipe == R.SageRecipe(128, 64, "fp8")


def test_kernel_failure_on_first_call_falls_back_once(caplog, monkeypatch):
    q, k, v = random_qkv(1, 300, 2, 64, seed=5, dtype=torch.float32)
    attention = SparseLinearSelfAttention("sagesla", 0.3)
    key = (q.device.type, q.device.index, q.shape[-1])
    attention._plans[key] = plan("sagesla")  # pretend the kernels were chosen for this device

    def broken(*args):
        raise RuntimeError("fp8e4nv not supported in this architecture")

    monkeypatch.setattr(attention, "_run_triton", broken)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = attention(q, k, v, None)
        attention(q, k, v, None)
    failures = [r for r in caplog.records if "Triton kernels failed" in r.getMessage()]
    assert len(failures) == 1
    torch.testing.assert_close(out, R.sagesla_attention_reference(q, k, v, None, 0.3, R.HOPPER_RECIPE))


@pytest.mark.parametrize(("name", "topk"), [("flash", 0.1), ("sla", 1.5), ("sagesla", -0.1)])
def test_bad_arguments_raise_clear_errors(name, topk):
    with pytest.raises(ValueError, match="attention backend|sla_topk"):
        make_self_attention(name, topk)


def test_query_pass_rejects_inconsistent_linear_branch_arguments():
    """Checked before any kernel launch, so this runs without Triton's interpreter."""
    from comfyui_turbodiffusion.turbo_kernels.sage_prepass import LinearState, pool_and_quantise

    q = torch.zeros(1, 64, 2, 32, dtype=torch.bfloat16)
    state = LinearState(torch.zeros(2, 32, 32, dtype=torch.bfloat16), torch.zeros(2, 32), torch.zeros(32))
    with pytest.raises(ValueError, match="needs `linear_out`"):
        pool_and_quantise(q, 64, linear=state)
    with pytest.raises(ValueError, match="unsmoothed query; pass no `mean`"):
        pool_and_quantise(q, 64, linear=state, linear_out=torch.empty_like(q), mean=torch.zeros(2, 32))
