#!/bin/bash
# Issue 15's GPU checks in one script, for a GPU machine that cannot download anything (results under $OUT, or
# ./gpu_out). Run from the repository root: bash benchmarks/gpu_checks.sh
#   1. bench_gpu.py eager, then with --compile (its two compiles take a minute or two);
#   2. mmcat train bf16 on one GPU (150 steps), summarized from TensorBoard by benchmarks/summarize_runs.py into
#      train_summary.json;
#   3. bench_gpu.py --decode-on device; 4. mmcat train with train.compile=true (recompiles counted);
#   5. with ZERO=1, DeepSpeed ZeRO-2 and ZeRO-3 through mmcat train (measured on 2026-11-26: on one GPU they save
#      nothing, so they run only when asked).
# Ordered by what matters most: a time limit that cuts the script short loses the last steps only.
# The benchmark and the trainer read in resampled mode with one virtual epoch for the whole run: the 2,160-sample
# train split below would otherwise be 8-17 batches an epoch, and each epoch start waits for the workers' first
# batches (bench_gpu.py's docstring).
# What it reads, prepared beforehand on any machine with the dev install (2026-11-27: 28 MB of data, 23 MB of wheels):
#   mmcat synth --out /tmp/raw --num-products 2400 --min-side 256 --max-side 400 --seed 1
#   mmcat pack /tmp/raw/products.csv --out .gpu/packed --splits train=0.9,val=0.05,test=0.05 --image-size 256 \
#     --max-samples-per-shard 100
#   python -c "import sys, pathlib; sys.path.insert(0, 'benchmarks'); import bench_gpu; bench_gpu.text_model(pathlib.Path('.gpu'), False)"
#   .whl/: Python 3.12 wheels of what the GPU machine lacks (there: transformers, tokenizers, webdataset,
#   braceexpand, omegaconf, hjson, pydantic + pydantic_core, annotated-types, typing-inspection,
#   typing_extensions, regex: pip download --no-deps --only-binary=:all: --python-version 3.12 ...) and DeepSpeed
#   built as a pure-Python wheel (DS_BUILD_OPS=0 pip wheel deepspeed).
# Carry .whl and .gpu to the machine. BENCHMARKS.md section 7 holds the figures of its runs (one H100).
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_checks.log") 2>&1  # the log survives a time limit that kills the caller's pipe
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
T0=$(date +%s); el(){ echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
keep(){ for r in /tmp/runs/*; do cp "$r/metrics.json" "$OUT/$(basename "$r")-metrics.json" 2>/dev/null; done; }
[ -d .whl ] && { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; }
export PYTHONPATH=/tmp/site:$PWD
el setup done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; echo "cpus: $(nproc), $(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2)"
python3 -c "import torch, torchvision, cv2, transformers, accelerate, deepspeed, webdataset; print(torch.__version__, torchvision.__version__, cv2.__version__, transformers.__version__, accelerate.__version__, deepspeed.__version__)" 2>&1 | tail -2
W=/tmp/work; mkdir -p $W; cp -r .gpu/bert_base $W/; PK=$PWD/.gpu/packed
B="python3 benchmarks/bench_gpu.py --data $PK --work $W --batch 256 --workers 14 --warmup 20"
el bench eager; timeout 110 $B --steps ${STEPS:-140} --json $OUT/bench_eager.json 2>&1 | grep -v Warning
el bench compile; timeout 200 $B --steps ${CSTEPS:-70} --compile --json $OUT/bench_compile.json 2>&1 | grep -v Warning
TS=${TSTEPS:-150}
TR="-m mmcat train --config configs/resnet50_bert_base.yaml data.root=$PK model.image.weights=none model.text.name=$W/bert_base model.text.pretrained=false data.max_text_length=64 data.num_workers=12 data.resampled=true data.samples_per_epoch=$((TS * 128)) train.batch_size=128 train.max_steps=$TS train.eval_every=100000 train.save_every=100000 train.log_every=10 train.freeze_backbones_steps=0 train.warmup_steps=10"
rm -rf /tmp/runs  # a warm machine keeps /tmp: old TensorBoard events would mix into the summaries
el train single_gpu bf16; timeout 110 accelerate launch --config_file launch/single_gpu.yaml $TR output_dir=/tmp/runs/single_gpu 2>&1 | grep -v Warning | tail -15
python3 benchmarks/summarize_runs.py $OUT/train_summary.json /tmp/runs/* 2>&1 | tail -30; keep
el bench decode-on device; timeout 90 $B --steps ${DSTEPS:-80} --decode-on device --json $OUT/bench_device.json 2>&1 | grep -v Warning
el train single_gpu bf16 compile; timeout 170 accelerate launch --config_file launch/single_gpu.yaml $TR train.compile=true output_dir=/tmp/runs/single_gpu_compile 2>&1 | grep -v Warning | tail -8
python3 benchmarks/summarize_runs.py $OUT/train_summary.json /tmp/runs/* 2>&1 | tail -40; keep
if [ -n "$ZERO" ]; then
  for z in 2 3; do
    el train zero$z bf16; timeout 120 accelerate launch --config_file launch/deepspeed_zero$z.yaml --num_processes 1 $TR output_dir=/tmp/runs/zero$z 2>&1 | grep -v Warning | tail -15
  done
  python3 benchmarks/summarize_runs.py $OUT/train_summary.json /tmp/runs/* 2>&1 | tail -30; keep
fi
el end
