"""A roofline model of the training step on paper: what GPT-2 124M's step (bf16 autocast, fused AdamW, T = 1024)
would take on an A100, H100 or H200, kernel group by kernel group, from the work the step really does; for ours
and for the peers whose published speeds calibrate it.

    python bench/roofline.py                         # today's model, compiled, micro-batch 64
    python bench/roofline.py --revision HEAD~2       # the model as it was at a commit, for before / after
    python bench/roofline.py --peer nanogpt --nanogpt PATH/model.py --attention flash --batch 16   # an anchor
    python bench/roofline.py --peer llmc --nanogpt PATH/model.py                                   # llm.c's stand-in
    python bench/roofline.py --peer modded --nanogpt PATH/records/track_1_short/2024-10-18_PyTorch25/d4bfb25f-*.txt

One training step runs on fake tensors (shapes and dtypes, no arithmetic) under a dispatch mode that records
every aten operation with its operands: compiled, the forward and backward graphs torch.compile hands inductor
(aot_autograd's, split by its min-cut partitioner, which recomputes cheap elementwise results in backward rather
than store them); eager, what autograd runs. Each operation becomes work on the device:

- GEMMs (mm, addmm, bmm): 2 M N K FLOPs at GEMM_EFFICIENCY of the device's dense bf16 peak, times
  MISALIGNED_FACTOR when an operand's leading dimension is not a multiple of 8 (16 bytes of bf16: 50,257
  columns), which keeps cuBLAS off its aligned tensor-core kernels;
- attention (SDPA forward and backward): FlashAttention's causal FLOPs at ATTENTION_EFFICIENCY, by backend;
- the rest, bytes: what a kernel reads and writes, at HBM_EFFICIENCY of the bandwidth, and at least
  KERNEL_FLOOR_S a kernel. Where the step is compiled, elementwise operations are inlined into the kernels
  that read their results and neighbours fuse as inductor fuses them (`kernels`, `fuses`); where it runs
  eagerly (a loss behind `torch.compiler.disable`), every operation is a kernel of its own;
- the optimizer: fused AdamW reads parameter, gradient and both moments and writes three of them (28 bytes a
  parameter), and clipping reads the gradients twice; modded-nanogpt's Muon, as ADAMW_BYTES's comment says.

Operations inside the LM-head loss count as the "loss" group whatever their kind. The efficiencies are
calibrated against the published steps in ANCHORS (where one anchor fixes one number, that number is a fit, not a
check); the device check (bench/gpu_check.sh, its `kernels` step) measures what they stand for.
"""

import argparse
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from metrics import model_flops_per_token  # noqa: E402
from report import write_report  # noqa: E402

