"""The rCM few-step sampler of TurboDiffusion, with the Wan2.2 I2V expert switch.

Reproduces the reference loop (wan2.1_t2v_infer.py / wan2.2_i2v_infer.py) operation by operation:
float64 state, the network fed the state cast to its compute dtype and the timestep bf16(1000·t), one
generator on the sampling device, noise drawn in float32 in the reference order (initial noise, then
one draw per SDE step including the last). On the same device and PyTorch version the noise, and
therefore the whole sampling path, matches the reference bit for bit given the same network.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .block_swap import estimate_activation_bytes
from .i2v import CONDITION_CHANNELS, ExpertSwitch, module_device

MAX_STEPS = 4
# TrigFlow angles of the intermediate steps (the first is atan(sigma_max), the last 0).
MID_ANGLES = (1.5, 1.4, 1.0)
SAMPLER_MODES = ("sde", "ode")
T2V_IN_DIM = 16
I2V_IN_DIM = 16 + CONDITION_CHANNELS
ARCHITECTURE_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim")

StepCallback = Callable[[int, int], None]


@dataclass
class SamplingStats:
    """What a sampling run did: the model used per step, network timesteps and wall-clock seconds.

    Model labels are "high_noise"/"low_noise" with an expert pair, "model" otherwise. Seconds are measured
    with the device synchronised; `transfer_seconds` is the time spent moving models to the sampling device
    and, with an expert pair, swapping the experts.
    """

    step_models: list[str] = field(default_factory=list)
    timesteps: list[float] = field(default_factory=list)
    seconds_per_model: dict[str, float] = field(default_factory=dict)
    transfer_seconds: float = 0.0

    @property
    def steps_per_model(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for label in self.step_models:
            counts[label] = counts.get(label, 0) + 1
        return counts


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(
            f"steps must be 1, 2, 3 or 4 (the rCM checkpoints are distilled for 1-4), got {steps!r}"
        )


def _check_sigma_max(sigma_max: float) -> None:
    if not math.isfinite(sigma_max) or sigma_max <= 0:
        raise ValueError(
            f"sigma_max must be a positive finite number (80 for T2V, 200 for I2V), got {sigma_max!r}"
        )


def rcm_time_grid(
    steps: int = 4, sigma_max: float = 80.0, device: torch.device | str | None = None
) -> torch.Tensor:
    """Rectified-flow times t_0 > ... > t_steps = 0 (float64, steps + 1 values) of the rCM sampler.

    TrigFlow angles [atan(sigma_max), 1.5, 1.4, 1.0][:steps] + [0] mapped by t = sin/(cos + sin), computed
    with torch on `device` as the reference does.
    """
    _check_steps(steps)
    _check_sigma_max(sigma_max)
    angles = torch.tensor(
        [math.atan(sigma_max), *MID_ANGLES[: steps - 1], 0.0], dtype=torch.float64, device=device
    )
    return torch.sin(angles) / (torch.cos(angles) + torch.sin(angles))


def network_timestep(t: torch.Tensor, batch: int) -> torch.Tensor:
    """The timestep the network sees for RF time `t`: bf16(fp64(fp32(t))·1000), as a float32 (batch,) tensor.

    The rounding to bf16 is part of what the checkpoints were distilled with; it applies whatever the
    weight dtype.
    """
    scaled = t.to(torch.float32).to(torch.float64) * 1000
    return scaled.to(torch.bfloat16).to(torch.float32).reshape(1).expand(batch)


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the network computes in: its `compute_dtype`, else that of its floating-point parameters."""
    declared = getattr(model, "compute_dtype", None)
    if isinstance(declared, torch.dtype):
        return declared
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    raise ValueError(f"{type(model).__name__} has no floating-point parameters to take a compute dtype from")


def check_sampler_options(steps: int, sigma_max: float, mode: str, boundary: float = 0.9) -> None:
    """Raise a ValueError naming the problem if a sampler option is out of range."""
    _check_steps(steps)
    _check_sigma_max(sigma_max)
    if mode not in SAMPLER_MODES:
        raise ValueError(f"unknown sampler mode {mode!r}; choose 'sde' or 'ode'")
    if not 0.0 <= boundary <= 1.0:
        raise ValueError(f"boundary must be an RF time in [0, 1] (default 0.9), got {boundary!r}")


def _architecture(model: torch.nn.Module) -> dict[str, object]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "in_dim"):
        raise TypeError(f"{type(model).__name__} has no `config` with `in_dim`; pass a WanDiT from load_dit")
    return {name: getattr(config, name, None) for name in ARCHITECTURE_FIELDS}


