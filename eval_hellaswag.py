"""HellaSwag for MiniGPT runs and for any causal LM, in the two conventions the field reports, in one pass.

    python eval_hellaswag.py --model runs/quickstart/final --model openai-community/gpt2
    python eval_hellaswag.py --model runs/gpt2-124M/final --model openai-community/gpt2 \\
        --data_dir data/fineweb-edu                       # adds a val loss column
    accelerate launch eval_hellaswag.py --model ...       # examples split over processes, results gathered

completion   build-nanogpt / llm.c `hellaswag.py`: the context `ctx`, each ending after a space. acc picks the
             ending with the highest summed log-likelihood, acc_norm the highest mean per token.
harness      lm-evaluation-harness's `hellaswag` task: the query "activity_label: ctx_a Ctx_b" after its cleanup
             of WikiHow artifacts, context and ending tokenized together. acc from the summed log-likelihood,
             acc_norm from it divided by the ending's length in characters.

Contexts longer than the model's window lose tokens from the left, as in lm-eval.
"""

import argparse
import datetime
import hashlib
import inspect
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import modeling_minigpt  # noqa: F401  registers MiniGPT with the Auto classes: training checkpoints hold no code
from atomic_writes import write_text_atomically
from token_shards import TokenData
from training_settings import find_tokenizer
from validation import (
    bits_per_byte,
    bits_per_byte_note,
    check_same_tokenizer,
    check_seq_len,
    check_val_windows,
    device_of,
    padded_share,
    val_loss,
)

HUB_DATASET = "Rowan/hellaswag"
CONVENTIONS = ("completion", "harness")
FIELDS = ("activity_label", "ctx_a", "ctx_b", "ctx", "endings", "label")


class HellaSwagError(ValueError):
    """Bad HellaSwag data or an unusable model/tokenizer: the message names the line or the problem."""


@dataclass(frozen=True)
class Example:
    line: int  # 1-based line of the jsonl (row for a Hub split): how errors and results name an example
    activity_label: str
    ctx_a: str
    ctx_b: str
    ctx: str
    endings: tuple[str, ...]
    label: int


# --- data ------------------------------------------------------------------------------------------


def parse_example(record, line: int, where: str) -> Example:
    if not isinstance(record, dict):
        raise HellaSwagError(f"{where}:{line}: expected a JSON object, got {type(record).__name__}")
    missing = [f for f in FIELDS if f not in record]
    if missing:
        raise HellaSwagError(f"{where}:{line}: missing {', '.join(missing)}")
    if not all(isinstance(record[f], str) for f in FIELDS[:4]):
        raise HellaSwagError(f"{where}:{line}: {', '.join(FIELDS[:4])} must be strings")
    endings = record["endings"]
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise HellaSwagError(f"{where}:{line}: 'endings' must be a list of at least two strings")
    try:
        label = int(record["label"])  # an int in rowanz's jsonl, a string on the Hub
    except (TypeError, ValueError):
        raise HellaSwagError(f"{where}:{line}: label {record['label']!r} is not an integer") from None
    if not 0 <= label < len(endings):
        raise HellaSwagError(f"{where}:{line}: label {label} is out of range for {len(endings)} endings")
    text = {f: record[f] for f in FIELDS[:4]}
    return Example(line=line, endings=tuple(endings), label=label, **text)


def load_examples(source: str, limit: int | None = None) -> list[Example]:
    """The first `limit` examples of a local jsonl in rowanz/hellaswag's format, or of a Hub dataset's
    validation split (`Rowan/hellaswag`)."""
    path = Path(source)
    if path.suffix in {".jsonl", ".json"} or path.exists():
        if not path.is_file():
            raise HellaSwagError(f"{path}: no such HellaSwag file")
        examples = []
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if limit is not None and len(examples) == limit:
                    break
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise HellaSwagError(f"{path}:{number}: malformed JSON ({error.msg})") from None
                examples.append(parse_example(record, number, str(path)))
    else:
        try:  # only here: the GPU images, and a run on local files, do without it
            import datasets
        except ImportError:
            raise HellaSwagError(f"loading HellaSwag as {source!r} needs the `datasets` package (pip install datasets); "
                                 "or pass a local jsonl") from None  # fmt: skip
        try:
            split = datasets.load_dataset(source, split="validation")
        except Exception as error:  # noqa: BLE001  offline, unknown id, no validation split: all end the same way
            raise HellaSwagError(
                f"cannot load HellaSwag from {source!r} ({error.__class__.__name__}: {error}); "
                "offline, pass a local jsonl such as ../shared/data/hellaswag/hellaswag_val_500.jsonl"
            ) from None
        rows = split if limit is None else split.select(range(min(limit, len(split))))
        examples = [parse_example(row, number, source) for number, row in enumerate(rows, start=1)]
    if not examples:
        raise HellaSwagError(f"{source}: no examples")
    return examples