DEVICES = {  # dense bf16 FLOP/s and HBM bytes/s, NVIDIA's datasheets (SXM parts)
    "A100 SXM 80GB": dict(flops=312e12, bandwidth=2.039e12),
    "H100 SXM": dict(flops=989e12, bandwidth=3.35e12),
    "H200 SXM": dict(flops=989e12, bandwidth=4.8e12),
}
# Published GPT-2 124M training speeds (tokens/s a GPU, T = 1024), by peer, device and micro-batch: what the model
# must reproduce for code it can trace before its numbers for ours mean anything. nanoGPT's model.py is
# build-nanogpt's GPT; "llmc" is nanoGPT's graph in bf16 throughout, standing in for llm.c (see peer_model).
ANCHORS = [
    ("nanogpt", "A100 SXM 80GB", 16, 16384 / 0.090, "build-nanogpt, 1 A100, compiled, flash attention, 50,304, fused "
     "AdamW: 90 ms a step (Karpathy's 'Let's reproduce GPT-2' chapters: 96 ms, 93 ms padded, 90 ms fused)"),
    ("llmc", "A100 SXM 80GB", 64, 230e3, "llm.c, 8x A100, ~60% MFU"),
    ("llmc", "H100 SXM", 64, 468e3, "llm.c, 8x H100: 524,288 tokens in ~140 ms (modded-nanogpt records, llm.c #481)"),
    ("modded", "H100 SXM", 64, 524288 / 8 / 0.14182, "modded-nanogpt's 2024-10-18 record (PyTorch 2.5), 8x H100, "
     "64 x 1024 a GPU, compiled, bf16 autocast, Muon: 141.82 ms a step over 5,100 steps"),
]  # fmt: skip
# GEMMs with a 768-wide dimension (every GEMM of GPT-2 124M), by device, as calibrated against the anchors: on an
# A100 0.75 reproduces both A100 anchors (build-nanogpt at 1.05, llm.c at 0.98); on Hopper these shapes sit near the
# ridge (989 TFLOP/s over 3.35 TB/s is 295 FLOP/byte; a 65,536 x 768 x 768 GEMM does 383), and 0.53, fitted to
# both H100 anchors at once, leaves llm.c at 1.02 and modded-nanogpt at 0.98. The device check measures it
# (gpu_check: GEMMs at the step's shapes). A 8192^3 GEMM reads ~80% on an H200 (the device tool).
GEMM_EFFICIENCY = {"A100 SXM 80GB": 0.75, "H100 SXM": 0.53, "H200 SXM": 0.53}
# An operand whose leading dimension is not a multiple of 8 (50,257) keeps cuBLAS off its aligned kernels. Calibrated
# on build-nanogpt's A100 step: padding the vocabulary took it from 96 to 93 ms, i.e. its three head GEMMs
# (~16 ms aligned) ran at ~0.85 of the aligned efficiency (this model said 0.53 before: 16% slower, not 3%).
MISALIGNED_FACTOR = 0.85
ATTENTION_EFFICIENCY = {"flash": 0.35, "cudnn": 0.60}  # FA2 on Hopper; cuDNN 1.7-2.3x faster (transformers #48163); A100 too
HBM_EFFICIENCY = 0.80
KERNEL_FLOOR_S = 3e-6  # the smallest a kernel takes, launch gap included
REDUCTIONS = ("amax", "amin", "max", "min", "sum", "mean", "var", "std", "logsumexp", "norm", "nll_loss",
              "linalg_vector_norm")  # fmt: skip
ROW_WISE = ("native_layer_norm", "native_layer_norm_backward")  # eager; a compiled graph has them decomposed
GEMMS = ("mm", "addmm", "bmm", "baddbmm")
MAX_INLINED_SOURCES = 8
INDEXED = ("gather", "index", "index_select", "embedding")  # read only the rows they select
# The optimizer steps, outside the traced step. Fused AdamW reads parameter, gradient and both moments and writes
# three of them (28 bytes a parameter); our clipping reads the gradients twice. modded-nanogpt's Muon (its
# 2024-10-18 record) keeps the matrices of the blocks: each of 8 GPUs updates the momentum of an eighth of them
# (read gradient and buffer, write buffer, Nesterov: 24 bytes a parameter) and orthogonalizes it with 5 bf16
# Newton-Schulz iterations (three GEMMs of 2 m^2 n FLOPs for an m x n matrix, m <= n, and two elementwise kernels
# each); then the bf16 updates of all of them are summed over the 8 GPUs (NCCL all-reduce at NVLINK_BUS_BYTES_S,
# nccl-tests' bus bandwidth on 8x H100 SXM) and applied (read the update, read and write the parameter: 10 bytes).
ADAMW_BYTES, CLIP_BYTES = 28, 8
MUON_GPUS, MUON_STEPS, MUON_MOMENTUM_BYTES, MUON_APPLY_BYTES = 8, 5, 24, 10
NVLINK_BUS_BYTES_S = 360e9


