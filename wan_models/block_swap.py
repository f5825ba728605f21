"""Block swap: run a WanDiT whose last N transformer blocks stay in (pinned) CPU memory (issue 6, low VRAM).

`enable_block_swap(model, n)` moves the weights of the last n blocks to the CPU (pinned when CUDA is
available) and puts `min(n, 2)` staging copies of a block ("slots") on the model's device. During a forward
the swapped blocks run in turn in the slots: the weights of the next swapped block are copied into the free
slot while the current one computes. On CUDA the copies run on a side stream and the compute stream waits on
an event only when it needs the block (the first swapped block starts copying when the forward starts, so it
overlaps the resident blocks); elsewhere the same code copies synchronously. The arithmetic is unchanged,
so outputs are identical to the resident model's.

`plan_block_swap(model, max_vram_gb, tokens)` derives n from a memory budget: resident weights + slots +
an activation estimate must fit, else it raises `MemoryBudgetError` naming the budget that would work.

While swapping is on, the model's state dict holds the resident blocks and the slots (`block_swap_slots.*`)
instead of the swapped blocks, so ComfyUI's `module_size` counts what really occupies the device.
`BlockSwap.remove()` puts the blocks back on the model's device; `active_block_swap(model)` finds the swap
enabled on a model.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import WanDiTConfig

logger = logging.getLogger(__name__)

GIB = 2**30
MAX_SLOTS = 2
TEXT_TOKENS = 512
# Peak activation bytes per token and channel of one block's forward in bf16, measured on the CPU by
# tracking live tensors (dense PyTorch ops, an attention core that only allocates its output): about
# 28·dim during self-attention (q, k, v, the float32 RMSNorm and RoPE temporaries) and 13·dim + 4·ffn_dim in
# the FFN (hidden state and its GELU). bench/memory.py prints this estimate beside the GPU's measured peak.
ATTENTION_BYTES_PER_CHANNEL = 28
FFN_BYTES_PER_CHANNEL = 13
FFN_BYTES_PER_HIDDEN = 4
# Quantised attention inputs (int8 q and k, fp8 v) and the block map of SLA / SageSLA, per token and channel.
ATTENTION_KERNEL_BYTES_PER_CHANNEL = 4
# Caching-allocator fragmentation and small buffers.
ACTIVATION_MARGIN = 1.1


class MemoryBudgetError(ValueError):
    """A VRAM budget too small to run the model at the requested size."""


@dataclass(frozen=True)
class SwapPlan:
    """How a model fits a budget: `swapped_blocks` of `num_blocks` stream from the CPU."""

    swapped_blocks: int
    num_blocks: int
    block_bytes: int
    other_weight_bytes: int
    activation_bytes: int

    @property
    def slots(self) -> int:
        return min(self.swapped_blocks, MAX_SLOTS)

    @property
    def device_weight_bytes(self) -> int:
        resident = self.num_blocks - self.swapped_blocks + self.slots
        return self.other_weight_bytes + resident * self.block_bytes

    @property
    def device_bytes(self) -> int:
        return self.device_weight_bytes + self.activation_bytes


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def estimate_activation_bytes(config: WanDiTConfig, tokens: int, batch: int = 1) -> int:
    """Estimated peak activation memory of one forward of a bf16 / int8 / fp8 model (see the constants)."""
    attention = (ATTENTION_BYTES_PER_CHANNEL + ATTENTION_KERNEL_BYTES_PER_CHANNEL) * config.dim
    ffn = FFN_BYTES_PER_CHANNEL * config.dim + FFN_BYTES_PER_HIDDEN * config.ffn_dim
    per_token = max(attention, ffn)
    text = TEXT_TOKENS * config.dim * 2 * 4  # embedded context and its cross-attention keys / values
    return math.ceil(ACTIVATION_MARGIN * batch * (tokens * per_token + text))


def plan_block_swap(
    model: nn.Module, max_vram_gb: float, tokens: int, batch: int = 1, reserved_bytes: int = 0
) -> SwapPlan:
    """The fewest swapped blocks that keep weights + activations + `reserved_bytes` within `max_vram_gb` GiB.

    `model` is a WanDiT, swapping or not (a swapping model is planned as if all its blocks were its own);
    `tokens` = latent frames × (height/16) × (width/16). `reserved_bytes`: what else stays on the device
    while the model runs (e.g. the VAE's weights and the sampler's state in a whole job), so that a budget
    can stand for the whole GPU.
    """
    swap = active_block_swap(model)
    host_blocks = {} if swap is None else dict(zip(swap.indices, swap.host_blocks))
    blocks = [host_blocks.get(index, block) for index, block in enumerate(model.blocks)]
    block_bytes = max(tensor_bytes(block) for block in blocks)
    # Streamed stand-ins hold no tensors, so this leaves the resident blocks' and the slots' bytes out.
    resident = sum(tensor_bytes(block) for block in model.blocks)
    slots = 0 if swap is None else tensor_bytes(swap.slots)
    other = tensor_bytes(model) - resident - slots
    activations = estimate_activation_bytes(model.config, tokens, batch)
    budget = max_vram_gb * GIB - reserved_bytes
    for swapped in range(len(blocks) + 1):
        plan = SwapPlan(swapped, len(blocks), block_bytes, other, activations)
        if plan.device_bytes <= budget:
            return plan
    need = (plan.device_bytes + reserved_bytes) / GIB
    suggestion = math.ceil(need * 10) / 10
    reserved = f", other memory on the device {reserved_bytes / GIB:.2f} GB" if reserved_bytes else ""
    raise MemoryBudgetError(
        f"max_vram_gb={max_vram_gb:g} is too small for this model ({len(blocks)} blocks of dim "
        f"{model.config.dim}) at {tokens} tokens x batch {batch}: even with every block swapped to the CPU "
        f"it needs about {need:.1f} GB (weights outside the blocks {other / GIB:.2f} GB, {plan.slots} "
        f"staged blocks {plan.slots * block_bytes / GIB:.2f} GB, activations {activations / GIB:.2f} GB"
        f"{reserved}). "
        f"Set max_vram_gb to at least {suggestion:.1f}, or lower the resolution or frame count."
    )


class _StreamedBlock(nn.Module):
    """Stands in `model.blocks[i]` for a swapped block; runs it in a slot. Holds no tensors."""

    def __init__(self, swap: BlockSwap, order: int) -> None:
        super().__init__()
        self.order = order
        object.__setattr__(self, "_swap", swap)  # a plain reference, not a submodule

    def forward(self, *args, **kwargs):
        return self._swap.run(self.order, *args, **kwargs)


def _state_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for _, t in (*module.named_parameters(), *module.named_buffers())]


def _pin_(module: nn.Module) -> None:
    """Put a CPU module's tensors in page-locked memory, so copies to the GPU run asynchronously."""
    for tensor in _state_tensors(module):
        tensor.data = tensor.data.pin_memory()


