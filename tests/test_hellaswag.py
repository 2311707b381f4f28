"""eval_hellaswag.py against references: log-likelihoods computed by hand, lm-evaluation-harness itself,
transformers' own GPT-2, a single process."""

import json
import math
import os
import re
import sys

import pytest
import torch
from conftest import HANDMADE_HELLASWAG, REPO, failure, run_script, shared_file, two_cpu_processes

import eval_hellaswag
import prepare_data
import validation
from configuration_minigpt import MiniGPTConfig
from modeling_minigpt import MiniGPTForCausalLM
from token_shards import read_meta

EVAL = [sys.executable, str(REPO / "eval_hellaswag.py")]


def opinionated_model(tokenizer, n_positions=96, seed=0):
    """A tiny random model with large weights, so that its log-likelihoods differ a lot between endings."""
    torch.manual_seed(seed)
    eot = tokenizer.eos_token_id
    config = MiniGPTConfig(n_layer=2, n_head=4, n_embd=64, n_positions=n_positions, vocab_size=len(tokenizer),
                           bos_token_id=eot, eos_token_id=eot, initializer_range=0.2)  # fmt: skip
    return MiniGPTForCausalLM(config).eval()


def saved(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# --- by hand ---------------------------------------------------------------------------------------


@torch.no_grad()
def loglikelihood_by_hand(model, context_ids, ending_ids):
    """One unpadded sequence: the sum over the ending of log p(token | everything before it)."""
    logprobs = model(torch.tensor([context_ids + ending_ids])).logits[0].log_softmax(-1)
    return sum(logprobs[len(context_ids) - 1 + k, token].item() for k, token in enumerate(ending_ids))


def test_two_examples_checked_by_hand(gpt2_tokenizer, handmade_hellaswag, tmp_path):
    tok, model = gpt2_tokenizer, opinionated_model(gpt2_tokenizer)
    # lm-eval's cleanup, written out: artifacts gone, ctx_b capitalized, " [title]" at the start of an
    # ending leaves its leading space.
    queries = ["Making tea: A man fills a kettle with water. Then he", "Baking: She mixes flour and eggs. The dough"]
    choices = [
        ["boils it.", "pours the hot water over a tea bag in a big blue cup and waits for it to steep.", " sings.", "runs away"],
        ["rises.", "is put into the oven for an hour.", "falls on the floor and the dog eats all of it happily.", "x"],
    ]
    expected = {"completion": {"acc": 0, "acc_norm": 0}, "harness": {"acc": 0, "acc_norm": 0}}
    by_hand = []
    for example, query, example_choices in zip(HANDMADE_HELLASWAG, queries, choices):
        completion = [(tok.encode(example["ctx"]), tok.encode(" " + e)) for e in example["endings"]]
        query_ids = tok.encode(query)
        harness = [(query_ids, tok.encode(query + " " + c)[len(query_ids) :]) for c in example_choices]
        lls = {name: [loglikelihood_by_hand(model, c, e) for c, e in pairs]
               for name, pairs in [("completion", completion), ("harness", harness)]}  # fmt: skip
        norms = {"completion": [len(e) for _, e in completion], "harness": [len(c) for c in example_choices]}
        by_hand.append((lls, norms))
        for name in expected:
            picks = {"acc": max(range(4), key=lambda i: lls[name][i]),
                     "acc_norm": max(range(4), key=lambda i: lls[name][i] / norms[name][i])}  # fmt: skip
            for metric, pick in picks.items():
                expected[name][metric] += (pick == example["label"]) / len(HANDMADE_HELLASWAG)
    # Only meaningful if normalizing changes a choice and the conventions disagree somewhere.
    assert expected["completion"] != expected["harness"]
    assert any(expected[name]["acc"] != expected[name]["acc_norm"] for name in expected)

    result = eval_hellaswag.evaluate_hellaswag(model, tok, eval_hellaswag.load_examples(str(handmade_hellaswag)))
    for scored, (lls, norms) in zip(result["scored"], by_hand):
        for name in expected:
            torch.testing.assert_close(scored[name]["loglikelihoods"], lls[name], rtol=1e-5, atol=1e-4)
            assert scored[name]["normalizers"] == norms[name]
    for name in expected:
        assert result[name] == pytest.approx(expected[name], abs=1e-12)

    # The command line reports the same four numbers in its JSON.
    out = tmp_path / "results.json"
    eval_hellaswag.main(["--model", saved(model, tok, tmp_path / "model"), "--hellaswag", str(handmade_hellaswag),
                         "--output", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert report["hellaswag"]["examples"] == 2 and len(report["hellaswag"]["sha256"]) == 64
    for name in expected:
        assert report["results"][0][name] == pytest.approx(expected[name], abs=1e-12)


# --- lm-evaluation-harness -------------------------------------------------------------------------


def test_equals_lm_evaluation_harness_on_500_real_examples(gpt2_tokenizer, tmp_path):
    """lm-eval's own hellaswag task (its yaml and preprocessing, included as is) on the local file, with
    HFLM loading our saved folder through trust_remote_code. Contexts of 39 of the 500 examples exceed
    the 96-token window, so left truncation is compared too."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in requirements-test.txt")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    data = shared_file("hellaswag/hellaswag_val_500.jsonl")
    model_dir = saved(opinionated_model(gpt2_tokenizer), gpt2_tokenizer, tmp_path / "model")
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    builtin = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "hellaswag", "hellaswag.yaml")
    (task_dir / "hellaswag_local.yaml").write_text(
        f"include: {builtin}\ntask: hellaswag_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\ntraining_split: null\n"
    )
    harness = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model_dir, trust_remote_code=True, batch_size=32, device="cpu"),
        tasks=["hellaswag_local"], task_manager=TaskManager(include_path=str(task_dir)), log_samples=True,
    )  # fmt: skip
    theirs = harness["results"]["hellaswag_local"]
    their_lls = {s["doc_id"]: [ll for ll, _ in s["filtered_resps"]] for s in harness["samples"]["hellaswag_local"]}

    model = eval_hellaswag.AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    tokenizer = eval_hellaswag.AutoTokenizer.from_pretrained(model_dir)
    ours = eval_hellaswag.evaluate_hellaswag(model, tokenizer, eval_hellaswag.load_examples(str(data)), batch_size=8)
    assert ours["examples"] == len(their_lls) == 500
    assert ours["harness"]["acc"] == theirs["acc,none"]
    assert ours["harness"]["acc_norm"] == theirs["acc_norm,none"]
    for doc_id, scored in enumerate(ours["scored"]):  # same order: both follow the file
        torch.testing.assert_close(scored["harness"]["loglikelihoods"], their_lls[doc_id], rtol=1e-5, atol=2e-4)


# --- processes, models side by side, val loss ------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_pair(gpt2_tokenizer, tmp_path_factory):
    """transformers' GPT2LMHeadModel (random, saved as the library's model) and the same weights as MiniGPT."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    eot = gpt2_tokenizer.eos_token_id
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=len(gpt2_tokenizer),
                                      bos_token_id=eot, eos_token_id=eot, initializer_range=0.2))  # fmt: skip
    root = tmp_path_factory.mktemp("models")
    return saved(gpt2, gpt2_tokenizer, root / "gpt2"), saved(MiniGPTForCausalLM.from_gpt2(gpt2), gpt2_tokenizer, root / "ours")