@dataclass
class Op:
    name: str
    region: str  # "trunk" or "loss"
    backward: bool  # run by autograd's backward pass
    eager: bool  # runs as its own kernel (not compiled)
    reads: list  # (buffer, bytes): a buffer is one version of a storage's contents
    writes: list
    kind: str = "pointwise"  # gemm, attention, reduction, indexed, pointwise, free
    flops: float = 0.0
    misaligned: bool = False
    shape: tuple = ()  # a reduction's (elements read, results), an elementwise operation's (elements written,)
    row_wise: bool = False  # a reduction over each row's last dimension (a norm's statistics, a softmax's sum)


@dataclass
class Recorder(TorchDispatchMode):
    """Every aten operation of what runs under it, with the buffers it reads and writes. An in-place operation
    writes a new version of its storage, so a buffer id names contents, not memory."""

    loss_eager: bool = False
    region: str = "trunk"
    backward: bool = False
    ops: list = field(default_factory=list)
    versions: dict = field(default_factory=dict)  # storage -> the buffer id of its current contents

    def __post_init__(self):
        super().__init__()

    def buffer(self, tensor):
        return self.versions.setdefault(tensor.untyped_storage()._cdata, ("input", len(self.versions)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        reads = [(self.buffer(t), nbytes(t)) for t in inputs]
        input_storages = {t.untyped_storage()._cdata for t in inputs}
        out = func(*args, **(kwargs or {}))
        outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        name = func.overloadpacket.__name__
        in_place = name.endswith("_") or name == "copy"
        if not outputs or name in FREE or (not in_place and all(t.untyped_storage()._cdata in input_storages for t in outputs)):
            return out  # a view, a query, an allocation: no data moves
        writes = []
        for t in outputs:
            self.versions[t.untyped_storage()._cdata] = ("written", len(self.ops), len(writes))
            writes.append((self.versions[t.untyped_storage()._cdata], nbytes(t)))
        op = Op(name, self.region, self.backward, self.loss_eager and self.region == "loss", reads, writes)
        if name in GEMMS:
            a, b = inputs[-2:]
            op.kind, op.flops = "gemm", 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
            op.misaligned = any(max(t.stride()) % 8 for t in (*inputs[-2:], *outputs) if t.dim() >= 2)
        elif "scaled_dot_product" in name:
            q, k = inputs[:2]
            forward = 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3] / 2  # causal: half the scores
            op.kind, op.flops = "attention", forward * (2.5 if "backward" in name else 1)
        elif name in INDEXED:  # reads the index and the rows it selects
            op.kind = "indexed"
            op.reads = [(b, n) for (b, n), t in zip(reads, inputs) if not t.is_floating_point()] + writes
        elif name in SCATTERS:  # updates the rows it is given: reads them and the index, writes them
            op.kind = "indexed"
            if in_place:
                op.reads, op.writes = reads[1:], [(writes[0][0], nbytes(inputs[-1]))]
        elif name in ROW_WISE:
            pass  # normalizes rows of n_embd: one pass, fused with what reads it (a persistent reduction)
        elif name in REDUCTIONS or max(t.numel() for t in outputs) < max((t.numel() for t in inputs), default=0) // 2:
            op.kind = "reduction"
            source = max(inputs, key=torch.Tensor.numel)
            op.shape = (source.numel(), max(t.numel() for t in outputs))
            op.row_wise = source.dim() > 0 and op.shape[1] * source.shape[-1] == op.shape[0]
        if op.kind == "pointwise":
            op.shape = (max(t.numel() for t in outputs),)
        self.ops.append(op)
        return out


FREE = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense", "lift_fresh",
        "detach", "alias")  # fmt: skip
SCATTERS = ("index_add", "index_add_", "index_put", "index_put_", "scatter_add", "scatter_add_", "embedding_dense_backward")
# The functional forms of an in-place update of part of a buffer (`x[rows] = y` in a traced graph): inductor writes
# them into the buffer itself when nothing reads its old contents afterwards (its re-inplacing pass).
FUNCTIONAL_UPDATES = ("slice_scatter", "select_scatter", "index_put", "scatter", "scatter_add")


