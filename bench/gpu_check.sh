#!/usr/bin/env bash
# One command for the GPU (issue 14): the benches that need CUDA, within 10 minutes, figures appended to
# bench/RESULTS.md.
#
#     bash bench/gpu_check.sh                 # on a machine with a CUDA GPU, from anywhere
#     PYTHON=/path/to/python bash bench/gpu_check.sh
#
# Python: $PYTHON, else .venv/bin/python if it sees a GPU, else python3 (a GPU image's own PyTorch). The project's
# pure-Python requirements (transformers, datasets, anthropic, ...) must be importable; the script says which
# are missing before it spends any GPU time.
#   1. bench_roofline.py on CUDA, float32 and bfloat16 (SAE parameters and inputs): the demo and wide shapes and
#      --preset paper's SAE at k 1024 and k 64 (d 3200, 50,000 latents, batch 4096); matmul peak, step time,
#      share of the encoder roofline, torch.cuda.max_memory_allocated.
#   2. bench_sparse_vs_dense.py --scale paper on CUDA: the NFM at K 300 (dim 300, d 3200, 50,000 features),
#      at the SAE's k 250 and at the joint model's K 1024.
#   3. paper_rehearsal.py on CUDA (OpenLLaMA-3B shapes, random init, built on the machine): every stage with
#      --preset paper at reduced token counts, the LM in bfloat16, then part1 again with the LM in float32; per
#      stage wall time, peak RSS, CUDA max allocated, training tokens/s (lower bound).
#   4. With more than one GPU: part1 under torchrun on the nccl backend (the demo, 2 processes).
# Each step has its own time limit, so a failure or a hang costs only that step. The whole log goes to
# bench/gpu_check.log and, fenced, under a dated heading at the end of bench/RESULTS.md.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
LOG=bench/gpu_check.log
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

sees_gpu() { "$1" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' >/dev/null 2>&1; }
pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  for py in .venv/bin/python python3; do
    if command -v "$py" >/dev/null && sees_gpu "$py"; then echo "$py"; return; fi
  done
  if [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python3; fi   # the check below says why not
}
PY=$(pick_python)

"$PY" - <<'EOF2' || exit 2
import importlib.util, sys
try:
    import torch
except ImportError:
    sys.exit(f"gpu_check: {sys.executable} has no torch; set PYTHON to a python with a CUDA build of torch")
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: {sys.executable} (torch {torch.__version__}) sees no CUDA GPU; run it on a GPU machine "
             f"or set PYTHON to a CUDA build's python")
missing = [m for m in ("transformers", "tokenizers", "datasets", "safetensors", "scipy", "matplotlib", "tqdm",
                       "anthropic") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: {sys.executable} lacks {', '.join(missing)}; pip install them (or carry their wheels)")
EOF2

step() {   # step <seconds> <title> <command...>
  local limit=$1 title=$2; shift 2
  echo
  echo "### $title"
  echo "\$ $*"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=15 "$limit" "$@"
  local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "(stopped at its ${limit} s limit)"; elif [ $rc -ne 0 ]; then echo "(exit code $rc)"; fi
  echo "($((SECONDS - t0)) s)"
}

{
  echo "GPU check, $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  "$PY" -c 'import torch; print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda, "GPUs", torch.cuda.device_count())'
  step 100 "roofline, float32" "$PY" bench/bench_roofline.py --device cuda --dtype float32 --rounds 2 --shapes demo wide paper_k1024 paper_k64
  step 100 "roofline, bfloat16" "$PY" bench/bench_roofline.py --device cuda --dtype bfloat16 --rounds 2 --shapes demo wide paper_k1024 paper_k64
  step 60 "sparse vs dense, paper scale (NFM K 300 at k 250)" "$PY" bench/bench_sparse_vs_dense.py --scale paper --device cuda --rounds 2
  step 60 "sparse vs dense, paper scale at the joint model's K 1024" "$PY" bench/bench_sparse_vs_dense.py --scale paper --k 1024 --device cuda --rounds 2
  step 300 "paper-shape rehearsal on CUDA, LM in bfloat16" "$PY" bench/paper_rehearsal.py --device cuda --dtype bfloat16 \
      --train-tokens 16384 --steps 4 --docs 8 --work "$WORK" --json bench/paper_rehearsal_cuda.json --fresh
  step 60 "part1 with the LM in float32" "$PY" bench/paper_rehearsal.py --device cuda --dtype float32 \
      --train-tokens 16384 --steps 4 --work "$WORK" --json bench/paper_rehearsal_cuda_fp32.json --stages part1 --fresh
  if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -gt 1 ]; then
    step 120 "DDP on nccl: part1 on the demo, 2 processes" "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 \
        part1_train_topk_sae.py --device cuda --steps 20 --out "$WORK/ddp_part1" --overwrite
  else
    echo; echo "### DDP on nccl: skipped (one GPU)"
  fi
} 2>&1 | tee "$LOG"

{
  echo
  echo "## GPU check ($(date -u +%Y-%m-%d), \`bash bench/gpu_check.sh\`)"
  echo
  echo "Appended by bench/gpu_check.sh; the rehearsal's figures are also in bench/paper_rehearsal_cuda.json."
  echo
  echo '```'
  cat "$LOG"
  echo '```'
} >> bench/RESULTS.md
echo "appended to $ROOT/bench/RESULTS.md (log: $ROOT/$LOG)"