def examples_sha256(examples: list[Example]) -> str:
    """Identifies exactly what was evaluated (file or Hub split, after --limit)."""
    return hashlib.sha256(json.dumps([asdict(e) for e in examples], sort_keys=True).encode()).hexdigest()


def harness_clean(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: strip, WikiHow's " [title]" to a sentence break, other bracketed
    artifacts removed, double spaces made single (once, as lm-eval does)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def requests(example: Example, tokenizer) -> dict[str, list[tuple[list[int], list[int]]]]:
    """(context tokens, ending tokens) for each convention and ending."""
    context = tokenizer.encode(example.ctx)
    completion = [(context, tokenizer.encode(" " + e, add_special_tokens=False)) for e in example.endings]
    # lm-eval tokenizes context + " " + ending as one string and splits it at the context's length,
    # so a merge across the boundary is scored as it is.
    query = harness_clean(f"{example.activity_label}: {example.ctx_a} {example.ctx_b.capitalize()}")
    query_ids = tokenizer.encode(query)
    harness = []
    for choice in map(harness_clean, example.endings):
        whole = tokenizer.encode(f"{query} {choice}")
        harness.append((query_ids, whole[len(query_ids) :]))
    return {"completion": completion, "harness": harness}


def normalizers(example: Example, pairs) -> dict[str, list[int]]:
    """What acc_norm divides the log-likelihood by: tokens of the ending, or its characters (lm-eval)."""
    return {
        "completion": [len(ending) for _, ending in pairs["completion"]],
        "harness": [len(harness_clean(e)) for e in example.endings],
    }


# --- scoring ---------------------------------------------------------------------------------------


@torch.no_grad()
def loglikelihoods(model, pairs, max_length: int) -> list[float]:
    """Summed log-probability of each ending given its context, all pairs in one right-padded batch.
    Padding sits after every scored position, so causal attention never sees it and no mask is needed."""
    rows = [(context + ending)[-(max_length + 1) :] for context, ending in pairs]  # left-truncated, as lm-eval
    width = max(len(r) for r in rows) - 1
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)  # -100: not scored
    for i, ((_, ending), row) in enumerate(zip(pairs, rows)):
        inputs[i, : len(row) - 1] = torch.tensor(row[:-1])
        targets[i, len(row) - 1 - len(ending) : len(row) - 1] = torch.tensor(ending)
    # Every row ends at its last scored position, so the last `keep` positions hold all of them: the
    # vocabulary-sized logits (most of the work for a small model) are computed only there.
    keep = width - int((targets != -100).int().argmax(1).min())
    kwargs = {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    # No KV cache: in eval mode a causal LM builds one by default, and scoring never reads it back.
    logits = model(input_ids=inputs.to(device_of(model)), use_cache=False, **kwargs).logits[:, -keep:]
    targets = targets[:, -keep:].to(logits.device)
    scored = targets != -100
    token_logprobs = -F.cross_entropy(logits[scored].float(), targets[scored], reduction="none")
    return [piece.sum().item() for piece in token_logprobs.split(scored.sum(1).tolist())]


def first_argmax(values) -> int:
    return max(range(len(values)), key=values.__getitem__)


def metrics(scored: list[dict]) -> dict:
    """acc and acc_norm for both conventions from per-example log-likelihoods and normalizers."""
    out = {"examples": len(scored)}
    for convention in CONVENTIONS:
        acc = acc_norm = 0
        for s in scored:
            lls, norms = s[convention]["loglikelihoods"], s[convention]["normalizers"]
            acc += first_argmax(lls) == s["label"]
            acc_norm += first_argmax([ll / n for ll, n in zip(lls, norms)]) == s["label"]
        out[convention] = {"acc": acc / len(scored), "acc_norm": acc_norm / len(scored)}
    return out


def context_length(model, tokenizer) -> int:
    """The window lm-eval's HFLM uses: the config's n_positions / max_position_embeddings / n_ctx,
    else the tokenizer's model_max_length, else 2048."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(model.config, name, None) is not None:
            return int(getattr(model.config, name))
    return tokenizer.model_max_length if tokenizer.model_max_length < 1e12 else 2048


def check_fits(example: Example, pairs, max_length: int):
    for convention, endings in pairs.items():
        for i, (_, ending) in enumerate(endings):
            if not 0 < len(ending) <= max_length:
                raise HellaSwagError(f"line {example.line}: {convention} ending {i} has {len(ending)} tokens, "
                                     f"the model's window is {max_length}")  # fmt: skip


def evaluate_hellaswag(model, tokenizer, examples, accelerator=None, batch_size=4, show_progress=True) -> dict:
    """Both conventions on `examples`. `batch_size` examples (each ending in both conventions) make one
    forward pass, grouped by length to save padding. Batches go to processes round-robin and are the
    same whatever the process count, so 1 and N processes give identical numbers. Returns the metrics
    and, under "scored", each example's log-likelihoods in the order of `examples`."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    max_length = context_length(model, tokenizer)
    pairs = [requests(e, tokenizer) for e in examples]
    for example, p in zip(examples, pairs):
        check_fits(example, p, max_length)
    by_length = sorted(range(len(examples)), key=lambda i: max(len(c) + len(e) for r in pairs[i].values() for c, e in r))
    batches = [by_length[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    was_training = model.training
    model.eval()
    scored = []
    share = padded_share(batches, rank, world)
    for batch, counted in tqdm(share, desc="hellaswag", disable=not show_progress or rank != 0, leave=False):
        flat = [pair for i in batch for convention in CONVENTIONS for pair in pairs[i][convention]]
        lls = iter(loglikelihoods(model, flat, max_length))
        for i in batch if counted else []:
            norms = normalizers(examples[i], pairs[i])
            result = {"index": i, "line": examples[i].line, "label": examples[i].label}
            for convention in CONVENTIONS:
                lls_of_example = [next(lls) for _ in pairs[i][convention]]
                result[convention] = {"loglikelihoods": lls_of_example, "normalizers": norms[convention]}
            scored.append(result)
    model.train(was_training)
    if world > 1:
        scored = gather_object(scored)
    scored.sort(key=lambda s: s["index"])
    return {**metrics(scored), "scored": scored}


# --- models ----------------------------------------------------------------------------------------


def check_model_path(model_path: str) -> None:
    """A local folder must hold a saved model; what is not a folder is taken as a Hub id, which, unlike a
    path, has at most one "/" and no leading "." or "/" (a mistyped path would otherwise be reported by
    huggingface_hub as a malformed repo id)."""
    path = Path(model_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HellaSwagError(f"--model {model_path} is a directory without config.json: not a saved model or checkpoint")
    elif path.exists() or model_path.startswith((".", "/", "~")) or model_path.count("/") > 1:
        raise HellaSwagError(f"--model {model_path}: no such model directory")


def load(model_path: str, tokenizer_path: str | None, device, dtype):
    check_model_path(model_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(find_tokenizer(model_path, tokenizer_path))
        model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=True, dtype=dtype)
    except OSError as error:
        raise HellaSwagError(f"cannot load {model_path!r}: {error}") from None
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise HellaSwagError(f"{model_path}: its tokenizer has {len(tokenizer)} tokens, the model only {vocab}")
    return model.to(device), tokenizer


# --- command line ----------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True,
                   help="exported folder, training checkpoint, or Hub/local causal LM; repeat to compare")  # fmt: skip
    p.add_argument("--tokenizer", default=None, help="tokenizer for every --model (default: each model's own)")
    p.add_argument("--hellaswag", default=HUB_DATASET, help="a local jsonl (rowanz/hellaswag format) or a Hub dataset id")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples")
    p.add_argument("--batch_size", type=int, default=4, help="examples per forward pass (x2 conventions x 4 endings)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: bf16 on GPU, else fp32")
    p.add_argument("--data_dir", default=None, help="prepare_data.py output: also report val loss")
    p.add_argument("--val_batches", type=int, default=20)
    p.add_argument("--val_batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=None, help="val window (default: the model's context)")
    p.add_argument("--output", default="runs/hellaswag.json", help="results as JSON")
    args = p.parse_args(argv)
    for name in ("limit", "batch_size", "val_batches", "val_batch_size", "seq_len"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    blocking = next((parent for parent in Path(args.output).parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None or Path(args.output).is_dir():
        p.error(f"--output {args.output} cannot be written: {blocking or args.output} is {'a file' if blocking else 'a directory'}")
    return args


def table(results: list[dict]) -> str:
    header = (f"{'model':<40} {'params':>12} {'acc':>7} {'acc_norm':>9} {'lm-eval acc':>12} {'lm-eval acc_norm':>17} "
              f"{'val loss':>9} {'val bpb':>8}")  # fmt: skip
    lines = [header, "-" * len(header)]
    for r in results:
        val = f"{r['val_loss']:.4f}" if r.get("val_loss") is not None else "-"
        bpb = f"{r['val_bpb']:.4f}" if r.get("val_bpb") is not None else "-"
        c, h = r["completion"], r["harness"]
        lines.append(f"{r['model'][-40:]:<40} {r['parameters']:>12,} {c['acc']:>7.4f} {c['acc_norm']:>9.4f} "
                     f"{h['acc']:>12.4f} {h['acc_norm']:>17.4f} {val:>9} {bpb:>8}")  # fmt: skip
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if accelerator.device.type == "cuda" else torch.float32
    examples = load_examples(args.hellaswag, args.limit)
    data = TokenData.of(args.data_dir) if args.data_dir else None  # its manifest read once
    if data and (note := bits_per_byte_note(data)):
        accelerator.print(note)
    results = []
    for model_path in args.model:
        model, tokenizer = load(model_path, args.tokenizer, accelerator.device, dtype)
        context = context_length(model, tokenizer)
        seq_len = args.seq_len or context
        check_seq_len(seq_len, context, model_path)
        if data:
            check_same_tokenizer(data, tokenizer, model_path)
            check_val_windows(data, args.val_batch_size, seq_len, args.val_batches,
                              f"--val_batches {args.val_batches} x --val_batch_size {args.val_batch_size}")  # fmt: skip
        accelerator.print(f"{model_path}: {len(examples)} examples on {accelerator.num_processes} process(es), {dtype}")
        scores = evaluate_hellaswag(model, tokenizer, examples, accelerator, args.batch_size)
        result = {"model": model_path, "parameters": model.num_parameters(), "completion": scores["completion"],
                  "harness": scores["harness"], "val_loss": None, "val_bpb": None}  # fmt: skip
        if data:
            result["val_loss"] = val_loss(model, data, args.val_batch_size, seq_len, args.val_batches, accelerator)
            result["val_bpb"] = bits_per_byte(result["val_loss"], data)
        results.append(result)
        del model
    if accelerator.is_main_process:
        print(table(results))
        report = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "hellaswag": {"source": args.hellaswag, "examples": len(examples), "sha256": examples_sha256(examples)},
            "dtype": str(dtype).removeprefix("torch."),
            "processes": accelerator.num_processes,
            "val": {"data_dir": args.data_dir, "batches": args.val_batches, "batch_size": args.val_batch_size} if args.data_dir else None,
            "results": results,
        }
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(output, json.dumps(report, indent=1))
        print(f"wrote {output}")


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # HellaSwagError and ShardError among them: bad input, named in one line
        sys.exit(f"eval_hellaswag.py: error: {error}")