def nbytes(t):
    return t.numel() * t.element_size()


def record_step(modeling, batch: int, seq_len: int, compiled: bool, peer: str = "minigpt", nanogpt_path=None,
                nanogpt_vocab: int = 50304) -> Recorder:  # fmt: skip
    """One training step of GPT-2 124M on fake tensors, its operations tagged trunk or loss: ours (`modeling`),
    or a peer whose published speed anchors the model: nanoGPT's `GPT` (build-nanogpt's: full logits at the
    vocabulary padded to 50,304, then `F.cross_entropy`) or transformers' `GPT2LMHeadModel` (sdpa, 50,257).
    A peer's loss is not tagged: its head and cross-entropy count in the trunk's groups.

    Compiled, the step is the two graphs torch.compile would hand inductor (`partitioned_step`); eager, it is
    what autograd runs, recorded as it runs. (Ours runs the same operations on every device; a revision before
    2026-12-04 summed its weight gradient with a CUDA-only fp32-output `addmm`, modelled here by the CPU form
    it took on these fake tensors.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = modeling.MiniGPTConfig.from_preset("124M", vocab_size=50257, pad_vocab_size_multiple=64)
    eager_loss = peer == "minigpt" and (getattr(modeling.chunked_lm_head_loss, "_torchdynamo_disable", False) or not compiled)
    recorder = Recorder(loss_eager=eager_loss)
    original = modeling.chunked_lm_head_loss

    def tagged(*args, **kwargs):  # eager: recorded as it runs; compiled: the graphs' nodes carry the tag
        recorder.region = "loss"
        try:
            with torch.fx.traceback.annotate({"region": "loss"}):
                return original(*args, **kwargs)
        finally:
            recorder.region = "trunk"

    windows = torch.zeros(batch, seq_len + 1, dtype=torch.long)
    modeling.chunked_lm_head_loss = tagged
    try:
        if compiled:  # real weights (a second or two on the CPU): the partitioner only traces them
            model, step_loss = peer_model(peer, modeling, config, seq_len, nanogpt_path, nanogpt_vocab)
            forward, backward = partitioned_step(model, step_loss, windows, autocast=peer != "llmc")
            run_graphs(recorder, forward, backward)
        else:
            with FakeTensorMode(allow_non_fake_inputs=True):
                model, step_loss = peer_model(peer, modeling, config, seq_len, nanogpt_path, nanogpt_vocab)
                with recorder:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=peer != "llmc"):
                        loss = step_loss(model, windows)
                    recorder.backward = True
                    loss.backward()
    finally:
        modeling.chunked_lm_head_loss = original
    recorder.compiled = compiled
    recorder.parameters = sum(p.numel() for p in model.parameters())
    # Muon's matrices (modded-nanogpt's blocks), as (rows, columns)
    recorder.muon = [tuple(p.shape) for p in model.transformer.h.parameters()] if peer == "modded" else []
    recorder.config = config
    return recorder


class _Partitioned(Exception):
    """Raised once the graphs exist: nothing is compiled or run."""


def partitioned_step(model, step_loss, windows, autocast: bool):
    """The forward and backward graphs torch.compile hands inductor for one training step: aot_autograd's joint
    graph in inductor's decompositions, split by the min-cut partitioner, which saves for backward what is
    cheapest to keep and recomputes cheap elementwise results (a softmax from its logits, a norm from its
    input) instead of storing them. The decisions do not depend on the device."""
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    graphs = []

    def partition(joint, joint_inputs, **kwargs):
        graphs.extend(min_cut_rematerialization_partition(joint, joint_inputs, compiler="inductor", **kwargs))
        raise _Partitioned

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, windows):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return step_loss(self.model, windows)

    step = Step()
    for module in step.modules():  # a tensor kept as a plain attribute (a rotary table) becomes an input, as a buffer
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                delattr(module, name)
                module.register_buffer(name, value, persistent=False)
    state = {**dict(step.named_parameters()), **dict(step.named_buffers())}
    traced = aot_function(lambda state, w: torch.func.functional_call(step, state, (w,)), fw_compiler=None,
                          partition_fn=partition, decompositions=select_decomp_table())  # fmt: skip
    try:
        with torch.fx.traceback.preserve_node_meta():
            traced(state, windows)
    except _Partitioned:
        return graphs
    raise RuntimeError("aot_autograd made no backward graph")


def run_graphs(recorder: Recorder, forward, backward):
    """Runs the partitioned graphs on their own fake tensors under the recorder: the forward's saved results are
    the backward's inputs (the same names), the incoming gradient a fake tensor of ones."""

    class Tagged(torch.fx.Interpreter):
        def run_node(self, node):
            recorder.region = node.meta.get("custom", {}).get("region", "trunk")
            return super().run_node(node)

    def inputs(graph):
        return [node for node in graph.graph.nodes if node.op == "placeholder"]

    fake_mode = inputs(forward)[0].meta["val"].fake_mode
    with fake_mode:
        values = [n.meta["val"] for n in inputs(forward)]
        with recorder:
            results = Tagged(forward).run(*values)
        outputs = dict(zip([getattr(n, "name", None) for n in forward.graph.output_node().args[0]], results))
        gradients = [outputs[n.name] if n.name in outputs else torch.ones_like(n.meta["val"]) for n in inputs(backward)]
        recorder.backward = True
        with recorder:
            Tagged(backward).run(*gradients)
    recorder.region = "trunk"


