"""What a finished run publishes: the model folder (weights, remote code, tokenizer, generation config,
model card, loss plot) that `from_pretrained(..., trust_remote_code=True)` and `pipeline` load, the same
model as a native GPT-2 folder for runtimes that run no remote code, and the upload to the Hub. Every
folder is written aside and renamed into place when complete."""

import shutil
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData, create_repo, upload_folder
from transformers import AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel

from atomic_writes import put_in_place, staging_dir
from conversion_minigpt import CONV1D_WEIGHTS, GPT2_CONFIG_FIELDS
from modeling_minigpt import MiniGPTForCausalLM
from token_shards import TokenData

COMPANION_FILES = ("loss.png",)  # copied into an exported folder as they are, when present


def export_model(accelerator, model, settings, data: TokenData, summary: dict, destination: Path, base_model: str | None = None):
    """The run's model folder. Every process gives its part of the weights (under FSDP they are gathered
    from all of them); the main process alone writes the folder and renames it into place. No other process
    touches it: one that arrives late would find the staging folder already renamed away."""
    weights = accelerator.get_state_dict(model)  # the full tensors, gathered from every process under FSDP
    if accelerator.is_main_process:
        config = accelerator.unwrap_model(model).config
        temporary = staging_dir(destination)
        # Saved through a weightless model of our own class: under FSDP2 the model's class is torch's generated
        # FSDP subclass, and save_pretrained would copy torch's source files in place of ours as remote code.
        with torch.device("meta"):
            plain = MiniGPTForCausalLM(config)
        if config.tie_word_embeddings:  # gathered tensors share no storage: drop the alias by name
            for alias in plain._tied_weights_keys:
                weights.pop(alias, None)
        plain.save_pretrained(temporary, state_dict=weights)
        exported_tokenizer(data, config).save_pretrained(temporary)
        eot = config.eos_token_id
        GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, do_sample=True, top_k=50,
                         max_new_tokens=64).save_pretrained(temporary)  # fmt: skip
        model_card(settings, data, summary, base_model).save(temporary / "README.md")
        copy_companions(settings.output_dir, temporary)
        put_in_place(temporary, destination)
        if settings.export_gpt2:
            export_gpt2(destination, destination.with_name(destination.name + "-gpt2"))
        if settings.export_gguf:
            from export_gguf import export_gguf  # gguf is imported only when asked for: the GPU images lack it

            export_gguf(destination, destination.with_name(f"{destination.name}-{settings.export_gguf}.gguf"), settings.export_gguf)
    accelerator.wait_for_everyone()


def exported_tokenizer(data: TokenData, config):
    """The data's tokenizer, set up for the model: truncation at its context, and a pad token (eot, as
    GPT-2 has none) on the left, where generation needs the padding."""
    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer_dir, model_max_length=config.n_positions,
                                              padding_side="left")  # init arguments are what save_pretrained keeps
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_card(settings, data: TokenData, summary: dict, base_model: str | None) -> ModelCard:
    """The card's metadata (license, pipeline tag, datasets, base model, and a model-index with the val
    loss and HellaSwag) through huggingface_hub, which the Hub parses; the body is the run's table."""
    meta = data.meta
    source = meta["source"]
    hub_dataset = None if source == "builtin" or source.startswith("files:") else source
    results = [EvalResult(task_type="text-generation", dataset_type=hub_dataset or source, dataset_name=f"{source} (held-out split)",
                          dataset_split="validation", metric_type="loss", metric_name="val loss",
                          metric_value=round(summary["val_loss"], 4))]  # fmt: skip
    if "val_bpb" in summary:  # bits per byte compare across tokenizers; nats per token do not
        results.append(EvalResult(task_type="text-generation", dataset_type=hub_dataset or source, metric_type="bits_per_byte",
                                  dataset_name=f"{source} (held-out split)", dataset_split="validation",
                                  metric_name="val bits per byte", metric_value=round(summary["val_bpb"], 4)))  # fmt: skip
    if "hellaswag_acc_norm" in summary:
        hellaswag = dict(task_type="multiple-choice", dataset_type="Rowan/hellaswag", dataset_name="HellaSwag",
                         dataset_split="validation")  # fmt: skip
        for convention, prefix in [("completion style", "hellaswag"), ("lm-evaluation-harness style", "hellaswag_lm_eval")]:
            for metric in ("acc", "acc_norm"):
                results.append(EvalResult(**hellaswag, metric_type=metric, metric_value=round(summary[f"{prefix}_{metric}"], 4),
                                          metric_name=f"{metric}, {convention} ({summary['hellaswag_examples']:,} examples)"))  # fmt: skip
    card_data = ModelCardData(language="en", license=settings.license, library_name="transformers", pipeline_tag="text-generation",
                         tags=["minigpt", "gpt2", "text-generation"], datasets=[hub_dataset] if hub_dataset else None,
                         base_model=base_model, model_name=settings.hub_model_id or "minigpt", eval_results=results)  # fmt: skip
    lines = [
        "# MiniGPT", "",
        "GPT-2 architecture trained from scratch with minigpt's `train_accelerate.py`. Load with",
        "`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.", "",
        "| | |", "| --- | --- |",
        f"| model | {settings.model}: {summary['parameters']:,} parameters |",
        f"| data | {source} ({meta['tokens']['train']:,} train tokens, tokenizer {meta['tokenizer']}) |",
        f"| recipe | {summary['steps']} steps x {summary['tokens_per_step']:,} tokens, peak lr {settings.learning_rate}, "
        f"warmup {settings.num_warmup_steps}, cosine to {settings.min_lr_ratio:g}x, {optimizer_text(settings)}, wd {settings.weight_decay} |",
        f"| tokens seen | {summary['tokens_seen']:,} |",
        f"| final train loss | {summary['train_loss']:.4f} |",
        f"| final val loss | {summary['val_loss']:.4f} |",
    ]  # fmt: skip
    if "val_bpb" in summary:
        lines.append(f"| final val bits per byte | {summary['val_bpb']:.4f} (comparable across tokenizers) |")
    if "hellaswag_acc_norm" in summary:
        lines += [
            (f"| HellaSwag ({settings.hellaswag}, {summary['hellaswag_examples']:,} examples), completion style | "
             f"acc {summary['hellaswag_acc']:.4f}, acc_norm {summary['hellaswag_acc_norm']:.4f} |"),
            (f"| HellaSwag, lm-evaluation-harness style | "
             f"acc {summary['hellaswag_lm_eval_acc']:.4f}, acc_norm {summary['hellaswag_lm_eval_acc_norm']:.4f} |"),
        ]  # fmt: skip
    body = "\n".join(lines + ["", "![loss](loss.png)", ""])
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def optimizer_text(settings) -> str:
    if settings.optimizer == "adamw":
        return "AdamW"
    return (f"Muon for the blocks' matrices (peak lr {settings.muon_peak_lr}, momentum {settings.muon_momentum}, "
            f"{settings.muon_adjust_lr} lr adjustment) and AdamW for the rest")  # fmt: skip