@pytest.fixture(scope="module")
def gpt2_data(gpt2_tokenizer, tmp_path_factory):
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    gpt2_tokenizer.save_pretrained(tokenizer_dir)
    out = tmp_path_factory.mktemp("data") / "builtin"
    prepare_data.main(["--tokenizer", str(tokenizer_dir), "--max_tokens", "60000", "--output_dir", str(out), "--num_proc", "1"])
    return out


def test_side_by_side_two_processes_equal_one_and_library_gpt2_equals_ours(gpt2_pair, gpt2_data, tmp_path):
    data = shared_file("hellaswag/hellaswag_val_500.jsonl")
    gpt2_dir, ours_dir = gpt2_pair
    common = ["--model", gpt2_dir, "--model", ours_dir, "--hellaswag", str(data), "--limit", "30", "--batch_size", "2",
              "--data_dir", str(gpt2_data), "--val_batches", "3", "--val_batch_size", "2", "--seq_len", "32"]  # fmt: skip
    one = run_script([*EVAL, *common, "--output", str(tmp_path / "one.json")])
    assert one.returncode == 0, failure(one)
    two = run_script([*two_cpu_processes("eval_hellaswag.py", 29535), *common, "--output", str(tmp_path / "two.json")],
                     ACCELERATE_USE_CPU="true")
    assert two.returncode == 0, failure(two)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    def scores(report):
        return [(r["model"], r["completion"], r["harness"]) for r in report["results"]]

    assert scores(two) == scores(one)
    assert [r["val_loss"] for r in two["results"]] == pytest.approx([r["val_loss"] for r in one["results"]], rel=1e-6)

    gpt2, ours = one["results"]
    assert (gpt2["completion"], gpt2["harness"]) == (ours["completion"], ours["harness"])
    # Val loss against the library's own loss (labels shifted inside GPT2LMHeadModel) on the same windows.
    from transformers import GPT2LMHeadModel

    from token_shards import ShardedTokens

    reference = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    windows = ShardedTokens(gpt2_data, "val", 2, 32, 0, 1, shuffle=False)
    with torch.no_grad():
        losses = [reference(input_ids=(w := next(windows)), labels=w).loss for _ in range(3)]
    # (GPT-2 sees all T+1 tokens and shifts; the script feeds T and scores the next tokens: same T targets.)
    meta = read_meta(gpt2_data)
    for result in (gpt2, ours):
        assert result["val_loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)
        assert result["val_bpb"] == pytest.approx(result["val_loss"] / math.log(2) * meta["tokens"]["val"] / meta["val_bytes"])


# --- bad input -------------------------------------------------------------------------------------


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda good: [good[0], "{not json"], ":2: malformed JSON"),
        (lambda good: [json.dumps({**json.loads(good[0]), "label": 4})], ":1: label 4 is out of range for 4 endings"),
        (lambda good: [good[0], json.dumps({k: v for k, v in json.loads(good[1]).items() if k != "ctx_b"})], ":2: missing ctx_b"),
        (lambda good: [json.dumps({**json.loads(good[0]), "endings": "one string"})], ":1: 'endings' must be a list"),
        (lambda good: [], "no examples"),
    ],
)
def test_bad_data_names_the_line(mutate, message, handmade_hellaswag, tmp_path):
    good = handmade_hellaswag.read_text().splitlines()
    bad = write_lines(tmp_path / "bad.jsonl", mutate(good))
    with pytest.raises(eval_hellaswag.HellaSwagError, match=message):
        eval_hellaswag.load_examples(bad)


