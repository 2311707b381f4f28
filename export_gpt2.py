"""Export a MiniGPT folder as a native GPT-2 folder: transformers' own `GPT2LMHeadModel` (model_type
`gpt2`), which every GPT-2 runtime serves without remote code (vLLM, TGI, llama.cpp's converter, ONNX
exporters, `AutoModelForCausalLM.from_pretrained(dir)` without trust_remote_code).

    python export_gpt2.py runs/quickstart/final runs/quickstart/final-gpt2

The weights are the same numbers (Conv1D layout; logits equal ours), and the
tokenizer, generation config and model card come along. `train_accelerate.py --export_gpt2` does this
for its export; both go through `export.export_gpt2`.
"""

import argparse
import sys
from pathlib import Path

from export import export_gpt2


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="a folder saved by MiniGPT (train_accelerate.py's export)")
    p.add_argument("destination", type=Path, help="the native GPT-2 folder to write")
    args = p.parse_args(argv)
    print(f"wrote {export_gpt2(args.source, args.destination)}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as error:
        sys.exit(f"export_gpt2.py: error: {error}")