def push_to_hub(folder: Path, repo_id: str):
    """The exported folder as it is (weights, code, tokenizer, card): what `model.push_to_hub` would upload."""
    create_repo(repo_id, exist_ok=True)
    upload_folder(repo_id=repo_id, folder_path=folder, commit_message="minigpt export")


# --- native GPT-2 -----------------------------------------------------------------------------------


def to_gpt2(model: MiniGPTForCausalLM) -> GPT2LMHeadModel:
    """The inverse of `MiniGPTForCausalLM.from_gpt2`: transformers' own `GPT2LMHeadModel` with these weights
    (Conv1D layout) and identical logits, for the runtimes that serve GPT-2 but
    run no remote code (vLLM, TGI, llama.cpp's converter, ONNX exporters)."""
    c = model.config
    # n_ctx (GPT-2's old name for the context) is read by llama.cpp's converter and mlx-lm; transformers 5 no
    # longer writes it unless given.
    config = GPT2Config(**{name: getattr(c, name) for name in GPT2_CONFIG_FIELDS}, activation_function="gelu_new",
                        tie_word_embeddings=c.tie_word_embeddings, n_ctx=c.n_positions)  # fmt: skip
    with torch.device("meta"):  # no init: every tensor is assigned below
        gpt2 = GPT2LMHeadModel(config)
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.t() if key.endswith(CONV1D_WEIGHTS) else tensor
        state[key] = tensor.clone()
    gpt2.load_state_dict(state, assign=True)
    gpt2.tie_weights()
    return gpt2.train(model.training)


def export_gpt2(source: Path, destination: Path) -> Path:
    """Write the native GPT-2 folder `destination` from the MiniGPT folder `source`, with its tokenizer,
    generation config and model card (retagged: no remote code)."""
    source, destination = Path(source), Path(destination)
    if not (source / "config.json").is_file():
        raise ValueError(f"{source} is not a saved MiniGPT folder (no config.json)")
    model = MiniGPTForCausalLM.from_pretrained(source)
    temporary = staging_dir(destination)
    to_gpt2(model).save_pretrained(temporary)
    AutoTokenizer.from_pretrained(source, trust_remote_code=True).save_pretrained(temporary)
    if (source / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(source).save_pretrained(temporary)
    if (source / "README.md").is_file():
        card = ModelCard.load(source / "README.md")
        card.data.tags = [tag for tag in card.data.tags or [] if tag != "minigpt"] + ["minigpt-native-gpt2"]
        card.text = card.text.replace("trust_remote_code=True", "no remote code: model_type gpt2")
        card.save(temporary / "README.md")
    copy_companions(source, temporary)
    put_in_place(temporary, destination)
    return destination


def copy_companions(source: Path, destination: Path):
    for name in COMPANION_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, destination / name)
