"""The model against the library's own GPT-2: same weights must give the same numbers and tokens."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2Config, GPT2LMHeadModel

from configuration_minigpt import MiniGPTConfig
from conftest import TINY, VOCAB
from modeling_minigpt import MiniGPTForCausalLM



@pytest.fixture(scope="module")
def gpt2_and_ours():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(**TINY)).eval()
    ours = MiniGPTForCausalLM.from_gpt2(gpt2).eval()
    return gpt2, ours


def gpt2_grad_in_our_layout(name, param):
    """GPT-2's Conv1D weights are stored (in, out), ours (out, in) as nn.Linear."""
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    return param.grad.t() if name.endswith(conv1d) else param.grad


def tiny_model(**overrides):
    torch.manual_seed(0)
    return MiniGPTForCausalLM(MiniGPTConfig(**{**TINY, **overrides})).eval()


def test_from_gpt2_logits_loss_and_greedy_tokens_match_transformers(gpt2_and_ours):
    gpt2, ours = gpt2_and_ours
    x = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    labels = x.clone()
    labels[0, :10] = -100  # ignored positions must be ignored the same way
    with torch.no_grad():
        theirs, mine = gpt2(x, labels=labels), ours(x, labels=labels)
    torch.testing.assert_close(mine.logits, theirs.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(mine.loss, theirs.loss, atol=1e-5, rtol=0)
    prompt = x[:, :8]
    generate = dict(max_new_tokens=20, do_sample=False, pad_token_id=VOCAB - 1)
    assert torch.equal(ours.generate(prompt, **generate), gpt2.generate(prompt, **generate))


@pytest.mark.parametrize("pad_vocab_size_multiple", [1, 64])
def test_training_loss_and_every_gradient_match_transformers(pad_vocab_size_multiple):
    """Train mode with gradients takes the chunked loss (no logits kept): loss and gradients must still
    be GPT-2's, with ignored labels, token-count averaging over accumulated micro-batches and
    vocabulary padding."""
    torch.manual_seed(0)
    no_dropout = dict(embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    gpt2 = GPT2LMHeadModel(GPT2Config(**TINY, **no_dropout)).train()
    ours = MiniGPTForCausalLM.from_gpt2(gpt2, pad_vocab_size_multiple=pad_vocab_size_multiple).train()
    x = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(2))
    labels = x.clone()
    labels[1, 5:20] = -100
    for num_items_in_batch in (None, torch.tensor(500)):
        gpt2.zero_grad(), ours.zero_grad()
        theirs = gpt2(x, labels=labels, num_items_in_batch=num_items_in_batch)
        mine = ours(x, labels=labels, num_items_in_batch=num_items_in_batch)
        assert mine.logits is None
        torch.testing.assert_close(mine.loss, theirs.loss, atol=1e-5, rtol=0)
        theirs.loss.backward(), mine.loss.backward()
        for name, param in gpt2.named_parameters():
            grad = gpt2_grad_in_our_layout(name, param)
            mine_grad = ours.get_parameter(name).grad
            torch.testing.assert_close(mine_grad, grad, atol=1e-5, rtol=1e-4, msg=name)


def test_training_under_bf16_autocast_matches_transformers():
    """GPU training runs the chunked loss under bf16 autocast (matmuls in bf16, softmax and the weight
    gradient in fp32): loss and gradients must agree with GPT-2's under the same autocast, to bf16 precision."""
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(**TINY, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)).train()
    ours = MiniGPTForCausalLM.from_gpt2(gpt2, pad_vocab_size_multiple=64).train()
    x = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(3))
    losses = []
    for model in (gpt2, ours):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, labels=x).loss
        loss.backward()
        losses.append(loss)
    assert losses[1].dtype == torch.float32
    torch.testing.assert_close(losses[1], losses[0], atol=2e-2, rtol=0)
    for name, param in gpt2.named_parameters():
        theirs = gpt2_grad_in_our_layout(name, param)
        mine = ours.get_parameter(name).grad[: theirs.shape[0]]
        assert mine.dtype == torch.float32
        assert (mine - theirs).norm() <= 0.05 * theirs.norm(), name


def test_under_autocast_the_residual_stream_is_bf16_and_the_weights_and_their_gradients_fp32():
    """As llm.c trains: the residual stream (the embeddings' sum and every block's output) in autocast's dtype, half
    the bytes of every add and norm along it, while the weights and their gradients stay fp32 for the optimizer.
    Outside autocast everything stays fp32 (the test above holds the bf16 losses and gradients to GPT-2's)."""
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(MiniGPTConfig(**TINY)).train()
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden_states = model.transformer(x, output_hidden_states=True).hidden_states
        model(x, labels=x).loss.backward()
    assert [h.dtype for h in hidden_states[:-1]] == [torch.bfloat16] * TINY["n_layer"]  # the last is after ln_f
    assert {p.dtype for p in model.parameters()} == {p.grad.dtype for p in model.parameters()} == {torch.float32}
    assert {h.dtype for h in model.transformer(x, output_hidden_states=True).hidden_states} == {torch.float32}


