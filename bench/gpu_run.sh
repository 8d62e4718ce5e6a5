#!/usr/bin/env bash
# Everything a lent GPU should check, in one call; raw output goes to $OUT (the device tool's
# folder) or bench/results/<date>-<gpu>/. Usage: bash bench/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')
out=${OUT:-bench/results/$(date +%Y%m%d)-$gpu}
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt"
python -c "import torch, triton, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())" > "$out/versions.txt"
# The test suite on CUDA (fp32 with TF32 off, fp16/bf16 where the tests have them; training, the
# CUDA-graph capture of a fused forward + backward).
FUSED_INCEPTION_DEVICE=cuda python -m pytest -q tests -rs 2>&1 | tee "$out/pytest-cuda.txt"
# The pytest-benchmark suites: per block and whole networks, eager / torch.compile / fused, batch
# 1/32/256, fp32 (TF32 as PyTorch's defaults) / bf16 / fp16, channels_last. Raw JSON with machine info.
python -m pytest -q -p no:cacheprovider bench --benchmark-json="$out/bench.json" 2>&1 | tee "$out/bench.txt"
python bench/report.py "$out/bench.json" > "$out/bench-table.md" 2>&1
# The fusion reports (GoogLeNet 224x224, Inception v3 299x299): fp32 NCHW and bf16 channels_last,
# batch 1/32/256.
for model in googlenet inception_v3; do
  for batch in 1 32 256; do
    python -m fused_inception --model "$model" --device cuda --batch "$batch" 2>&1 \
      | tee "$out/report-$model-fp32-b$batch.txt"
    python -m fused_inception --model "$model" --device cuda --batch "$batch" --dtype bfloat16 --channels-last 2>&1 \
      | tee "$out/report-$model-bf16-cl-b$batch.txt"
  done
done
# Training: the example run (loss must go down) in bf16 autocast, channels_last, batch 64 at 224,
# fused and eager; the timed step is bench/test_training.py in the suites above.
for impl in fused eager; do
  python bench/train_step.py --impl "$impl" --device cuda --batch 64 --size 224 --amp bf16 --channels-last \
    --steps 10 2>&1 | tee "$out/train-step-$impl-bf16-b64.txt"
done
