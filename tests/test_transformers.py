"""The transformers contract beyond `generate`: Trainer, output options, torch.compile with changing
shapes, the static cache, and requests longer than the context. References are transformers' own
GPT2LMHeadModel and the eager model."""

import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import REPO, TINY, VOCAB, script_env
from modeling_minigpt import MiniGPTForCausalLM

GREEDY = dict(do_sample=False, pad_token_id=VOCAB - 1)


@pytest.fixture(scope="module")
def gpt2_and_ours():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(**TINY, attn_implementation="eager")).eval()
    return gpt2, MiniGPTForCausalLM.from_gpt2(gpt2).eval()


def test_trainer_train_then_evaluate_reports_eval_loss(tmp_path):
    """Trainer treats every forward argument with "label" in its name as a label column: with a second
    one it returned no eval_loss. The number must be the model's own mean loss on the eval set."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = MiniGPTForCausalLM.from_gpt2(GPT2LMHeadModel(GPT2Config(**TINY)))
    ids = torch.randint(0, VOCAB, (12, 16), generator=torch.Generator().manual_seed(3))
    rows = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             per_device_eval_batch_size=4, report_to=[], use_cpu=True)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows)
    assert trainer.label_names == ["labels"]
    trainer.train()
    metrics = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        expected = torch.stack([model(ids[i : i + 4], labels=ids[i : i + 4]).loss for i in range(0, 12, 4)]).mean()
    assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_hidden_states_attentions_and_tuples_equal_gpt2(gpt2_and_ours):
    gpt2, ours = gpt2_and_ours
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = gpt2(x, output_hidden_states=True, output_attentions=True)
        mine = ours(x, output_hidden_states=True, output_attentions=True)
        plain = ours(x)
    assert len(mine.hidden_states) == len(theirs.hidden_states) == TINY["n_layer"] + 1
    for a, b in zip(mine.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert len(mine.attentions) == TINY["n_layer"]
    for a, b in zip(mine.attentions, theirs.attentions):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(mine.logits, plain.logits, atol=1e-5, rtol=0)  # the unfused path computes the same
    assert plain.hidden_states is None and plain.attentions is None

    with torch.no_grad():  # a decoding step: one query against the cached keys
        prefix = ours(x[:, :-1], use_cache=True)
        step = ours(x[:, -1:], cache=cache_of(prefix), output_attentions=True)
    torch.testing.assert_close(step.attentions[1], theirs.attentions[1][:, :, -1:], atol=1e-6, rtol=0)

    with torch.no_grad():
        mine_tuple = ours(x, labels=x, return_dict=False, use_cache=False)
        theirs_tuple = gpt2(x, labels=x, return_dict=False, use_cache=False)
    assert isinstance(mine_tuple, tuple) and len(mine_tuple) == len(theirs_tuple) == 2  # (loss, logits)
    torch.testing.assert_close(mine_tuple[1], theirs_tuple[1], atol=1e-5, rtol=0)


def test_compiled_generation_with_dynamic_and_static_caches_equals_eager(gpt2_and_ours):
    from torch._dynamo.testing import CompileCounterWithBackend

    _, ours = gpt2_and_ours
    prompts = [torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 9, 14)]
    eager = [ours.generate(p, max_new_tokens=20, **GREEDY) for p in prompts]
    for cache in ("dynamic", "static"):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        forward = ours.forward
        ours.forward = torch.compile(forward, backend=counter, dynamic=cache == "dynamic", fullgraph=True)
        try:
            for prompt, expected in zip(prompts, eager):
                assert torch.equal(ours.generate(prompt, max_new_tokens=20, cache_implementation=cache, **GREEDY), expected)
        finally:
            ours.forward = forward
        # dynamic: prefill and decoding, for every prompt length; static: the cache keeps every decoding shape
        assert counter.frame_count <= 3 if cache == "dynamic" else counter.frame_count <= 2 * len(prompts), counter.frame_count


def test_static_cache_with_left_padding_equals_the_dynamic_cache(gpt2_and_ours):
    _, ours = gpt2_and_ours
    x = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=15, output_scores=True, return_dict_in_generate=True, **GREEDY)
    dynamic, static = ours.generate(x, **kw), ours.generate(x, cache_implementation="static", **kw)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.scores), torch.stack(dynamic.scores), atol=1e-5, rtol=0)


def test_generating_past_the_context_is_refused_at_the_first_position_beyond_it(gpt2_and_ours):
    """The context check sits in the trunk's forward, which every path passes: generation, scoring, training."""
    _, ours = gpt2_and_ours
    calls = []
    hook = ours.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"sequence of 65 tokens \(64 cached \+ 1 new\) is longer than the model's "
                                             r"context of n_positions=64"):  # fmt: skip
            ours.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10, **GREEDY)
    finally:
        hook.remove()
    assert len(calls) == 5  # the prompt, then every step whose positions fit
    with pytest.raises(ValueError, match=r"sequence of 65 tokens \(0 cached \+ 65 new\)"):
        ours(torch.zeros(1, 65, dtype=torch.long))
    calls.clear()
    hook = ours.register_forward_hook(lambda *_: calls.append(1))
    try:  # a static cache (compiled generation) is preallocated for the whole request: refused at the prompt
        with pytest.raises(ValueError, match=r"a static KV cache of 69 positions is longer than the model's context"):
            ours.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10, cache_implementation="static", **GREEDY)
    finally:
        hook.remove()
    assert calls == []