def test_chunked_loss_equals_the_plain_loss_across_uneven_chunks():
    from loss_minigpt import causal_lm_loss, chunked_lm_head_loss

    torch.manual_seed(0)
    hidden = torch.randn(3, 40, 16, requires_grad=True)
    weight = torch.randn(100, 16, requires_grad=True)  # 100 tokens, padded to 128 columns inside the loss
    labels = torch.randint(0, 100, (3, 40))
    labels[2, :7] = -100
    chunked = chunked_lm_head_loss(hidden, weight, labels, padded_rows=128, chunk_logits=7 * 128)  # 7-row chunks: 120 = 17 x 7 + 1
    chunked.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = causal_lm_loss(hidden @ weight.t(), labels)
    plain.backward()
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_long_generation_matches_transformers(gpt2_and_ours, batch_size):
    """40 cached decoding steps, one sequence and several: the same tokens and scores as GPT-2."""
    gpt2, ours = gpt2_and_ours
    prompt = torch.randint(0, VOCAB - 1, (batch_size, 8), generator=torch.Generator().manual_seed(3))
    options = dict(max_new_tokens=40, do_sample=False, pad_token_id=VOCAB - 1, eos_token_id=None,
                   output_scores=True, return_dict_in_generate=True)  # fmt: skip
    mine, theirs = ours.generate(prompt, **options), gpt2.generate(prompt, **options)
    assert torch.equal(mine.sequences, theirs.sequences)
    torch.testing.assert_close(torch.stack(mine.scores), torch.stack(theirs.scores), atol=1e-4, rtol=0)


def test_sampling_and_beam_search_match_transformers(gpt2_and_ours):
    gpt2, ours = gpt2_and_ours
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    settings = [
        dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9),
        dict(num_beams=3, do_sample=False),
    ]
    for setting in settings:
        runs = []
        for model in (gpt2, ours):
            torch.manual_seed(3)
            runs.append(model.generate(prompt, max_new_tokens=12, pad_token_id=VOCAB - 1, **setting))
        assert torch.equal(runs[0], runs[1]), setting


def test_generation_with_cache_equals_without(gpt2_and_ours):
    _, ours = gpt2_and_ours
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=15, do_sample=False, pad_token_id=VOCAB - 1)
    assert torch.equal(ours.generate(prompt, use_cache=True, **kwargs), ours.generate(prompt, use_cache=False, **kwargs))


def test_left_padded_batch_equals_each_prompt_alone(gpt2_and_ours):
    _, ours = gpt2_and_ours
    pad = VOCAB - 1
    prompts = [[5, 17, 250, 3, 42, 9], [77, 8], [301, 302, 303]]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch = ours.generate(input_ids, attention_mask=attention_mask, max_new_tokens=10, do_sample=False, pad_token_id=pad)
    with torch.no_grad():
        batch_logits = ours(input_ids, attention_mask=attention_mask).logits
    for row, prompt in enumerate(prompts):
        alone = ours.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=pad)
        assert batch[row, width:].tolist() == alone[0, len(prompt):].tolist()
        with torch.no_grad():
            alone_logits = ours(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(batch_logits[row, width - len(prompt):], alone_logits, atol=1e-5, rtol=0)


def test_logits_to_keep_returns_the_last_positions(gpt2_and_ours):
    _, ours = gpt2_and_ours
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        full = ours(x).logits
        last = ours(x, logits_to_keep=1).logits
        picked = ours(x, logits_to_keep=torch.tensor([0, 5])).logits
        with_loss = ours(x, labels=x, logits_to_keep=3)  # the loss needs every position: all are returned
    assert last.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last, full[:, -1:])
    torch.testing.assert_close(picked, full[:, [0, 5]])
    torch.testing.assert_close(with_loss.logits, full)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_losss_padded_head_changes_no_loss_gradient_or_table(autocast):
    """`pad_vocab_size_multiple` pads the head only inside the training loss (1,000 -> 1,024 columns): the
    tables keep 1,000 rows, and the loss and every gradient are those of the unpadded head, up to the order in
    which the wider matmuls sum."""
    plain, padded = tiny_model().train(), tiny_model(pad_vocab_size_multiple=64).train()
    assert padded.transformer.wte.weight.shape[0] == padded.lm_head.weight.shape[0] == VOCAB
    padded.load_state_dict(plain.state_dict())
    x = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (plain, padded):
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = model(x, labels=x).loss
        results.append((loss, *torch.autograd.grad(loss, list(model.parameters()))))
    tolerance = dict(atol=1e-6, rtol=1e-5) if autocast is None else dict(atol=1e-3, rtol=1e-2)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tolerance)


