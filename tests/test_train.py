"""train_accelerate.py as users run it: real processes, real DDP (gloo on CPU), real files."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, TINY_RUN, TRAIN, failure, losses, run_script, script_env, step_rows, two_cpu_processes
from token_shards import ShardedTokens, read_meta

def test_a_tiny_run_learns_and_exports_a_loadable_model(uninterrupted, data_dir):
    loss, steps = losses(uninterrupted)
    assert steps == list(range(12))
    assert loss[-1] < loss[0] - 0.5, loss
    final = uninterrupted / "final"
    assert {"model.safetensors", "modeling_minigpt.py", "tokenizer.json", "generation_config.json", "README.md"} <= set(os.listdir(final))
    assert (uninterrupted / "loss.png").stat().st_size > 0
    from transformers import AutoModelForCausalLM, pipeline

    # (Loading as remote code in a clean process is test_hub's; here the class may already be registered.)
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)
    assert type(model).__name__ == "MiniGPTForCausalLM"
    [out] = pipeline("text-generation", model=model, tokenizer=str(final))("def", max_new_tokens=5)
    assert out["generated_text"].startswith("def")
    card = (final / "README.md").read_text()
    assert "final val loss" in card and "12 steps" in card
    checkpoints = sorted(os.listdir(uninterrupted / "checkpoints"))
    assert checkpoints == ["kept.json", "latest", "step_12", "step_8"]  # the last two are kept
    state = json.loads((uninterrupted / "checkpoints" / "step_12" / "training_state.json").read_text())
    assert state == {"step": 12, "data": {"windows_consumed": 48, "seed": 1337, "seq_len": 32}}
    assert not list((uninterrupted / "checkpoints" / "step_12").glob("custom_checkpoint_*"))  # our state is JSON, not pickle


def test_hellaswag_in_the_loop_equals_eval_hellaswag_on_the_export(data_dir, handmade_hellaswag, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval_hellaswag import evaluate_hellaswag, load_examples

    out = tmp_path / "run"
    result = run_script([*TRAIN, *TINY_RUN, "--data_dir", str(data_dir), "--output_dir", str(out), "--max_train_steps", "4",
                  "--eval_steps", "2", "--checkpointing_steps", "0", "--hellaswag", str(handmade_hellaswag)], tmp_path)  # fmt: skip
    assert result.returncode == 0, failure(result)
    rows = step_rows(out)
    evaluated = [row for row in rows if "hellaswag_acc_norm" in row]
    assert [row["step"] for row in evaluated] == [1, 3] and evaluated[-1]["hellaswag_examples"] == 2

    final = out / "final"
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)
    scores = evaluate_hellaswag(model, AutoTokenizer.from_pretrained(final), load_examples(str(handmade_hellaswag)))
    for convention, prefix in [("completion", "hellaswag"), ("harness", "hellaswag_lm_eval")]:
        for metric in ("acc", "acc_norm"):
            assert evaluated[-1][f"{prefix}_{metric}"] == scores[convention][metric]
    assert "lm-evaluation-harness style" in (final / "README.md").read_text()


def test_eval_hellaswag_loads_a_training_checkpoint_like_the_export(uninterrupted, handmade_hellaswag):
    """A checkpoint holds no code and no tokenizer: eval_hellaswag finds the class through the local
    registration and the tokenizer through the run's data_dir. The last checkpoint is the exported model."""
    from eval_hellaswag import evaluate_hellaswag, load, load_examples

    examples = load_examples(str(handmade_hellaswag))
    scores = []
    for path in (uninterrupted / "checkpoints" / "step_12", uninterrupted / "final"):
        model, tokenizer = load(str(path), None, "cpu", torch.float32)
        scores.append(evaluate_hellaswag(model, tokenizer, examples)["scored"])
    assert scores[0] == scores[1]


