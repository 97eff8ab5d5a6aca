#!/usr/bin/env bash
# What a lent GPU measures next (docs/performance.md, "Next on a GPU"), as calls of the device tool that fit its
# 15 minutes: each call ≤ 8 minutes, its results written under $OUT stage by stage, the most wanted first.
#
#   here, once:     python tools/device_wheels.py       # .whl/: diffusers, transformers, ..., bitsandbytes, torchao
#   device call 1:  bash tools/gpu_session.sh 1          # carry .whl, timeout_s 500
#   device call 2:  bash tools/gpu_session.sh 2          # with the time left (timeout_s: what is left, less a minute)
#   device call 3:  bash tools/gpu_session.sh 3          # on a later lease
#   on a CPU:       OUT=/tmp/s bash tools/gpu_session.sh 1 --small --resolution 256 --batch 2 --runner-iters 4 ...
#
# Call 1: the bare step against the reference at batch 4, 1024² (three interleaved rounds, median and spread), the
# default runner (latent cache) against it, FP8 against that runner over the same steps, the 24 GB config at batch 1
# with the planner's prediction, `pgv25 generate` with its levers (and compiled), `pgv25 eval generate`'s images/s
# (compiled, 4 prompts per call: what an MJHQ-30K run would use). OUT/summary_row.md is docs/performance.md's summary
# row for the call.
# Call 2: the 24 GB config trained, checkpointed, killed, verified and resumed with the compiled GPU defaults at
# batch 1, then at batches 2 and 3 (the largest within 22 GiB).
# Call 3: 8-bit AdamW at batch 8, with the reference beside it where it fits (an 80 GB card: it does not).
# Extra arguments go to gpu_check.py after the call's own (argparse keeps the last value given).
set -uo pipefail
: "${OUT:?OUT: the folder the results go to}"
call=${1:-1}
shift || true
if [ -d .whl ]; then  # the GPU machine has torch and nothing else we import
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
python=$(command -v python3 || command -v python)
float8=float8
if ! "$python" -c "import torchao.float8" >/dev/null 2>&1; then  # diffusers imports torchao whenever it is there
    echo "torchao does not import here: FP8 left out of this call" | tee "$OUT/no_float8.txt"
    rm -rf /tmp/site/torchao /tmp/site/torchao-*
    float8=
fi
case "$call" in
1)
    "$python" tools/gpu_check.py --out "$OUT" --budget 440 --skip train --square --images 48 \
        --bench-variants full full+cl+cudnn+regional --bench-rounds 3 --bench-steps 6 --bench-warmup 2 --bench-timeout 150 \
        --runner-variants cache $float8 24gb@1 --runner-iters 10 --runner-timeout 120 \
        --eval-images 8 --eval-batch 4 --eval-compile "$@" 2>&1 | tee "$OUT/gpu_check.log"
    ;;
2)
    "$python" tools/gpu_check.py --out "$OUT" --budget 300 --main-variant 24gb --batch 1 --square --images 32 \
        --iters 6 --checkpoint-at 3 --skip generate bench generate_pgv25 eval_generate \
        --runner-variants 24gb@2 24gb@3 --runner-iters 8 --runner-timeout 80 "$@" 2>&1 | tee "$OUT/gpu_check.log"
    ;;
3)
    "$python" tools/gpu_check.py --out "$OUT" --budget 240 --skip train generate_pgv25 eval_generate --square --images 8 \
        --bench-variants adamw8bit adamw8bit+cl+cudnn+regional --bench-batch 8 --bench-rounds 1 --bench-steps 6 \
        --bench-warmup 2 "$@" 2>&1 | tee "$OUT/gpu_check.log"
    ;;
*)
    echo "gpu_session.sh: the call is 1, 2 or 3, got '$call'" >&2
    exit 2
    ;;
esac
