"""Forward modes of WanDiT (CUDA graphs, torch.compile) on the CPU: accepted, same results, clean fallbacks.

The CUDA-graph runner's bookkeeping (static input buffers, output copy, one graph per shape, invalidation
when the weights move) is checked with a stand-in graph whose replay recomputes from the captured input
buffers; real capture and replay run on the GPU in bench/e2e.py.
"""

from __future__ import annotations

import contextlib
import logging
import shutil

import pytest
import torch
from comfyui_turbodiffusion.wan_models import forward_modes
from comfyui_turbodiffusion.wan_models.block_ops import TORCH_BLOCK_OPS, make_block_ops
from comfyui_turbodiffusion.wan_models.dit_loader import load_dit
from comfyui_turbodiffusion.wan_models.forward_modes import forward_mode, set_forward_mode
from dit_reference import make_diffusers_model, make_inputs, to_original_layout, to_turbodiffusion_layout
from dit_spec_reference import spec_forward


@pytest.fixture(scope="module")
def bf16_file(tmp_path_factory):
    """A tiny random DiT as released: bf16 weights, float32 norm weights, SLA proj_l."""
    original = to_turbodiffusion_layout(to_original_layout(make_diffusers_model(16, seed=3).state_dict()))
    state = {k: (v.float() if ".norm" in k else v.to(torch.bfloat16)) for k, v in original.items()}
    path = tmp_path_factory.mktemp("dit") / "tiny.pth"
    torch.save(state, path)
    return path, state


def test_unknown_modes_are_refused_before_reading_the_file(tmp_path):
    with pytest.raises(ValueError, match="unknown forward_mode 'fast'.*none, cudagraphs, default"):
        load_dit(tmp_path / "missing.pth", forward_mode="fast")


def test_cudagraphs_without_a_gpu_runs_eagerly_and_says_so(bf16_file, caplog):
    path, _ = bf16_file
    eager = load_dit(path)
    graphed = load_dit(path, forward_mode="cudagraphs")
    x, t, context, _ = make_inputs(16, (1, 16, 2, 4, 4))
    with caplog.at_level(logging.INFO), torch.no_grad():
        expected, got = eager(x, t, context), graphed(x, t, context)
    assert torch.equal(got, expected)
    assert forward_mode(graphed) == "cudagraphs"
    assert "cudagraphs: needs a CUDA device" in caplog.text


class StandInGraph:
    """Records nothing: replay recomputes the model from the runner's captured input buffers."""

    def __init__(self) -> None:
        self.runner = None
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        entry = next(e for e in self.runner._graphs.values() if e.graph is self)
        entry.output.copy_(self.runner.model.compute(*entry.inputs))


def test_cuda_graph_runner_bookkeeping(bf16_file, monkeypatch):
    path, _ = bf16_file
    model = load_dit(path)
    runner = forward_modes.CudaGraphRunner(model, max_graphs=1)
    model.forward_runner = runner
    graphs = []

    def new_graph():
        graphs.append(StandInGraph())
        graphs[-1].runner = runner
        return graphs[-1]

    monkeypatch.setattr(torch.cuda, "CUDAGraph", new_graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, **options: contextlib.nullcontext())
    monkeypatch.setattr(runner, "_cannot_capture", lambda x: None)
    eager = load_dit(path)
    first = make_inputs(16, (1, 16, 2, 4, 4), seed=1)[:3]
    second = make_inputs(16, (1, 16, 2, 4, 4), seed=2)[:3]

    with torch.no_grad():
        out = model(*first)  # eager, then captured
        assert len(graphs) == 1 and graphs[0].replays == 0
        assert torch.equal(out, eager(*first))
        replayed = model(*second)  # new values through the same graph
        assert graphs[0].replays == 1
        assert torch.equal(replayed, eager(*second))
        replayed.zero_()  # the caller owns its copy; the graph's output buffer is untouched
        assert torch.equal(model(*second), eager(*second))

        model(*make_inputs(16, (1, 16, 1, 4, 6), seed=3)[:3])  # a new shape evicts the only graph
        assert len(runner._graphs) == 1 and len(graphs) == 2

        model.to(torch.float32)  # moved weights: the graphs are dropped, the next call captures anew
        assert len(runner._graphs) == 0
        assert torch.equal(model(*first), eager.to(torch.float32)(*first))
        assert len(graphs) == 3

    with torch.inference_mode():  # ComfyUI runs nodes so; its buffers could not be written under no_grad
        assert torch.equal(model(*first), eager(*first))
    assert len(graphs) == 4


def test_cuda_graph_runner_refuses_block_swap(bf16_file):
    from comfyui_turbodiffusion.wan_models.block_swap import enable_block_swap

    model = load_dit(bf16_file[0])
    enable_block_swap(model, 1)
    runner = forward_modes.CudaGraphRunner(model)
    assert "block swap" in runner._cannot_capture(torch.zeros(1))


def _has_cpp_compiler() -> bool:
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _has_cpp_compiler(), reason="torch.compile on the CPU needs a C++ compiler")
def test_torch_compile_keeps_the_rounding_points(bf16_file):
    """Compiled blocks (Inductor on the CPU) against the step-by-step spec forward and the eager model."""
    path, state = bf16_file
    model = load_dit(path)
    x, t, context, _ = make_inputs(16, (1, 16, 2, 4, 4))
    with torch.no_grad():
        eager = model(x, t, context)
        set_forward_mode(model, "default")
        assert model.block_ops is TORCH_BLOCK_OPS  # Inductor fuses the PyTorch ops itself
        compiled = model(x, t, context)
        expected = spec_forward(state, x, t, context, num_heads=2)
    assert (compiled - expected).abs().max().item() <= 2e-3
    assert (compiled - eager).abs().max().item() <= 2e-3
    state = model.forward_runner._state
    set_forward_mode(model, "none")
    assert model.forward_runner is None
    assert all(block._compiled_call_impl is None for block in model.blocks)
    assert model.block_ops is not TORCH_BLOCK_OPS  # the loader's fused ops are back
    if state != "working":  # the eager fallback gave the results above
        pytest.skip("torch.compile could not build its CPU kernels on this machine")


def test_a_failing_compiler_falls_back_to_eager(bf16_file, monkeypatch, caplog):
    model = load_dit(bf16_file[0])
    model.set_block_ops(make_block_ops("auto"))
    x, t, context, _ = make_inputs(16, (1, 16, 1, 4, 4))
    with torch.no_grad():
        expected = model(x, t, context)
        set_forward_mode(model, "max-autotune")

        def broken(*args, **kwargs):
            raise RuntimeError("no working compiler here")

        for block in model.blocks:
            monkeypatch.setattr(block, "_compiled_call_impl", broken)
        with caplog.at_level(logging.WARNING):
            got = model(x, t, context)
    assert torch.equal(got, expected)
    assert "torch.compile (max-autotune) failed (no working compiler here); running eagerly" in caplog.text
    assert all(block._compiled_call_impl is None for block in model.blocks)
