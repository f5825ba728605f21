"""The reference side of bench/e2e.py: thu-ml/TurboDiffusion's own Wan2.1 network and rCM loop.

The network is built the way `inference/modify_model.py` builds it for inference (`select_model`, SLA
attention through `replace_attention`, FastRMSNorm / FastLayerNorm through `replace_linear_norm`), from the
files bench/e2e_prepare.py copies to `.ref/turbodiffusion/` (git-ignored, never committed). The loop follows
`inference/wan2.1_t2v_infer.py` (float64 state, bf16 network inputs, one generator, fresh noise each step).

Stand-ins replace only modules the GPU image cannot import; `STAND_INS` says which and how, and the
benchmark prints it. SageSLA needs the SpargeAttn CUDA package, which is not installed, so the reference runs
its other attention, `sla` (Triton, blocks 128/64), as the issue's reference measurement does.
"""

from __future__ import annotations

import logging
import math
import sys
import types
from pathlib import Path

import torch

REFERENCE_DIR = Path(__file__).resolve().parents[1] / ".ref" / "turbodiffusion"
MODEL_NAMES = {"1.3b": "Wan2.1-1.3B", "14b": "Wan2.1-14B"}
STAND_INS = {
    "flash_attn.layers.rotary.apply_rotary_emb": "PyTorch interleaved rotary in float32, fused into one "
    "kernel by torch.compile (flash-attn is not installed)",
    "imaginaire.utils.log": "Python logging (loguru is not installed)",
    "imaginaire.utils.distributed": "an empty module (used for context parallelism only)",
    "rcm.utils.model_utils": "an empty module (checkpoint-file reading; needs imaginaire.easy_io)",
    "turbo_diffusion_ops": "absent CUDA extension: its int8 kernels raise (the bf16 path never calls them)",
}


def available() -> str | None:
    """None when the reference can run here, else why not."""
    if not (REFERENCE_DIR / "rcm" / "networks" / "wan2pt1.py").exists():
        return f"{REFERENCE_DIR} is missing; run bench/e2e_prepare.py where the network is reachable"
    if not torch.cuda.is_available():
        return "the reference network and its SLA kernels need a CUDA GPU"
    return None


def _interleaved_rotary(x, cos, sin, interleaved=False, inplace=False, **unused):
    """flash-attn's `apply_rotary_emb(x [B, L, H, D], cos/sin [L, D/2], interleaved=True)`."""
    if not interleaved:
        raise NotImplementedError("the stand-in rotates interleaved pairs only, as wan2pt1.py asks")
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def _install_stand_ins(compile_rotary: bool) -> str:
    rotary = _interleaved_rotary
    note = "eager"
    if compile_rotary:
        try:
            rotary = torch.compile(_interleaved_rotary, dynamic=False)
            note = "torch.compile"
        except Exception as error:  # no compiler: the eager stand-in (slower than flash-attn's kernel)
            note = f"eager (torch.compile unavailable: {error})"
    _module("flash_attn")
    _module("flash_attn.layers")
    _module("flash_attn.layers.rotary", apply_rotary_emb=rotary)
    log = logging.getLogger("turbodiffusion.reference")
    levels = ("debug", "info", "warning", "error", "critical")
    _module("imaginaire.utils.log", **{level: getattr(log, level) for level in levels})
    _module("imaginaire.utils.distributed")
    _module("rcm.utils.model_utils", load_state_dict=None)

    def missing(*args, **kwargs):
        raise RuntimeError("turbo_diffusion_ops (TurboDiffusion's CUDA extension) is not built here")

    _module("turbo_diffusion_ops", quant_cuda=missing, gemm_cuda=missing)
    return note


