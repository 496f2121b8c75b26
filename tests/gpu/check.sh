#!/usr/bin/env bash
# The build on one lent GPU (an H200 here), in <= 8 minutes, nothing downloaded:
#   1. tests/benchmarks/bench_training.py in train mode: the plain QLoRA shape vs the default recipe, on fixed-length
#      and on packed oasst rows: tokens/s after warm-up and peak GPU memory;
#   2. the default recipe end to end for a few dozen steps (train -> merge -> export -> quantize -> evaluate; the last
#      two only where llama-cpp-python is installed: the GPU image has none);
# then one table (tests/gpu/summary.py). The model is Phi-3.5-mini's exact shape with random weights, built from its
# config as the recipe's random_init does; the data is the shipped oasst1 sample.
#
# Here, once:  bash tests/gpu/fetch_wheels.sh    (trl, bitsandbytes, datasets wheels into the ignored .gpu-wheels/)
# Then, through the device tool:  bash tests/gpu/check.sh   with .gpu-wheels carried. Full logs land in $OUT.
# PHASES="bench" or PHASES="e2e" runs one part (e.g. one per call where a call is limited to 10 minutes; on a machine
# still warm the random-weight base in $WORK is reused).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-check}
WORK=${WORK:-/tmp/gpu-work}
STEPS=${STEPS:-12}        # optimizer steps per benchmark run (the second half is timed)
E2E_STEPS=${E2E_STEPS:-30}
PHASES=${PHASES:-bench e2e}
stages=""
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PHI35_OASST1_CACHE="$WORK/cache"
start=$(date +%s)
stamp() { echo "[check $(( $(date +%s) - start )) s] $*"; }

if [ -d .gpu-wheels ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpu-wheels/*.whl || { echo "check: installing .gpu-wheels failed"; exit 3; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 - <<'PY' || exit 3
import importlib.metadata as md, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for pkg in ("transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "llama_cpp_python"):
    try:
        print(f"  {pkg} {md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"  {pkg} missing")
if not torch.cuda.is_available():
    sys.exit("check: no CUDA device")
PY

# The base, once: Phi-3.5-mini's config + a tokenizer, random bf16 weights (the data stage materialises base/).
stamp "base: random weights of Phi-3.5-mini's shape"
python3 -c "import sys; sys.path[:0] = ['tests/benchmarks', 'tests']; from pathlib import Path; \
import bench_training; bench_training.phi35_config_dir(Path('$WORK/config'))" || exit 4
E2E=(--recipe phi35-oasst1 --random_init true --config_name_or_path "$WORK/config"
     --dataset tests/data/oasst1-sample/train.jsonl --eval_fraction 0.1 --output-dir "$WORK/e2e")
timeout 150 python3 build/run.py "${E2E[@]}" --stages data >"$OUT/base.log" 2>&1 || { tail -20 "$OUT/base.log"; exit 4; }

if [[ " $PHASES " == *" bench "* ]]; then
stamp "1. bench_training.py (train mode), $STEPS steps per run"
timeout 300 python3 tests/benchmarks/bench_training.py --base "$WORK/e2e/base" --steps "$STEPS" \
    --results "$OUT/training.json" >"$OUT/bench_training.log" 2>&1 || { tail -30 "$OUT/bench_training.log"; }
fi

if [[ " $PHASES " == *" e2e "* ]]; then
stamp "2. default recipe end to end, $E2E_STEPS steps"
stages=data,train,merge,export
python3 -c "import llama_cpp" 2>/dev/null && stages=data,train,merge,export,quantize,evaluate
llama_cpp_dir=()
[ -d .gpu-wheels/llama.cpp ] && llama_cpp_dir=(--llama_cpp_dir .gpu-wheels/llama.cpp)
timeout 300 python3 build/run.py "${E2E[@]}" --stages "$stages" "${llama_cpp_dir[@]}" \
    --max_steps "$E2E_STEPS" --eval_steps 10 --save_steps 10 --logging_steps 2 \
    --eval_conversations 4 --quant_types Q4_K_M >"$OUT/e2e.log" 2>&1 || { tail -30 "$OUT/e2e.log"; }
cp "$WORK/e2e/report.json" "$OUT/e2e-report.json" 2>/dev/null
cp "$WORK/e2e/adapter/loss_curve.png" "$OUT/" 2>/dev/null
fi

stamp "done"
python3 tests/gpu/summary.py "$OUT/training.json" "$OUT/e2e-report.json" "$stages"