def peer_model(peer: str, modeling, config, seq_len: int, nanogpt_path=None, nanogpt_vocab=50304):
    """The model in train mode, and its loss on (B, T + 1) windows."""
    if peer == "minigpt":
        model = modeling.MiniGPTForCausalLM(config).train()
        return model, lambda m, w: m(input_ids=w[:, :-1], shift_labels=w[:, 1:]).loss
    if peer == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        gpt2 = GPT2LMHeadModel(GPT2Config(n_positions=config.n_positions, resid_pdrop=0.0, embd_pdrop=0.0,
                                          attn_pdrop=0.0, attn_implementation="sdpa")).train()  # fmt: skip
        return gpt2, lambda m, w: m(input_ids=w[:, :-1], labels=w[:, :-1]).loss
    import importlib.util

    if peer == "modded":  # the record's log opens with its training script: the model is what precedes `# int main`
        code = Path(nanogpt_path).read_text().split("\n", 1)[1].split("# int main")[0]
        record = {"__name__": "modded_nanogpt"}
        exec(compile(code, str(nanogpt_path), "exec"), record)
        gpt = record["GPT"](record["GPTConfig"]()).train()  # its defaults: 50,304, 12 layers, 6 heads of 128, 768
        for rotary in (m for m in gpt.modules() if isinstance(m, record["Rotary"])):
            rotary(torch.empty(1, seq_len))  # its tables are made on first use: here, or a trace would keep its own
        return gpt, lambda m, w: m(w[:, :-1].contiguous(), w[:, 1:].contiguous(), return_logits=False)[1]
    # "llmc" stands in for llm.c, which no tracer can follow: nanoGPT's graph in bf16 throughout (llm.c keeps
    # activations, the residual stream and gradients in bf16, fp32 master weights in its optimizer), compiled,
    # as its hand-fused kernels are.
    spec = importlib.util.spec_from_file_location("nanogpt_model", nanogpt_path)
    nanogpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nanogpt)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if peer == "llmc" else default)  # made in bf16: fake tensors cannot be cast
    try:
        gpt = nanogpt.GPT(nanogpt.GPTConfig(block_size=config.n_positions, vocab_size=nanogpt_vocab, n_layer=config.n_layer,
                                            n_head=config.n_head, n_embd=config.n_embd, dropout=0.0, bias=True)).train()  # fmt: skip
    finally:
        torch.set_default_dtype(default)
    return gpt, lambda m, w: m(w[:, :-1].contiguous(), w[:, 1:].contiguous())[1]  # its loader hands contiguous x, y


