"""Peak GPU memory of one training step, estimated on CPU, without a GPU.

The model, fused AdamW and two training steps (the second holds the optimizer's state) run on fake tensors
(torch's `FakeTensorMode`: shapes and dtypes, no data, no arithmetic), under bf16 autocast as the recipe
trains, and torch's `MemTracker` records what is alive at the peak, by kind: parameters, gradients,
optimizer state, activations, temporaries. Then, per process:

- compiled: the compiler saves other activations for backward than eager does. Both sets are read off the
  forward graph aot_autograd partitions, with inductor's decompositions: its min-cut partitioner (what
  inductor saves) against the default one (everything eager would keep), and the difference is applied;
- DDP adds its gradient buckets (a copy of the gradients, in their dtype);
- FSDP over N processes keeps 1/N of parameters, gradients and optimizer state, and gathers, at a time, the
  root's parameters and two blocks' (the one running and the one prefetched) in bf16, with their gradients.

`bench/bench_memory.py` prints the table; `fit_micro_batch` gives `train_accelerate.py` its micro-batch
(`--per_device_train_batch_size auto`: the largest that fits the device with `MARGIN` to spare).
"""

import functools
import json

import torch
from accelerate import DistributedType
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition
from torch._inductor.decomposition import select_decomp_table
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from configuration_minigpt import MiniGPTConfig
from modeling_minigpt import MiniGPTForCausalLM

GiB = 2**30
MARGIN = 0.10  # of the device's free memory, left for the CUDA context, NCCL, and the allocator's fragmentation
STRATEGIES = ("single", "ddp", "fsdp")


def estimate_peak_bytes(config: MiniGPTConfig, batch_size: int, seq_len: int, compiled=False, strategy="single",
                        world_size=1, autocast=torch.bfloat16) -> int:  # fmt: skip
    """Bytes one process holds at the peak of a training step (`autocast=None`: fp32, no autocast)."""
    return per_process(step_memory(config, batch_size, seq_len, compiled, autocast), compiled, strategy, world_size)


def step_memory(config, batch_size, seq_len, compiled=False, autocast=torch.bfloat16) -> dict:
    """One process's step on one device: MemTracker's peak by kind, its "Total", and with `compiled` the
    "compiled_change" of the activations saved for backward. Feeds `per_process` for every strategy."""
    memory = tracked_peak(config, batch_size, seq_len, autocast)
    if compiled:  # what is saved for backward grows with the batch, window for window: traced at one window
        memory["compiled_change"] = batch_size * compiled_change_per_window(config.to_json_string(), seq_len, autocast)
    memory["gathered_parameters"] = gathered_parameters(config)
    return memory


def per_process(memory: dict, compiled: bool, strategy: str, world_size: int) -> int:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    total = memory["Total"] + (memory["compiled_change"] if compiled else 0)
    if strategy == "ddp":
        total += memory["Parameter"]  # the buckets: gradients are copied into them for the all-reduce
    elif strategy == "fsdp":
        sharded = memory["Parameter"] + memory["Gradient"] + memory["Optstate"]
        total += sharded // world_size - sharded + memory["gathered_parameters"] * (2 + 4)  # bf16, fp32 gradients
    return int(total)


def tracked_peak(config, batch_size, seq_len, autocast) -> dict[str, int]:
    """MemTracker's peak snapshot of two eager steps on fake tensors: bytes by kind, and "Total"."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = MiniGPTForCausalLM(config).train()
        optimizer = torch.optim.AdamW(model.parameters(), fused=True)
        windows = torch.zeros(batch_size, seq_len + 1, dtype=torch.long)
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            for _ in range(2):
                with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
                    loss = model(input_ids=windows[:, :-1], shift_labels=windows[:, 1:]).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tracker.reset_mod_stats()
        (peak,) = tracker.get_tracker_snapshot("peak").values()
    return {str(kind.value if hasattr(kind, "value") else kind): size for kind, size in peak.items()}


@functools.cache
def compiled_change_per_window(config_json: str, seq_len: int, autocast) -> int:
    config = MiniGPTConfig(**json.loads(config_json))
    eager, fused = (saved_for_backward(config, 1, seq_len, autocast, partition)
                    for partition in (default_partition, min_cut_rematerialization_partition))  # fmt: skip
    return fused - eager


def saved_for_backward(config, batch_size, seq_len, autocast, partition) -> int:
    """Bytes the compiled forward graphs hand to backward under `partition`: their outputs beyond the
    model's own, less parameters and inputs (and views of them), which are held anyway."""
    saved = []

    def recording(joint_module, joint_inputs, **kwargs):
        forward, backward = partition(joint_module, joint_inputs, **kwargs)
        saved.append(output_bytes(forward, kwargs["num_fwd_outputs"]))
        return forward, backward

    def run_as_traced(graph, _):  # no code generation: only the partition matters
        return make_boxed_func(graph.forward)

    backend = aot_autograd(fw_compiler=run_as_traced, bw_compiler=run_as_traced, partition_fn=recording,
                           decompositions=select_decomp_table())  # fmt: skip
    torch._dynamo.reset()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = torch.compile(MiniGPTForCausalLM(config).train(), backend=backend)
        windows = torch.zeros(batch_size, seq_len + 1, dtype=torch.long)
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = model(input_ids=windows[:, :-1], shift_labels=windows[:, 1:]).loss
        loss.backward()
    torch._dynamo.reset()
    return sum(saved)


