"""The compiled training step as a GPU compiles it, on a machine without one.

A CUDA build of torch (CI's floor environment: PyPI's torch==2.11.0, the GPU image's) makes fake CUDA tensors
without a driver, and the compiler's device-independent stages run on them for CUDA: dynamo, CUDA bf16 autocast,
aot_autograd with inductor's decompositions, and inductor's lowering of each graph into its IR. Device
properties (what reductions size their splits by) are an H100's, stated below. Where it stops, and why:

- the trunk's backward: the autograd engine asks the driver for a primary context
  (`GraphTask::stash_current_streams`) before it runs any node on a CUDA tensor, so aot_autograd cannot trace a
  joint forward-backward graph. The forward is traced with frozen parameters instead; the loss, whose gradients
  are made in its forward pass, is traced with those gradients as outputs;
- SDPA's kernel choice reads the device: without one it takes the math path (the graph has bmm, not cuDNN or
  flash attention), which `tests/test_model.py` checks the preconditions of instead;
- inductor's scheduling and code generation: Triton's GPU backend asks the driver.
"""

import types

import pytest
import torch

from configuration_minigpt import MiniGPTConfig
from conftest import TINY
from loss_minigpt import CHUNK_LOGITS, LMHeadCrossEntropy
from modeling_minigpt import MiniGPTForCausalLM

pytestmark = pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch, which makes fake CUDA "
                                "tensors without a driver (CI's floor environment: torch==2.11.0 from PyPI)")  # fmt: skip

H100 = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
                             total_memory=80 * 2**30, regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                             max_threads_per_block=1024, warp_size=32, L2_cache_size=50 * 2**20)  # fmt: skip


@pytest.fixture
def h100(monkeypatch):
    """What the compiler and autocast read of the device, answered for an H100 where no driver can."""
    from torch._dynamo.device_interface import CudaInterface

    properties = staticmethod(lambda device=None: H100)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (H100.major, H100.minor))
    monkeypatch.setattr(CudaInterface, "get_device_properties", properties)
    monkeypatch.setattr(CudaInterface.Worker, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def lower_for_cuda(graph: torch.fx.GraphModule, inputs) -> None:
    """Inductor's lowering of an aten graph into its IR for the inputs' device (CUDA): every op must lower."""
    from torch._guards import detect_fake_mode
    from torch._inductor.graph import GraphLowering
    from torch._inductor.virtualized import V

    lowering = GraphLowering(graph, example_inputs=inputs)
    with V.set_graph_handler(lowering), V.set_fake_mode(detect_fake_mode(inputs)):
        lowering.run(*inputs)


def matmul_dtypes(graph: torch.fx.GraphModule) -> set:
    return {tuple(arg.meta["val"].dtype for arg in node.args[-2:]) for node in graph.graph.nodes
            if node.op == "call_function" and node.target == torch.ops.aten.mm.default}  # fmt: skip


def test_the_compiled_training_forward_traces_and_lowers_for_cuda_under_bf16_autocast(h100):
    """As training calls it: the model in train mode, `torch.compile(fullgraph=True)`, CUDA bf16 autocast, the
    chunked loss (vocabulary 1000 padded to 1024)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode

    graphs = []

    def lowered(graph, inputs):
        lower_for_cuda(graph, inputs)
        graphs.append(graph)
        return make_boxed_func(graph.forward)

    backend = aot_autograd(fw_compiler=lowered, decompositions=select_decomp_table())
    with FakeTensorMode(allow_non_fake_inputs=True):
        with torch.device("cuda"):
            model = MiniGPTForCausalLM(MiniGPTConfig(**TINY, pad_vocab_size_multiple=64)).train().requires_grad_(False)
            windows = torch.zeros(2, 17, dtype=torch.long)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.compile(model, backend=backend, fullgraph=True)(input_ids=windows[:, :-1], shift_labels=windows[:, 1:]).loss
    assert loss.device.type == "cuda" and loss.dtype == torch.float32 and loss.shape == ()
    assert len(graphs) == 1 and matmul_dtypes(graphs[0]) == {(torch.bfloat16, torch.bfloat16)}  # autocast engaged


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_losss_gradients_trace_and_lower_for_cuda(h100, autocast):
    """The loss's forward pass with the gradients it saves for backward as outputs (under `torch.compile` they are
    part of the training step's forward graph): traced with inductor's decompositions for CUDA tensors, then
    lowered. At GPT-2's vocabulary, padded to 50,304 in the loss, two chunks."""
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    class Saved:  # the Function's context: what it saves is returned
        def save_for_backward(self, *tensors):
            self.tensors = tensors

    def loss_and_gradients(hidden, weight, targets, divisor):
        ctx = Saved()
        rows = CHUNK_LOGITS // 50304
        with torch.autocast("cuda", dtype=autocast or torch.float32, enabled=autocast is not None):
            total = LMHeadCrossEntropy.forward(ctx, hidden, weight, targets, 50304, divisor, rows)
        return (total, *ctx.tensors)

    with FakeTensorMode(allow_non_fake_inputs=True):
        with torch.device("cuda"):
            rows = CHUNK_LOGITS // 50304 + 100  # one full chunk and a short one
            inputs = (torch.empty(rows, 768), torch.empty(50257, 768), torch.zeros(rows, dtype=torch.long), torch.tensor(rows))
        # Functionalized, as aot_autograd hands inductor every graph: no in-place op is left to lower.
        graph = make_fx(functionalize(loss_and_gradients, remove="mutations_and_views"),
                        decomposition_table=select_decomp_table())(*inputs)  # fmt: skip
        assert not [node for node in graph.graph.nodes if str(node.target).endswith("_.default")]
        lower_for_cuda(graph, inputs)
    outputs = graph.graph.output_node().args[0]
    assert [tuple(node.meta["val"].shape) for node in outputs] == [(), (rows, 768), (50257, 768)]
    assert {node.meta["val"].device.type for node in outputs} == {"cuda"}
    assert matmul_dtypes(graph) == {(autocast or torch.float32,) * 2}
