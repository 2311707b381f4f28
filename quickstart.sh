#!/usr/bin/env bash
# README command 1. On a fresh machine, offline: set up, tokenize the built-in corpus (Python's own
# documentation) with a BPE trained on it, train the `small` preset (~4 minutes on 2 CPU cores),
# evaluate, print samples, and load the exported model with `pipeline`.
set -euo pipefail
cd "$(dirname "$0")"

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0  # first: a bare `torch` requirement pulls a large CUDA build
.venv/bin/python -m pip install -q -r requirements.txt -c requirements-lock.txt  # the tested versions
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.venv/bin/python prepare_data.py --vocab_size 8192 --output_dir data/builtin
.venv/bin/python train_accelerate.py --data_dir data/builtin --output_dir runs/quickstart "$@"
.venv/bin/python - <<'PY'
from transformers import AutoModelForCausalLM, pipeline

model = AutoModelForCausalLM.from_pretrained("runs/quickstart/final", trust_remote_code=True)
generator = pipeline("text-generation", model=model, tokenizer="runs/quickstart/final")
for out in generator(["The", "Return the"], max_new_tokens=40, do_sample=True, top_k=50):
    print(repr(out[0]["generated_text"]))
print("exported model: runs/quickstart/final (loss plot: runs/quickstart/loss.png)")
PY