def kernels(recorder: Recorder) -> list[dict]:
    """The recorded operations as device kernels. GEMMs, attention, reductions, gathers and scatters are
    kernels of their own; eager operations too. A compiled elementwise operation is inlined into whatever
    reads its result (the compiler's default) unless that result must exist in memory: read by a GEMM,
    attention or an eager operation, kept for the backward pass, read by nothing in the step (a gradient, a
    result), or computed from more than MAX_INLINED_SOURCES stored buffers. A kernel reads the stored buffers
    its inlined inputs come from, each once, and writes its results. Compiled neighbours fuse as `fuses` says."""
    readers = {}
    for op in recorder.ops:
        for buffer, _ in op.reads:
            readers.setdefault(buffer, []).append(op)
    sources = {}  # an inlined buffer -> the stored buffers it is computed from, with their bytes

    def stored(op, buffer, reads):
        return (not recorder.compiled or op.eager or buffer not in readers or len(reads) > MAX_INLINED_SOURCES
                or any(r.kind in ("gemm", "attention") or r.eager or r.backward > op.backward for r in readers[buffer]))  # fmt: skip

    def origin(buffer, size):
        return sources.get(buffer, {buffer: size})

    def in_place(op):
        base = op.reads[0][0] if op.reads else None
        return recorder.compiled and op.name in FUNCTIONAL_UPDATES and base not in sources and readers[base][-1] is op

    result = []
    for op in recorder.ops:
        if in_place(op):  # reads what it writes in, writes that much; the rest of the buffer stays as it is
            update = max(n for _, n in op.reads[1:])
            op = replace(op, kind="indexed", reads=op.reads[1:], writes=[(op.writes[0][0], update)])
        reads = {}
        for buffer, size in op.reads:
            reads.update(origin(buffer, size))
        if op.kind == "pointwise" and not op.eager and not any(stored(op, b, reads) for b, _ in op.writes):
            for buffer, _ in op.writes:
                sources[buffer] = reads
            continue
        group = "loss" if op.region == "loss" else op.kind if op.kind in ("gemm", "attention") else "elementwise"
        kernel = {"group": group, "kind": op.kind, "flops": op.flops, "misaligned": op.misaligned, "name": op.name,
                  "reads": reads, "writes": dict(op.writes), "shape": op.shape, "row_wise": op.row_wise,
                  "fusible": recorder.compiled and not op.eager and op.kind in ("pointwise", "reduction")}  # fmt: skip
        target = fusion_target(result, kernel)
        if target:  # one kernel: what both read, read once
            target["reads"].update({b: n for b, n in reads.items() if b not in target["writes"]})
            target["writes"].update(kernel["writes"])
            if kernel["kind"] == "reduction" and target["kind"] == "pointwise":
                target.update(kind="reduction", shape=kernel["shape"], row_wise=kernel["row_wise"])
            continue
        result.append(kernel)
    for kernel in result:
        kernel["bytes"] = sum(kernel.pop("reads").values()) + sum(kernel.pop("writes").values())
    return result


def fusion_target(result: list, kernel: dict):
    """The kernel since the last one that cannot fuse (a GEMM, attention, an eager operation) that `kernel`
    fuses into, if any: inductor fuses by the graph, not by the order of operations, so `kernel` may join one
    before the kernels in between, unless it reads what one of those writes."""
    if not kernel["fusible"]:
        return None
    for earlier in reversed(result):
        if not earlier["fusible"] or earlier["group"] != kernel["group"]:
            return None
        if fuses(earlier, kernel):
            return earlier
        if set(kernel["reads"]) & set(earlier["writes"]):
            return None
    return None