def cache_of(output):
    """An output's KV cache, under the installed transformers' name for it (`cache` from 5.24)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def test_the_cache_goes_by_either_name_and_nothing_warns():
    """transformers 5.24 hands the KV cache to `forward` as `cache=` (earlier releases: `past_key_values=`) and
    reads it back from the output's `cache` field; a model that missed it decoded every token without context.
    A fresh process, so that transformers' once-per-process deprecation warnings still print."""
    script = textwrap.dedent(f"""
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
        from modeling_minigpt import MiniGPTForCausalLM
        from test_transformers import cache_of

        torch.manual_seed(0)
        gpt2 = GPT2LMHeadModel(GPT2Config(**{TINY!r})).eval()
        ours = MiniGPTForCausalLM.from_gpt2(gpt2).eval()
        prompt = torch.randint(0, {VOCAB}, (2, 6), generator=torch.Generator().manual_seed(1))
        greedy = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False, pad_token_id={VOCAB - 1})
        assert torch.equal(ours.generate(prompt, **greedy), gpt2.generate(prompt, **greedy)), "generation differs"
        with torch.no_grad():
            full = ours(prompt).logits[:, -1]
            for name in ("cache", "past_key_values"):
                cache = cache_of(ours(prompt[:, :-1], use_cache=True))
                step = ours(prompt[:, -1:], **{{name: cache}})
                assert cache_of(step).get_seq_length() == 6, name
                torch.testing.assert_close(step.logits[:, -1], full, atol=1e-5, rtol=0)
            try:
                ours(prompt, cache=cache, past_key_values=cache)
            except ValueError as error:
                assert "pass the KV cache once" in str(error)
            else:
                raise AssertionError("a cache under both names was accepted")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO / "tests", env=script_env(PYTHONPATH=str(REPO)),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    assert result.stderr == "", result.stderr  # no deprecation, no warning


def test_an_older_transformers_is_refused_at_load_in_one_line(tmp_path):
    """The oldest release CI tests is the oldest the model claims: an older one is named at load, by the remote
    code's loader, not found out inside `generate`. (The installed release, reported as 5.16.1.)"""
    from configuration_minigpt import OLDEST_TRANSFORMERS, MiniGPTConfig

    MiniGPTForCausalLM(MiniGPTConfig(**TINY)).save_pretrained(tmp_path / "model")
    script = textwrap.dedent(f"""
        import sys, transformers
        from transformers import AutoModelForCausalLM
        sys.modules["transformers"].__version__ = "5.16.1"
        AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=script_env(HF_MODULES_CACHE=str(tmp_path / "modules")),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"ImportError: MiniGPT needs transformers >= {OLDEST_TRANSFORMERS}, found 5.16.1: "
        f"pip install 'transformers>={OLDEST_TRANSFORMERS}'"
    )


def test_output_attentions_takes_an_additive_float_mask_as_gpt2_does():
    """A 4-D mask may be boolean (True attends) or additive (0 or the dtype's minimum), as generate passes one
    with a static cache: the weights path raised TypeError on a float mask. Both give GPT-2's numbers, and
    compiled-style generation (static cache) with every output returns GPT-2's attentions."""
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(**TINY, attn_implementation="eager")).eval()
    ours = MiniGPTForCausalLM.from_gpt2(gpt2).eval()
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(9))
    allowed = torch.ones(10, 10, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    allowed[1, :, 4:, 2] = False
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        theirs = gpt2(x, attention_mask=additive, output_attentions=True)
        for mask in (additive, allowed):
            mine = ours(x, attention_mask=mask, output_attentions=True)
            torch.testing.assert_close(mine.logits, theirs.logits, atol=1e-5, rtol=0)
            for a, b in zip(mine.attentions, theirs.attentions):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    options = dict(max_new_tokens=5, do_sample=False, cache_implementation="static", output_attentions=True,
                   return_dict_in_generate=True, pad_token_id=VOCAB - 1, attention_mask=torch.ones_like(x[:, :4]))  # fmt: skip
    mine, theirs = ours.generate(x[:, :4], **options), gpt2.generate(x[:, :4], **options)
    assert torch.equal(mine.sequences, theirs.sequences)
    for step_mine, step_theirs in zip(mine.attentions, theirs.attentions):
        for a, b in zip(step_mine, step_theirs):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("pad_to_multiple_of", [None, 64])
def test_adding_tokens_to_a_model_trained_with_a_padded_loss_resizes_as_gpt2(pad_to_multiple_of, tmp_path):
    """The training script's models pad the loss's head to a multiple of 64 rows; their tables hold exactly
    the vocabulary. `resize_token_embeddings` then does what it does to GPT-2: the table has the rows asked
    for (with `pad_to_multiple_of`, the library's convention: the padded rows are tokens, counted in
    `vocab_size`), the new rows are initialised as GPT-2's (the same numbers for the same seed), the tied
    head follows, and the saved folder reloads. Before, the table was padded to 1,024 rows for 1,000 tokens,
    and the library's battery failed (`128 != 138`)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(**TINY)).eval()
    ours = MiniGPTForCausalLM.from_gpt2(gpt2, pad_vocab_size_multiple=64).eval()
    for model in (gpt2, ours):
        torch.manual_seed(1)
        model.resize_token_embeddings(VOCAB + 10, pad_to_multiple_of=pad_to_multiple_of)
    assert ours.config.vocab_size == gpt2.config.vocab_size == ours.transformer.wte.weight.shape[0]
    assert ours.lm_head.weight is ours.transformer.wte.weight
    torch.testing.assert_close(ours.transformer.wte.weight, gpt2.transformer.wte.weight, atol=1e-5, rtol=0)
    x = torch.randint(0, VOCAB + 10, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, gpt2(x).logits, atol=1e-4, rtol=0)
    ours.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, ours(x).logits, atol=0, rtol=0)


def test_the_head_holds_exactly_the_vocabulary_and_its_loss_is_the_models(tmp_path):
    """What TRL (its loss from `get_output_embeddings().weight`), PEFT, vLLM and a user's code read: a
    table of exactly `vocab_size` rows, whose cross-entropy is the model's own training loss (the loss
    pads the head to 64-row multiples inside, where it casts it). Before, a 1,000-token model trained with
    the defaults had 1,024 rows, and TRL's loss counted the 24 padding columns."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(**TINY, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).train()
    ours = MiniGPTForCausalLM.from_gpt2(gpt2, pad_vocab_size_multiple=64).train()  # train: the chunked loss
    ours.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).train()
    assert reloaded.get_output_embeddings().weight.shape[0] == reloaded.get_input_embeddings().weight.shape[0] == VOCAB
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    hidden = reloaded.transformer(x).last_hidden_state
    theirs = torch.nn.functional.cross_entropy((hidden[:, :-1] @ reloaded.get_output_embeddings().weight.t()).flatten(0, 1),
                                               x[:, 1:].flatten())  # fmt: skip
    loss = reloaded(x, labels=x).loss
    torch.testing.assert_close(loss, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, gpt2(x, labels=x).loss, atol=1e-5, rtol=0)


