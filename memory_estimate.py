"""Peak GPU memory of one training step, estimated on CPU, without a GPU.

The model, fused AdamW and two training steps (the second holds the optimizer's state) run on fake tensors
(torch's `FakeTensorMode`: shapes and dtypes, no data, no arithmetic), under bf16 autocast as the recipe
trains, and torch's `MemTracker` records what is alive at the peak, by kind: parameters, gradients,
optimizer state, activations, temporaries. Then, per process:

- compiled: the compiler saves other activations for backward than eager does. Both sets are read off the
  forward graph aot_autograd partitions, with inductor's decompositions: its min-cut partitioner (what
  inductor saves) against the default one (everything eager would keep), and the difference is applied;
- DDP adds nothing: the training script keeps the gradients in DDP's buckets (`gradient_as_bucket_view`),
  which would otherwise be a second copy of them;
- FSDP over N processes keeps 1/N of parameters, gradients and optimizer state, and gathers, at a time, the
  root's parameters and two blocks' (the one running and the one prefetched) in bf16, with their gradients.

`bench/bench_memory.py` prints the table; `fit_micro_batch` gives `train_accelerate.py` its micro-batch
(`--per_device_train_batch_size auto`: the largest that fits the device, the estimate's error and `MARGIN`
allowed for) and checks an explicit one, each estimate kept in a cache so that a second start (a resume)
makes none.
"""

import functools
import hashlib
import json
import os
import time
from pathlib import Path

import torch
from accelerate import DistributedType
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition
from torch._inductor.decomposition import select_decomp_table
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from atomic_writes import write_text_atomically
from configuration_minigpt import MiniGPTConfig
from modeling_minigpt import MiniGPTForCausalLM

GiB = 2**30
MARGIN = 0.10  # of the device's free memory, left for the CUDA context, NCCL, and the allocator's fragmentation
# The estimate read 0.83-0.89x of the peaks measured on CPU (bench/bench_memory.py --check): a step is taken to
# need the estimate / 0.83, so that the worst measured error still fits.
ESTIMATE_ERROR = 1 / 0.83
STRATEGIES = ("single", "ddp", "fsdp")
PROBE_WINDOWS = 8  # the batch the compiled partition is traced at (see compiled_change_per_window)


def estimate_peak_bytes(config: MiniGPTConfig, batch_size: int, seq_len: int, compiled=False, strategy="single",
                        world_size=1, autocast=torch.bfloat16) -> int:  # fmt: skip
    """Bytes one process holds at the peak of a training step (`autocast=None`: fp32, no autocast)."""
    return per_process(step_memory(config, batch_size, seq_len, compiled, autocast), compiled, strategy, world_size)


def step_memory(config, batch_size, seq_len, compiled=False, autocast=torch.bfloat16) -> dict:
    """One process's step on one device: MemTracker's peak by kind, its "Total", and with `compiled` the
    "compiled_change" of the activations saved for backward. Feeds `per_process` for every strategy."""
    memory = tracked_peak(config, batch_size, seq_len, autocast)
    if compiled:
        memory["compiled_change"] = batch_size * compiled_change_per_window(config.to_json_string(), seq_len, autocast)
    memory["gathered_parameters"] = gathered_parameters(config)
    return memory


def per_process(memory: dict, compiled: bool, strategy: str, world_size: int) -> int:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    total = memory["Total"] + (memory["compiled_change"] if compiled else 0)
    if strategy == "fsdp":
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
def compiled_change_per_window(config_json: str, seq_len: int, autocast) -> float:
    """What the compiled step saves for backward beyond eager, per window, traced at PROBE_WINDOWS windows.
    The trunk's share grows window for window; the loss's does not, but at several windows both partitions
    keep the same for it (its two gradients), where at one window min-cut keeps the last chunk's smaller
    softmax instead and recomputes the rest, which would scale into a large false saving."""
    config = MiniGPTConfig(**json.loads(config_json))
    eager, fused = (saved_for_backward(config, PROBE_WINDOWS, seq_len, autocast, partition)
                    for partition in (default_partition, min_cut_rematerialization_partition))  # fmt: skip
    return (fused - eager) / PROBE_WINDOWS


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
    C, V, P = config.n_embd, config.vocab_size, config.n_positions
    block = 12 * C * C + 13 * C  # attention (4 C^2 + 4 C), MLP (8 C^2 + 5 C), two LayerNorms (4 C)
    return V * C + P * C + 2 * C + 2 * block


class Estimates:
    """Estimated peaks of one setup (model, window, compiled, strategy, processes, autocast) by micro-batch,
    counted, and cached on disk ($XDG_CACHE_HOME/minigpt/memory_estimates.json), keyed by the setup, the torch
    release and the source of the model and of this estimator, so that a second start (a resume) estimates
    nothing. Only the node's first process writes the cache."""

    def __init__(self, config, seq_len, compiled=False, strategy="single", world_size=1, autocast=torch.bfloat16,
                 write_cache=True):  # fmt: skip
        self.setup = (config, seq_len, compiled, strategy, world_size, autocast)
        sources = [Path(__file__).with_name(name).read_bytes() for name in SOURCES]
        self.key = hashlib.sha256(repr((config.to_json_string(), *self.setup[1:], torch.__version__, sources)).encode()).hexdigest()
        self.path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minigpt" / "memory_estimates.json"
        self.write_cache = write_cache
        self.made, self.seconds = 0, 0.0  # estimates made here, and their time

    def __call__(self, batch: int) -> int:
        cache = self.read()
        if str(batch) not in cache.get(self.key, {}):
            started = time.perf_counter()
            peak = estimate_peak_bytes(self.setup[0], batch, *self.setup[1:])
            self.made, self.seconds = self.made + 1, self.seconds + time.perf_counter() - started
            if not self.write_cache:
                return peak
            cache.setdefault(self.key, {})[str(batch)] = peak
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(self.path, json.dumps(cache))
        return cache[self.key][str(batch)]

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: estimated afresh
            return {}