def test_command_line_errors_are_one_line(gpt2_pair, gpt2_data, gpt2_tokenizer, tmp_path, handmade_hellaswag):
    """Missing file, an ending that cannot fit the window, data tokenized with another tokenizer."""
    small = opinionated_model(gpt2_tokenizer, n_positions=8)
    other_data = tmp_path / "other_data"  # tokenized with a BPE trained on the spot
    prepare_data.main(["--vocab_size", "300", "--max_tokens", "5000", "--output_dir", str(other_data), "--num_proc", "1"])
    cases = [
        (["--model", gpt2_pair[1], "--hellaswag", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such HellaSwag file"),
        (["--model", saved(small, gpt2_tokenizer, tmp_path / "small"), "--hellaswag", str(handmade_hellaswag)],
         r"line 1: completion ending 1 has \d+ tokens, the model's window is 8"),
        (["--model", str(tmp_path / "nothing_here"), "--hellaswag", str(handmade_hellaswag)], "nothing_here: no such model directory"),
        (["--model", str(other_data / "tokenizer" / ".."), "--hellaswag", str(handmade_hellaswag)], "is a directory without config.json"),
        (["--model", gpt2_pair[1], "--hellaswag", str(handmade_hellaswag), "--data_dir", str(other_data)],
         "was tokenized with another tokenizer"),
        (["--model", gpt2_pair[1], "--hellaswag", str(handmade_hellaswag), "--seq_len", "999"], r"--seq_len 999 exceeds .*'s context of"),
        (["--model", gpt2_pair[1], "--hellaswag", str(handmade_hellaswag), "--data_dir", str(gpt2_data), "--val_batches", "100000"],
         r"--val_batches 100000 x --val_batch_size 8 needs 800000 val windows of \d+ tokens; .* has \d+"),
        (["--model", gpt2_pair[1], "--hellaswag", str(handmade_hellaswag), "--output", str(handmade_hellaswag / "r.json")],
         "cannot be written: .* is a file"),
    ]  # fmt: skip
    for argv, message in cases:
        result = run_script([*EVAL, *argv, "--output", str(tmp_path / "r.json")] if "--output" not in argv else [*EVAL, *argv])
        assert result.returncode in (1, 2), result.stderr[-2000:]
        assert re.search(message, result.stderr) and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "r.json").exists()


def test_evaluation_builds_no_kv_cache(gpt2_tokenizer, handmade_hellaswag, data_dir):
    """In eval mode a causal LM builds a KV cache unless told not to: ~2.4 GiB at 64 x 1024 for GPT-2 124M
    that neither scoring nor the val loss ever reads."""
    hellaswag_model = opinionated_model(gpt2_tokenizer)
    vocab = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    val_model = MiniGPTForCausalLM(MiniGPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=vocab,
                                                 bos_token_id=vocab - 1, eos_token_id=vocab - 1))  # fmt: skip
    with_cache = []
    for model in (hellaswag_model, val_model):
        model.register_forward_hook(lambda module, args, output: with_cache.append("cache" in output or "past_key_values" in output))
    eval_hellaswag.evaluate_hellaswag(hellaswag_model, gpt2_tokenizer, eval_hellaswag.load_examples(str(handmade_hellaswag)))
    validation.val_loss(val_model, data_dir, batch_size=2, seq_len=32, batches=2)
    assert len(with_cache) >= 3 and not any(with_cache)


