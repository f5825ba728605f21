"""Wan2.2 I2V expert prefetch (issue 8): the low-noise expert uploads while the high-noise expert samples.

On the CPU the device side is faked: "meta" stands for the GPU in the recorded placements (as in
test_i2v_job_placement.py), and the upload's streams are a recorder whose copies are clones made in the
worker thread. The sampler's output is checked against the spec-derived loop of pipeline_mocks, the order of
events (upload started, copies made, waited on, high-noise expert moved out) against the protocol, and the
fit decision against byte counts written out in the tests.
"""

from __future__ import annotations

import threading

import pytest
import torch
from comfyui_turbodiffusion.wan_models import i2v, sampler
from comfyui_turbodiffusion.wan_models.block_swap import GIB, enable_block_swap, estimate_activation_bytes
from comfyui_turbodiffusion.wan_models.config import WanDiTConfig
from comfyui_turbodiffusion.wan_models.dit import WanDiT
from comfyui_turbodiffusion.wan_models.sampler import SamplingStats, rcm_sample
from dit_reference import randomise_
from pipeline_mocks import TEXT_DIM, MockVelocity, spec_sample

GPU = torch.device("meta")  # the stand-in for the accelerator: moves there are only recorded
CPU = torch.device("cpu")
SHAPE = (1, 16, 2, 4, 6)
TIMEOUT = 10.0


def _context():
    return torch.randn(1, 5, TEXT_DIM, generator=torch.Generator().manual_seed(11))


def _condition():
    return torch.randn(1, 20, *SHAPE[2:], generator=torch.Generator().manual_seed(12))