SOURCES = ("memory_estimate.py", "modeling_minigpt.py", "loss_minigpt.py", "configuration_minigpt.py")


def largest_divisor_that_fits(estimate, budget_bytes, windows: int) -> int:
    """The largest divisor of `windows` (a step's windows per process) whose estimate fits, 0 if none does,
    tried from the largest down. Memory grows about linearly in the batch, so when the first two do not fit,
    the line through their estimates names the largest divisor predicted to fit, which is estimated next:
    usually three estimates in all."""
    candidates = [b for b in range(windows, 0, -1) if windows % b == 0]
    peaks = {}
    for batch in candidates[:2]:
        peaks[batch] = estimate(batch)
        if peaks[batch] <= budget_bytes:
            return batch
    if len(candidates) < 3:
        return 0
    first, second = candidates[:2]
    slope = (peaks[first] - peaks[second]) / (first - second)
    predicted = second - (peaks[second] - budget_bytes) / max(slope, 1)
    for batch in candidates[2:]:
        if batch <= predicted and estimate(batch) <= budget_bytes:
            return batch
    return 0


def largest_that_fits(estimate, budget_bytes) -> int:
    """The largest micro-batch whose estimate fits, 0 if none does. The line through the estimates at 1 and 2
    gives the first guess (memory grows about linearly in the batch, a little faster once the loss's chunks
    grow with it); bisecting between what fits and what does not settles it, in a handful of estimates."""
    peaks = {1: estimate(1), 2: estimate(2)}
    fits = max((batch for batch, peak in peaks.items() if peak <= budget_bytes), default=0)
    too_big = min((batch for batch, peak in peaks.items() if peak > budget_bytes), default=None)
    probe = 2 + int((budget_bytes - peaks[2]) // max(1, peaks[2] - peaks[1])) if too_big is None else None
    while probe is not None:
        peaks[probe] = estimate(probe)
        fits, too_big = (probe, too_big) if peaks[probe] <= budget_bytes else (fits, probe)
        upper = too_big if too_big is not None else 2 * fits
        probe = (fits + upper) // 2 if upper - fits > 1 else None
    return fits


def usable_bytes(free_bytes: float) -> float:
    """What a step's estimate may reach on a device with `free_bytes` free: MARGIN kept, the estimate's error allowed."""
    return (1 - MARGIN) * free_bytes / ESTIMATE_ERROR


def fit_micro_batch(settings, config, seq_len, windows_per_step, accelerator) -> int:
    """The micro-batch to train with. `auto`: the largest whose estimated peak (above) fits the device, and that
    divides `windows_per_step` (each process's windows per optimizer step, from `--total_batch_size`; None
    without one). An explicit one whose estimate does not fit is refused, naming the largest that does.
    Unchecked where the device's memory is unknown (CPU without --device_memory_gib)."""
    requested = settings.per_device_train_batch_size
    free = settings.device_memory_gib * GiB if settings.device_memory_gib else None
    if free is None and accelerator.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(accelerator.device)
    if free is None:
        if requested == "auto":
            raise ValueError("--per_device_train_batch_size auto needs the device's memory: on CPU pass --device_memory_gib")
        return requested
    budget = usable_bytes(free)
    world = accelerator.num_processes
    strategy = {DistributedType.FSDP: "fsdp", DistributedType.NO: "single"}.get(accelerator.distributed_type, "ddp")
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    compiled = settings.compile
    estimate = Estimates(config, seq_len, compiled, strategy, world, autocast, accelerator.is_local_main_process)
    where = (f"{free / GiB:.1f} GiB free, less {MARGIN:.0%}, for {ESTIMATE_ERROR:.2f}x the estimate; {strategy} over "
             f"{world}, {'compiled' if compiled else 'eager'}")  # fmt: skip

    def largest():
        if windows_per_step:
            return largest_divisor_that_fits(estimate, budget, windows_per_step)
        return largest_that_fits(estimate, budget)

    if requested != "auto":
        peak = estimate(requested)
        if peak > budget:
            raise ValueError(f"--per_device_train_batch_size {requested} needs an estimated {peak / GiB:.1f} GiB a "
                             f"device, more than fits ({where}): the largest that fits is {largest()} (or pass auto)")  # fmt: skip
        return requested
    batch = largest()
    if batch == 0:
        raise ValueError(f"not even one window of {seq_len} tokens fits ({where}; it needs an estimated "
                         f"{estimate(1) / GiB:.1f} GiB): shard the model (FSDP), or shorten --seq_len")  # fmt: skip
    accelerator.print(f"micro-batch auto: {batch} windows, an estimated {estimate(batch) / GiB:.1f} GiB a device "
                      f"({where}; {estimate.made} estimates made, {estimate.seconds:.0f} s)")  # fmt: skip
    return batch
