#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, on a machine with one or more NVIDIA GPUs and the trainer's
# Python packages (the trainer image, or .venv): tokens/s, MFU and peak memory of the dense ~1B and
# the small MoE presets, eager and compiled (the trainer's default on GPUs: training.compile unset),
# compiled with training.precision fp8 (compute capability 8.9 or later; on an older GPU its line says
# it is refused and the script goes on), on one GPU and (with more than one) on all of them with FSDP2;
# then the same models under transformers.Trainer for the ratio. MFU's formula is in
# benchmarks/throughput.py's docstring (an fp8 run's MFU is against the bf16 peak).
#   benchmarks/gpu.sh [LOG]            # prints everything, and keeps it in LOG (default gpu-benchmarks.log)
#   benchmarks/gpu.sh --check [LOG]    # the same steps on CPU with the tiny preset: checks the script itself
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
presets=(llama-1b moe-small)
steps=(--steps 20 --warmup 5)
if [ "${1:-}" = "--check" ]; then
  shift
  presets=(cpu-tiny)
  steps=(--steps 2 --warmup 1)
  gpus=1
else
  gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
  if [ "$gpus" -eq 0 ]; then
    echo "gpu.sh: no NVIDIA GPU found (nvidia-smi lists none); benchmarks/gpu.sh --check runs the steps on CPU" >&2
    exit 2
  fi
fi
log=${1:-gpu-benchmarks.log}
export PYTHONPATH="$PWD/trainer-image${PYTHONPATH:+:$PYTHONPATH}"

run() {
  echo "\$ $*"
  "$@"
  echo
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU (--check)"
  "$python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  echo
  for preset in "${presets[@]}"; do
    run "$python" benchmarks/throughput.py --preset "$preset" --no-compile "${steps[@]}"
    run "$python" benchmarks/throughput.py --preset "$preset" "${steps[@]}"  # the default: compiled on a GPU
    run "$python" benchmarks/throughput.py --preset "$preset" --precision fp8 "${steps[@]}" || true
    if [ "$gpus" -gt 1 ]; then
      run "$python" -m torch.distributed.run --standalone --nproc-per-node "$gpus" benchmarks/throughput.py \
        --preset "$preset" "${steps[@]}"
    fi
    run "$python" benchmarks/throughput.py --preset "$preset" --against hf --rounds 1 "${steps[@]}"
  done
} 2>&1 | tee "$log"
