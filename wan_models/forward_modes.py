"""How a WanDiT's forward runs: eagerly, replayed from a CUDA graph, or compiled by torch.compile (issue 8).

`set_forward_mode(model, mode)` installs a runner on the model (`WanDiT.forward_runner`); every mode computes
the same function (TURBODIFFUSION.md §2), and every mode falls back to eager execution, logged once, where it
cannot run:

* "none": eager PyTorch (with the injected kernels: attention, linears, fused block ops).
* "cudagraphs": the whole forward is captured once per input shape in a CUDA graph and replayed, so the
  ~1000 kernel launches of a forward cost one launch and no Python. The first call at a shape runs eagerly
  (compiling kernels and settling their self-checks; its result is returned) and then captures. A graph keeps
  the activation memory of one forward reserved while it lives (about 28·C bytes per token: 1.4 GB for the
  1.3B model at 480p); at most `MAX_GRAPHS` shapes are kept per model, and moving the model drops them.
  Needs a CUDA device and no block swap; inputs are copied into the graph's buffers, the output is copied out.
* "default", "max-autotune": torch.compile of each transformer block (`nn.Module.compile`, one compiled
  graph shared by all blocks), with the PyTorch block ops so that Inductor fuses the norms, RoPE and
  residuals itself; attention and quantised linears stay opaque calls (marked `torch.compiler.disable`).
  Compiling takes seconds to minutes on the first call per shape; a compiler failure there restores eager
  execution.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .block_ops import TORCH_BLOCK_OPS
from .dit import WanBlock, WanDiT

FORWARD_MODES = ("none", "cudagraphs", "default", "max-autotune")
MAX_GRAPHS = 2

logger = logging.getLogger(__name__)


def set_forward_mode(model: WanDiT, mode: str) -> None:
    """Run `model`'s forward in `mode` (one of FORWARD_MODES) from now on; "none" restores eager execution."""
    if mode not in FORWARD_MODES:
        raise ValueError(f"unknown forward mode {mode!r}; choose one of {', '.join(FORWARD_MODES)}")
    previous = model.forward_runner
    if previous is not None:
        previous.reset()
        if isinstance(previous, CompiledRunner):
            previous.undo()
    model.forward_runner = None
    if mode == "cudagraphs":
        model.forward_runner = CudaGraphRunner(model)
    elif mode != "none":
        model.forward_runner = CompiledRunner(model, mode)


def forward_mode(model: WanDiT) -> str:
    runner = model.forward_runner
    if runner is None:
        return "none"
    return "cudagraphs" if isinstance(runner, CudaGraphRunner) else runner.mode


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor | None, ...]
    output: torch.Tensor
    weights: tuple[int, ...]
    keep_alive: object  # tensors captured by address that the model only caches (the RoPE tables)