class BlockSwap:
    """The last `swapped_blocks` blocks of `model` live on the CPU and stream through staging slots."""

    def __init__(self, model: nn.Module, swapped_blocks: int) -> None:
        num_blocks = len(model.blocks)
        if not 0 < swapped_blocks <= num_blocks:
            raise ValueError(f"swapped_blocks must be between 1 and {num_blocks}, got {swapped_blocks}")
        if hasattr(model, "block_swap_slots"):
            raise ValueError("block swap is already enabled on this model; remove() it first")
        device = next(model.parameters()).device
        self.model = model
        self.indices = list(range(num_blocks - swapped_blocks, num_blocks))
        self.host_blocks = [model.blocks[i].to("cpu") for i in self.indices]
        if torch.cuda.is_available():
            try:
                for block in self.host_blocks:
                    _pin_(block)
            except RuntimeError as error:  # pinning can fail when page-locked memory runs out
                logger.warning("block swap: could not pin CPU memory (%s); copies will be synchronous", error)
        slots = [copy.deepcopy(self.host_blocks[0]) for _ in range(min(swapped_blocks, MAX_SLOTS))]
        model.block_swap_slots = nn.ModuleList(slots).to(device)
        for order, index in enumerate(self.indices):
            model.blocks[index] = _StreamedBlock(self, order)
        self._ready: list[torch.cuda.Event | None] = [None] * len(slots)
        self._free: list[torch.cuda.Event | None] = [None] * len(slots)
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._hook = model.register_forward_pre_hook(self._start_forward)

    @property
    def slots(self) -> nn.ModuleList:
        return self.model.block_swap_slots

    @property
    def swapped_blocks(self) -> int:
        return len(self.indices)

    def remove(self) -> None:
        """Put the swapped blocks back into the model, on its device, and drop the slots."""
        device = next(self.slots.parameters()).device
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        for index, block in zip(self.indices, self.host_blocks):
            self.model.blocks[index] = block.to(device)
        del self.model.block_swap_slots
        self._hook.remove()

    def run(self, order: int, *args, **kwargs):
        """Forward of the `order`-th swapped block: wait for its weights, compute, prefetch the next one."""
        slot_index = order % len(self.slots)
        slot = self.slots[slot_index]
        device = next(slot.parameters()).device
        if device.type == "cuda":
            torch.cuda.current_stream(device).wait_event(self._ready[slot_index])
        out = slot(*args, **kwargs)
        if device.type == "cuda":
            self._free[slot_index] = torch.cuda.current_stream(device).record_event()
        upcoming = order + len(self.slots)
        if upcoming < len(self.indices):
            self._load(upcoming)
        return out

    def _start_forward(self, module: nn.Module, args) -> None:
        device = next(self.slots.parameters()).device
        if device.type == "cuda":
            # Work queued before this forward (e.g. the asynchronous move of the model onto the GPU, which
            # writes the slots) must land before the copies overwrite the slots.
            self._copy_stream(device).wait_stream(torch.cuda.current_stream(device))
        for order in range(len(self.slots)):
            self._load(order)

    def _copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._copy_streams:
            self._copy_streams[device] = torch.cuda.Stream(device)
        return self._copy_streams[device]

    def _load(self, order: int) -> None:
        """Copy the weights of swapped block `order` into its slot (asynchronously on CUDA)."""
        slot_index = order % len(self.slots)
        slot = self.slots[slot_index]
        pairs = zip(_state_tensors(slot), _state_tensors(self.host_blocks[order]))
        device = next(slot.parameters()).device
        if device.type != "cuda":
            with torch.no_grad():
                for target, source in pairs:
                    target.copy_(source)
            return
        stream = self._copy_stream(device)
        if self._free[slot_index] is not None:
            stream.wait_event(self._free[slot_index])  # the slot's previous block has finished computing
        with torch.cuda.stream(stream), torch.no_grad():
            for target, source in pairs:
                target.copy_(source, non_blocking=True)
        self._ready[slot_index] = stream.record_event()


def enable_block_swap(model: nn.Module, swapped_blocks: int) -> BlockSwap:
    """Keep the last `swapped_blocks` blocks of a WanDiT on the CPU and stream them in during forwards."""
    return BlockSwap(model, swapped_blocks)


def active_block_swap(model: nn.Module) -> BlockSwap | None:
    """The block swap enabled on a WanDiT, or None when all its blocks are its own."""
    for block in model.blocks:
        if isinstance(block, _StreamedBlock):
            return block._swap
    return None