def fuses(previous: dict, kernel: dict) -> bool:
    """Whether inductor makes one kernel of two fusible kernels of the same group that share a buffer:
    elementwise kernels over the same elements (one loop); reductions over the same elements (a norm's
    statistics; a row maximum and the sum of exp(x - max), the online softmax); and a row reduction with the
    elementwise work over its elements or its results that produces its input or reads its result (an add,
    the norm after it and its 1/std; a softmax and its output: one pass a row, what the pass re-reads coming
    from the cache)."""
    if not set(kernel["reads"]) & (set(previous["reads"]) | set(previous["writes"])):
        return False
    kinds = (previous["kind"], kernel["kind"])
    if kinds in (("pointwise", "pointwise"), ("reduction", "reduction")):
        return previous["shape"] == kernel["shape"]
    reduction, pointwise = (previous, kernel) if kinds[0] == "reduction" else (kernel, previous)
    return reduction["row_wise"] and pointwise["shape"][0] in reduction["shape"]


def seconds(kernel: dict, name: str, attention: str) -> float:
    device = DEVICES[name]
    memory = kernel["bytes"] / (device["bandwidth"] * HBM_EFFICIENCY)
    if kernel.get("kind") == "gemm":
        efficiency = GEMM_EFFICIENCY[name] * (MISALIGNED_FACTOR if kernel["misaligned"] else 1.0)
        compute = kernel["flops"] / (device["flops"] * efficiency)
    elif kernel.get("kind") == "attention":
        compute = kernel["flops"] / (device["flops"] * ATTENTION_EFFICIENCY[attention])
    else:
        compute = 0.0
    return max(compute, memory, KERNEL_FLOOR_S)


def optimizer_seconds(recorder: Recorder, name: str) -> float:
    """The optimizer step (see ADAMW_BYTES): fused AdamW with clipping for every parameter, or, for modded-nanogpt,
    unclipped AdamW for the parameters outside the blocks and Muon for the blocks' matrices."""
    device = DEVICES[name]
    memory = device["bandwidth"] * HBM_EFFICIENCY
    if not recorder.muon:
        return recorder.parameters * (ADAMW_BYTES + CLIP_BYTES) / memory
    matrices = sum(rows * columns for rows, columns in recorder.muon)
    total = (recorder.parameters - matrices) * ADAMW_BYTES / memory
    total += matrices * (MUON_MOMENTUM_BYTES / MUON_GPUS + MUON_APPLY_BYTES) / memory
    gemm = device["flops"] * GEMM_EFFICIENCY[name]
    for rows, columns in recorder.muon[::MUON_GPUS]:  # one GPU's share
        m, n = min(rows, columns), max(rows, columns)
        gemms = [2 * m * m * n] * 3
        per_iteration = sum(max(f / gemm, KERNEL_FLOOR_S) for f in gemms) + 2 * max(2 * m * n * 2 / memory, KERNEL_FLOOR_S)
        total += MUON_STEPS * per_iteration
    return total + 2 * (MUON_GPUS - 1) / MUON_GPUS * matrices * 2 / NVLINK_BUS_BYTES_S