def test_bfloat16_evaluation_scores_like_float32(gpt2_tokenizer, handmade_hellaswag, tmp_path):
    """`--dtype bfloat16`, the default on a GPU, run here on CPU: the same log-likelihoods to bf16's precision."""
    model = saved(opinionated_model(gpt2_tokenizer), gpt2_tokenizer, tmp_path / "model")
    reports = {}
    for dtype in ("float32", "bfloat16"):
        eval_hellaswag.main(["--model", model, "--hellaswag", str(handmade_hellaswag), "--dtype", dtype,
                             "--output", str(tmp_path / f"{dtype}.json")])  # fmt: skip
        reports[dtype] = json.loads((tmp_path / f"{dtype}.json").read_text())
    assert reports["bfloat16"]["dtype"] == "bfloat16"
    for convention in ("completion", "harness"):
        ours, reference = reports["bfloat16"]["results"][0][convention], reports["float32"]["results"][0][convention]
        assert ours == reference  # the choices (endings' log-likelihoods differ by several nats here)
    examples = eval_hellaswag.load_examples(str(handmade_hellaswag))
    fp32, bf16 = (eval_hellaswag.evaluate_hellaswag(opinionated_model(gpt2_tokenizer).to(dtype), gpt2_tokenizer, examples)
                  for dtype in (torch.float32, torch.bfloat16))  # fmt: skip
    for a, b in zip(fp32["scored"], bf16["scored"]):
        torch.testing.assert_close(b["completion"]["loglikelihoods"], a["completion"]["loglikelihoods"], rtol=3e-2, atol=0.1)
