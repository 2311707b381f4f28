#!/usr/bin/env bash
# The one prepared device check, best numbers first, <= 7 minutes on one H100/H200 (the budget below), on the
# GPU image as it is (python3 with torch 2.11, transformers 5.17, accelerate 1.15, no `datasets`, no network):
# nothing is installed.
#
#   bash bench/gpu_check.sh RESULTS DATA_DIR HELLASWAG_JSONL
#
# DATA_DIR is prepare_data.py's output, made beforehand on a machine with `datasets` and GPT-2's tokenizer:
#   python prepare_data.py --files ../shared/data/tinyshakespeare/input.txt --tokenizer ../shared/data/gpt2-tokenizer \
#       --val_tokens 200000 --output_dir data/shakespeare && cp ../shared/data/hellaswag/hellaswag_val_500.jsonl data/
# and carried with the tree (the device tool's `carry: ["data"]`).
#
# Every step runs under its own `timeout`, leaves its log (RESULTS/NN-name.log), a line of RESULTS/steps.jsonl and
# its key numbers on stdout as it ends; with ARCHIVE=FILE (on the device tool: $OUT/gpu-check.tgz) all of it but the
# weights is packed into FILE after every step, so a run cut short keeps what it measured. No step runs past
# BUDGET seconds from the start (its limit shrinks to what is left). The order, and each step's predicted
# seconds on an H100 / its own limit (docs/development.md, "The device check", gives the arithmetic):
#   versions          5 / 30    torch, CUDA, cuDNN, the GPU
#   kernels          15 / 40    what bench/roofline.py assumes: bf16 GEMMs at the step's shapes, elementwise bandwidth
#   estimates         - / 240   the memory estimates the runs ask for, made on the CPU beside the GPU's work
#   speed           135 / 200   ours vs transformers' GPT-2, both compiled, micro-batch 64: tokens/s, MFU, memory
#   train           105 / 160   train_accelerate.py --compile, 12 steps, evaluation and a checkpoint at step 6
#   resume           45 / 90    the same run from its step-6 checkpoint: the losses must continue
#   attention        10 / 45    the SDPA kernel that ran; cuDNN, flash and efficient alone at the training shape
#   losses           70 / 110   compiled plain, chunked and plain eager losses: ms a step, memory, the estimate
#   train-eager      30 / 60    the eager run: its steady state (if time is left)
#   hellaswag        20 / 60    the compiled run's export on the shared 500 (if time is left)
# The sizes come from the environment; tests/test_gpu_check.py dry-runs the same script on CPU with a tiny model:
#   MODEL=124M SEQ_LEN=1024 BATCH=64 TOTAL_WINDOWS=128 STEPS=12 CONFIG=accelerate_configs/1gpu.yaml BUDGET=420
set -uo pipefail
results=${1:?usage: bash bench/gpu_check.sh RESULTS DATA_DIR HELLASWAG_JSONL}
data=${2:?usage: bash bench/gpu_check.sh RESULTS DATA_DIR HELLASWAG_JSONL}
hellaswag=${3:?usage: bash bench/gpu_check.sh RESULTS DATA_DIR HELLASWAG_JSONL}
results=$(mkdir -p "$results" && cd "$results" && pwd)
data=$(cd "$data" && pwd) && hellaswag=$(cd "$(dirname "$hellaswag")" && pwd)/$(basename "$hellaswag") || exit 2
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
MODEL=${MODEL:-124M} SEQ_LEN=${SEQ_LEN:-1024} BATCH=${BATCH:-64} TOTAL_WINDOWS=${TOTAL_WINDOWS:-128} STEPS=${STEPS:-12}
CONFIG=${CONFIG:-accelerate_configs/1gpu.yaml} BUDGET=${BUDGET:-420}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false XDG_CACHE_HOME=$results/cache
number=0 started=$SECONDS

left() { echo $((BUDGET - (SECONDS - started))); }

archive() {  # all that is measured so far (no weights), in one file renamed into place
    [ -n "${ARCHIVE:-}" ] || return 0
    tar czf "$ARCHIVE.tmp" -C "$results" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pkl' --exclude=cache . &&
        mv "$ARCHIVE.tmp" "$ARCHIVE"
}