class Log:
    """Events in order, with a virtual place per expert ("meta" = the GPU)."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.where: dict[str, str] = {"high": "cpu", "low": "cpu"}
        self.first_step_started = threading.Event()

    def index(self, event: tuple) -> int:
        return self.events.index(event)

    def last(self, event: tuple) -> int:
        return max(i for i, e in enumerate(self.events) if e == event)


class Expert(MockVelocity):
    def __init__(self, seed: int, name: str, log: Log) -> None:
        super().__init__(seed=seed, in_dim=36)
        self.name = name
        self.log = log

    def forward(self, x, t, context, y=None):
        self.log.events.append((self.name, "starts", dict(self.log.where)))
        self.log.first_step_started.set()
        out = super().forward(x, t, context, y)
        self.log.events.append((self.name, "ends"))
        return out


class FakeStreams:
    """Stands in for CudaUploadStreams: records the calls; the copies are clones made in the worker thread.

    The copy waits until the first step has started: had the sampling thread waited for the upload before
    enqueuing that step, the copy would time out.
    """

    def __init__(self, log: Log, name: str, fail: BaseException | None = None) -> None:
        self.log, self.name, self.fail = log, name, fail

    def mark(self):
        self.log.events.append(("upload started",))
        return "after"

    def copy(self, tensors, after):
        assert after == "after"
        assert self.log.first_step_started.wait(TIMEOUT), "the first step never started during the upload"
        on_worker = threading.current_thread() is not threading.main_thread()
        self.log.events.append(("copied", on_worker))
        if self.fail is not None:
            raise self.fail
        return [t.detach().clone() for t in tensors], "done"

    def adopt(self, copies, done):
        assert done == "done"
        self.log.events.append(("upload waited",))
        self.log.where[self.name] = "meta"


@pytest.fixture
def rig(monkeypatch):
    """Two experts whose switch runs on the GPU stand-in with prefetch, everything recorded."""
    log = Log()
    high, low = Expert(31, "high", log), Expert(32, "low", log)
    names = {id(high): "high", id(low): "low"}
    fits: list[tuple] = []
    options = {"fits": True, "fail": None}

    def move(module, device):
        name = names[id(module)]
        if log.where[name] != torch.device(device).type:
            log.where[name] = torch.device(device).type
            log.events.append(("move", name, log.where[name]))

    def can_prefetch(high_noise, low_noise, device, activation_bytes):
        fits.append((names[id(high_noise)], names[id(low_noise)], device, activation_bytes))
        return options["fits"]

    def start_upload(module, device):
        streams = FakeStreams(log, names[id(module)], options["fail"])
        return i2v.BackgroundUpload(module, device, streams)

    monkeypatch.setattr(i2v, "move_module", move)
    monkeypatch.setattr(i2v, "module_device", lambda module: torch.device(log.where[names[id(module)]]))
    monkeypatch.setattr(i2v, "can_prefetch", can_prefetch)
    monkeypatch.setattr(i2v, "start_upload", start_upload)
    monkeypatch.setattr(
        sampler,
        "ExpertSwitch",
        lambda h, lo, boundary, device, **_: i2v.ExpertSwitch(
            h, lo, boundary, GPU, offload_device=CPU, prefetch=True, activation_bytes=123
        ),
    )
    return log, high, low, fits, options


def _sample(high, low, steps=4, **options):
    stats = SamplingStats()
    out = rcm_sample(
        high,
        _context(),
        SHAPE,
        seed=4,
        steps=steps,
        sigma_max=200.0,
        y=_condition(),
        low_noise_model=low,
        stats=stats,
        **options,
    )
    return out, stats


def _reference(steps=4):
    expected, used, _ = spec_sample(
        MockVelocity(seed=31, in_dim=36),
        MockVelocity(seed=32, in_dim=36),
        _context(),
        SHAPE,
        seed=4,
        steps=steps,
        sigma_max=200.0,
        ode=False,
        y=_condition(),
    )
    return torch.from_numpy(expected), used


@pytest.mark.parametrize("prefetch_experts", [True, False])
def test_cpu_sampling_is_the_same_with_and_without_prefetch(prefetch_experts):
    high, low = MockVelocity(seed=31, in_dim=36), MockVelocity(seed=32, in_dim=36)
    high.watch, low.watch = [low], [high]
    out, stats = _sample(high, low, prefetch_experts=prefetch_experts)
    expected, used = _reference()

    assert torch.equal(out, expected)
    assert stats.step_models == used
    # On the CPU nothing moves anywhere: every step sees the other expert where it was.
    assert all(d == [CPU] for d in high.devices_of_others + low.devices_of_others)


def test_the_cpu_sampler_asks_for_no_prefetch(monkeypatch):
    requested = []
    real = i2v.ExpertSwitch

    def switch(high, low, boundary, device, **options):
        requested.append(options)
        return real(high, low, boundary, device, **options)

    monkeypatch.setattr(sampler, "ExpertSwitch", switch)
    _sample(MockVelocity(seed=31, in_dim=36), MockVelocity(seed=32, in_dim=36))
    assert requested == [{}]


def test_prefetch_protocol_upload_overlaps_the_high_noise_steps(rig):
    log, high, low, fits, _ = rig
    low_weights = [p.data_ptr() for p in low.parameters()]
    out, stats = _sample(high, low)
    expected, used = _reference()

    assert torch.equal(out, expected)
    assert stats.step_models == used == ["high_noise", "high_noise", "low_noise", "low_noise"]
    assert fits == [("high", "low", GPU, 123)]
    events = log.events
    first_high_end = log.index(("high", "ends"))
    last_high_end = log.last(("high", "ends"))
    first_low_start = next(i for i, e in enumerate(events) if e[:2] == ("low", "starts"))
    # Started before the first step returned, copied on a worker thread while it ran.
    assert log.index(("upload started",)) < first_high_end
    assert ("copied", True) in events
    # Waited on after the last high-noise step, before the first low-noise step; then the high one leaves.
    waited = log.index(("upload waited",))
    assert last_high_end < waited < log.index(("move", "high", "cpu")) < first_low_start
    # The low-noise expert arrived by the upload only: no plain move, and it runs on its copies.
    assert ("move", "low", "meta") not in events
    assert all(p.data_ptr() not in low_weights for p in low.parameters())
    starts = [e for e in events if e[1:2] == ("starts",)]
    assert [e[2] for e in starts if e[0] == "high"] == [{"high": "meta", "low": "cpu"}] * 2
    assert [e[2] for e in starts if e[0] == "low"] == [{"high": "cpu", "low": "meta"}] * 2


def test_without_room_the_switch_is_todays(rig):
    log, high, low, fits, options = rig
    options["fits"] = False
    out, _ = _sample(high, low)

    assert torch.equal(out, _reference()[0])
    assert len(fits) == 1
    assert ("upload started",) not in log.events
    moves = [e for e in log.events if e[0] == "move"]
    assert moves == [("move", "high", "meta"), ("move", "high", "cpu"), ("move", "low", "meta")]
    between = log.events[
        log.last(("high", "ends")) : log.index(("low", "starts", {"high": "cpu", "low": "meta"}))
    ]
    assert [e for e in between if e[0] == "move"] == moves[1:]


def test_a_low_noise_expert_already_on_the_device_stays(rig):
    log, high, low, _, _ = rig
    log.where["low"] = "meta"
    out, _ = _sample(high, low)

    assert torch.equal(out, _reference()[0])
    assert ("upload started",) not in log.events
    assert [e for e in log.events if e[0] == "move"] == [("move", "high", "meta"), ("move", "high", "cpu")]


def test_an_upload_out_of_memory_falls_back_to_the_plain_move(rig, caplog):
    log, high, low, _, options = rig
    options["fail"] = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 26.00 GiB")
    with caplog.at_level("WARNING"):
        out, _ = _sample(high, low)

    assert torch.equal(out, _reference()[0])
    assert "prefetching the low-noise expert ran out of GPU memory" in caplog.text
    assert "prefetch_experts=False" in caplog.text
    moves = [e for e in log.events if e[0] == "move"]
    assert moves == [("move", "high", "meta"), ("move", "high", "cpu"), ("move", "low", "meta")]


def test_other_upload_errors_reach_the_caller(rig):
    _, high, low, _, options = rig
    options["fail"] = RuntimeError("copy engine exploded")
    with pytest.raises(RuntimeError, match="copy engine exploded"):
        _sample(high, low)


# The tiny WanDiT used to check that the upload installs its copies the way `Module.to` would.
TINY = WanDiTConfig(dim=256, ffn_dim=256, num_heads=2, num_layers=4, text_dim=64, in_dim=36)


def _tiny_dit(seed=0) -> WanDiT:
    def sdpa(q, k, v, proj_l=None):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return out.transpose(1, 2)

    model = WanDiT(TINY, self_attention=sdpa, cross_attention=sdpa)
    randomise_(model, seed)
    return model.eval()


class RecordingRunner:
    def __init__(self) -> None:
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1


def test_finished_upload_installs_the_copies_like_module_to():
    model = _tiny_dit()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    pointers = {t.data_ptr() for t in model.state_dict().values()}
    runner = RecordingRunner()
    model.forward_runner = runner
    log = Log()
    log.first_step_started.set()
    upload = i2v.BackgroundUpload(model, CPU, FakeStreams(log, "low"))
    upload.finish()
    model.forward_runner = None

    assert runner.resets == 1  # WanDiT drops captured graphs on a move, so on this one too
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert not pointers & {t.data_ptr() for t in after.values()}
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())


# The fit decision, with numbers.


def test_experts_fit_counts_both_experts_activations_and_the_margin():
    assert i2v.experts_fit(100, [30, 30], 20, margin_bytes=20)
    assert not i2v.experts_fit(100, [30, 30], 20, margin_bytes=21)
    assert not i2v.experts_fit(100, [30, 51], 0, margin_bytes=20)
    assert i2v.PREFETCH_MARGIN_BYTES == 2 * GIB
    assert i2v.experts_fit(10 * GIB, [3 * GIB, 3 * GIB], 2 * GIB)
    assert not i2v.experts_fit(10 * GIB - 1, [3 * GIB, 3 * GIB], 2 * GIB)


def test_a14b_at_720p_fits_an_h200_not_a_24_gib_card():
    expert = 14_288_901_184 * 2  # TURBODIFFUSION.md §1.1 parameters, bf16
    a14b = WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36)
    activations = estimate_activation_bytes(a14b, 21 * 45 * 80)
    assert i2v.experts_fit(139 * GIB, [expert, expert], activations)
    assert not i2v.experts_fit(24 * GIB, [expert, expert], activations)
    # int8 experts (about half the bytes) do not fit a 48 GiB card either: 2 x 13.3 + 13.5 + 2 GiB.
    assert not i2v.experts_fit(40 * GIB, [expert // 2, expert // 2], activations)


def test_block_swapped_experts_count_only_what_stays_on_the_device():
    model = _tiny_dit()
    full = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    block = sum(t.numel() * t.element_size() for t in model.blocks[0].state_dict().values())
    assert i2v.expert_device_bytes(model) == full
    enable_block_swap(model, 3)  # one resident block, three on the CPU through two slots
    swapped = i2v.expert_device_bytes(model)
    assert swapped == full - 3 * block + 2 * block

    available = 2 * swapped + 1000 + 10
    assert i2v.experts_fit(available, [swapped, swapped], 1000, margin_bytes=10)
    assert not i2v.experts_fit(available, [full, full], 1000, margin_bytes=10)


def _fake_cuda_memory(monkeypatch, free, total, allocated, reserved, fraction):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: allocated)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: reserved)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: fraction)


def test_allocatable_bytes_counts_the_unused_reserve_within_the_memory_fraction(monkeypatch):
    cuda = torch.device("cuda", 0)
    _fake_cuda_memory(monkeypatch, free=10, total=100, allocated=30, reserved=40, fraction=1.0)
    assert i2v.allocatable_bytes(cuda) == 10 + (40 - 30)
    _fake_cuda_memory(monkeypatch, free=10, total=100, allocated=30, reserved=40, fraction=0.35)
    assert i2v.allocatable_bytes(cuda) == 35 - 30


def test_can_prefetch_counts_experts_already_on_the_device(monkeypatch):
    cuda = torch.device("cuda", 0)
    high, low = MockVelocity(seed=1, in_dim=36), MockVelocity(seed=2, in_dim=36)
    size = i2v.expert_device_bytes(high)
    assert size == sum(p.numel() * 4 for p in high.parameters())
    margin = i2v.PREFETCH_MARGIN_BYTES
    monkeypatch.setattr(i2v, "allocatable_bytes", lambda device: size + 100 + margin)
    assert not i2v.can_prefetch(high, low, cuda, activation_bytes=100)
    places = {id(high): cuda, id(low): CPU}
    monkeypatch.setattr(i2v, "module_device", lambda module: places[id(module)])
    assert i2v.can_prefetch(high, low, cuda, activation_bytes=100)
    assert not i2v.can_prefetch(high, low, cuda, activation_bytes=101)


def test_no_prefetch_off_cuda(monkeypatch):
    def fail(device):
        raise AssertionError("asked a CPU device for CUDA memory")

    monkeypatch.setattr(i2v, "allocatable_bytes", fail)
    high, low = MockVelocity(seed=1, in_dim=36), MockVelocity(seed=2, in_dim=36)
    assert not i2v.can_prefetch(high, low, CPU, activation_bytes=0)


# On a GPU.


def _cuda_sample(high, low, prefetch_experts):
    return rcm_sample(
        high,
        torch.randn(1, 512, 64, generator=torch.Generator().manual_seed(3)),
        (1, 16, 2, 4, 6),
        seed=7,
        sigma_max=200.0,
        y=torch.randn(1, 20, 2, 4, 6, generator=torch.Generator().manual_seed(4)),
        low_noise_model=low,
        device="cuda",
        prefetch_experts=prefetch_experts,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_prefetch_gives_the_same_latent_and_uploads_during_the_high_noise_steps():
    high, low = _tiny_dit(1).to(torch.bfloat16), _tiny_dit(2).to(torch.bfloat16)
    plain = _cuda_sample(high, low, prefetch_experts=False)
    for expert in (high, low):
        expert.to("cpu")
    torch.cuda.synchronize()
    both = i2v.expert_device_bytes(high) + i2v.expert_device_bytes(low)
    seen = []

    def during_high_step(module, args):
        if len(seen) == 1:  # the second high-noise step: the upload should land before the switch
            for _ in range(int(TIMEOUT / 0.01)):
                if torch.cuda.memory_allocated() >= both:
                    break
                threading.Event().wait(0.01)
        seen.append(torch.cuda.memory_allocated())

    hook = high.register_forward_pre_hook(during_high_step)
    try:
        prefetched = _cuda_sample(high, low, prefetch_experts=True)
    finally:
        hook.remove()

    assert torch.equal(prefetched, plain)
    assert len(seen) == 2 and seen[1] >= both  # the low-noise expert was on the GPU before the switch
    assert i2v.module_device(low).type == "cuda" and i2v.module_device(high).type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_no_prefetch_when_the_low_noise_expert_does_not_run():
    high, low = _tiny_dit(1).to(torch.bfloat16), _tiny_dit(2).to(torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()  # what earlier tests in this process still hold
    rcm_sample(
        high,
        torch.randn(1, 512, 64),
        (1, 16, 2, 4, 6),
        steps=2,  # high, high with the default grid
        sigma_max=200.0,
        y=torch.randn(1, 20, 2, 4, 6),
        low_noise_model=low,
        device="cuda",
    )
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - before
    assert grown < i2v.expert_device_bytes(high) + i2v.expert_device_bytes(low)
    assert i2v.module_device(low).type == "cpu"
