"""bench/i2v_job.py (issue 6: the whole A14B I2V job under a VRAM cap) runs end to end in its CPU dry run:
tiny experts quantised to int8 through the loader, a tiny umT5 encoder, a tiny VAE, block swap planned from
the cap, the capped and the uncapped job, and the per-stage table."""

from __future__ import annotations

from bench_children import BARE_ENV, run_bench

STAGES = (
    "text encoding",
    "image encoding (VAE)",
    "high-noise expert upload",
    "high-noise sampling",
    "expert swap",
    "low-noise sampling",
    "experts back to the CPU",
    "VAE decoding",
)


def test_i2v_job_bench_dry_run():
    out = run_bench("i2v_job.py", "--dry-run", "--attention", "sdpa", env=BARE_ENV)
    assert "umT5 encoder: bf16" in out, out  # the text encoder was built and used, not replaced by a context
    # The dry-run cap leaves room for one resident block: three of the four blocks stream from the CPU.
    assert "swap plan: 3 of 4 blocks per expert" in out, out
    assert "capped: OK" in out and "uncapped: OK" in out, out
    table = out[out.index("Per stage") :]
    for stage in STAGES:
        assert f"\n{stage} " in table, (stage, table)
    assert "FAILED" not in table
    assert "sampling_high_noise" in out and "sampling_low_noise" in out
    assert "time overhead of the cap" in out
