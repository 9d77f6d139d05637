#!/usr/bin/env bash
# The GPU path, proven on one GPU in under 8 minutes: prints one table (and writes it to $OUT if set).
#
#   stage 1 (torch + torchvision + webdataset + cityscapesscripts; no Ray, no MLflow)
#     synthetic Cityscapes at the real size (1024x2048) -> shards; the real training step with AMP
#     (pipeline.train.train_one_epoch, 1024x1024 crops, batch 8, 8 loader workers) for DF-DAM-R18,
#     DF-DAM-R101 and torchvision's deeplabv3_resnet50: images/s, data-wait share, peak GPU memory;
#     a checkpoint restored onto the GPU through pipeline.train.setup_training (the Ray worker's
#     function), every optimizer state tensor checked on its parameter's device, one more epoch.
#   stage 2 (+ Ray 2.60 + MLflow 3)
#     run.py train --gpu --preset cityscapes (1 worker, 1024x1024, batch 8, AMP, 2 epochs), SIGKILL
#     of the driver's process group once epoch 1's checkpoint is registered, run.py train --resume
#     (must train epoch 2 only, on the GPU), run.py evaluate of the run folder.
#   See benchmarks/gpu_check.py for what each row measures.
#
# Usage:  bash benchmarks/gpu_check.sh [--cpu-smoke]
#   --cpu-smoke   the same checks at tiny sizes on the CPU (tests/test_gpu_check.py runs this)
#   PYTHON        interpreter (default python3); GPU_CHECK_WORK: work folder (default a new /tmp one)
#   GPU_CHECK_BUDGET_S  seconds the GPU check may take in all (default 460; stage 2's runs are cut to fit)
#   OUT           if set, the table (gpu_check.txt, gpu_check.json), this script's whole output
#                 (gpu_check.log) and run.py's (gpu_check_stage2.log) are written there too
#
# Wheels: what the interpreter lacks is installed (pip --target, no index, no deps) from wheels
# carried in .whl/stage1 (webdataset, braceexpand, cityscapesscripts, lz4) and .whl/stage2 (Ray repacked
# without its Java jars, mlflow-skinny, and their dependencies that the GPU image lacks), which
# `bash benchmarks/prepare_gpu_wheels.sh` downloads here (cp312, manylinux x86_64). Measured: stage1
# 0.5 MiB, stage2 49 MiB (Ray LZMA-compressed; 59.7 MiB with RAY_ZIP=deflate), the repository
# under 1 MiB. A set is installed only when its packages do not import already, so the project's
# own .venv never uses them. Without .whl/stage2, stage 2 is reported as SKIP with the reason.
#
# On the device machine (the device tool's `run`, in the repository root; one call, both stages):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl/stage1", ".whl/stage2"], timeout_s=540)
# Stage 1 alone (when the stage-2 wheels must stay behind):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl/stage1"], timeout_s=400)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SMOKE=()
for arg in "$@"; do
    case "$arg" in
        --cpu-smoke) SMOKE=(--cpu-smoke) ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (use --cpu-smoke or --help)" >&2; exit 2 ;;
    esac
done
export PYTHONUNBUFFERED=1
START=$SECONDS
# The whole check ends within 8 minutes on a GPU: stage 2's runs get what is left of 460 s.
[ ${#SMOKE[@]} -eq 0 ] && export GPU_CHECK_DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET_S:-460} ))
log() {  # stdin -> stdout, and to $OUT/gpu_check.log when OUT is set
    if [ -n "${OUT:-}" ]; then tee -a "$OUT/gpu_check.log"; else cat; fi
}
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && : > "$OUT/gpu_check.log"; fi

# 1. Carried wheels, for what this interpreter cannot import.
wheels=()
if ! "$PY" -c "import webdataset, cityscapesscripts.helpers.labels, lz4.frame" 2>/dev/null; then
    wheels+=(.whl/stage1/*.whl)
fi
if ! "$PY" -c "import ray, mlflow" 2>/dev/null; then
    wheels+=(.whl/stage2/*.whl)
fi
present=()
for w in ${wheels[@]+"${wheels[@]}"}; do [ -f "$w" ] && present+=("$w"); done
if [ ${#present[@]} -gt 0 ]; then
    SITE=${GPU_CHECK_SITE:-/tmp/dfdam-gpu-check-site}
    echo "gpu_check.sh: installing ${#present[@]} carried wheels into $SITE" | log
    "$PY" -c "import lzma" 2>/dev/null \
        || echo "gpu_check.sh: this Python lacks lzma, which the repacked Ray wheel needs: rebuild .whl/ with RAY_ZIP=deflate" | log
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${present[@]}" \
        2>&1 | log || { echo "gpu_check.sh: installing the carried wheels failed" | log; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$SITE/bin:$PATH"
    echo "gpu_check.sh: wheels installed after $((SECONDS - START)) s" | log
fi

# 2. The stages, each its own process (stage 1 frees the GPU before Ray's worker takes it).
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
mkdir -p "$WORK"
rm -f "$WORK/rows.json"
run_stage() {  # N: a stage that dies (a crash, not a failed check) still leaves a FAIL row
    "$PY" benchmarks/gpu_check.py --work "$WORK" --stage "$1" ${SMOKE[@]+"${SMOKE[@]}"} 2>&1 | log
    local rc=$?
    if [ $rc -ne 0 ]; then
        "$PY" benchmarks/gpu_check.py --work "$WORK" --failed-stage "$1" \
            --reason "the stage-$1 process exited with status $rc (see its output above)" 2>&1 | log
    fi
}
run_stage 1
if why=$("$PY" -c "import ray, mlflow" 2>&1); then
    run_stage 2
else
    "$PY" benchmarks/gpu_check.py --work "$WORK" --skipped-stage 2 \
        --reason "Ray/MLflow do not import ($(echo "$why" | tail -1)); carry .whl/stage2 (benchmarks/prepare_gpu_wheels.sh)" \
        2>&1 | log
fi

# 3. The table.
"$PY" benchmarks/gpu_check.py --work "$WORK" --report ${OUT:+--out-dir "$OUT"} ${SMOKE[@]+"${SMOKE[@]}"} 2>&1 | log
rc=$?
echo "gpu_check.sh: $((SECONDS - START)) s in all; work folder $WORK" | log
exit $rc
