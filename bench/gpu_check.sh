#!/usr/bin/env bash
# The one prepared device check: <= 8 minutes on one H100/H200, on the GPU image as it is (python3 with
# torch 2.11, transformers 5.17, accelerate 1.15, no `datasets`, no network): nothing is installed.
#
#   bash bench/gpu_check.sh RESULTS DATA_DIR HELLASWAG_JSONL
#
# DATA_DIR is prepare_data.py's output, made beforehand on a machine with `datasets` and GPT-2's tokenizer:
#   python prepare_data.py --files ../shared/data/tinyshakespeare/input.txt --tokenizer ../shared/data/gpt2-tokenizer \
#       --val_tokens 200000 --output_dir data/shakespeare && cp ../shared/data/hellaswag/hellaswag_val_500.jsonl data/
# and carried with the tree (the device tool's `carry: ["data"]`). Each step writes its log (RESULTS/NN-name.log)
# and a line of RESULTS/steps.jsonl as it ends, so a run cut short still leaves what ran; with ARCHIVE=FILE
# (on the device tool: $OUT/gpu-check.tgz) all of it but the weights is packed into FILE after every step.
# The environment sets the sizes; the defaults are the GPU's (BATCH=auto: the largest micro-batch that the
# memory estimate fits, of the TOTAL_WINDOWS a step), and tests/test_gpu_check.py dry-runs the same script
# on CPU with a tiny model:
#   MODEL=124M SEQ_LEN=1024 BATCH=auto COMPILED_BATCH=32 TOTAL_WINDOWS=64 STEPS=20
#   CONFIG=accelerate_configs/1gpu.yaml LOSS_BATCHES="16 32 64"
set -uo pipefail
results=${1:?usage: bash bench/gpu_check.sh RESULTS DATA_DIR HELLASWAG_JSONL}
data=${2:?usage: bash bench/gpu_check.sh RESULTS DATA_DIR HELLASWAG_JSONL}
hellaswag=${3:?usage: bash bench/gpu_check.sh RESULTS DATA_DIR HELLASWAG_JSONL}
results=$(mkdir -p "$results" && cd "$results" && pwd)
data=$(cd "$data" && pwd) && hellaswag=$(cd "$(dirname "$hellaswag")" && pwd)/$(basename "$hellaswag") || exit 2
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
MODEL=${MODEL:-124M} SEQ_LEN=${SEQ_LEN:-1024} BATCH=${BATCH:-auto} COMPILED_BATCH=${COMPILED_BATCH:-32}
TOTAL_WINDOWS=${TOTAL_WINDOWS:-64} STEPS=${STEPS:-20}
CONFIG=${CONFIG:-accelerate_configs/1gpu.yaml} LOSS_BATCHES=${LOSS_BATCHES:-16 32 64}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
number=0

step() {  # step NAME COMMAND...: its output to RESULTS/NN-NAME.log, its exit status and time to steps.jsonl
    local name=$1 started=$SECONDS
    shift
    number=$((number + 1))
    local log=$results/$(printf %02d $number)-$name.log
    echo "== $name: $*" | tee "$log"
    "$@" >>"$log" 2>&1
    local status=$?
    printf '{"step": "%s", "exit": %d, "seconds": %d}\n' "$name" "$status" $((SECONDS - started)) >>"$results/steps.jsonl"
    tail -n 3 "$log"
    if [ -n "${ARCHIVE:-}" ]; then  # one file with all that is measured so far (no weights), renamed into place
        tar czf "$ARCHIVE.tmp" -C "$results" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pkl' . &&
            mv "$ARCHIVE.tmp" "$ARCHIVE"
    fi
}

train() {  # train OUTPUT_DIR MICRO_BATCH EXTRA...: the recipe's model through accelerate with CONFIG
    local out=$1 batch=$2
    shift 2
    "$python" -m accelerate.commands.launch --config_file "$CONFIG" train_accelerate.py --model "$MODEL" \
        --seq_len "$SEQ_LEN" --data_dir "$data" --output_dir "$out" --per_device_train_batch_size "$batch" \
        --total_batch_size $((TOTAL_WINDOWS * SEQ_LEN)) \
        --max_train_steps "$STEPS" --num_warmup_steps 2 --eval_steps $((STEPS / 2)) --eval_iters 2 \
        --checkpointing_steps $((STEPS / 2)) --hellaswag "$hellaswag" --hellaswag_limit 100 "$@"
}

step versions "$python" -c "import importlib.metadata as m, torch, sys
print(sys.version)
print({p: m.version(p) for p in ('torch', 'transformers', 'accelerate', 'huggingface_hub', 'tokenizers', 'safetensors')})
print('cuda', torch.version.cuda, 'devices', torch.cuda.device_count())"
step nvidia-smi nvidia-smi
# shellcheck disable=SC2086  # LOSS_BATCHES is a list
step branches-and-losses "$python" bench/gpu_check.py --results "$results" --model "$MODEL" --seq_len "$SEQ_LEN" --batches $LOSS_BATCHES
step train-eager train "$results/runs/eager" "$BATCH"
resume() {  # the compiled run's first checkpoint, resumed: its metrics must continue the uninterrupted run's
    cp -r "$results/runs/compiled" "$results/runs/resumed" && rm -rf "$results/runs/resumed/checkpoints/step_$STEPS" &&
        echo "step_$((STEPS / 2))" >"$results/runs/resumed/checkpoints/latest" &&
        train "$results/runs/resumed" "$COMPILED_BATCH" --compile --resume_from_checkpoint latest
}
TORCH_LOGS=recompiles,graph_breaks step train-compiled train "$results/runs/compiled" "$COMPILED_BATCH" --compile
TORCH_LOGS=recompiles step resume resume
step hellaswag "$python" eval_hellaswag.py --model "$results/runs/eager/final" --hellaswag "$hellaswag" --output "$results/hellaswag.json"
step speed "$python" bench/bench_speed.py --only gpu --rounds 3 --gpu_steps 5 --gpu_batches 32 --output "$results/speed.json"
for run in eager compiled resumed; do  # what the runs measured, beside the logs
    [ -f "$results/runs/$run/metrics.jsonl" ] && cp "$results/runs/$run/metrics.jsonl" "$results/metrics-$run.jsonl"
done
echo "steps: $(wc -l <"$results/steps.jsonl"), failed: $(grep -vc '"exit": 0' "$results/steps.jsonl")"