def test_the_loop_trains_like_a_plain_pytorch_loop_on_transformers_gpt2(data_dir, tmp_path):
    """Golden test: train_accelerate.py's losses, lr and grad norms step for step against an independent
    reference: the same initial weights in transformers' GPT2LMHeadModel, the same windows in the reader's
    order, and a plain loop written here (AdamW with decay on weights but not biases or LayerNorms, the
    warmup+cosine values computed by hand, clipping, loss averaged over accumulated micro-batches).
    An evaluation mid-run must not disturb training."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from configuration_minigpt import MiniGPTConfig
    from modeling_minigpt import MiniGPTForCausalLM

    steps, warmup, accumulation, batch, seq_len = 20, 5, 2, 4, 32
    peak, floor, weight_decay, max_grad_norm = 3e-3, 3e-4, 0.1, 1.0
    meta = read_meta(data_dir)
    shape = dict(n_layer=2, n_head=4, n_embd=64, n_positions=seq_len, vocab_size=meta["vocab_size"])
    torch.manual_seed(0)
    ours = MiniGPTForCausalLM(MiniGPTConfig(**shape, bos_token_id=meta["eot_token_id"], eos_token_id=meta["eot_token_id"]))
    ours.save_pretrained(tmp_path / "init")
    out = tmp_path / "run"
    result = run_script([*TRAIN, "--model", str(tmp_path / "init"), "--data_dir", str(data_dir), "--output_dir", str(out),
                         "--seq_len", str(seq_len), "--per_device_train_batch_size", str(batch),
                         "--gradient_accumulation_steps", str(accumulation), "--max_train_steps", str(steps),
                         "--num_warmup_steps", str(warmup), "--learning_rate", str(peak), "--min_lr_ratio", "0.1",
                         "--weight_decay", str(weight_decay), "--max_grad_norm", str(max_grad_norm),
                         "--eval_steps", "10", "--eval_iters", "2", "--checkpointing_steps", "0"], tmp_path)  # fmt: skip
    assert result.returncode == 0, failure(result)
    logged = step_rows(out)

    gpt2 = GPT2LMHeadModel(GPT2Config(**shape, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)).train()
    conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # stored (in, out) by GPT-2
    gpt2.load_state_dict({k: v.t() if k.endswith(conv1d) else v for k, v in ours.state_dict().items()})
    named = list(gpt2.named_parameters())
    decayed = [p for n, p in named if n.endswith(".weight") and ".ln_" not in n]
    not_decayed = [p for n, p in named if n.endswith(".bias") or ".ln_" in n]
    assert len(decayed) + len(not_decayed) == len(named) and len(decayed) == 4 * shape["n_layer"] + 2  # + wte, wpe
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay}, {"params": not_decayed, "weight_decay": 0.0}],
                                  betas=(0.9, 0.95), eps=1e-8)  # fmt: skip
    windows = ShardedTokens(data_dir, "train", batch, seq_len, seed=1337)  # the training run's default seed
    for step in range(steps):
        lr = peak * (step + 1) / warmup if step < warmup else floor + (peak - floor) * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup))) / 2
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = []
        for _ in range(accumulation):
            window = next(windows)
            logits = gpt2(window[:, :-1]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
            (loss / accumulation).backward()
            losses.append(loss.item())
        norm = torch.nn.utils.clip_grad_norm_(gpt2.parameters(), max_grad_norm).item()
        optimizer.step()
        optimizer.zero_grad()
        row = logged[step]
        assert row["step"] == step and row["lr"] == pytest.approx(lr, rel=1e-12)
        assert row["loss"] == pytest.approx(sum(losses) / accumulation, rel=2e-6), f"step {step}"
        assert row["grad_norm"] == pytest.approx(norm, rel=2e-6), f"step {step}"
    norms = [row["grad_norm"] for row in logged]
    assert min(norms) < max_grad_norm < max(norms)  # clipping both engaged and not
    assert logged[-1]["loss"] < logged[0]["loss"] - 0.5


@pytest.mark.parametrize("optimizer, port", [("adamw", 29533), ("muon", 29534)])
def test_two_process_ddp_equals_one_process_with_twice_the_accumulation(optimizer, port, data_dir, tmp_path):
    common = [*TINY_RUN, "--data_dir", str(data_dir), "--max_train_steps", "6", "--checkpointing_steps", "0",
              "--optimizer", optimizer]  # fmt: skip
    one = run_script([*TRAIN, *common, "--output_dir", str(tmp_path / "one"), "--gradient_accumulation_steps", "2"], tmp_path)
    assert one.returncode == 0, failure(one)
    two = run_script([*two_cpu_processes("train_accelerate.py", port), *common, "--output_dir", str(tmp_path / "two")],
                     tmp_path, ACCELERATE_USE_CPU="true")  # fmt: skip
    assert two.returncode == 0, failure(two)
    assert "2 processes x 1 accumulation" in two.stdout + two.stderr
    rows = {name: step_rows(tmp_path / name) for name in ("one", "two")}
    for key in ("loss", "grad_norm"):  # (equal to the last bit here, Muon's bf16 Newton-Schulz included)
        torch.testing.assert_close([r[key] for r in rows["two"]], [r[key] for r in rows["one"]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_sigkill_then_resume_latest_reproduces_the_uninterrupted_losses(optimizer, uninterrupted, data_dir, tmp_path):
    def command_for(out):
        return [*TRAIN, *TINY_RUN, "--data_dir", str(data_dir), "--output_dir", str(out), "--max_train_steps", "12",
                "--checkpointing_steps", "4", "--optimizer", optimizer]  # fmt: skip

    if optimizer == "muon":  # its own uninterrupted run (the fixture's is AdamW's)
        uninterrupted = tmp_path / "uninterrupted"
        reference = run_script(command_for(uninterrupted), tmp_path)
        assert reference.returncode == 0, failure(reference)
    out = tmp_path / "killed"
    command = command_for(out)
    process = subprocess.Popen(command, cwd=tmp_path, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "latest").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 6:
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # A crash in the middle of a save leaves a temporary directory (the kill may already have left a real
    # one): it must never be resumed from.
    shutil.copytree(out / "checkpoints" / "step_4", out / "checkpoints" / "step_8.tmp", dirs_exist_ok=True)
    (out / "checkpoints" / "step_8.tmp" / "model.safetensors").write_bytes(b"half")
    resumed = run_script([*command, "--resume_from_checkpoint", "latest"], tmp_path)
    assert resumed.returncode == 0, failure(resumed)
    assert "resumed from" in resumed.stdout + resumed.stderr
    loss, steps = losses(out)
    assert steps == list(range(12))
    assert loss == losses(uninterrupted)[0]  # bitwise: same process count, CPU
    if optimizer == "muon":
        assert (out / "checkpoints" / "step_12" / "optimizer_1.bin").exists()  # Muon's momentum buffers


def test_a_checkpoint_saved_with_padded_tables_resumes_to_the_uninterrupted_losses(uninterrupted, data_dir, tmp_path):
    """Checkpoints written before the loss took over the vocabulary padding held the tables, and their AdamW
    moments, with padding rows (here 512 tokens in 576 rows, as a 64-multiple run once saved them): resumed
    at step 8, the run's last 4 losses are the uninterrupted run's, bitwise."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "legacy"
    shutil.copytree(uninterrupted, out, ignore=shutil.ignore_patterns("step_12", "final", ".lock"))
    (out / "checkpoints" / "latest").write_text("step_8")
    (out / "checkpoints" / "kept.json").write_text('["step_8"]')
    checkpoint = out / "checkpoints" / "step_8"
    weights = load_file(checkpoint / "model.safetensors")
    weights["transformer.wte.weight"] = torch.cat([weights["transformer.wte.weight"], torch.randn(64, 64)])
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    padded = 0
    for state in optimizer["state"].values():
        for name, value in state.items():
            if value.shape == (512, 64):
                state[name], padded = torch.cat([value, torch.zeros(64, 64)]), padded + 1
    assert padded == 2  # exp_avg and exp_avg_sq of the table
    torch.save(optimizer, checkpoint / "optimizer.bin")
    resumed = run_script([*TRAIN, *TINY_RUN, "--data_dir", str(data_dir), "--output_dir", str(out), "--max_train_steps",
                          "12", "--checkpointing_steps", "4", "--resume_from_checkpoint", "latest"], tmp_path)  # fmt: skip
    assert resumed.returncode == 0, failure(resumed)
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert losses(out) == losses(uninterrupted)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data_dir", "no/such/dir"], "data directory no/such/dir does not exist"),
        (["--total_batch_size", "1000"], "--total_batch_size 1000 is not a multiple of"),
        (["--model", "MODEL_DIR"], "vocabulary mismatch: the model has vocab_size=1000"),
        (["--resume_from_checkpoint", "CHECKPOINT", "--model", "small"], "cannot resume"),
        (["--resume_from_checkpoint", "latest"], "no complete checkpoint"),
        (["--resume_from_checkpoint", "CHECKPOINT", "--optimizer", "muon"], "trained with --optimizer adamw, with --optimizer muon"),
    ],
)
def test_mistakes_end_in_one_clear_error_before_any_step(extra, message, data_dir, uninterrupted, tmp_path):
    from configuration_minigpt import MiniGPTConfig

    MiniGPTConfig.from_preset("tiny", vocab_size=1000).save_pretrained(tmp_path / "model_dir")
    extra = [e.replace("MODEL_DIR", str(tmp_path / "model_dir")) for e in extra]
    extra = [e.replace("CHECKPOINT", str(uninterrupted / "checkpoints" / "step_12")) for e in extra]
    out = tmp_path / "run"
    result = run_script([*TRAIN, *TINY_RUN, "--data_dir", str(data_dir), "--output_dir", str(out), *extra], tmp_path)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not (out / "metrics.jsonl").exists()


