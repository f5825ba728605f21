"""bench/e2e.py --dry-run: every part of the GPU benchmark (our variants, the equality checks, the whole job
queued to ComfyUI in-process and written as MP4) runs on tiny models on the CPU, so the GPU run can be made
in one call. The reference network itself needs CUDA; where its files are present the dry run checks that
it imports with the stand-ins and names its tensors as we do."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench_children import run_bench
from comfy_server import comfy_host

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_exercises_every_part(tmp_path):
    report = tmp_path / "e2e.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    options = ("--dry-run", "--json", str(report), "--workdir", str(tmp_path))
    stdout = run_bench("e2e.py", *options, env=env, timeout=600, cwd=tmp_path)
    results = json.loads(report.read_text())

    variants = {row["variant"]: row for row in results["loops"]}
    assert set(variants) == {"eager-sla", "eager", "fused", "graphs", "int8", "int8rw", "fp8"}
    assert 0 < variants["eager-sla"]["vs_eager"]["rel_l2"] < 0.05  # sla vs sagesla: quantisation only
    assert variants["graphs"]["replay_equals_capture_run"]
    assert variants["graphs"]["vs_eager"]["rel_l2"] == 0.0  # the CPU runs PyTorch ops in both
    assert variants["int8"]["vs_eager"]["cos"] > 0.999
    assert variants["int8rw"]["vs_eager"]["cos"] > 0.999
    assert "optimised path equals the unoptimised within bf16 tolerance: yes" in stdout

    if comfy_host.find_comfyui_dir() is not None or (ROOT / ".ref" / "ComfyUI").exists():
        runs = results["whole_job"]
        assert [run["loaded"] for run in runs] == [False, True]
        for run in runs:
            assert Path(run["video"]).stat().st_size > 0
            stages = [stage for stage, _ in run["stages"]]
            assert stages[0] == "text encoding" and "sampling (4 steps)" in stages
            assert stages[-1] == "video encoding (after decoding)"


def test_reference_fast_norm_buffers_get_padded_storage():
    """The reference's FastNorm kernels read weight/bias unmasked up to the next power of two; the bench
    re-homes those buffers into zero-padded storage without changing their values."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("e2e_reference", ROOT / "bench" / "e2e_reference.py")
    e2e_reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e_reference)

    class FastLayerNorm(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.register_buffer("weight", torch.randn(dim))
            self.register_buffer("bias", torch.randn(dim))

    class FastRMSNorm(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.register_buffer("weight", torch.randn(dim))

    net = torch.nn.Sequential(FastLayerNorm(1536), FastRMSNorm(5120), torch.nn.LayerNorm(24))
    before = {key: value.clone() for key, value in net.state_dict().items()}
    assert e2e_reference.pad_fast_norm_buffers(net) == 3
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key])
    assert net[0].weight.untyped_storage().nbytes() == 2048 * 4
    assert net[1].weight.untyped_storage().nbytes() == 8192 * 4
    padded = torch.empty(0).set_(net[0].bias.untyped_storage())
    assert torch.count_nonzero(padded[1536:]) == 0
    assert net[2].weight.untyped_storage().nbytes() == 24 * 4  # PyTorch's own norms untouched
