"""TD_RCMSampler's `max_vram_gb`: the DiT's block swap derived from a GPU memory budget (issue 6, item 3).

For each model the sampler is about to run, `plan_block_swap` finds the fewest transformer blocks that must
stream from CPU memory so that the device weights, the estimated activations of one forward at this latent
size and the sampler's own state fit the budget. A model that already swaps at least that many blocks (from
the loader's swap_blocks, or from an earlier run) is left as it is; otherwise its swap is enabled, or
re-enabled with the larger count, while the model is off the GPU, and its patcher's size is recorded anew so
ComfyUI's evictions see what the model really occupies.

The swap stays on the model afterwards: the loader's output is cached, so re-queues at the same size find
enough blocks swapped and move nothing. A later larger budget (or 0) does not bring blocks back; reloading
the model (a changed loader input) does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..wan_models.block_swap import GIB, MemoryBudgetError, SwapPlan, active_block_swap, plan_block_swap
from ..wan_models.sampler import T2V_IN_DIM, compute_dtype
from ..wan_models.tokenizer import TEXT_LEN
from .model_patchers import TurboPatcher, set_block_swap

logger = logging.getLogger(__name__)

# Bytes per element of the (batch, 16, T, H, W) latent that rcm_sample keeps on the device beside the DiT's
# weights and activations: the float64 state and the next one being computed (8 + 8), the float64 velocity
# and the update's float64 temporary (8 + 8), the float32 initial noise (kept for the whole loop), the step's
# fresh float32 noise and its scaled copy (4 + 4 + 4), and the network's float32 output (4). The network's
# input, the I2V condition and the text context are added in the compute dtype.
STATE_BYTES_PER_LATENT_ELEMENT = 48


def sampler_state_bytes(shape: tuple[int, ...], network: torch.nn.Module) -> int:
    """Device bytes of the sampler's state for a latent of `shape` sampled with `network`.

    About 0.24 GiB for Wan2.2 I2V A14B at 720p x 81 frames (latent 1 x 16 x 21 x 90 x 160, bf16).
    """
    batch, channels, frames, height, width = shape
    elements = batch * channels * frames * height * width
    dtype_bytes = torch.empty(0, dtype=compute_dtype(network)).element_size()
    config = network.config
    condition_elements = elements * (config.in_dim - T2V_IN_DIM) // channels
    context_elements = batch * TEXT_LEN * config.text_dim
    return STATE_BYTES_PER_LATENT_ELEMENT * elements + dtype_bytes * (
        elements + condition_elements + context_elements
    )


def latent_tokens(shape: tuple[int, ...]) -> int:
    """Transformer tokens of a (batch, 16, T, H, W) latent: the DiT patchifies by 1 x 2 x 2."""
    _, _, frames, height, width = shape
    return frames * (height // 2) * (width // 2)


@dataclass(frozen=True)
class BudgetPlan:
    """How one model fits the budget: its swap plan and the sampler state counted beside it."""

    patcher: TurboPatcher
    swap: SwapPlan
    reserved_bytes: int

    @property
    def working_bytes(self) -> int:
        """What the run needs on the device beyond the weights: activations and the sampler's state."""
        return self.swap.activation_bytes + self.reserved_bytes


def plan_vram_budget(
    patchers: list[TurboPatcher], max_vram_gb: float, shape: tuple[int, ...], node: str
) -> list[BudgetPlan]:
    """A swap plan per model; a budget too small for any of them raises MemoryBudgetError naming the budget
    that would work."""
    plans = []
    for patcher in patchers:
        reserved = sampler_state_bytes(shape, patcher.network)
        try:
            swap = plan_block_swap(
                patcher.network, max_vram_gb, latent_tokens(shape), shape[0], reserved_bytes=reserved
            )
        except MemoryBudgetError as error:
            raise MemoryBudgetError(
                f"{node}: '{patcher.label}': {error} (The other memory on the device is the sampler's "
                f"state for this latent.)"
            ) from error
        plans.append(BudgetPlan(patcher, swap, reserved))
    return plans


def apply_vram_budget(plans: list[BudgetPlan], max_vram_gb: float, node: str) -> None:
    """Swap at least the planned number of blocks in each model, before ComfyUI loads it to the device."""
    for plan in plans:
        swap = active_block_swap(plan.patcher.network)
        current = 0 if swap is None else swap.swapped_blocks
        needed = plan.swap.swapped_blocks
        detail = (
            f"weights on the device {plan.swap.device_weight_bytes / GIB:.2f} GB, estimated activations "
            f"{plan.swap.activation_bytes / GIB:.2f} GB, sampler state {plan.reserved_bytes / GIB:.2f} GB"
        )
        if current >= needed:
            logger.info(
                "%s max_vram_gb=%g: '%s' keeps its %d swapped blocks of %d (%d needed: %s)",
                node,
                max_vram_gb,
                plan.patcher.label,
                current,
                plan.swap.num_blocks,
                needed,
                detail,
            )
            continue
        set_block_swap(plan.patcher, needed)
        logger.info(
            "%s max_vram_gb=%g: '%s' swaps %d of %d blocks (was %d; %s)",
            node,
            max_vram_gb,
            plan.patcher.label,
            needed,
            plan.swap.num_blocks,
            current,
            detail,
        )
