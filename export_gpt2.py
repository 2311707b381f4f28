"""Export a MiniGPT folder as a native GPT-2 folder: transformers' own `GPT2LMHeadModel` (model_type
`gpt2`), which every GPT-2 runtime serves without remote code (vLLM, TGI, llama.cpp's converter, ONNX
exporters, `AutoModelForCausalLM.from_pretrained(dir)` without trust_remote_code).

    python export_gpt2.py runs/quickstart/final runs/quickstart/final-gpt2

The weights are the same numbers (Conv1D layout, vocabulary padding dropped; logits equal ours), and the
tokenizer, generation config and model card come along. `train_accelerate.py --export_gpt2` does this
for its export.
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

from huggingface_hub import ModelCard
from transformers import AutoTokenizer, GenerationConfig

from modeling_minigpt import MiniGPTForCausalLM

COMPANION_FILES = ("loss.png",)  # copied as they are, when present


def export_gpt2(source: Path, destination: Path) -> Path:
    """Write `destination` from the MiniGPT folder `source`, aside first and renamed when complete."""
    source, destination = Path(source), Path(destination)
    if not (source / "config.json").is_file():
        raise ValueError(f"{source} is not a saved MiniGPT folder (no config.json)")
    model = MiniGPTForCausalLM.from_pretrained(source)
    temporary = destination.with_name(destination.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    model.to_gpt2().save_pretrained(temporary)
    AutoTokenizer.from_pretrained(source, trust_remote_code=True).save_pretrained(temporary)
    if (source / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(source).save_pretrained(temporary)
    if (source / "README.md").is_file():
        card = ModelCard.load(source / "README.md")
        card.data.tags = [tag for tag in card.data.tags or [] if tag != "minigpt"] + ["minigpt-native-gpt2"]
        card.text = card.text.replace("trust_remote_code=True", "no remote code: model_type gpt2")
        card.save(temporary / "README.md")
    for name in COMPANION_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, temporary / name)
    shutil.rmtree(destination, ignore_errors=True)
    os.replace(temporary, destination)
    return destination


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
