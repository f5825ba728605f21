"""End-to-end TurboDiffusion generation: text-to-video (Wan2.1) and image-to-video (Wan2.2 A14B).

Each function takes already loaded models (`load_dit`, `load_vae`, `load_text_encoder`), runs the
reference procedure (TURBODIFFUSION.md Appendix A) and returns the frames with the wall-clock time of
every stage, VAE decoding included. With `output_path` the video file is encoded while the VAE decodes
(`video_file.BackgroundVideoWriter`), so only the encoding of the last frames adds to the job.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .attention import make_self_attention
from .i2v import ImageLike, build_i2v_condition, image_size, module_device, move_module, preprocess_image
from .resolution import FPS, adaptive_size, latent_shape, preset_size, validate_num_frames, validate_size
from .sampler import (
    I2V_IN_DIM,
    T2V_IN_DIM,
    SamplingStats,
    StepCallback,
    check_sampler_options,
    rcm_sample,
)
from .video_file import MAX_CRF, PYAV_CODECS, BackgroundVideoWriter, background_writer

SIGMA_MAX_T2V = 80.0
SIGMA_MAX_I2V = 200.0


@dataclass
class GenerationResult:
    """What a generation produced and how long each stage took.

    `frames`: [F, H, W, 3] float32 in [0, 1] on the CPU (several samples side by side along W), None when
    not asked for. `latent`: the sampler's final latent. `timings`: seconds per stage, each measured with
    the devices synchronised: text_encoding, vae_encoding (I2V), sampling (one model) or
    sampling_high_noise / sampling_low_noise (expert pair), model_transfer (moves to the sampling device
    and expert swaps), vae_decoding, video_encoding (with a video file: the encoding left once decoding
    ended; the rest overlapped it), and total. Stages that did not run (e.g. text encoding with a
    precomputed context) are absent. `steps_per_model`: how many sampler steps each model ran.
    `video_path`: the video file written, if any.
    """

    frames: torch.Tensor | None
    latent: torch.Tensor
    timings: dict[str, float]
    width: int
    height: int
    num_frames: int
    seed: int
    steps_per_model: dict[str, int] = field(default_factory=dict)
    fps: int = FPS
    video_path: Path | None = None


class _StageClock:
    """Seconds per named stage, with CUDA devices synchronised before each reading."""

    def __init__(self, device: torch.device, modules: Sequence[torch.nn.Module | None]) -> None:
        devices = {device} | {module_device(module) for module in modules if module is not None}
        self.cuda_devices = {device for device in devices if device.type == "cuda"}
        self.seconds: dict[str, float] = {}
        self.start = self.now()

    def now(self) -> float:
        for device in self.cuda_devices:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = self.now()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + self.now() - start

    def record_total(self) -> dict[str, float]:
        self.seconds["total"] = self.now() - self.start
        return dict(self.seconds)


def _resolve_size(
    resolution: str, aspect_ratio: str, width: int | None, height: int | None
) -> tuple[int, int]:
    if (width is None) != (height is None):
        raise ValueError("give both width and height, or neither (then resolution and aspect_ratio apply)")
    if width is not None:
        return validate_size(width, height)
    return preset_size(resolution, aspect_ratio)


def _text_context(
    clock: _StageClock,
    text_encoder: torch.nn.Module | None,
    prompt: str | None,
    context: torch.Tensor | None,
    encode_device: torch.device | None,
) -> torch.Tensor:
    if context is not None:
        return context
    if text_encoder is None or prompt is None:
        raise ValueError("give a text_encoder and a prompt, or a precomputed context [1, 512, text_dim]")
    with clock.stage("text_encoding"), _visiting(text_encoder, encode_device):
        return text_encoder.encode([prompt])


def _optional_device(device: torch.device | str | None) -> torch.device | None:
    """A device with its index filled in for CUDA (so that "cuda" and "cuda:0" compare equal), or None."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@contextmanager
def _visiting(module: torch.nn.Module, device: torch.device | None) -> Iterator[None]:
    """Run the block with `module` on `device` (None: where it is), then send it back to its own device.

    The way back is complete when the block ends, so e.g. a CPU-resident text encoder holds GPU memory only
    while it encodes, and its CPU weights are usable right away.
    """
    home = module_device(module)
    if device is None or device == home:
        yield
        return
    move_module(module, device)
    try:
        yield
    finally:
        move_module(module, home)
        for place in (device, home):
            if place.type == "cuda":
                torch.cuda.synchronize(place)


