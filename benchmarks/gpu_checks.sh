#!/bin/bash
# Issue 15's GPU checks in one script, for a GPU machine that cannot download anything (results under $OUT, or
# ./gpu_out). Run from the repository root: bash benchmarks/gpu_checks.sh
#   1. bench_gpu.py eager, with --decode-on device, and with --compile (last: it takes longest);
#   2. mmcat train bf16 on one GPU, DeepSpeed ZeRO-2 and ZeRO-3 (150 steps each), summarized from TensorBoard by
#      benchmarks/summarize_runs.py into train_summary.json.
# What it reads, prepared beforehand on any machine with the dev install (2026-11-26: ~29 MB + ~23 MB of wheels):
#   mmcat synth --out /tmp/raw --num-products 2400 --min-side 256 --max-side 400 --seed 1
#   mmcat pack /tmp/raw/products.csv --out .gpu/packed --splits train=0.9,val=0.05,test=0.05 --image-size 256
#   python -c "import sys, pathlib; sys.path.insert(0, 'benchmarks'); import bench_gpu; bench_gpu.text_model(pathlib.Path('.gpu'), False)"
#   .whl/: Python 3.12 wheels of what the GPU machine lacks (there: transformers, tokenizers, webdataset,
#   braceexpand, omegaconf, hjson, pydantic + pydantic_core, annotated-types, typing-inspection,
#   typing_extensions, regex) and DeepSpeed built as a pure-Python wheel (DS_BUILD_OPS=0 pip wheel deepspeed).
# BENCHMARKS.md section 7 holds the figures of its first run (one H100).
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
T0=$(date +%s); el(){ echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
[ -d .whl ] && { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; }
export PYTHONPATH=/tmp/site:$PWD
el setup done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision, cv2, transformers, accelerate, deepspeed, webdataset; print(torch.__version__, torchvision.__version__, cv2.__version__, transformers.__version__, accelerate.__version__, deepspeed.__version__)" 2>&1 | tail -2
W=/tmp/work; mkdir -p $W; cp -r .gpu/bert_base $W/; PK=$PWD/.gpu/packed
B="python3 benchmarks/bench_gpu.py --data $PK --work $W --batch 256 --workers 14 --steps ${STEPS:-140} --warmup 20"
el bench eager; timeout 150 $B --json $OUT/bench_eager.json 2>&1 | grep -v Warning
el bench decode-on device; timeout 120 $B --decode-on device --json $OUT/bench_device.json 2>&1 | grep -v Warning
TR="-m mmcat train --config configs/resnet50_bert_base.yaml data.root=$PK model.image.weights=none model.text.name=$W/bert_base model.text.pretrained=false data.max_text_length=64 data.num_workers=12 train.batch_size=128 train.max_steps=${TSTEPS:-150} train.eval_every=100000 train.save_every=100000 train.log_every=10 train.freeze_backbones_steps=0 train.warmup_steps=10"
el train single_gpu bf16; timeout 120 accelerate launch --config_file launch/single_gpu.yaml $TR output_dir=/tmp/runs/single_gpu 2>&1 | grep -v Warning | tail -15
el train zero2 bf16; timeout 120 accelerate launch --config_file launch/deepspeed_zero2.yaml --num_processes 1 $TR output_dir=/tmp/runs/zero2 2>&1 | grep -v Warning | tail -15
el train zero3 bf16; timeout 120 accelerate launch --config_file launch/deepspeed_zero3.yaml --num_processes 1 $TR output_dir=/tmp/runs/zero3 2>&1 | grep -v Warning | tail -15
python3 benchmarks/summarize_runs.py $OUT/train_summary.json /tmp/runs/* 2>&1 | tail -60
el bench compile; timeout 200 $B --compile --json $OUT/bench_compile.json 2>&1 | grep -v Warning
el end
