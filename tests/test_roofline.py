"""bench/roofline.py's model of a compiled step, on a graph small enough to count its kernels by hand: what the
partitioner keeps for backward, and the fusions the model assumes inductor makes. The calibration itself (the
published steps it reproduces) needs peers' code that is not shipped: `docs/benchmarks.md`."""

import sys

import torch
import torch.nn.functional as F

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import roofline  # noqa: E402

BATCH, SEQ_LEN, WIDTH, VOCAB = 4, 64, 64, 512
ROWS = BATCH * SEQ_LEN


class Residual(torch.nn.Module):
    """An embedding, one residual add, a LayerNorm and a head: GPT-2's stream in miniature."""

    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(VOCAB, WIDTH)
        self.proj = torch.nn.Linear(WIDTH, WIDTH)
        self.ln = torch.nn.LayerNorm(WIDTH)
        self.head = torch.nn.Linear(WIDTH, VOCAB, bias=False)


def step_loss(model, windows):
    x = model.wte(windows[:, :-1])
    x = x + model.proj(x)
    logits = model.head(model.ln(x))
    return F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten())  # fp32 logits, as nanoGPT's


def compiled_step():
    torch.manual_seed(0)
    windows = torch.randint(0, VOCAB, (BATCH, SEQ_LEN + 1))
    forward, backward = roofline.partitioned_step(Residual().train(), step_loss, windows, autocast=True)
    recorder = roofline.Recorder()
    recorder.compiled = True
    roofline.run_graphs(recorder, forward, backward)
    return backward, recorder


def test_the_partitioner_keeps_the_bf16_logits_for_backward_not_the_fp32_log_softmax():
    """Eager autograd keeps `log_softmax`'s fp32 output (rows x vocabulary) for its backward; the compiled step
    keeps the bf16 product and recomputes the softmax from it. The model of the eager step overcounted this."""
    backward, _ = compiled_step()
    kept = [node.meta["val"] for node in backward.graph.nodes if node.op == "placeholder"]
    vocabulary_sized = [t.dtype for t in kept if isinstance(t, torch.Tensor) and t.numel() == ROWS * VOCAB]
    assert vocabulary_sized == [torch.bfloat16], vocabulary_sized


def test_a_residual_add_and_the_layernorm_after_it_are_one_kernel_that_reads_each_input_once():
    """Between the residual branch's GEMM and the head's, the compiled forward runs two kernels: autocast's
    cast of the head's weight to bf16, and one pass over the rows that reads the embedding and the branch and
    writes the normalized rows (bf16, for the head) and the row statistics; the sum itself is recomputed in
    backward. As separate kernels the add, the statistics and the normalization would read the rows again."""
    _, recorder = compiled_step()
    steps = roofline.kernels(recorder)
    gemms = [i for i, k in enumerate(steps) if k["kind"] == "gemm"]
    between = sorted(steps[gemms[0] + 1 : gemms[1]], key=lambda k: k["kind"])
    assert [k["kind"] for k in between] == ["pointwise", "reduction"], [(k["name"], k["kind"]) for k in between]
    weight_cast, rows_pass = between
    assert weight_cast["bytes"] == VOCAB * WIDTH * (4 + 2)
    one_pass = ROWS * WIDTH * (4 + 2 + 2)  # read the fp32 embedding and the bf16 branch, write the bf16 rows
    assert one_pass <= rows_pass["bytes"] <= one_pass + ROWS * WIDTH * 4 + 4 * ROWS * 4, rows_pass["bytes"]