def test_a_folder_saved_with_padded_tables_loads_without_the_padding(tmp_path):
    """Folders and checkpoints written before the loss took over the padding hold tables of 1,024 rows for
    a 1,000-token vocabulary: `from_pretrained` (our class, without remote code) and torch's `load_state_dict`
    (accelerate's checkpoints) load them with exactly the vocabulary, the same logits as GPT-2's."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(**TINY)).eval()
    ours = MiniGPTForCausalLM.from_gpt2(gpt2, pad_vocab_size_multiple=64)
    ours.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    padded = {key: torch.cat([tensor, torch.randn(1024 - VOCAB, tensor.shape[1])]) if key.endswith("wte.weight") else tensor
              for key, tensor in state.items()}  # fmt: skip
    save_file(padded, weights, metadata={"format": "pt"})
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    loaded = MiniGPTForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.transformer.wte.weight.shape[0] == VOCAB and loaded.lm_head.weight is loaded.transformer.wte.weight
    fresh = MiniGPTForCausalLM(ours.config).eval()
    fresh.load_state_dict(padded, strict=False)  # the tied head is stored once
    with torch.no_grad():
        for model in (loaded, fresh):
            torch.testing.assert_close(model(x).logits, gpt2(x).logits, atol=1e-4, rtol=0)


def test_packed_documents_attend_each_within_itself_as_alone(gpt2_and_ours, tmp_path):
    """DataCollatorWithFlattening packs documents into one row and restarts `position_ids` at each: every
    document's logits must be its own, alone (before: 0.09 off, attending across the boundaries, with no
    error), as GPT-2's are; and padding-free fine-tuning through the Trainer must train on the loss of the
    documents alone, the training path (the chunked loss, train mode) included."""
    from datasets import Dataset
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    gpt2, ours = gpt2_and_ours
    generator = torch.Generator().manual_seed(11)
    docs = [torch.randint(0, VOCAB, (n,), generator=generator) for n in (5, 7, 4)]
    packed = DataCollatorWithFlattening()([{"input_ids": d.tolist()} for d in docs])
    with torch.no_grad():
        alone = torch.cat([ours(d[None]).logits[0] for d in docs])
        mine = ours(packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        theirs = gpt2(packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
    torch.testing.assert_close(mine, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs, alone, atol=1e-5, rtol=0)

    model = MiniGPTForCausalLM.from_gpt2(gpt2, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0).train()
    loss = model(**packed).loss  # train mode, gradients on: the chunked loss
    with torch.no_grad():
        logits = [model(d[None]).logits[0, :-1] for d in docs]
    expected = torch.nn.functional.cross_entropy(torch.cat(logits), torch.cat([d[1:] for d in docs]))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)

    rows = Dataset.from_dict({"input_ids": [d.tolist() for d in docs] * 4})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=3, report_to=[],
                             use_cpu=True, learning_rate=0.0, logging_steps=1)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithFlattening())
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected.item(), rel=1e-4)


def test_a_packed_row_longer_than_the_context_is_limited_by_its_positions(gpt2_and_ours):
    """TRL's packing and padding-free batches make one row of documents, each shorter than the context, the row
    longer (120 tokens for a 64-token context here). Before, refused for its length; GPT-2 takes it. The
    logits and the training loss are each document's alone; a position past the context is still an error."""
    gpt2, ours = gpt2_and_ours
    generator = torch.Generator().manual_seed(12)
    docs = [torch.randint(0, VOCAB, (n,), generator=generator) for n in (40, 50, 30)]
    row = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    assert row.shape[1] > TINY["n_positions"]
    with torch.no_grad():
        alone = torch.cat([ours(d[None]).logits[0] for d in docs])
        torch.testing.assert_close(ours(row, position_ids=positions).logits[0], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(gpt2(row, position_ids=positions, use_cache=False).logits[0], alone, atol=1e-5, rtol=0)
    model = MiniGPTForCausalLM.from_gpt2(gpt2, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0).train()
    labels = torch.cat([torch.cat([torch.tensor([-100]), d[1:]]) for d in docs])[None]  # no target across documents
    loss = model(row, position_ids=positions, shift_labels=torch.cat([labels[:, 1:], torch.tensor([[-100]])], 1)).loss
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(torch.cat([model(d[None]).logits[0, :-1] for d in docs]),
                                                     torch.cat([d[1:] for d in docs]))  # fmt: skip
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="position 64 of a sequence of 65 tokens is past the model's context of n_positions=64"):
        ours(row[:, :65], position_ids=torch.arange(65)[None])