class CudaGraphRunner:
    """Replays one CUDA graph of `model.compute` per input shape (see the module docstring)."""

    def __init__(self, model: WanDiT, max_graphs: int = MAX_GRAPHS) -> None:
        self.model = model
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._failed: set[tuple] = set()
        self._said: set[str] = set()

    def reset(self) -> None:
        self._graphs.clear()

    def __call__(self, x, t, context, y):
        reason = self._cannot_capture(x)
        if reason:
            self._say_once(logging.INFO, f"cudagraphs: {reason}; running eagerly")
            return self.model.compute(x, t, context, y)
        inputs = (x, t, context, y)
        # Buffers made under inference mode cannot be written outside it: one graph per mode.
        key = tuple(None if v is None else (tuple(v.shape), v.dtype, v.device) for v in inputs)
        key += (torch.is_inference_mode_enabled(),)
        weights = self._weight_addresses()
        entry = self._graphs.get(key)
        if entry is not None and entry.weights != weights:
            del self._graphs[key]
            entry = None
        if entry is None:
            out = self.model.compute(x, t, context, y)
            if key not in self._failed:
                self._capture(key, inputs, weights)
            return out
        self._graphs.move_to_end(key)
        for static, value in zip(entry.inputs, inputs):
            if static is not None:
                static.copy_(value)
        entry.graph.replay()
        return entry.output.clone()

    def _cannot_capture(self, x: torch.Tensor) -> str | None:
        if hasattr(self.model, "block_swap_slots"):
            return "block swap streams weights during the forward, which a graph cannot replay"
        if x.device.type != "cuda":
            return f"needs a CUDA device, the model runs on {x.device.type}"
        return None

    def _weight_addresses(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in (*self.model.parameters(), *self.model.buffers()))

    def _capture(self, key: tuple, inputs: tuple, weights: tuple[int, ...]) -> None:
        x = inputs[0]
        static = tuple(None if v is None else v.clone() for v in inputs)
        grid = tuple(size // patch for size, patch in zip(x.shape[2:], self.model.config.patch_size))
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                output = self.model.compute(*static)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as error:  # e.g. a host synchronisation or an uncapturable kernel in the forward
            self._failed.add(key)
            self._say_once(logging.WARNING, f"cudagraphs: capture failed ({error}); running eagerly")
            return
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        keep = self.model.rope(grid, x.device)
        self._graphs[key] = _Graph(graph, static, output, weights, keep)
        self._say_once(logging.INFO, f"cudagraphs: captured the forward for latent {tuple(x.shape)}")

    def _say_once(self, level: int, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            logger.log(level, message)


class CompiledRunner:
    """`model.compute` with each resident transformer block compiled by torch.compile in `mode`."""

    def __init__(self, model: WanDiT, mode: str) -> None:
        self.model = model
        self.mode = mode
        self._previous_ops = model.block_ops
        self._state = "pending"  # "working" after a first successful call, "failed" after a failed one
        model.set_block_ops(TORCH_BLOCK_OPS)
        options = inductor_options(mode)
        for block in _resident_blocks(model):
            block.compile(options=options, dynamic=False)

    def reset(self) -> None:
        """Compiled code is guarded on devices and dtypes: it recompiles by itself."""

    def undo(self) -> None:
        for block in _resident_blocks(self.model):
            block._compiled_call_impl = None  # what nn.Module.compile set; no public way back exists
        self.model.set_block_ops(self._previous_ops)

    def __call__(self, x, t, context, y):
        if self._state == "failed":
            return self.model.compute(x, t, context, y)
        try:
            out = self.model.compute(x, t, context, y)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as error:  # the first call compiles; failing there means no working compiler
            if self._state == "working":
                raise
            self._state = "failed"
            self.undo()
            logger.warning("torch.compile (%s) failed (%s); running eagerly", self.mode, error)
            return self.model.compute(x, t, context, y)
        if self._state == "pending":
            logger.info("torch.compile (%s): compiled the transformer blocks", self.mode)
            self._state = "working"
        return out


def inductor_options(mode: str) -> dict:
    """Inductor options of a forward mode. Inductor would otherwise keep fused intermediates in float32 where
    eager PyTorch rounds them to bf16 (e.g. the gated residual's product), moving TurboDiffusion's rounding
    points; `emulate_precision_casts` keeps them. "max-autotune" leaves out Inductor's own CUDA graphs: the
    attention's graph break would cut them into pieces per block ("cudagraphs" captures the whole forward)."""
    from torch._inductor import config, list_mode_options

    options = dict(list_mode_options()["max-autotune-no-cudagraphs" if mode == "max-autotune" else mode])
    if hasattr(config, "emulate_precision_casts"):
        options["emulate_precision_casts"] = True
    return options


def _resident_blocks(model: nn.Module) -> list[WanBlock]:
    """The blocks held by the model itself (block swap's streamed stand-ins run slots, left eager)."""
    return [block for block in model.blocks if isinstance(block, WanBlock)]