def import_reference(compile_rotary: bool = True):
    """TurboDiffusion's `modify_model` module, importable once (reference dirs put on sys.path)."""
    if "modify_model" in sys.modules:
        return sys.modules["modify_model"], sys.modules["modify_model"].rotary_note
    note = _install_stand_ins(compile_rotary)
    for folder in (REFERENCE_DIR, REFERENCE_DIR / "inference"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    import imaginaire.utils  # noqa: F401  (the real package; its log / distributed are the stand-ins)

    sys.modules["imaginaire.utils"].log = sys.modules["imaginaire.utils.log"]
    sys.modules["imaginaire.utils"].distributed = sys.modules["imaginaire.utils.distributed"]
    import modify_model

    # wan2pt1 / wan2pt2 hold the rotary function now; a `flash_attn` left in sys.modules would make other
    # libraries (transformers) believe flash-attn is installed.
    for name in ("flash_attn.layers.rotary", "flash_attn.layers", "flash_attn"):
        del sys.modules[name]
    modify_model.rotary_note = note
    return modify_model, note


def build_reference(
    size: str, state: dict[str, torch.Tensor], sla_topk: float, fast_norms: bool = True
) -> torch.nn.Module:
    """The reference network with the weights `state` (keys as TurboDiffusion's checkpoints), on the GPU.

    `fast_norms=False` keeps Wan's PyTorch norms (TurboDiffusion's `--default_norm`) instead of its FastNorm
    Triton kernels. The tensors are assigned, not copied, so our models built from the same dict share
    them."""
    modify_model, _ = import_reference()
    with torch.device("meta"):
        net = modify_model.select_model(MODEL_NAMES[size])
    net = modify_model.replace_attention(net, attention_type="sla", sla_topk=sla_topk)
    if fast_norms:
        modify_model.replace_linear_norm(net, replace_linear=False, replace_norm=True, quantize=False)
    net.load_state_dict(state, assign=True)
    net = net.to("cuda").eval()
    if fast_norms:
        pad_fast_norm_buffers(net)
    return net


def pad_fast_norm_buffers(net: torch.nn.Module) -> int:
    """Give every FastRMSNorm / FastLayerNorm weight and bias zero-padded storage up to the next power of two.

    The reference's FastNorm Triton kernels (`ops/core.py`: `_rms_norm_fwd_fused`,
    `_layer_norm_param_fwd_fused`) load `W + cols` and `B + cols` without a mask for cols up to
    next_power_of_2(dim) (2048 for dim 1536, 8192 for 5120). In the released pipeline those reads land in
    other tensors of the same allocation; with our freshly allocated weights they ran past the end of a
    segment ("illegal memory access", H200, Triton 3.6). The padded columns are masked out of the stores,
    so the values are unchanged; only the storage moves. Returns the number of tensors re-homed."""
    moved = 0
    for module in net.modules():
        if type(module).__name__ not in ("FastRMSNorm", "FastLayerNorm"):
            continue
        for name in ("weight", "bias"):
            tensor = getattr(module, name, None)
            if tensor is None:
                continue
            padded = torch.zeros(
                1 << (tensor.numel() - 1).bit_length(), dtype=tensor.dtype, device=tensor.device
            )
            padded[: tensor.numel()] = tensor.reshape(-1)
            module._buffers[name] = padded[: tensor.numel()].view(tensor.shape)
            moved += 1
    return moved


def reference_state_shapes(size: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Key -> (shape, dtype as released) of the reference network's state dict."""
    modify_model, _ = import_reference()
    with torch.device("meta"):
        net = modify_model.select_model(MODEL_NAMES[size])
    net = modify_model.replace_attention(net, attention_type="sla", sla_topk=0.1)
    return {key: (tensor.shape, tensor.dtype) for key, tensor in net.state_dict().items()}


@torch.no_grad()
def reference_loop(
    net,
    context: torch.Tensor,
    shape: tuple[int, ...],
    seed: int,
    steps: int = 4,
    sigma_max: float = 80.0,
    first_velocity: list | None = None,
) -> torch.Tensor:
    """`wan2.1_t2v_infer.py`'s sampling loop (TURBODIFFUSION.md §4.2, SDE mode)."""
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    generator = torch.Generator(device="cuda")
    generator.manual_seed(seed)
    noise = torch.randn(*shape, dtype=torch.float32, device="cuda", generator=generator)
    angles = [math.atan(sigma_max), *(1.5, 1.4, 1.0)[: steps - 1], 0.0]
    t_steps = torch.tensor(angles, dtype=torch.float64, device="cuda")
    t_steps = torch.sin(t_steps) / (torch.cos(t_steps) + torch.sin(t_steps))
    x = noise.to(torch.float64) * t_steps[0]
    ones = torch.ones(x.size(0), 1, device=x.device, dtype=x.dtype)
    condition = {"crossattn_emb": context.to(**bf16)}
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        timesteps = (t_cur.float() * ones * 1000).to(**bf16)
        velocity = net(x_B_C_T_H_W=x.to(**bf16), timesteps_B_T=timesteps, **condition).to(torch.float64)
        if first_velocity is not None and not first_velocity:
            first_velocity.append(velocity.float())
        fresh = torch.randn(*x.shape, dtype=torch.float32, device="cuda", generator=generator)
        x = (1 - t_next) * (x - t_cur * velocity) + t_next * fresh
    return x.float()
