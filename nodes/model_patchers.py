"""Our models under ComfyUI's memory management.

Every module the loaders create is wrapped in a `TurboPatcher` (a ComfyUI `ModelPatcher`), so ComfyUI moves
it to the compute device with `load_models_gpu` before use, offloads it when another model needs the memory,
and unloads it on `POST /free`. The subclass only marks the patcher as ours and names the file it came from,
so `TD_FreeVRAM` and the `/turbodiffusion/models` route can tell our models from ComfyUI's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy import model_management as mm
from comfy.model_patcher import ModelPatcher

from ..wan_models.block_swap import active_block_swap, enable_block_swap
from ..wan_models.i2v import module_device


class TurboDiffusionModel(torch.nn.Module):
    """The module a patcher manages: ModelPatcher writes its bookkeeping attributes (`device`, loaded
    memory, ...) onto it, which the library's models must not receive (their `device` is read-only)."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network


class TurboPatcher(ModelPatcher):
    """A ModelPatcher that knows which file and which kind of model (dit, vae, text_encoder) it holds."""

    def __init__(
        self, model, load_device, offload_device, size=0, weight_inplace_update=False, label="", kind=""
    ):
        super().__init__(model, load_device, offload_device, size, weight_inplace_update)
        self.label = label
        self.kind = kind

    def clone(self):
        copy = super().clone()
        copy.label, copy.kind = self.label, self.kind
        return copy

    @property
    def network(self) -> torch.nn.Module:
        """The library model (WanDiT, WanVAE or UMT5TextEncoder)."""
        return self.model.network


def wrap_module(
    module: torch.nn.Module, load_device: torch.device, offload_device: torch.device, label: str, kind: str
) -> TurboPatcher:
    return TurboPatcher(
        TurboDiffusionModel(module),
        load_device,
        offload_device,
        size=mm.module_size(module),
        label=label,
        kind=kind,
    )


def load_to_device(*patchers: TurboPatcher, memory_required: int = 0) -> None:
    """Bring models onto their compute device through ComfyUI (evicting others if memory is short).

    Always whole: our layers are plain torch modules (some hold int8 weights as buffers), which ComfyUI's
    partial low-VRAM loading would leave on the CPU. `memory_required`: bytes the run needs on the device
    beyond the weights (activations), which ComfyUI then frees as well.
    """
    mm.load_models_gpu(list(patchers), memory_required=memory_required, force_full_load=True)


def set_block_swap(patcher: TurboPatcher, swapped_blocks: int) -> None:
    """Make a DiT patcher's network stream its last `swapped_blocks` blocks from CPU memory (0: none).

    A loaded patcher is unloaded first, so the blocks are rearranged on the offload device and ComfyUI's
    count of loaded memory stays true; the patcher's size is then recorded anew, because ComfyUI decides
    what to evict from `model_size()`.
    """
    _unload_where(lambda candidate: candidate is patcher)
    swap = active_block_swap(patcher.network)
    if swap is not None:
        swap.remove()
    if swapped_blocks:
        enable_block_swap(patcher.network, swapped_blocks)
    patcher.size = mm.module_size(patcher.model)


@dataclass(frozen=True)
class LoadedModelInfo:
    label: str
    kind: str
    device: str
    size_mb: float


def _describe(loaded) -> LoadedModelInfo:
    patcher = loaded.model
    return LoadedModelInfo(patcher.label, patcher.kind, str(loaded.device), patcher.model_size() / 2**20)


def loaded_models_of_ours() -> list[LoadedModelInfo]:
    """Our models that ComfyUI currently counts as loaded."""
    return [
        _describe(loaded) for loaded in mm.current_loaded_models if isinstance(loaded.model, TurboPatcher)
    ]


def _unload_where(predicate) -> list[LoadedModelInfo]:
    unloaded = []
    for index in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[index]
        if predicate(loaded.model):
            unloaded.append(_describe(loaded))
            loaded.model_unload()
            mm.current_loaded_models.pop(index)
    return unloaded


def unload_models_of_ours() -> list[LoadedModelInfo]:
    """Unload every model of ours from ComfyUI's loaded list; returns what was unloaded."""
    return _unload_where(lambda patcher: isinstance(patcher, TurboPatcher))


def _on_load_device(patcher: TurboPatcher) -> bool:
    device = module_device(patcher.network)
    target = torch.device(patcher.load_device)
    return device.type == target.type and (device.index or 0) == (target.index or 0)


def reconcile_after_sampling(patchers: list[TurboPatcher]) -> None:
    """Make ComfyUI's loaded list match where the experts are after the library's expert switch.

    The sampler moves the Wan2.2 experts itself (only the active one stays on the GPU); afterwards the
    expert that was moved out is unloaded in ComfyUI's books and the one moved in is registered.
    """
    if len(patchers) < 2:
        return
    _unload_where(lambda patcher: patcher in patchers and not _on_load_device(patcher))
    load_to_device(*(patcher for patcher in patchers if _on_load_device(patcher)))
