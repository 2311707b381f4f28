"""Decoding speed of GPT-2 124M in llama.cpp (llama-cpp-python, our GGUF files) against transformers, on this
CPU: greedy, one sequence, a 32-token prompt and 64 new tokens, in alternating rounds (the order rotating).
The weights are random (speed does not depend on them); the tokenizer is GPT-2's from ../shared or a path.

    python bench/bench_gguf.py                       # f32, f16, q8_0 against transformers (~5 min on 2 cores)
    python bench/bench_gguf.py --rounds 3 --threads 2

Prints new tokens/s per runtime and file type, with the ratio to transformers per round (median [min-max]),
and writes bench/results/gguf-<date>.json with the machine and versions.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configuration_minigpt import MiniGPTConfig  # noqa: E402
from export_gguf import write_gguf  # noqa: E402
from metrics import machine  # noqa: E402
from modeling_minigpt import MiniGPTForCausalLM  # noqa: E402
from report import write_report  # noqa: E402


def transformers_runner(model, prompt, new_tokens):
    @torch.no_grad()
    def run() -> float:
        started = time.perf_counter()
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)  # fmt: skip
        assert out.shape[1] == len(prompt) + new_tokens
        return new_tokens / (time.perf_counter() - started)

    return run


def llama_runner(path, prompt, new_tokens, threads):
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=len(prompt) + new_tokens, n_threads=threads, verbose=False)

    def run() -> float:
        llm.reset()
        started = time.perf_counter()
        for count, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0), 1):
            if count == new_tokens:
                break
        return new_tokens / (time.perf_counter() - started)

    return run, llm


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "data" / "gpt2-tokenizer"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--output", default=None, help="default: bench/results/gguf-<date>.json")
    args = p.parse_args(argv)
    info = machine()
    print(f"{info['processor']}, {args.threads} threads, torch {info['torch']}, transformers {info['transformers']}")
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(MiniGPTConfig.from_preset("124M")).eval()
    prompt = torch.randint(0, 50257, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    runners, opened = {"transformers": transformers_runner(model, prompt, args.new_tokens)}, []
    with tempfile.TemporaryDirectory() as folder:
        for outtype in ("f32", "f16", "q8_0"):
            path = write_gguf(model, tokenizer, Path(folder) / f"124M-{outtype}.gguf", outtype)
            runners[f"llama.cpp {outtype}"], llm = llama_runner(path, prompt, args.new_tokens, args.threads)
            opened.append(llm)
        for run in runners.values():
            run()  # warm-up
        rates = {name: [] for name in runners}
        names = list(runners)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                rates[name].append(runners[name]())
        for llm in opened:
            llm.close()
    print(f"\ngreedy decoding, GPT-2 124M, {len(prompt)}-token prompt, {args.new_tokens} new tokens, batch 1")
    results = {}
    for name, values in rates.items():
        ratios = [v / t for v, t in zip(values, rates["transformers"])]
        spread = f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"
        print(f"  {name:<16} {statistics.median(values):>7.1f} new tokens/s   / transformers: {spread}")
        results[name] = {"rates": values, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                         "ratio_max": max(ratios)}  # fmt: skip
    write_report("gguf", {"decode": results, "threads": args.threads}, args.output)


if __name__ == "__main__":
    main()