def _check_expert_pair(model: torch.nn.Module, low_noise_model: torch.nn.Module | None) -> dict[str, object]:
    arch = _architecture(model)
    if low_noise_model is None:
        return arch
    if low_noise_model is model:
        raise ValueError(
            "the same model was given as the high-noise and the low-noise expert; "
            "pass the low-noise expert file's model, or low_noise_model=None"
        )
    low_arch = _architecture(low_noise_model)
    for role, in_dim in (("high-noise", arch["in_dim"]), ("low-noise", low_arch["in_dim"])):
        if in_dim != I2V_IN_DIM:
            raise ValueError(
                f"the {role} expert has in_dim {in_dim}, but an expert pair must be two Wan2.2 I2V A14B "
                f"experts (in_dim {I2V_IN_DIM}); a T2V model (in_dim {T2V_IN_DIM}) runs alone with "
                "low_noise_model=None"
            )
    differing = [
        f"{name} {arch[name]} vs {low_arch[name]}"
        for name in ARCHITECTURE_FIELDS
        if arch[name] != low_arch[name]
    ]
    if differing:
        raise ValueError(
            "the high-noise and low-noise experts have different architectures ("
            + ", ".join(differing)
            + "); load the two files of one Wan2.2 I2V A14B release"
        )
    return arch


def _check_shape(shape: tuple[int, ...], arch: dict[str, object]) -> tuple[int, ...]:
    shape = tuple(shape)
    if len(shape) != 5 or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(
            f"shape must be (batch, channels, frames, height, width) of positive ints, got {shape}"
        )
    channels = arch["out_dim"] if arch["out_dim"] is not None else T2V_IN_DIM
    if shape[1] != channels:
        raise ValueError(f"the model predicts {channels} latent channels, but shape has {shape[1]}: {shape}")
    if shape[3] % 2 or shape[4] % 2:
        raise ValueError(
            f"latent height and width must be even (the DiT patchifies by 2), got {shape[3]}x{shape[4]}; "
            "use pixel sizes that are multiples of 16"
        )
    return shape