def two_nodes(node_dirs, arguments, port):
    """Two `accelerate launch` "nodes" on localhost (one process each), each started from its own directory."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
              "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
              "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    nodes = [subprocess.Popen([*launch, "--machine_rank", str(rank), str(REPO / "train_accelerate.py"), *arguments],
                              cwd=directory, env=script_env(ACCELERATE_USE_CPU="true"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank, directory in enumerate(node_dirs)]  # fmt: skip
    return [(node.wait(timeout=300), *node.communicate()) for node in nodes]


def test_two_nodes_refuse_separate_disks_and_with_a_shared_one_equal_one_node(data_dir, tmp_path):
    common = [*TINY_RUN, "--data_dir", str(data_dir), "--max_train_steps", "6", "--checkpointing_steps", "3"]
    node_dirs = [tmp_path / "node0", tmp_path / "node1"]
    for directory in node_dirs:
        directory.mkdir()
    separate = two_nodes(node_dirs, [*common, "--output_dir", "run"], 29541)  # a relative path: each node's own disk
    for returncode, stdout, stderr in separate:
        assert returncode != 0 and "is not one shared directory: the processes of rank(s) 1 cannot see" in stderr
    assert not (node_dirs[0] / "run" / "metrics.jsonl").exists() and not (node_dirs[1] / "run" / "checkpoints").exists()

    shared = two_nodes(node_dirs, [*common, "--output_dir", str(tmp_path / "shared")], 29542)
    assert all(returncode == 0 for returncode, _, _ in shared), shared[0][2][-3000:] + shared[1][2][-3000:]
    one_node = run_script([*two_cpu_processes("train_accelerate.py", 29543), *common, "--output_dir", str(tmp_path / "one")],
                          tmp_path, ACCELERATE_USE_CPU="true")  # fmt: skip
    assert one_node.returncode == 0, failure(one_node)
    assert losses(tmp_path / "shared") == losses(tmp_path / "one")  # bitwise
    assert (tmp_path / "shared" / "checkpoints" / "step_6" / "random_states_1.pkl").exists()


def test_fsdp2_trains_evaluates_checkpoints_resumes_and_exports_like_ddp(data_dir, tmp_path):
    """accelerate's FSDP config on 2 CPU processes (gloo), through tests/scripts/fsdp_on_cpu.py: accelerate
    alone would fall back to DDP on CPU. Evaluation (val loss over 3 batches, so the processes get unequal
    shares, and samples) must not hang; the sharded checkpoint resumes; the export gathers full tensors."""
    from transformers import AutoModelForCausalLM

    fsdp = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / "fsdp_8xa100.yaml"),
            "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29551",
            str(REPO / "tests" / "scripts" / "fsdp_on_cpu.py")]  # fmt: skip
    common = [*TINY_RUN, "--data_dir", str(data_dir), "--max_train_steps", "6", "--eval_steps", "3", "--eval_iters", "3",
              "--checkpointing_steps", "3"]  # fmt: skip
    sharded = run_script([*fsdp, *common, "--output_dir", str(tmp_path / "fsdp")], tmp_path, ACCELERATE_USE_CPU="true")
    assert sharded.returncode == 0, failure(sharded)
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step_6"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and not (checkpoint / "model.safetensors").exists()  # FSDP's format
    assert sharded.stdout.count("step 3: val_loss") == 1 and "  > 'def" in sharded.stdout  # evaluated, samples printed

    ddp = run_script([*two_cpu_processes("train_accelerate.py", 29552), *common, "--output_dir", str(tmp_path / "ddp")],
                     tmp_path, ACCELERATE_USE_CPU="true")  # fmt: skip
    assert ddp.returncode == 0, failure(ddp)
    rows = {name: step_rows(tmp_path / name) for name in ("fsdp", "ddp")}
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close([r[key] for r in rows["fsdp"]], [r[key] for r in rows["ddp"]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows["fsdp"][-1]["val_loss"], rows["ddp"][-1]["val_loss"], rtol=1e-5, atol=1e-6)

    exported = {name: AutoModelForCausalLM.from_pretrained(tmp_path / name / "final", trust_remote_code=True) for name in ("fsdp", "ddp")}
    for key, tensor in exported["ddp"].state_dict().items():  # Adam turns fp32 noise in tiny gradients into ~1e-6
        torch.testing.assert_close(exported["fsdp"].state_dict()[key], tensor, rtol=1e-4, atol=1e-5, msg=key)
    assert exported["fsdp"].lm_head.weight is exported["fsdp"].transformer.wte.weight
    assert (tmp_path / "fsdp" / "final" / "model.safetensors").stat().st_size == (tmp_path / "ddp" / "final" / "model.safetensors").stat().st_size

    # Resume from the sharded checkpoint at step 3: the rest of the run again.
    run = tmp_path / "fsdp"
    shutil.rmtree(run / "checkpoints" / "step_6")
    (run / "checkpoints" / "latest").write_text("step_3")
    resumed = run_script([*fsdp, *common, "--output_dir", str(run), "--resume_from_checkpoint", "latest"], tmp_path,
                         ACCELERATE_USE_CPU="true")  # fmt: skip
    assert resumed.returncode == 0 and "step_3 at step 3" in resumed.stdout, resumed.stderr[-3000:]
    again = step_rows(run)
    assert [r["loss"] for r in again] == [r["loss"] for r in rows["fsdp"]]  # bitwise: same processes, CPU


def test_muon_trains_like_a_plain_loop_with_torch_muon_and_adamw(data_dir, tmp_path):
    """The loop with --optimizer muon against one written here, on the same saved model: Muon on the
    blocks' matrices picked by name, AdamW on the rest with decay on 2-D weights, both following the
    warmup+cosine schedule computed by hand from their own peaks, clipping over all parameters, accumulation."""
    from configuration_minigpt import MiniGPTConfig
    from modeling_minigpt import MiniGPTForCausalLM

    steps, warmup, accumulation, batch, seq_len = 8, 2, 2, 4, 32
    peak, muon_peak, weight_decay = 3e-3, 1e-2, 0.1
    meta = read_meta(data_dir)
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(MiniGPTConfig(n_layer=2, n_head=4, n_embd=64, n_positions=seq_len, vocab_size=meta["vocab_size"],
                                             bos_token_id=meta["eot_token_id"], eos_token_id=meta["eot_token_id"]))  # fmt: skip
    model.save_pretrained(tmp_path / "init")
    out = tmp_path / "run"
    result = run_script([*TRAIN, "--model", str(tmp_path / "init"), "--data_dir", str(data_dir), "--output_dir", str(out),
                         "--optimizer", "muon", "--muon_learning_rate", str(muon_peak), "--learning_rate", str(peak),
                         "--seq_len", str(seq_len), "--per_device_train_batch_size", str(batch),
                         "--gradient_accumulation_steps", str(accumulation), "--max_train_steps", str(steps),
                         "--num_warmup_steps", str(warmup), "--min_lr_ratio", "0.1", "--weight_decay", str(weight_decay),
                         "--eval_steps", "0", "--eval_iters", "2", "--checkpointing_steps", "0"], tmp_path)  # fmt: skip
    assert result.returncode == 0, failure(result)
    logged = step_rows(out)

    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script ran (OMP_NUM_THREADS=1): the same fp32 sums, so the same bf16 roundings
    named = list(model.named_parameters())
    matrices = [p for n, p in named if n.split(".")[-2] in ("c_attn", "c_proj", "c_fc") and n.endswith("weight")]
    rest = [p for n, p in named if all(p is not m for m in matrices)]
    adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() == 2], "weight_decay": weight_decay},
                               {"params": [p for p in rest if p.dim() == 1], "weight_decay": 0.0}], betas=(0.9, 0.95), eps=1e-8)  # fmt: skip
    muon = torch.optim.Muon(matrices, weight_decay=weight_decay, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    windows = ShardedTokens(data_dir, "train", batch, seq_len, seed=1337)
    for step in range(steps):
        factor = (step + 1) / warmup if step < warmup else 0.1 + 0.9 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup))) / 2
        for optimizer, top in ((adamw, peak), (muon, muon_peak)):
            for group in optimizer.param_groups:
                group["lr"] = top * factor
        losses = []
        for _ in range(accumulation):
            window = next(windows)
            loss = model(input_ids=window[:, :-1], shift_labels=window[:, 1:]).loss  # the golden test checks this loss
            (loss / accumulation).backward()
            losses.append(loss.item())
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        for optimizer in (adamw, muon):
            optimizer.step()
            optimizer.zero_grad()
        row = logged[step]
        assert row["lr"] == pytest.approx(peak * factor, rel=1e-12) and row["muon_lr"] == pytest.approx(muon_peak * factor, rel=1e-12)
        # Muon orthogonalizes in bf16, where a last-bit difference in a gradient rounds to another bf16 value
        # and grows from step to step (to 5e-4 in 8 steps when the script trained in eval mode): equal to fp32.
        assert row["loss"] == pytest.approx(sum(losses) / accumulation, rel=1e-6), f"step {step}"
        assert row["grad_norm"] == pytest.approx(norm, rel=1e-6), f"step {step}"
    torch.set_num_threads(threads)
    assert logged[-1]["loss"] < logged[0]["loss"] - 0.3
    assert "Muon for the blocks' matrices (peak lr 0.01, momentum 0.95" in (out / "final" / "README.md").read_text()


def test_muon_under_fsdp_is_refused_in_one_line_before_any_step(data_dir, tmp_path):
    """torch.optim.Muon trains on FSDP2's DTensor shards (equal to DDP within 4e-5 over 4 steps), but
    accelerate 1.15 saves one optimizer per FSDP model (optimizer i with model i) and crashed at the
    first checkpoint: the combination is refused up front."""
    fsdp = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / "fsdp_8xa100.yaml"),
            "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29555",
            str(REPO / "tests" / "scripts" / "fsdp_on_cpu.py")]  # fmt: skip
    out = tmp_path / "fsdp"
    result = run_script([*fsdp, *TINY_RUN, "--data_dir", str(data_dir), "--output_dir", str(out), "--optimizer", "muon"],
                        tmp_path, ACCELERATE_USE_CPU="true")  # fmt: skip
    assert result.returncode != 0 and "--optimizer muon does not run under FSDP" in result.stderr, result.stderr[-3000:]
    assert "[rank0]: Traceback" not in result.stderr and not out.exists()  # (the launcher adds its own traceback)


def test_muon_trains_under_compile_and_bf16_autocast(data_dir, tmp_path):
    common = [*TINY_RUN, "--data_dir", str(data_dir), "--max_train_steps", "6", "--checkpointing_steps", "0", "--optimizer", "muon"]
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        result = run_script([*TRAIN, *common, *extra, "--output_dir", str(tmp_path / name)], tmp_path, ACCELERATE_MIXED_PRECISION="bf16")
        assert result.returncode == 0, failure(result)
        assert "cpu bf16" in result.stdout + result.stderr  # autocast really on
        runs[name] = losses(tmp_path / name)[0]
    assert all(math.isfinite(loss) for loss in runs["compiled"]) and runs["compiled"][-1] < runs["compiled"][0]
    torch.testing.assert_close(runs["compiled"], runs["eager"], rtol=2e-2, atol=0)  # bf16: another kernel, other roundings


def test_samples_leave_the_training_random_streams_as_they_were(gpt2_tokenizer):
    """Samples are drawn from a fixed seed, so that they compare across evaluations; dropout's stream goes on
    afterwards as if none had been drawn. (On CUDA the same restore covers every device's generator.)"""
    from configuration_minigpt import MiniGPTConfig
    from modeling_minigpt import MiniGPTForCausalLM
    from train_accelerate import generate_samples

    eot = gpt2_tokenizer.eos_token_id
    model = MiniGPTForCausalLM(MiniGPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=len(gpt2_tokenizer),
                                             bos_token_id=eot, eos_token_id=eot)).train()  # fmt: skip
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first = generate_samples(model, gpt2_tokenizer, "The", seed=7, max_new_tokens=8)
    assert torch.equal(torch.rand(4), expected)
    assert generate_samples(model, gpt2_tokenizer, "The", seed=7, max_new_tokens=8) == first  # the fixed seed
    assert model.training