def output_bytes(forward: torch.fx.GraphModule, model_outputs: int) -> int:
    bases = set()
    for node in forward.graph.output_node().args[0][model_outputs:]:
        while node.op == "call_function" and getattr(node.target, "is_view", False):
            node = node.args[0]  # a view allocates nothing: its base does
        if isinstance(node, torch.fx.Node) and node.op != "placeholder":
            bases.add(node)
    return sum(node.meta["val"].numel() * node.meta["val"].element_size() for node in bases
               if isinstance(node.meta.get("val"), torch.Tensor))  # fmt: skip


def gathered_parameters(config) -> int:
    """Parameters FSDP holds unsharded at once: the root's (embeddings, final LayerNorm) and two blocks'."""
    C, V, P = config.n_embd, config.padded_vocab_size, config.n_positions
    block = 12 * C * C + 13 * C  # attention (4 C^2 + 4 C), MLP (8 C^2 + 5 C), two LayerNorms (4 C)
    return V * C + P * C + 2 * C + 2 * block


def largest_micro_batch(config, seq_len, budget_bytes, compiled=False, strategy="single", world_size=1,
                        autocast=torch.bfloat16) -> tuple[int, int]:  # fmt: skip
    """The largest micro-batch whose estimate fits `budget_bytes`, with that estimate; (0, the estimate at 1)
    if none does. The line through the estimates at 1 and 2 gives the first guess (memory grows about
    linearly in the batch, a little faster once the loss's chunks grow with it); bisecting between what
    fits and what does not settles it, in a handful of estimates."""
    def estimate(batch):
        return estimate_peak_bytes(config, batch, seq_len, compiled, strategy, world_size, autocast)

    peaks = {1: estimate(1), 2: estimate(2)}
    fits = max((batch for batch, peak in peaks.items() if peak <= budget_bytes), default=0)
    too_big = min((batch for batch, peak in peaks.items() if peak > budget_bytes), default=None)
    probe = 2 + int((budget_bytes - peaks[2]) // max(1, peaks[2] - peaks[1])) if too_big is None else None
    while probe is not None:
        peaks[probe] = estimate(probe)
        fits, too_big = (probe, too_big) if peaks[probe] <= budget_bytes else (fits, probe)
        upper = too_big if too_big is not None else 2 * fits
        probe = (fits + upper) // 2 if upper - fits > 1 else None
    return (fits, peaks[fits]) if fits else (0, peaks[1])


def fit_micro_batch(args, config, seq_len, accelerator) -> int:
    """The micro-batch to train with. `auto`: the largest whose estimated peak (memory_estimate.py) fits the
    device with MARGIN to spare, and that divides the windows of `--total_batch_size`. An explicit one whose
    estimate does not fit is refused, naming the largest that does. Unchecked where the device's memory is
    unknown (CPU without --device_memory_gib)."""
    free = args.device_memory_gib * GiB if args.device_memory_gib else None
    if free is None and accelerator.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(accelerator.device)
    if free is None:
        if args.per_device_train_batch_size == "auto":
            raise ValueError("--per_device_train_batch_size auto needs the device's memory: on CPU pass --device_memory_gib")
        return args.per_device_train_batch_size
    budget = (1 - MARGIN) * free
    world = accelerator.num_processes
    strategy = {DistributedType.FSDP: "fsdp", DistributedType.NO: "single"}.get(accelerator.distributed_type, "ddp")
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    where = f"{free / GiB:.1f} GiB free less {MARGIN:.0%}, {strategy} over {world}, {'compiled' if args.compile else 'eager'}"
    if args.per_device_train_batch_size != "auto":
        peak = estimate_peak_bytes(config, args.per_device_train_batch_size, seq_len, args.compile, strategy, world, autocast)
        if peak > budget:
            largest, _ = largest_micro_batch(config, seq_len, budget, args.compile, strategy, world, autocast)
            raise ValueError(f"--per_device_train_batch_size {args.per_device_train_batch_size} needs an estimated "
                             f"{peak / GiB:.1f} GiB a device, more than fits ({where}): the largest that fits is "
                             f"{largest} (or pass auto)")  # fmt: skip
        return args.per_device_train_batch_size
    largest, peak = largest_micro_batch(config, seq_len, budget, args.compile, strategy, world, autocast)
    if args.total_batch_size is not None and args.total_batch_size % (seq_len * world) == 0:
        windows = args.total_batch_size // (seq_len * world)  # per process per optimizer step
        largest = max((b for b in range(1, min(largest, windows) + 1) if windows % b == 0), default=0)
        peak = estimate_peak_bytes(config, largest, seq_len, args.compile, strategy, world, autocast) if largest else peak
    if largest == 0:
        raise ValueError(f"not even one window of {seq_len} tokens fits ({where}; it needs an estimated "
                         f"{peak / GiB:.1f} GiB): shard the model (FSDP), or shorten --seq_len")  # fmt: skip
    accelerator.print(f"micro-batch auto: {largest} windows, an estimated {peak / GiB:.1f} GiB a device ({where})")
    return largest