def _batched(tensor: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Repeat a batch-1 conditioning tensor to `batch` samples (as the reference's num_samples does)."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.repeat(batch, *([1] * (tensor.ndim - 1)))
    raise ValueError(f"{name} has batch {tensor.shape[0]}; give batch 1 or the sample batch {batch}")


def _prepare_condition(
    y: torch.Tensor | None, arch: dict[str, object], shape: tuple[int, ...]
) -> torch.Tensor | None:
    expected_channels = arch["in_dim"] - shape[1]
    if expected_channels == 0:
        if y is not None:
            raise ValueError(
                f"y (I2V conditioning) was given, but the model is a T2V model (in_dim {arch['in_dim']}); "
                "drop y, or use a Wan2.2 I2V expert"
            )
        return None
    if y is None:
        raise ValueError(
            f"the model is an I2V expert (in_dim {arch['in_dim']}) and needs the conditioning latent y "
            f"with {expected_channels} channels (build it with build_i2v_condition)"
        )
    if y.ndim != 5 or y.shape[1] != expected_channels or tuple(y.shape[2:]) != shape[2:]:
        raise ValueError(
            f"y must have shape (batch, {expected_channels}, {shape[2]}, {shape[3]}, {shape[4]}) to match "
            f"the latent {shape}, got {tuple(y.shape)}"
        )
    return _batched(y, shape[0], "y")


def _add_seconds(stats: SamplingStats, label: str, seconds: float) -> None:
    stats.seconds_per_model[label] = stats.seconds_per_model.get(label, 0.0) + seconds


class _Clock:
    """Wall-clock seconds with the sampling device synchronised before each reading."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.last = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        now = self._now()
        elapsed, self.last = now - self.last, now
        return elapsed


def _prefetch_options(model: torch.nn.Module, shape: tuple[int, ...]) -> dict[str, object]:
    """ExpertSwitch's prefetch options for a latent of `shape`: one forward's estimated activation bytes."""
    batch, _, frames, height, width = shape
    tokens = frames * (height // 2) * (width // 2)  # the DiT patchifies by 1 x 2 x 2
    return {"prefetch": True, "activation_bytes": estimate_activation_bytes(model.config, tokens, batch)}


@torch.no_grad()
def rcm_sample(
    model: torch.nn.Module,
    context: torch.Tensor,
    shape: tuple[int, ...],
    *,
    seed: int = 0,
    steps: int = 4,
    sigma_max: float = 80.0,
    mode: str = "sde",
    y: torch.Tensor | None = None,
    low_noise_model: torch.nn.Module | None = None,
    boundary: float = 0.9,
    device: torch.device | str | None = None,
    callback: StepCallback | None = None,
    stats: SamplingStats | None = None,
    prefetch_experts: bool = True,
) -> torch.Tensor:
    """Sample a latent with the rCM few-step sampler; returns the final latent (float32, normalised space).

    `model` is a Wan DiT (`model(x, t, context, y=None)`), or the high-noise expert when
    `low_noise_model` is given (Wan2.2 I2V: the high-noise expert runs while t >= `boundary`, then the
    low-noise one; only the active expert stays on `device`, the other is moved to CPU). `shape` is
    (batch, 16, T_lat, H/8, W/8); a batch shares one noise draw and repeats batch-1 `context` / `y`.
    `device` (default: the model's) holds the state and the seeded generator. `mode` is "sde" (fresh noise
    each step) or "ode". `callback(step, total)` runs after every step; `stats`, if given, is filled in.
    The models are left where sampling ended.

    `prefetch_experts`: on a CUDA device where both experts and one forward's activations fit in the free
    memory, the low-noise expert uploads while the high-noise expert's steps run, and the switch only waits
    for what is left of the upload (see `ExpertSwitch`); False keeps one expert at a time on the device
    (e.g. to leave the memory to something else). No effect elsewhere, nor when the low-noise expert would
    not run (1 or 2 steps with the default grid).
    """
    check_sampler_options(steps, sigma_max, mode, boundary)
    arch = _check_expert_pair(model, low_noise_model)
    shape = _check_shape(shape, arch)
    if context.ndim != 3:
        raise ValueError(f"context must be (batch, tokens, text_dim), got {tuple(context.shape)}")
    if arch["text_dim"] is not None and context.shape[-1] != arch["text_dim"]:
        raise ValueError(
            f"context has width {context.shape[-1]} (shape {tuple(context.shape)}), but the model takes "
            f"text features of width {arch['text_dim']} (umT5-XXL: 4096); encode the prompt with the Wan "
            "umT5 text encoder"
        )
    device = torch.device(device) if device is not None else module_device(model)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = compute_dtype(model)
    batch = shape[0]
    context = _batched(context, batch, "context").to(device=device, dtype=dtype)
    condition = _prepare_condition(y, arch, shape)
    extra = {} if condition is None else {"y": condition.to(device=device, dtype=dtype)}
    stats = stats if stats is not None else SamplingStats()

    clock = _Clock(device)
    t_grid = rcm_time_grid(steps, sigma_max, device=device)
    # One read of the grid before the loop: the loop itself never waits for the device (expert choice and
    # timings come from these host copies; the clock synchronises only when the model changes and at the end).
    t_host = t_grid.tolist()
    will_switch = low_noise_model is not None and any(t < boundary for t in t_host[:steps])
    prefetch = {}
    if prefetch_experts and will_switch and device.type == "cuda":
        prefetch = _prefetch_options(model, shape)
    experts = ExpertSwitch(model, low_noise_model, boundary, device, **prefetch)
    stats.transfer_seconds += clock.lap()
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    noise = torch.randn(shape, dtype=torch.float32, device=device, generator=generator)
    x = noise.to(torch.float64) * t_grid[0]
    timesteps = []
    label = None
    for i in range(steps):
        t_cur, t_next = t_grid[i], t_grid[i + 1]
        switching = low_noise_model is not None and not experts.switched and t_host[i] < boundary
        if switching and label is not None:
            _add_seconds(stats, label, clock.lap())
        label, net = experts.select(t_host[i])
        if switching:
            stats.transfer_seconds += clock.lap()
        timestep = network_timestep(t_cur, batch)
        velocity = net(x.to(dtype), timestep, context, **extra).to(torch.float64)
        if mode == "ode":
            x = x - (t_cur - t_next) * velocity
        else:
            # t_next (0-dim float64) times float32 noise stays float32, as in the reference.
            fresh = torch.randn(shape, dtype=torch.float32, device=device, generator=generator)
            x = (1 - t_next) * (x - t_cur * velocity) + t_next * fresh
        stats.step_models.append(label)
        timesteps.append(timestep[0])
        if callback is not None:
            callback(i + 1, steps)
    _add_seconds(stats, label, clock.lap())
    stats.timesteps.extend(torch.stack(timesteps).tolist())
    return x.to(torch.float32)
