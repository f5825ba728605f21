"""What the GPU's fastest vendor GEMMs allow for the DiT loop's linear layers (issues 5 and 8).

Run from the repository root on a CUDA GPU:

    python bench/ceilings.py

Times, in one run (`triton.testing.do_bench`, median, L2 flushed): cuBLAS bf16 `torch.matmul`, FP8 E4M3
`torch._scaled_mm` (per-tensor scales, fast accumulation: cuBLAS's fastest FP8 path) and INT8
`torch._int_mm` at 8192³; then every linear layer of one DiT block (self-attention q, k, v, o; cross-attention
q, o; FFN up and down) at the token counts of Wan2.1-1.3B 480p and Wan2.1-14B 720p, with bf16 and FP8, and
prints what the linear layers of the 4-step loop cost at those speeds. The text-side cross-attention k/v
(512 tokens) are left out: they are computed once per job.
"""

from __future__ import annotations

import torch
from _environment import environment_line
from triton.testing import do_bench

MODELS = {  # name: (tokens, width, FFN width, layers)
    "1.3B 480p": (32760, 1536, 8960, 30),
    "14B 720p": (75600, 5120, 13824, 40),
}
STEPS = 4


def block_linears(width: int, ffn: int) -> list[tuple[str, int, int]]:
    """(name, K, N) of the token-side linear layers of one DiT block."""
    return [
        *[(f"self {p}", width, width) for p in "qkvo"],
        *[(f"cross {p}", width, width) for p in "qo"],
        ("ffn up", width, ffn),
        ("ffn down", ffn, width),
    ]


def gemm_ms(m: int, k: int, n: int, kind: str) -> float:
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    if kind == "bf16":
        fn = lambda: a @ b.T  # noqa: E731
    elif kind == "fp8":
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")
        fn = lambda: torch._scaled_mm(  # noqa: E731
            a8, b8.T, scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True
        )
    else:
        a8 = torch.randint(-127, 127, (m, k), device="cuda", dtype=torch.int8)
        b8 = torch.randint(-127, 127, (n, k), device="cuda", dtype=torch.int8)
        fn = lambda: torch._int_mm(a8, b8.T)  # noqa: E731
    fn()
    return do_bench(fn, warmup=10, rep=100, return_mode="median")


def main() -> None:
    print(environment_line(torch.device("cuda")))
    for kind in ("bf16", "fp8", "int8"):
        ms = gemm_ms(8192, 8192, 8192, kind)
        print(f"8192^3 {kind:5s} {ms:8.3f} ms  {2 * 8192**3 / ms / 1e9:7.1f} TFLOPS")
    for model, (tokens, width, ffn, layers) in MODELS.items():
        totals = {"bf16": 0.0, "fp8": 0.0}
        flop = 0.0
        for name, k, n in block_linears(width, ffn):
            row = []
            for kind in totals:
                ms = gemm_ms(tokens, k, n, kind)
                totals[kind] += ms
                row.append(f"{kind} {ms:7.3f} ms ({2 * tokens * k * n / ms / 1e9:6.1f} TFLOPS)")
            flop += 2 * tokens * k * n
            print(f"{model} {name:10s} M {tokens} K {k} N {n}: " + ", ".join(row))
        for kind, ms in totals.items():
            loop_s = ms * layers * STEPS / 1000
            print(
                f"{model}: linear layers of one block {kind} {ms:.3f} ms ({flop / ms / 1e9:.1f} TFLOPS); "
                f"{layers} layers x {STEPS} steps = {loop_s:.3f} s"
            )
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
