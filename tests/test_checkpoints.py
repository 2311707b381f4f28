"""checkpoints.py in-process, with a real Accelerator and real files: what a save leaves on disk, the
order resume tries checkpoints in, the fallback past a damaged one, the refusals, and the run lock.
(The subprocess runs in test_train.py and test_reliability.py kill and resume whole runs.)"""

import json

import pytest
import torch
from accelerate import Accelerator

from checkpoints import (KEPT, LATEST, check_same_model, checkpoint_candidates, load_checkpoint, lock_output_dir,
                         save_checkpoint, save_tied_head_once)  # fmt: skip
from configuration_minigpt import MiniGPTConfig
from modeling_minigpt import MiniGPTForCausalLM
from training_settings import TrainingSettings

CONFIG = dict(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=50, bos_token_id=49, eos_token_id=49)


def prepared(tmp_path, seed=0):
    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    model = MiniGPTForCausalLM(MiniGPTConfig(**CONFIG)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_save_state_pre_hook(save_tied_head_once)
    args = TrainingSettings(output_dir=tmp_path, checkpoints_total_limit=2)
    return accelerator, model, optimizer, args


def train_one_step(model, optimizer):
    x = torch.randint(0, 50, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_saves_are_complete_the_pointer_names_the_newest_and_only_the_last_k_stay(tmp_path):
    accelerator, model, optimizer, args = prepared(tmp_path)
    root = tmp_path / "checkpoints"
    (root / "step_2.tmp").mkdir(parents=True)  # left by a save that was killed
    (root / "step_2.tmp" / "junk").write_text("half-written")
    for step in (1, 2, 3):
        train_one_step(model, optimizer)
        save_checkpoint(accelerator, model.config, args, step, {"position": 10 * step})
    assert sorted(p.name for p in root.iterdir()) == sorted([KEPT, LATEST, "step_2", "step_3"])
    assert (root / LATEST).read_text() == "step_3" and json.loads((root / KEPT).read_text()) == ["step_2", "step_3"]
    assert not (root / "step_2" / "junk").exists()
    state = json.loads((root / "step_3" / "training_state.json").read_text())
    assert state == {"step": 3, "data": {"position": 30}}
    assert json.loads((root / "step_3" / "training_args.json").read_text())["checkpoints_total_limit"] == 2
    assert MiniGPTConfig.from_json_file(root / "step_3" / "config.json").n_embd == 16


def test_latest_tries_the_newest_then_the_older_kept_ones(tmp_path):
    accelerator, model, optimizer, args = prepared(tmp_path)
    for step in (1, 2):
        save_checkpoint(accelerator, model.config, args, step, {})
    root = tmp_path / "checkpoints"
    assert checkpoint_candidates("latest", tmp_path) == [root / "step_2", root / "step_1"]
    (root / "step_2" / "config.json").unlink()  # incomplete: never tried
    assert checkpoint_candidates("latest", tmp_path) == [root / "step_1"]
    assert checkpoint_candidates(str(root / "step_1"), tmp_path) == [root / "step_1"]
    with pytest.raises(ValueError, match="is not a complete checkpoint directory"):
        checkpoint_candidates(str(root / "step_2"), tmp_path)
    with pytest.raises(ValueError, match="no complete checkpoint in"):
        checkpoint_candidates("latest", tmp_path / "elsewhere")


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_exactly(tmp_path):
    accelerator, model, optimizer, args = prepared(tmp_path)
    train_one_step(model, optimizer)
    save_checkpoint(accelerator, model.config, args, 1, {"position": 1})
    at_step_1 = weights(model)
    rng_at_step_1 = torch.get_rng_state()
    train_one_step(model, optimizer)
    save_checkpoint(accelerator, model.config, args, 2, {"position": 2})
    newest = tmp_path / "checkpoints" / "step_2" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated

    fresh_accelerator, fresh, fresh_optimizer, _ = prepared(tmp_path, seed=1)  # other weights
    checkpoint, state = load_checkpoint(fresh_accelerator, checkpoint_candidates("latest", tmp_path))
    assert checkpoint.name == "step_1" and state == {"step": 1, "data": {"position": 1}}
    for name, tensor in weights(fresh).items():
        torch.testing.assert_close(tensor, at_step_1[name], rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), rng_at_step_1)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight  # still tied after loading
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1  # the optimizer's state came back too

    (tmp_path / "checkpoints" / "step_1" / "training_state.json").write_text("{")
    with pytest.raises(ValueError, match=r"step_2 is unreadable .*; .*step_1 is unreadable"):
        load_checkpoint(fresh_accelerator, checkpoint_candidates("latest", tmp_path))


def test_resuming_into_another_model_or_optimizer_is_refused(tmp_path):
    accelerator, model, optimizer, args = prepared(tmp_path)
    save_checkpoint(accelerator, model.config, args, 1, {})
    checkpoint = tmp_path / "checkpoints" / "step_1"
    check_same_model(checkpoint, MiniGPTConfig(**CONFIG), "adamw")  # the same: accepted
    with pytest.raises(ValueError, match="different model \\(n_layer: checkpoint 1, now 2\\)"):
        check_same_model(checkpoint, MiniGPTConfig(**{**CONFIG, "n_layer": 2}), "adamw")
    with pytest.raises(ValueError, match="trained with --optimizer adamw, with --optimizer muon"):
        check_same_model(checkpoint, MiniGPTConfig(**CONFIG), "muon")


def test_the_tied_head_is_saved_once():
    model = MiniGPTForCausalLM(MiniGPTConfig(**CONFIG))
    state = model.state_dict()
    save_tied_head_once([model], [state], None)
    assert "lm_head.weight" not in state and "transformer.wte.weight" in state


def test_one_run_per_output_directory(tmp_path):
    held = lock_output_dir(tmp_path)
    with pytest.raises(ValueError, match=r"in use by another training run \(pid \d+\)"):
        lock_output_dir(tmp_path)
    held.close()  # the holder ends: the directory is free again
    lock_output_dir(tmp_path).close()
