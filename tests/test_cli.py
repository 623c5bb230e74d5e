"""The command line: --help, config files, launch configs, and a clear message for every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, accelerate_launch, python, train
from trainer.errors import DataError, user_message
from trainer.train import main


def run_main(capsys, *args: str) -> tuple[int, str]:
    """(exit status, stderr) of `train.py` run in this process."""
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


def test_help_lists_every_flag_with_its_default():
    result = python("trainer/train.py", "--help")
    assert result.returncode == 0, result.stderr
    for flag in ["--batch_size", "--grad_accum", "--train_num_steps", "--lr", "--ema_decay", "--image_size",
                 "--save_and_sample_every", "--num_samples", "--results_path", "--mixed_precision", "--seed",
                 "--resume", "--report_to", "--dataset", "--train_data_dir", "--objective", "--beta_schedule",
                 "--dim_mults", "--config", "--checkpoints_total_limit"]:
        assert flag in result.stdout, flag
    text = " ".join(result.stdout.split())  # undo argparse's line wrapping
    assert "AdamW weight decay. (default: 0.0)" in text
    assert "Peak learning rate of AdamW. (default: 8e-05 (tiny: 0.003; full: 8e-05))" in text
    assert "examples:" in result.stdout


def test_accelerate_launch_help_works_as_users_type_it():
    result = python("-m", "accelerate.commands.launch", "--cpu", "trainer/train.py", "--help")
    assert result.returncode == 0, result.stderr
    assert "--train_data_dir" in result.stdout


@pytest.mark.parametrize("path", sorted((REPO / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load_with_accelerates_own_loader(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 1 and cfg.mixed_precision in ("no", "bf16")


def test_yaml_config_supplies_keys_and_flags_win(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    # PyYAML reads 1e-4 as a string and "1 2" lists as lists: values take the field's type.
    cfg_file.write_text("train:\n  train_num_steps: 3\n  lr: 0.01\n  weight_decay: 1e-4\n"
                        "save_and_sample_every: 3\nadam_betas: [0.9, 0.95]\nrandom_flip: false\n")
    run_dir = train(tmp_path, "--config", str(cfg_file), "--lr", "0.002")
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["train_num_steps"] == 3 and saved["train"]["lr"] == 0.002
    assert saved["train"]["weight_decay"] == 1e-4 and saved["train"]["adam_betas"] == [0.9, 0.95]
    assert saved["data"]["random_flip"] is False


def _bad_inputs(tmp: Path) -> list[tuple[str, list[str], list[str]]]:
    """(case, argv, substrings the message must contain)."""
    empty = tmp / "empty"
    empty.mkdir()
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "a.png").write_bytes(b"not a png")
    (corrupt / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("objective: pred_banana\n")
    unknown_yaml = tmp / "unknown.yaml"
    unknown_yaml.write_text("batchsize: 3\n")
    wrong_type_yaml = tmp / "wrong_type.yaml"
    wrong_type_yaml.write_text("weight_decay: lots\n")
    return [
        ("image size not divisible", ["--image_size", "10", "--dim_mults", "1", "2", "4"],
         ["--image_size 10", "divisible", "2^(levels-1) = 4", "8 or 12"]),
        ("missing data folder", ["--train_data_dir", str(tmp / "nope")], ["--train_data_dir", "does not exist"]),
        ("empty data folder", ["--dataset", "shapes", "--train_data_dir", str(empty)], ["--train_data_dir", str(empty)]),
        ("only corrupt images", ["--dataset", "shapes", "--train_data_dir", str(corrupt)], ["none of the 2 image files", "could be read", str(corrupt)]),
        ("batch size 0", ["--batch_size", "0"], ["--batch_size", "at least 1"]),
        ("steps 0", ["--train_num_steps", "0"], ["--train_num_steps", "at least 1"]),
        ("unknown objective in YAML", ["--config", str(bad_yaml)], ["--objective", "pred_banana", "pred_v"]),
        ("unknown key in YAML", ["--config", str(unknown_yaml)], ["batchsize", "--help"]),
        ("missing YAML", ["--config", str(tmp / "none.yaml")], ["--config", "does not exist"]),
        ("wrong type in YAML", ["--config", str(wrong_type_yaml)], ["--weight_decay 'lots' is not a valid float"]),
        ("linear schedule too short", ["--beta_schedule", "linear", "--timesteps", "20", "--sampling_timesteps", "4"],
         ["--beta_schedule linear needs --timesteps above 20"]),
        ("built-in dataset and a folder", ["--train_data_dir", str(corrupt)], ["--dataset two_modes", "one or the other"]),
        ("resume without checkpoints", ["--resume", "latest", "--results_path", str(tmp / "no_runs")],
         ["--resume latest", "no run with a checkpoint"]),
        ("resume a folder that is no run", ["--resume", str(empty)], ["--resume", "no committed checkpoint"]),
        ("resume auto without a name", ["--resume", "auto"], ["--resume auto needs --run_name"]),
        ("sampling steps above timesteps", ["--timesteps", "30", "--sampling_timesteps", "40"],
         ["--sampling_timesteps 40", "--timesteps 30"]),
        ("checkpoint limit below 2", ["--checkpoints_total_limit", "1"], ["--checkpoints_total_limit"]),
        ("grayscale/RGB only", ["--channels", "4"], ["--channels", "1 (grayscale) or 3"]),
    ]


def test_bad_inputs_get_a_clear_message_and_exit_2(tmp_path, capsys):
    for case, argv, needles in _bad_inputs(tmp_path):
        code, err = run_main(capsys, *TINY, "--train_num_steps", "2", "--results_path", str(tmp_path / "results"),
                             *argv)
        assert code == 2, f"{case}: exit {code}, stderr {err[-2000:]}"
        for needle in needles:
            assert needle in err, f"{case}: {needle!r} not in {err!r}"
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.safetensors"))


@pytest.mark.parametrize("argv,needle", [
    (["--objective", "pred_banana"], "--objective: invalid choice"),
    (["--mixed_precision", "fp4"], "--mixed_precision: invalid choice"),
    (["--beta_schedule", "quadratic"], "--beta_schedule: invalid choice"),
    (["--batch_size", "many"], "--batch_size: invalid int value"),
])
def test_bad_flag_values_are_refused_by_the_parser(capsys, argv, needle):
    code, err = run_main(capsys, *argv)
    assert code == 2 and needle in err


def test_resume_with_an_incompatible_model_names_the_keys(tmp_path, capsys):
    run_dir = train(tmp_path, "--train_num_steps", "2", "--save_and_sample_every", "2")
    code, err = run_main(capsys, *TINY, "--resume", str(run_dir), "--dim", "16", "--dim_mults", "1", "2", "2")
    assert code == 2
    assert "--dim (8 then, 16 now)" in err and "--dim_mults (1 2 then, 1 2 2 now)" in err


def test_resume_refuses_a_checkpoint_whose_weights_do_not_fit(tmp_path, capsys):
    """Weights that do not match the config (e.g. a hand-edited config.json) are named key by key."""
    run_dir = train(tmp_path, "--train_num_steps", "2", "--save_and_sample_every", "2")
    saved = json.loads((run_dir / "config.json").read_text())
    saved["model"]["dim"] = 16
    (run_dir / "config.json").write_text(json.dumps(saved))
    code, err = run_main(capsys, "--resume", str(run_dir))  # everything else comes from the run
    assert code == 2 and "model.safetensors does not fit this model" in err and "shape of" in err


def test_wandb_online_without_a_key_is_refused_before_training(tmp_path):
    result = python("trainer/train.py", *TINY, "--report_to", "wandb", "--results_path", str(tmp_path),
                    env={"WANDB_MODE": "online", "WANDB_API_KEY": "", "HOME": str(tmp_path)})
    assert result.returncode == 2
    assert "no W&B API key" in result.stderr and "WANDB_MODE=offline" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*.safetensors"))


def test_wandb_without_a_key_goes_offline_and_says_how_to_sync(tmp_path):
    result = python("trainer/train.py", *TINY, "--report_to", "wandb", "--results_path", str(tmp_path),
                    "--train_num_steps", "2", "--save_and_sample_every", "2",
                    env={"WANDB_MODE": "", "WANDB_API_KEY": "", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "no W&B API key found: logging offline" in result.stdout
    assert "wandb sync " in result.stdout
    assert len(list(tmp_path.glob("*/wandb/offline-run-*"))) == 1


@pytest.mark.parametrize("argv, needle", [
    (("--wandb_checkpoints", "all", "--report_to", "none"), "--wandb_checkpoints all uploads checkpoints to W&B, but "
                                                            "--report_to is none"),
    (("--wandb_checkpoints", "best", "--report_to", "wandb"), "this run evaluates nothing. Add --fid_every N"),
])
def test_wandb_checkpoint_uploads_that_cannot_happen_are_refused(capsys, tmp_path, argv, needle):
    code, err = run_main(capsys, *TINY, "--results_path", str(tmp_path), *argv)
    assert code == 2 and needle in err
    assert not list(tmp_path.rglob("*.safetensors"))


def test_multi_gpu_without_gpus_is_refused_not_run_twice(tmp_path):
    """`--multi_gpu` on a CPU machine without ACCELERATE_USE_CPU starts independent world-size-1 runs."""
    result = accelerate_launch("trainer/train.py", *TINY, "--results_path", str(tmp_path),
                               env={"ACCELERATE_USE_CPU": None})
    assert result.returncode != 0
    assert "each one sees a world of 1" in result.stderr and "ACCELERATE_USE_CPU=true" in result.stderr
    assert not list(tmp_path.rglob("*.safetensors"))


def test_a_deepspeed_zero3_launch_is_refused_with_the_fsdp_alternative(capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    code, err = run_main(capsys, *TINY, "--train_num_steps", "1")
    assert code == 2 and "ZeRO stage 3" in err and "accelerate_configs/fsdp.yaml" in err


def test_readme_flag_reference_is_current():
    from trainer.config import readme_with_flags

    readme = (REPO / "README.md").read_text()
    assert readme_with_flags(readme) == readme, "run: python -m trainer.config --update-readme"
    for flag in ("--batch_size", "--resume", "--max_rollbacks"):
        assert f"| `{flag}` |" in readme


def test_readme_test_command_is_what_ci_runs():
    assert "./launch.sh test" in (REPO / "README.md").read_text()
    assert "./launch.sh test" in (REPO / ".ci" / "run").read_text()


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise DataError(f"--train_data_dir /data: image {i} could not be read")


def test_an_error_in_a_dataloader_worker_is_shown_as_its_own_message():
    """torch re-raises worker errors with the worker's traceback in the text: show the message only."""
    loader = torch.utils.data.DataLoader(_Unreadable(), batch_size=2, num_workers=1)
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    assert "Traceback" in str(caught.value)  # what torch hands us
    assert user_message(caught.value) == "--train_data_dir /data: image 0 could not be read"
    assert user_message(DataError("plain")) == "plain"


@pytest.mark.parametrize("argv, value", [(["--random_flip", "false"], False), (["--random_flip=yes"], True),
                                         (["--random_flip"], True), (["--no-random_flip"], False),
                                         (["--self_condition", "0"], False)])
def test_boolean_flags_take_the_forms_other_training_scripts_use(argv, value):
    from trainer.train import build_parser

    parsed = vars(build_parser().parse_args(argv))
    assert list(parsed.values()) == [value]


def test_a_boolean_flag_with_another_word_names_the_forms_eddy_takes(capsys):
    from trainer.train import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--random_flip", "maybe"])
    assert "--random_flip maybe: write --random_flip or --random_flip true" in capsys.readouterr().err