def predict(recorder: Recorder, batch: int, seq_len: int, attention: str) -> dict:
    steps = kernels(recorder)
    tokens = batch * seq_len
    model_flops = model_flops_per_token(recorder.config, seq_len) * tokens
    out = {}
    for name, device in DEVICES.items():
        groups = {"gemm": 0.0, "attention": 0.0, "elementwise": 0.0, "loss": 0.0}
        for kernel in steps:
            groups[kernel["group"]] += seconds(kernel, name, attention)
        groups["optimizer"] = optimizer_seconds(recorder, name)
        total = sum(groups.values())
        out[name] = {"ms": {k: 1000 * v for k, v in groups.items()}, "step_ms": 1000 * total,
                     "share": {k: v / total for k, v in groups.items()}, "tokens_per_s": tokens / total,
                     "mfu": model_flops / total / device["flops"]}  # fmt: skip
    loss = [k for k in steps if k["group"] == "loss"]
    out["work"] = {"kernels": len(steps), "loss_kernels": len(loss), "loss_bytes": sum(k["bytes"] for k in loss),
                   "loss_gemm_flops": sum(k["flops"] for k in loss), "misaligned_gemms": sum(bool(k.get("misaligned")) for k in steps),
                   "model_flops": model_flops, "tokens": tokens}  # fmt: skip
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--revision", default=None, help="the model files at this git revision (default: the working tree)")
    p.add_argument("--batch", type=int, default=64, help="micro-batch (windows of --seq_len)")
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--eager", action="store_true", help="the eager step (default: torch.compile)")
    p.add_argument("--attention", choices=list(ATTENTION_EFFICIENCY), default="cudnn",
                   help="the SDPA backend training runs (cudnn: what the training script prefers on Hopper)")  # fmt: skip
    p.add_argument("--peer", choices=["minigpt", "nanogpt", "gpt2", "llmc", "modded"], default="minigpt",
                   help="whose step: ours, nanoGPT's model.py (needs --nanogpt), transformers' GPT2LMHeadModel, llm.c's "
                        "stand-in, or modded-nanogpt's 2024-10-18 record (--nanogpt: the record's .txt log)")  # fmt: skip
    p.add_argument("--nanogpt", default=None, help="the path of nanoGPT's model.py, or of modded-nanogpt's record (not shipped)")
    p.add_argument("--nanogpt_vocab", type=int, default=50304, help="nanoGPT's table: 50304 (padded) or 50257")
    p.add_argument("--output", default=None, help="default: bench/results/roofline-<date>.json")
    args = p.parse_args(argv)
    if args.peer in ("nanogpt", "llmc", "modded") and not args.nanogpt:
        p.error(f"--peer {args.peer} needs --nanogpt PATH/model.py")
    torch.set_num_threads(1)
    if args.revision:
        from revision import model_at

        modeling = model_at(args.revision)
    else:
        import modeling_minigpt as modeling
    recorder = record_step(modeling, args.batch, args.seq_len, not args.eager, args.peer, args.nanogpt, args.nanogpt_vocab)
    prediction = predict(recorder, args.batch, args.seq_len, args.attention)
    work = prediction["work"]
    print(f"GPT-2 124M ({args.peer}), {args.batch} x {args.seq_len}, bf16, {'eager' if args.eager else 'compiled'}, {args.attention} "
          f"attention, model at {args.revision or 'the working tree'}: {work['kernels']} kernels ({work['loss_kernels']} "
          f"in the loss, {work['loss_bytes'] / 1e9:.1f} GB moved there), {work['misaligned_gemms']} misaligned GEMMs")  # fmt: skip
    for name in DEVICES:
        d = prediction[name]
        groups = " | ".join(f"{k} {v:.1f} ms ({d['share'][k]:.0%})" for k, v in d["ms"].items())
        anchor = [a for a in ANCHORS if a[:3] == (args.peer, name, args.batch)]
        against = f"; published {anchor[0][3]:,.0f}: predicted / published {d['tokens_per_s'] / anchor[0][3]:.2f}" if anchor else ""
        print(f"  {name}: {d['step_ms']:.1f} ms a step, {d['tokens_per_s']:,.0f} tokens/s, MFU {d['mfu']:.1%}{against}\n    {groups}")
    assumptions = {"gemm": GEMM_EFFICIENCY, "misaligned_factor": MISALIGNED_FACTOR, "attention": ATTENTION_EFFICIENCY,
                   "hbm": HBM_EFFICIENCY, "kernel_floor_s": KERNEL_FLOOR_S}  # fmt: skip
    write_report("roofline", {"args": vars(args), "assumptions": assumptions, "devices": DEVICES, **prediction}, args.output)


if __name__ == "__main__":
    main()
