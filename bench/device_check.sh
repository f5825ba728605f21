#!/usr/bin/env bash
# One lent-GPU call that re-measures what the open issues (5, 6, 8) still need, each part under its own time
# limit so that one failure cannot take the others with it. Logs go to $OUT (the device tool brings them back).
#
#   bash bench/device_check.sh [parts]     parts: any of gpu-tests,steps,i2v,gemm,sweep,e2e,attention
#                                           (default: gpu-tests,steps,i2v,gemm,e2e); with carry [".whl", ".ref"] (.ref only for e2e)
#
# About 9 minutes on an H200 for the default parts, near the 10-minute limit of one call: safer as two calls,
# `gpu-tests,steps,i2v` then `gemm,e2e`. The wheels in .whl/ (bench/e2e_prepare.py) are installed
# into /tmp/site first, as the device README describes.
set -u
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
parts=${1:-gpu-tests,steps,i2v,gemm,e2e}
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/comfyui_turbodiffusion
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
date -u
git log -1 --format="code at %h %s" 2>/dev/null || true

run() {  # name, seconds, command...
    local name=$1 seconds=$2
    shift 2
    [[ ",$parts," == *",$name,"* ]] || return 0
    echo "== $name (limit ${seconds} s)"
    timeout "$seconds" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: exit $?"
}

run gpu-tests 120 env PYTHONPATH="/tmp/pkg:${PYTHONPATH:-}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/
# Issue 6: the capped A14B DiT step (block-swap overhead vs the uncapped int8 step) and the 8 GiB 1.3B step.
run steps 170 python3 bench/memory.py --skip gemm,load --steps 3 --only "A14B 720p int8,1.3B 480p"
run i2v 200 python3 bench/i2v_job.py
run gemm 120 python3 bench/memory.py --skip load,steps,sweep
# The persistent-GEMM launch sweeps (row-wise int8/fp8 and the exact -quant tiles variant): pick defaults.
run sweep 240 python3 bench/memory.py --skip load,steps
# Issue 8: loops against the reference at both sizes and the whole job through ComfyUI.
run e2e 330 python3 bench/e2e.py --variants "1.3b=eager,graphs,int8rw,fp8;14b=eager,graphs,fp8" \
    --json "$OUT/e2e.json" --workdir /tmp/e2e
# Issue 5: attention at both shapes and both top-k values (long: run it in a call of its own).
run attention 540 python3 bench/attention.py --no-variants

shopt -s nullglob
for log in "$OUT"/*.log; do
    echo "---- $(basename "$log")"
    grep -E "passed|failed|target|OK|OOM|ok$|x[0-9]\.[0-9]+|Summary|best path|whole job" "$log" | tail -25
done