def test_too_long_prompt_is_a_clear_error(gpt2_and_ours):
    _, ours = gpt2_and_ours
    with pytest.raises(ValueError, match="n_positions=64"):
        ours(torch.zeros(1, 65, dtype=torch.long))


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:  # newer releases warn on the old name; 5.17 has only it
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
        model(x, labels=x).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_training_compiles_to_one_graph_with_the_loss_for_every_length():
    """The training step, loss included, is one graph (`fullgraph=True`: a break raises) that serves every
    sequence length (`dynamic=True`: no recompiles), and inductor's loss and gradients equal eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = tiny_model(pad_vocab_size_multiple=64).train()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    graphs = []
    for length in (8, 13, 21):
        x = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
        labels = x.clone()
        labels[0, :3] = -100
        results = []
        for run in (model, compiled):
            model.zero_grad()
            loss = run(x, labels=labels).loss
            loss.backward()
            results.append((loss, *(p.grad.clone() for p in model.parameters())))
        for eager, fused in zip(*results):
            torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-4)
        graphs.append(counter.frame_count)
    assert graphs[0] == graphs[-1]  # what the first length compiled serves every length
    with torch.no_grad():  # inference compiles whole too
        model.eval()
        torch.testing.assert_close(torch.compile(model, backend="aot_eager", fullgraph=True)(x).logits, model(x).logits)


def forward_and_backward_graphs(model, *args, **kwargs):
    """The aot_autograd forward and backward graphs of a compiled call, and the tensors the forward saves
    for backward (its outputs past the model's own)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    graphs, saved = [], []

    def partition(joint, inputs, **options):
        forward, backward = min_cut_rematerialization_partition(joint, inputs, **options)
        saved.extend(forward.graph.output_node().args[0][options["num_fwd_outputs"] :])
        return forward, backward

    def keep(graph, _):
        graphs.append(graph)
        return make_boxed_func(graph.forward)

    torch._dynamo.reset()
    out = torch.compile(model, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep, partition_fn=partition),
                        fullgraph=True)(*args, **kwargs)  # fmt: skip
    out.loss.backward()
    torch._dynamo.reset()
    return out, graphs, [node.meta["val"] for node in saved if isinstance(node.meta.get("val"), torch.Tensor)]


def test_training_returns_no_logits_and_keeps_none_for_backward():
    """GPT-2 124M at 64 x 1024: the (B, T, V) logits are 6.1 GiB in bf16, 12.3 GiB once accelerate's mixed
    precision converts the outputs to fp32. Training with labels returns none, eager or compiled, and the
    compiled step saves nothing of (tokens, vocabulary) size for backward: each chunk's logits live and die
    inside the forward."""
    model = tiny_model(pad_vocab_size_multiple=64).train()
    x = torch.randint(0, VOCAB, (4, 64))  # more tokens than n_embd, as in any real batch
    assert model(x, labels=x).logits is None
    out, graphs, saved = forward_and_backward_graphs(model, x, labels=x)
    assert out.logits is None and len(graphs) == 2 and saved
    shapes = [tuple(t.shape) for t in saved]
    assert not [s for s in shapes if x.numel() in s and 1024 in s], shapes
    with torch.no_grad():  # evaluation keeps its logits
        assert model(x, labels=x).logits.shape == (4, 64, VOCAB)


class MatmulShapes(TorchDispatchMode):
    """Records the operand shapes of every matrix product."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.seen.append(tuple(tuple(t.shape) for t in args if isinstance(t, torch.Tensor)))
        return func(*args, **(kwargs or {}))


def test_every_lm_head_matmul_is_padded_width_and_padding_rows_get_zero_gradient():
    """GPT-2's 50,257 tokens padded to 50,304 = 64 x 786: the head's three matmuls (logits, and the two
    gradients) must all run at the padded width, which tensor cores take in aligned tiles, eager and
    compiled. The padding rows' gradient is exactly zero."""
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(MiniGPTConfig(**{**TINY, "vocab_size": 50257}, pad_vocab_size_multiple=64)).train()
    x = torch.randint(0, 50257, (2, 16))
    with MatmulShapes() as spy:
        model(x, labels=x).loss.backward()
    head = [shapes for shapes in spy.seen if any(50257 in s or 50304 in s for s in shapes)]
    assert len(head) == 3 and all(any(50304 in s for s in shapes) for shapes in head), head
    assert not [shapes for shapes in head if any(50257 in s for s in shapes)]
    grad = model.lm_head.weight.grad
    assert torch.all(grad[50257:] == 0) and grad[:50257].abs().max() > 0

    model.zero_grad()
    _, graphs, _ = forward_and_backward_graphs(model, x, labels=x)
    products = [[tuple(arg.meta["val"].shape) for arg in node.args if isinstance(arg, torch.fx.Node)]
                for graph in graphs for node in graph.graph.nodes
                if node.op == "call_function" and node.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)]  # fmt: skip
    head = [shapes for shapes in products if any(50257 in s or 50304 in s for s in shapes)]
    assert len(head) == 3 and not [shapes for shapes in head if any(50257 in s for s in shapes)], products
    assert torch.all(model.lm_head.weight.grad[50257:] == 0)