def test_two_process_ddp_with_bf16_accumulation_and_compile_compiles_once(data_dir, tmp_path):
    """The GPU recipe's path, on gloo: bf16 autocast, accumulation, --compile, two evaluations with samples
    and two checkpoints. dynamo logs what it traces, every graph break and every recompile: the step, loss
    included, must trace without a break and compile once, and the losses follow an eager single process
    with twice the accumulation within bf16's noise."""
    common = [*TINY_RUN, "--data_dir", str(data_dir), "--max_train_steps", "6", "--eval_steps", "3", "--checkpointing_steps", "3"]
    compiled = run_script([*two_cpu_processes("train_accelerate.py", 29561, mixed_precision="bf16"), *common, "--compile",
                           "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / "compiled")],
                          tmp_path, ACCELERATE_USE_CPU="true", TORCH_LOGS="dynamo,recompiles,graph_breaks")  # fmt: skip
    assert compiled.returncode == 0, failure(compiled)
    output = compiled.stdout + compiled.stderr
    assert "bf16 | torch" in output and "2 processes x 2 accumulation" in output  # accelerate engaged bf16
    assert "| DDP buckets 100 MiB, gradients in them" in output  # read off the DDP wrapper accelerate made
    assert "steady state: 5 steps after the first" in output
    assert "torchdynamo start tracing forward" in compiled.stderr  # dynamo ran
    # DDP's own forward runs eagerly around the compiled model, by design: it breaks, the model must not.
    breaks = [line for line in compiled.stderr.splitlines() if "Graph break in user code at" in line]
    assert breaks and not [line for line in breaks if "minigpt" in line], breaks
    assert "Recompiling" not in compiled.stderr, compiled.stderr[-3000:]
    assert output.count("  > 'def") == 4  # two evaluations' samples
    eager = run_script([*TRAIN, *common, "--gradient_accumulation_steps", "4", "--output_dir", str(tmp_path / "eager")],
                       tmp_path, ACCELERATE_MIXED_PRECISION="bf16")  # fmt: skip
    assert eager.returncode == 0, failure(eager)
    assert "cpu bf16 | torch" in eager.stdout + eager.stderr
    rows = {name: step_rows(tmp_path / name) for name in ("compiled", "eager")}
    for key in ("loss", "val_loss"):
        mine, reference = ([r[key] for r in rows[name] if key in r] for name in ("compiled", "eager"))
        torch.testing.assert_close(mine, reference, rtol=2e-2, atol=0)


def test_fsdp2_under_bf16_trains_like_ddp_under_bf16(data_dir, tmp_path):
    """The FSDP config's own mixed precision (bf16), on 2 gloo processes through the FSDP shim, against DDP
    under bf16: the same losses within bf16's noise (FSDP2 casts the parameters; DDP runs autocast)."""
    fsdp = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / "fsdp_8xa100.yaml"),
            "--num_processes", "2", "--main_process_port", "29591", str(REPO / "tests" / "scripts" / "fsdp_on_cpu.py")]  # fmt: skip
    common = [*TINY_RUN, "--data_dir", str(data_dir), "--max_train_steps", "4", "--eval_steps", "2", "--checkpointing_steps", "4"]
    sharded = run_script([*fsdp, *common, "--output_dir", str(tmp_path / "fsdp")], tmp_path, ACCELERATE_USE_CPU="true")
    assert sharded.returncode == 0, failure(sharded)
    assert "bf16 | torch" in sharded.stdout + sharded.stderr  # the config's mixed precision, engaged
    assert (tmp_path / "fsdp" / "checkpoints" / "step_4" / "pytorch_model_fsdp_0").is_dir()  # and FSDP's own checkpoint
    ddp = run_script([*two_cpu_processes("train_accelerate.py", 29592, mixed_precision="bf16"), *common,
                      "--output_dir", str(tmp_path / "ddp")], tmp_path, ACCELERATE_USE_CPU="true")  # fmt: skip
    assert ddp.returncode == 0, failure(ddp)
    rows = {name: step_rows(tmp_path / name) for name in ("fsdp", "ddp")}
    for key in ("loss", "val_loss"):
        mine, reference = ([r[key] for r in rows[name] if key in r] for name in ("fsdp", "ddp"))
        torch.testing.assert_close(mine, reference, rtol=3e-2, atol=0)


def test_val_loss_a_few_rows_at_a_time_equals_the_whole_batch_at_once(data_dir, monkeypatch):
    """Evaluation caps the logits one forward returns (a 64 x 1024 batch at GPT-2's vocabulary would be 12.3 GiB
    once accelerate converts them to fp32): one row at a time gives the loss of the whole batch at once."""
    import validation
    from configuration_minigpt import MiniGPTConfig
    from modeling_minigpt import MiniGPTForCausalLM

    torch.manual_seed(0)
    model = MiniGPTForCausalLM(MiniGPTConfig.from_preset("tiny", vocab_size=read_meta(data_dir)["vocab_size"]))
    whole = validation.val_loss(model, data_dir, 4, 32, 2)
    monkeypatch.setattr(validation, "EVAL_LOGITS", 1)
    window = next(ShardedTokens(data_dir, "val", 4, 32, shuffle=False))
    with torch.no_grad():
        first = F.cross_entropy(model(window[:, :-1]).logits.flatten(0, 1), window[:, 1:].flatten())
    assert validation.val_loss(model, data_dir, 4, 32, 1) == pytest.approx(first.item(), rel=1e-6)
    assert validation.val_loss(model, data_dir, 4, 32, 2) == pytest.approx(whole, rel=1e-6)
