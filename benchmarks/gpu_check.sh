#!/usr/bin/env bash
# The project's GPU check: meant to fit in 8 minutes on one H100/H200, run from the repository root
# (`make gpu-check`, or `bash benchmarks/gpu_check.sh`). Every step has its own time limit and a
# failed step does not stop the rest; everything printed goes to $OUT/gpu-check.log (or
# /tmp/gpu-check.log). Record its figures and failures in BENCHMARKS.md with the date and device.
# It measures the 124M and 163M shapes (bf16 compiled, the story's float16 with a GradScaler, eager),
# what --deterministic costs, every switch compiled in bfloat16 and in float16 + GradScaler against
# eager (benchmarks/switches.py: a table of tokens/s, peak memory, graphs, graph breaks and loss
# differences), the micro-batch --auto_batch_size finds, and runs train.py end to end
# (periodic eval, checkpoints, a SIGTERM once the first checkpoint is written, the resume), then
# eval.py and sample.py on the GPU. Nothing is downloaded: it uses the embedded corpus.
# GPU_CHECK_DEVICE=cpu runs every step on tiny shapes on the CPU, to check that the commands still
# parse and run (tests/test_bench.py does, in CI); PYTHON picks the interpreter (default python3).
# Adapted from the check the project's sessions were given (shared/gpu-check).
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
mkdir -p "$out"
log="$out/gpu-check.log"
failed=()
py=${PYTHON:-python3}
dev=${GPU_CHECK_DEVICE:-cuda}
: >"$log"
say() { echo "$*" | tee -a "$log"; }
step() {  # step SECONDS LABEL COMMAND... (EXPECT=N: the exit status that passes, default 0)
  local limit=$1 label=$2 want=${EXPECT:-0}; shift 2
  say ""; say "== $label"; say "\$ $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1; local rc=$?
  say "-- $label: exit $rc in $((SECONDS - t0))s"
  [ "$rc" = "$want" ] || failed+=("$label (exit $rc)")
}

if [ "$dev" = cpu ]; then  # tiny shapes, eager: only that every command still parses and runs
  small=(--n_layer=2 --n_head=2 --n_embd=64 --block_size=64 --device=cpu)
  gpt124=("${small[@]}" --qkv_bias=True --tie_weights=True); gpt163=("${small[@]}")
  # a 256-token vocabulary for the benchmarks' synthetic tokens, and float32 for the end-to-end run:
  # this CPU has no bfloat16 matmuls, and a 50,257-way head in bfloat16 takes seconds a step
  bb=(--batch_size=4 --total_batch_size=0 --steps=2 --warmup=1 --vocab_size=256); fast=(--compile=False)
  e2e=("${small[@]}" --batch_size=4 --compile=False --max_iters=30); e2e_dtype=float32; auto=(--compile=False)
  ckpt=(--checkpoint_interval=10); evals=(--eval_tokens=4096); auto_exit=2  # auto: GPUs only
  # dynamo's capture without code generation, two rows (tests/test_switches.py runs every row)
  sw=(--device=cpu --tiny=True --backend=eager --budget=0 --warmup=1 --steps=1 --only=baseline,modern.toml)
else
  gpt124=(--qkv_bias=True --tie_weights=True --device=cuda); gpt163=(--device=cuda)
  bb=(--batch_size=32 --total_batch_size=0 --steps=20 --warmup=5); fast=(--compile=True)
  e2e=(--device=cuda --batch_size=8 --max_iters=400); e2e_dtype=bfloat16; auto=(--device=cuda)
  ckpt=(--checkpoint_interval=50); evals=(--eval_tokens=0); auto_exit=0
  sw=(--device=cuda --budget=150)  # rows by importance until 150 s have passed; the rest listed as not run
fi
field_of() {  # field_of LABEL KEY: the value bench.py printed for KEY in the step LABEL
  awk -v start="== $1" -v key="$2" '$0 == start {on = 1} on && index($0, key " ") == 1 {v = substr($0, length(key) + 1);
    sub(/^ +/, "", v)} on && /^-- / {on = 0} END {print v}' "$log"
}

say "gpu-check $(date -u +%FT%TZ) on $(hostname)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$log"
$py -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" 2>&1 | tee -a "$log"
git log -1 --format='commit %h %s' 2>/dev/null | tee -a "$log"
git status --porcelain --untracked-files=no 2>/dev/null | head -5 | sed 's/^/changed: /' | tee -a "$log"

# 1. The goal row: GPT-2 124M (tied head, QKV bias), bf16, compiled. MFU against the device's peak.
step 240 "124M bf16 compiled" $py bench.py "${gpt124[@]}" --dtype=bfloat16 "${fast[@]}" "${bb[@]}"
# 2. The story's shape (163M, untied, no QKV bias) in the story's precision: float16 with a GradScaler.
step 240 "163M float16+GradScaler compiled" $py bench.py "${gpt163[@]}" --dtype=float16 "${fast[@]}" "${bb[@]}"
# 3. What compile buys: the 124M step without it; and what --deterministic costs on top of eager.
step 120 "124M bf16 eager" $py bench.py "${gpt124[@]}" --dtype=bfloat16 --compile=False "${bb[@]}"
step 120 "124M bf16 eager deterministic" $py bench.py "${gpt124[@]}" --dtype=bfloat16 --compile=False \
  --deterministic=True "${bb[@]}"