def _require_in_dim(model: torch.nn.Module, in_dim: int, role: str, use_instead: str) -> None:
    actual = model.config.in_dim
    if actual != in_dim:
        source = getattr(model, "source", None)
        named = f" ({source})" if source else ""
        raise ValueError(f"the {role}{named} has in_dim {actual}, expected {in_dim}; {use_instead}")


@contextmanager
def _self_attention_override(
    models: Sequence[torch.nn.Module], attention: str | None, sla_topk: float
) -> Iterator[None]:
    """Use `attention` for this run only; the models get their load-time attention back afterwards."""
    if attention is None:
        yield
        return
    previous = [model.attention.self_attention for model in models]
    function = make_self_attention(attention, sla_topk)
    for model in models:
        model.set_self_attention(function)
    try:
        yield
    finally:
        for model, fn in zip(models, previous):
            model.set_self_attention(fn)


@contextmanager
def _restore_placement(models: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Put the models back on the devices they came from (e.g. CPU-resident experts) after sampling."""
    homes = [module_device(model) for model in models]
    try:
        yield
    finally:
        visited = {module_device(model) for model in models} | set(homes)
        for model, home in zip(models, homes):
            move_module(model, home)
        for device in visited:  # the weights are usable on `home` when this returns
            if device.type == "cuda":
                torch.cuda.synchronize(device)


def _sample_and_decode(
    clock: _StageClock,
    models: Sequence[torch.nn.Module],
    vae: torch.nn.Module,
    context: torch.Tensor,
    shape: tuple[int, ...],
    *,
    attention: str | None,
    sla_topk: float,
    device: torch.device,
    callback: StepCallback | None,
    sampler_options: dict,
    video_file: Callable[[], BackgroundVideoWriter] | None,
    decode_vram_budget_gib: float | None,
) -> tuple[torch.Tensor, torch.Tensor, SamplingStats, Path | None]:
    stats = SamplingStats()
    with _self_attention_override(models, attention, sla_topk), _restore_placement(models):
        latent = rcm_sample(
            models[0],
            context,
            shape,
            low_noise_model=models[1] if len(models) > 1 else None,
            device=device,
            callback=callback,
            stats=stats,
            **sampler_options,
        )
    clock.seconds.update({_sampling_stage(label): s for label, s in stats.seconds_per_model.items()})
    clock.seconds["model_transfer"] = stats.transfer_seconds
    # Only when asked for, so that VAEs without budgeted plans (e.g. stand-ins) keep working.
    decode_options = {} if decode_vram_budget_gib is None else {"vram_budget_gib": decode_vram_budget_gib}
    if video_file is None:
        with clock.stage("vae_decoding"):
            video = vae.decode(latent.to(module_device(vae)), **decode_options)
        return latent, video, stats, None
    encoder = video_file()
    with encoder.aborted_on_error(), clock.stage("vae_decoding"):
        video = vae.decode(latent.to(module_device(vae)), on_chunk=encoder.add, **decode_options)
    with clock.stage("video_encoding"):
        path = encoder.finish()
    return latent, video, stats, path


def _sampling_stage(label: str) -> str:
    return "sampling" if label == "model" else f"sampling_{label}"


def video_to_frames(video: torch.Tensor) -> torch.Tensor:
    """VAE output [N, 3, F, H, W] in [-1, 1] -> frames [F, H, N·W, 3] in [0, 1] (samples side by side)."""
    unit = (1.0 + video.float().cpu().clamp(-1, 1)) / 2.0
    return unit.permute(2, 3, 0, 4, 1).flatten(2, 3)


def _video_file(
    output_path: str | Path | None, fps: float, crf: int
) -> Callable[[], BackgroundVideoWriter] | None:
    """What makes the writer for `output_path` (mp4 or webm by its suffix), checked before any work."""
    if output_path is None:
        return None
    path = Path(output_path)
    video_format = path.suffix.lower().lstrip(".")
    if video_format not in PYAV_CODECS:
        raise ValueError(f"output_path {path.name!r} must end in .mp4 or .webm")
    if not path.parent.is_dir():
        raise ValueError(f"the folder of output_path does not exist: {path.parent}")
    if not 0 <= crf <= MAX_CRF[video_format]:
        raise ValueError(f"crf {crf} is out of range for {video_format}; use 0..{MAX_CRF[video_format]}")
    return functools.partial(background_writer, path, fps, video_format, crf)


def _result(
    clock: _StageClock,
    decoded: tuple[torch.Tensor, torch.Tensor, SamplingStats, Path | None],
    size: tuple[int, int],
    num_frames: int,
    seed: int,
    return_frames: bool,
) -> GenerationResult:
    latent, video, stats, video_path = decoded
    frames = video_to_frames(video) if return_frames else None
    return GenerationResult(
        frames=frames,
        latent=latent,
        timings=clock.record_total(),
        width=size[0],
        height=size[1],
        num_frames=num_frames,
        seed=seed,
        steps_per_model=stats.steps_per_model,
        video_path=video_path,
    )


def generate_t2v(
    dit: torch.nn.Module,
    vae: torch.nn.Module,
    *,
    prompt: str | None = None,
    text_encoder: torch.nn.Module | None = None,
    context: torch.Tensor | None = None,
    resolution: str = "480p",
    aspect_ratio: str = "16:9",
    width: int | None = None,
    height: int | None = None,
    num_frames: int = 81,
    steps: int = 4,
    sigma_max: float = SIGMA_MAX_T2V,
    seed: int = 0,
    mode: str = "sde",
    attention: str | None = None,
    sla_topk: float = 0.1,
    num_samples: int = 1,
    device: torch.device | str | None = None,
    callback: StepCallback | None = None,
    output_path: str | Path | None = None,
    crf: int = 19,
    return_frames: bool = True,
    text_encoder_device: torch.device | str | None = None,
    decode_vram_budget_gib: float | None = None,
) -> GenerationResult:
    """Text-to-video with a Wan2.1 TurboDiffusion DiT (wan2.1_t2v_infer.py).

    The prompt is encoded by `text_encoder` unless a precomputed `context` is given. The size comes from
    `resolution` x `aspect_ratio` (TurboDiffusion's presets) unless `width` and `height` are given.
    `attention` ("sdpa", "sla", "sagesla") overrides the DiT's self-attention for this run only.
    `device` (default: the DiT's) is where sampling runs; the DiT returns to its own device afterwards.
    `callback(step, total)` runs after every sampler step. `output_path` (.mp4 or .webm) is written at 16 fps
    with constant-rate-factor `crf` while the VAE decodes (x264 preset "veryfast"); `return_frames=False`
    skips building `frames` on the CPU.

    Memory: `text_encoder_device` (default: where the text encoder is) is where the prompt is encoded; the
    encoder is moved there for the encoding only and is back on its own device before sampling starts (load
    it to the CPU and pass the GPU here, so that it never shares the GPU with the DiT).
    `decode_vram_budget_gib` makes the VAE decode with the fastest plan that fits that many GiB on its device,
    its weights included (`WanVAE.decode(vram_budget_gib=...)`); None decodes with the default plan.
    """
    validate_num_frames(num_frames)
    check_sampler_options(steps, sigma_max, mode)
    video_file = _video_file(output_path, FPS, crf)
    size = _resolve_size(resolution, aspect_ratio, width, height)
    _require_in_dim(dit, T2V_IN_DIM, "DiT", "a Wan2.2 I2V expert runs with generate_i2v")
    device = torch.device(device) if device is not None else module_device(dit)
    clock = _StageClock(device, [dit, vae, text_encoder])
    context = _text_context(clock, text_encoder, prompt, context, _optional_device(text_encoder_device))
    decoded = _sample_and_decode(
        clock,
        [dit],
        vae,
        context,
        latent_shape(*size, num_frames, batch=num_samples),
        attention=attention,
        sla_topk=sla_topk,
        device=device,
        callback=callback,
        sampler_options=dict(seed=seed, steps=steps, sigma_max=sigma_max, mode=mode),
        video_file=video_file,
        decode_vram_budget_gib=decode_vram_budget_gib,
    )
    return _result(clock, decoded, size, num_frames, seed, return_frames)


def generate_i2v(
    high_noise_dit: torch.nn.Module,
    low_noise_dit: torch.nn.Module | None,
    vae: torch.nn.Module,
    image: ImageLike,
    *,
    prompt: str | None = None,
    text_encoder: torch.nn.Module | None = None,
    context: torch.Tensor | None = None,
    resolution: str = "720p",
    aspect_ratio: str = "16:9",
    adaptive_resolution: bool = False,
    width: int | None = None,
    height: int | None = None,
    num_frames: int = 81,
    steps: int = 4,
    sigma_max: float = SIGMA_MAX_I2V,
    boundary: float = 0.9,
    seed: int = 0,
    mode: str = "sde",
    attention: str | None = None,
    sla_topk: float = 0.1,
    num_samples: int = 1,
    device: torch.device | str | None = None,
    callback: StepCallback | None = None,
    output_path: str | Path | None = None,
    crf: int = 19,
    return_frames: bool = True,
    text_encoder_device: torch.device | str | None = None,
    decode_vram_budget_gib: float | None = None,
    prefetch_experts: bool = True,
) -> GenerationResult:
    """Image-to-video with the two Wan2.2 A14B TurboDiffusion experts (wan2.2_i2v_infer.py).

    `image`: a PIL image, a uint8 array (H, W, C) or a ComfyUI IMAGE tensor. The size comes from the
    preset (`resolution` x `aspect_ratio`), or with `adaptive_resolution` from the preset's area and the
    image's aspect ratio, or from explicit `width` and `height`. The high-noise expert runs while t >=
    `boundary`, then the low-noise one, only the active one on `device` (default: the high-noise expert's);
    both return to their own devices afterwards. `low_noise_dit` may be None, then the high-noise expert
    runs every step (with the default grid it is the only one used at 1 and 2 steps anyway).
    Other arguments as in `generate_t2v`.

    Within a VRAM budget (e.g. both experts int8 on the CPU, block swap planned for the budget, the text
    encoder on the CPU with `text_encoder_device` the GPU, and `decode_vram_budget_gib`), the stages hold the
    GPU one after the other: the text encoder while it encodes, the VAE's encoder, one expert at a time (the
    outgoing expert leaves before the incoming one arrives), then the VAE's decoder with the experts back
    home. bench/i2v_job.py measures this at 720p under a 24 GiB cap.

    `prefetch_experts`: where both experts and one forward's activations fit in the memory this process may
    still use on the GPU (a per-process memory fraction counts), the low-noise expert uploads while the
    high-noise expert samples, hiding its transfer (see `rcm_sample`); False keeps strictly one expert at a
    time on the GPU, e.g. when the budget is meant to leave the rest of the GPU to something else.
    """
    validate_num_frames(num_frames)
    check_sampler_options(steps, sigma_max, mode, boundary)
    video_file = _video_file(output_path, FPS, crf)
    if adaptive_resolution:
        if width is not None or height is not None:
            raise ValueError("adaptive_resolution derives width and height from the image; do not pass them")
        size = adaptive_size(*image_size(image), resolution, aspect_ratio)
    else:
        size = _resolve_size(resolution, aspect_ratio, width, height)
    experts = [high_noise_dit] + ([low_noise_dit] if low_noise_dit is not None else [])
    for role, expert in zip(("high-noise expert", "low-noise expert"), experts):
        _require_in_dim(
            expert, I2V_IN_DIM, role, "load a Wan2.2 I2V A14B expert; T2V models run with generate_t2v"
        )
    device = torch.device(device) if device is not None else module_device(high_noise_dit)
    clock = _StageClock(device, [*experts, vae, text_encoder])
    context = _text_context(clock, text_encoder, prompt, context, _optional_device(text_encoder_device))
    with clock.stage("vae_encoding"):
        y = build_i2v_condition(vae, preprocess_image(image, *size), num_frames)
    decoded = _sample_and_decode(
        clock,
        experts,
        vae,
        context,
        latent_shape(*size, num_frames, batch=num_samples),
        attention=attention,
        sla_topk=sla_topk,
        device=device,
        callback=callback,
        sampler_options=dict(
            seed=seed,
            steps=steps,
            sigma_max=sigma_max,
            mode=mode,
            y=y,
            boundary=boundary,
            prefetch_experts=prefetch_experts,
        ),
        video_file=video_file,
        decode_vram_budget_gib=decode_vram_budget_gib,
    )
    return _result(clock, decoded, size, num_frames, seed, return_frames)