class MatmulDtypes(TorchDispatchMode):
    """Records the operand dtypes of every matrix product, after autocast has cast them."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        operands = {torch.ops.aten.mm.default: args[:2], torch.ops.aten.addmm.default: args[1:3],
                    torch.ops.aten.addmm_.default: args[1:3]}.get(func)  # fmt: skip
        if operands is not None:
            self.seen.append(tuple(t.dtype for t in operands))
        return func(*args, **(kwargs or {}))


def test_chunked_loss_under_bf16_autocast_runs_its_matmuls_in_bf16_with_the_plain_gradients():
    """Autocast never casts in-place ops: the chunk's weight-gradient `addmm_` ran in fp32 (TF32 on a GPU,
    ~9% of the step's FLOPs). Gradients are checked against the plain path under the same autocast."""
    from loss_minigpt import chunked_lm_head_loss

    torch.manual_seed(0)
    hidden = torch.randn(2, 48, 64, requires_grad=True)
    weight = (0.02 * torch.randn(VOCAB, 64)).requires_grad_()
    labels = torch.randint(0, VOCAB, (2, 48))
    labels[0, :5] = -100
    grads = []
    for chunked in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16), MatmulDtypes() as spy:
            if chunked:  # 16 rows a chunk: 6 chunks
                loss = chunked_lm_head_loss(hidden, weight, labels=labels, padded_rows=1024, chunk_logits=16 * 1024)
            else:
                logits = hidden @ weight.t()
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
            hidden_grad, weight_grad = torch.autograd.grad(loss, (hidden, weight))
        if chunked:
            assert len(spy.seen) == 3 * 6 and set(spy.seen) == {(torch.bfloat16, torch.bfloat16)}, spy.seen
        grads.append((loss, hidden_grad, weight_grad))
    for mine, plain in zip(*grads):
        torch.testing.assert_close(mine.float(), plain.float(), rtol=2e-2, atol=2e-4)


def test_gpt2_small_parameter_count():
    with torch.device("meta"):
        model = MiniGPTForCausalLM(MiniGPTConfig.from_preset("124M"))
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    assert model.lm_head.weight is model.transformer.wte.weight


def test_gpt2_family_presets_have_the_published_sizes():
    expected = {"350M": 354_823_168, "774M": 774_030_080, "1558M": 1_557_611_200}
    for name, count in expected.items():
        with torch.device("meta"):
            model = MiniGPTForCausalLM(MiniGPTConfig.from_preset(name))
        assert sum(p.numel() for p in model.parameters()) == count, name


def test_training_attention_takes_the_flash_kernels_condition(monkeypatch):
    """On CUDA, SDPA picks FlashAttention only for `is_causal=True` with no `attn_mask`: training must call it so."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = tiny_model().train()
    x = torch.randint(0, VOCAB, (2, 16))
    model(x, labels=x).loss.backward()
    assert calls == [(None, True)] * TINY["n_layer"]


def test_an_id_outside_the_vocabulary_is_named_at_inference():
    """Before: an IndexError from the embedding, or, for an id among the padding rows (1000-1023 here), logits
    from a row that is no token. Training checks its data where it is read instead."""
    model = tiny_model(pad_vocab_size_multiple=64)
    for bad in (VOCAB, 1023, 5000, -1):
        x = torch.tensor([[1, 2, bad, 3]])
        with pytest.raises(ValueError, match=rf"input id {bad} is outside the model's vocabulary of {VOCAB} tokens"):
            model(x)
    prompt = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=f"input id {VOCAB} is outside"):
        model.generate(torch.tensor([[1, VOCAB]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (1, 5)


def test_a_truncated_weights_file_is_named_in_one_line(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a download or a copy cut short
    with pytest.raises(OSError, match=rf"^{weights} is truncated or corrupt \(.*\): save or download it again$"):
        AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)  # the folder's own copy of our code
