#!/usr/bin/env bash
# Every GPU check and measurement in one call on a lent CUDA machine, parts in the order given:
#
#   benchmarks/run_gpu.sh OUT_DIR [PART...]      (default: tests train infer1b infer8b)
#
#   tests     the CUDA tests: int4 weights (tinygemm) = their CPU twin, a Q4_K_M file loaded on CUDA
#             (eager and compiled runner) = the same model built on the CPU, compiled step = eager step
#   train     benchmarks/bench_train_gpu.py, Llama 3.2 1B shape: herd full / LoRA (compiled) vs
#             transformers / + peft, MFU against the measured bf16 matmul peak
#   infer1b   benchmarks/bench_gpu.py, Llama 3.2 1B shape, every row (bf16, int4, 16 streams, transformers)
#   herd1b    the same, herd's compiled rows only
#   infer8b   the same on the Llama 3.1 8B shape, batch 1 only (bf16 and int4 compiled)
#   profile   benchmarks/profile_gpu.py: where a compiled step's time goes (wall vs device busy vs the
#             bound, kernels by kind, the top 25), 1B bf16 batch 1, 1B bf16 16 rows, 8B int4 batch 1
#
# The machine's python3 must have torch with CUDA (transformers for its rows); wheels it lacks
# (gguf) travel in .whl/ and are installed to /tmp/site first. Each part has its own time limit so
# a slow one leaves the others their turn; logs and JSON go to OUT_DIR.
set -uo pipefail
out=${1:?usage: run_gpu.sh OUT_DIR [PART...]}
shift
parts=${*:-tests train infer1b infer8b}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$out/env.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee -a "$out/env.txt"

run() {  # run NAME SECONDS COMMAND...: the command's output to OUT/NAME.log, its last lines here
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - t0)) s"
  grep -v -i "warn" "$out/$name.log" | tail -n 12
}

for part in $parts; do
  case $part in
    tests) run tests 180 python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_int4.py tests/test_compiled.py ;;
    train) PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True run train 160 python3 benchmarks/bench_train_gpu.py \
             --rows "herd full" "hf full" "herd lora" "hf+peft lora" --warmup 2 --steps 4 --json "$out/train_gpu.json" ;;
    herd1b) run herd1b 120 python3 benchmarks/bench_gpu.py --shapes llama3.2-1b --no-hf \
              --rows "herd compiled" "herd streams" "herd int4 compiled" --json "$out/bench_gpu_1b.json" ;;
    infer1b) run infer1b 200 python3 benchmarks/bench_gpu.py --shapes llama3.2-1b --json "$out/bench_gpu_1b.json" ;;
    infer8b) run infer8b 180 python3 benchmarks/bench_gpu.py --shapes llama3.1-8b --no-hf \
               --rows "herd int4 compiled" "herd compiled" --json "$out/bench_gpu_8b.json" ;;
    profile)
      run profile_1b 120 python3 benchmarks/profile_gpu.py --shape llama3.2-1b --json "$out/profile_1b.json"
      run profile_1b_16 120 python3 benchmarks/profile_gpu.py --shape llama3.2-1b --rows 16 --json "$out/profile_1b_16.json"
      run profile_8b_int4 150 python3 benchmarks/profile_gpu.py --shape llama3.1-8b --int4 --json "$out/profile_8b_int4.json" ;;
    *) echo "unknown part $part" ;;
  esac
done