# 3b. Every switch and the modern stack compiled, bfloat16 and float16 + GradScaler, against eager:
#     the table of benchmarks/switches.py (GPT-2 small's shape, batch 8, 2 + 3 steps a row).
step 210 "every switch compiled" $py benchmarks/switches.py "${sw[@]}"
# 4. End to end on the embedded corpus: train with periodic eval and checkpoints, SIGTERM once the
#    first checkpoint is on disk (a preemption mid-run), the same command again to resume in
#    place, then eval.py and sample.py on the GPU.
work=$(mktemp -d)
step 60 "prepare the embedded corpus" $py prepare_data.py --dataset=sample --data_dir="$work/data"
run=("${e2e[@]}" --dataset=sample --data_dir="$work/data" --out_dir="$work/run" --dtype=$e2e_dtype
     --total_batch_size=0 --log_interval=10 --eval_interval=50 --eval_tokens=65536 "${ckpt[@]}")
say ""; say "== train, SIGTERM after the first checkpoint, then the same command again"
t0=$SECONDS
$py train.py "${run[@]}" >>"$log" 2>&1 & pid=$!
for _ in $(seq 600); do [ -f "$work/run/ckpt.pt" ] && break; kill -0 $pid 2>/dev/null || break; sleep 0.5; done
kill -TERM $pid 2>/dev/null
for _ in $(seq 600); do kill -0 $pid 2>/dev/null || break; sleep 0.5; done  # at most 5 minutes
kill -KILL $pid 2>/dev/null; wait $pid; rc=$?
stopped=$(grep -o 'stopped by SIGTERM after step [0-9]*' "$work/run/log.txt" 2>/dev/null)
say "-- first part: exit $rc in $((SECONDS - t0))s; ${stopped:-not stopped by the SIGTERM}"
[ "$rc" = 0 ] && [ -n "$stopped" ] || failed+=("train stopped by SIGTERM (exit $rc, ${stopped:-not stopped})")
step 300 "restart in place" $py train.py "${run[@]}"
step 90 "eval.py on the test split" $py eval.py "$work/run" --dataset=sample --data_dir="$work/data" --device="$dev" \
  --ledger="" "${evals[@]}"
step 60 "sample.py" $py sample.py "$work/run" --device="$dev" --num_samples=2 --max_new_tokens=20
# 5. --auto_batch_size on the story's model and tokens per step: trial steps, then 2 real steps.
EXPECT=$auto_exit step 180 "auto micro-batch" $py train.py "${gpt163[@]}" "${auto[@]}" --auto_batch_size=True --dataset=sample \
  --data_dir="$work/data" --out_dir="$work/auto" --max_iters=2 --eval_interval=0 --eval_tokens=4096 --charts=False
grep -h "micro-batch:" "$work/auto/log.txt" 2>/dev/null | tee -a "$log" || true

# --- 6. Mixture of experts, sparse against dense (benchmarks/bench_moe.py; BENCHMARKS.md, "Mixture
#    of experts, sparse against dense"): the story's 163M shape with 6 experts top-2 and 8 top-2,
#    bf16 eager, each moe_impl: step time, one MoE layer's forward and backward, the experts' share.
if [ "$dev" = cpu ]; then
  moe=(--n_layer=1 --n_head=2 --n_embd=64 --block_size=32 --vocab_size=256 --batch_size=2 --steps=1 --warmup=1)
else
  moe=(--device=cuda --dtype=bfloat16 --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --vocab_size=50257
       --batch_size=8 --steps=10 --warmup=3)
fi
step 300 "experts sparse against dense" $py benchmarks/bench_moe.py "${moe[@]}"
# --- end of 6.

rm -rf "$work"
# The speed targets (BENCHMARKS.md), from steps 1 and 2; MFU counts matmul FLOPs (model.flops_per_token).
rate=$(field_of "124M bf16 compiled" tokens/s); mfu=$(field_of "163M float16+GradScaler compiled" mfu)
meets() { awk -v v="${1//,/}" -v t="$2" 'BEGIN {print (v + 0 >= t ? "met" : sprintf("short: %.0f%% of it", 100 * v / t))}'; }
say ""; say "== speed targets"
say "GPT-2 124M (tied, QKV bias) bf16 compiled: ${rate:-not measured} tokens/s; target >= 500,000 on one H200:" \
  "$([ -n "$rate" ] && meets "$rate" 500000 || echo "not measured")"
say "the story's 163M float16 + GradScaler compiled: MFU ${mfu:-not measured}; target >= 45%:" \
  "$(case "$mfu" in [0-9]*%*) meets "${mfu%%%*}" 45 ;; *) echo "not measured (no known peak)" ;; esac)"
say ""; say "gpu-check done in ${SECONDS}s; full log: $log"
if [ ${#failed[@]} -gt 0 ]; then say "FAILED: ${failed[*]}"; exit 1; fi