step() {  # step NAME SECONDS COMMAND...: under `timeout` (its own limit, or what is left of BUDGET if less; skipped
    # under 10 s), its output to NN-NAME.log, its exit and time to steps.jsonl
    local name=$1 limit=$2 began=$SECONDS
    shift 2
    if [ "$(left)" -lt "$limit" ]; then limit=$(left); fi
    if [ "$limit" -lt 10 ]; then
        echo "-- $name: skipped, ${limit}s of the budget left" | tee -a "$results/skipped.txt"
        return
    fi
    number=$((number + 1))
    local log=$results/$(printf %02d $number)-$name.log
    echo "== $name (at ${SECONDS}s, limit ${limit}s): $*" | tee "$log"
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    local status=$?
    printf '{"step": "%s", "exit": %d, "seconds": %d}\n' "$name" "$status" $((SECONDS - began)) >>"$results/steps.jsonl"
    grep -E '^(speed|attention|losses|estimates):|steady state|step +[0-9]+:|resumed from|acc_norm|  [a-z_]+: ' "$log" | cut -c 1-400
    echo "-- $name: exit $status, $((SECONDS - began)) s"
    archive
}

train() {  # train OUTPUT_DIR EXTRA...: the recipe's model through accelerate with CONFIG, a fixed micro-batch
    local out=$1
    shift
    "$python" -m accelerate.commands.launch --config_file "$CONFIG" train_accelerate.py --model "$MODEL" \
        --seq_len "$SEQ_LEN" --data_dir "$data" --output_dir "$out" --per_device_train_batch_size "$BATCH" \
        --total_batch_size $((TOTAL_WINDOWS * SEQ_LEN)) --max_train_steps "$STEPS" --num_warmup_steps 2 \
        --eval_steps $((STEPS / 2)) --eval_iters 2 --checkpointing_steps $((STEPS / 2)) --hellaswag "$hellaswag" \
        --hellaswag_limit 100 "$@"
}

resume() {  # the compiled run's first checkpoint, resumed: its metrics must continue the uninterrupted run's
    cp -r "$results/runs/compiled" "$results/runs/resumed" && rm -rf "$results/runs/resumed/checkpoints/step_$STEPS" &&
        echo "step_$((STEPS / 2))" >"$results/runs/resumed/checkpoints/latest" &&
        train "$results/runs/resumed" --compile --resume_from_checkpoint latest
}

export python CONFIG MODEL SEQ_LEN data BATCH TOTAL_WINDOWS STEPS hellaswag results  # for the runs under `timeout`
export -f train resume
check=("$python" bench/gpu_check.py --results "$results" --model "$MODEL" --seq_len "$SEQ_LEN" --batch "$BATCH" --only)

step versions 30 "$python" -c "import importlib.metadata as m, subprocess, sys, torch
print(sys.version)
print({p: m.version(p) for p in ('torch', 'transformers', 'accelerate', 'huggingface_hub', 'tokenizers', 'safetensors')})
print('cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'devices', torch.cuda.device_count())
print(subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,clocks.max.sm,power.limit', '--format=csv'], capture_output=True, text=True).stdout if torch.cuda.is_available() else 'no GPU')"
# The runs' memory estimates on the CPU, beside the speed step's GPU work: the runs then find them cached.
(timeout 240 "${check[@]}" estimates --data_dir "$data" >"$results/estimates.log" 2>&1 &)
step kernels 40 "${check[@]}" kernels
step speed 200 "${check[@]}" speed
step train 160 env TORCH_LOGS=recompiles,graph_breaks bash -c 'train "$results/runs/compiled" --compile'
step resume 90 env TORCH_LOGS=recompiles bash -c resume
step attention 45 "${check[@]}" attention
step losses 110 "${check[@]}" losses
step train-eager 60 bash -c 'train "$results/runs/eager" --max_train_steps 4 --eval_steps 0 --checkpointing_steps 0 --hellaswag_limit 2'
step hellaswag 60 "$python" eval_hellaswag.py --model "$results/runs/compiled/final" --hellaswag "$hellaswag" --output "$results/hellaswag.json"
for run in compiled resumed eager; do  # what the runs measured, beside the logs
    [ -f "$results/runs/$run/metrics.jsonl" ] && cp "$results/runs/$run/metrics.jsonl" "$results/metrics-$run.jsonl"
done
archive
echo "steps: $(wc -l <"$results/steps.jsonl"), failed: $(grep -vc '"exit": 0' "$results/steps.jsonl"), $((SECONDS - started)) s in all"
