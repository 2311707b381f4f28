"""The run's settings (training_settings.py): the command line built from their fields, the types they keep
through a checkpoint's training_args.json, and the files older runs wrote, which still resume."""

import dataclasses
import json
from pathlib import Path

from training_settings import SETTINGS_FILE, TrainingSettings, find_tokenizer

# training_args.json as train_accelerate.py wrote it before the settings were typed (f5154cc): `vars(args)`
# through json with `default=str`, after setup had set the micro-batch it resolved from `auto` and Muon's lr
# from --learning_rate; plus a setting a later release might drop.
WRITTEN_BEFORE = {
    "data_dir": "data/x", "model": "small", "from_gpt2": False, "pad_vocab_size_multiple": 64, "output_dir": "runs/x",
    "seq_len": 64, "per_device_train_batch_size": 4, "device_memory_gib": 20.0, "total_batch_size": 8192,
    "gradient_accumulation_steps": 1, "learning_rate": 0.001, "min_lr_ratio": 0.1, "weight_decay": 0.1,
    "optimizer": "muon", "muon_learning_rate": 0.001, "muon_momentum": 0.95, "muon_adjust_lr": "match_rms_adamw",
    "max_grad_norm": 1.0, "num_warmup_steps": 15, "max_train_steps": 150, "eval_steps": 50, "eval_iters": 10,
    "hellaswag": None, "hellaswag_limit": None, "sample_prompt": "The", "checkpointing_steps": 50,
    "checkpoints_total_limit": 2, "resume_from_checkpoint": None, "with_tracking": False, "report_to": "tensorboard",
    "seed": 1337, "compile": True, "export_gpt2": False, "export_gguf": "q8_0", "license": "mit",
    "push_to_hub": False, "hub_model_id": None, "a_setting_since_removed": 3,
}  # fmt: skip


def test_the_command_line_gives_typed_settings_that_survive_a_checkpoint(tmp_path):
    settings = TrainingSettings.from_command_line(
        ["--output_dir", str(tmp_path / "run"), "--per_device_train_batch_size", "auto", "--device_memory_gib", "20",
         "--seq_len", "64", "--optimizer", "muon", "--learning_rate", "2e-3", "--compile", "--export_gguf", "q8_0"]
    )  # fmt: skip
    assert settings.output_dir == tmp_path / "run" and settings.per_device_train_batch_size == "auto"
    assert settings.seq_len == 64 and settings.device_memory_gib == 20.0 and settings.compile is True
    assert settings.muon_learning_rate is None and settings.muon_peak_lr == 2e-3  # Muon's peak defaults to AdamW's
    (tmp_path / SETTINGS_FILE).write_text(settings.to_json())
    assert TrainingSettings.load(tmp_path / SETTINGS_FILE) == settings
    assert TrainingSettings.from_command_line([]) == TrainingSettings()  # the parser's defaults are the fields'


def test_settings_written_before_they_were_typed_load_with_their_types(tmp_path):
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(WRITTEN_BEFORE))
    loaded = TrainingSettings.load(tmp_path / SETTINGS_FILE)
    assert loaded.output_dir == Path("runs/x") and isinstance(loaded.output_dir, Path)  # a string in the file
    assert loaded.per_device_train_batch_size == 4 and loaded.muon_peak_lr == 0.001
    expected = {k: v for k, v in WRITTEN_BEFORE.items() if k != "a_setting_since_removed"}
    assert dataclasses.asdict(loaded) == {**expected, "output_dir": Path("runs/x")}


def test_a_checkpoint_finds_its_datas_tokenizer_through_its_settings(tmp_path):
    checkpoint = tmp_path / "step_8"
    checkpoint.mkdir()
    (checkpoint / SETTINGS_FILE).write_text(json.dumps(WRITTEN_BEFORE))
    assert find_tokenizer(str(checkpoint), None) == str(Path("data/x") / "tokenizer")
    assert find_tokenizer(str(checkpoint), "gpt2") == "gpt2"  # --tokenizer wins
    (checkpoint / "tokenizer.json").write_text("{}")
    assert find_tokenizer(str(checkpoint), None) == str(checkpoint)  # a folder with its own tokenizer
