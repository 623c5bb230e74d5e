"""FSDP2: two CPU processes launched with accelerate_configs/fsdp.yaml shard the network for real.

The reference is DDP on the same data and seeds: sharding must not change what is learned. The
checkpoints are full state dicts, so an FSDP run resumes bit-exactly, and DDP, FSDP and a single
process can each continue a run that another began.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import TINY, config_launch, train
from test_multiprocess import launch_ok
from test_train import assert_same, final_weights
from trainer.checkpoint import list_checkpoints
from trainer.errors import ConfigError
from trainer.parallel.fsdp import DEFAULT_WRAP, FsdpPlan, plan_from_env

COMMON = ["--grad_accum", "2", "--save_and_sample_every", "3", "--dropout", "0.1", "--num_samples", "3"]


def fsdp_launch(*args: str, launcher_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    result = config_launch("fsdp.yaml", *COMMON, *args, launcher_flags=launcher_flags)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


# ----------------------------------------------------------------------------------------------
# Reading the launch's FSDP settings

def test_plan_from_env_reads_the_accelerate_fsdp_keys_and_takes_the_request_from_accelerate():
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false",
           "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_TRANSFORMER_CLS_TO_WRAP": "ResnetBlock, Attention"}
    plan = plan_from_env(env)
    assert plan == FsdpPlan(wrap=("ResnetBlock", "Attention"), reshard_after_forward=False)
    assert "ACCELERATE_USE_FSDP" not in env  # the Accelerator will not wrap the network a second time
    assert plan_from_env({}) is None
    assert plan_from_env({"ACCELERATE_USE_FSDP": "true"}) == FsdpPlan(wrap=DEFAULT_WRAP, reshard_after_forward=True)
    v1 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}
    assert plan_from_env(v1).reshard_after_forward is False


@pytest.mark.parametrize("env,named", [
    ({"FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params"),
    ({"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, "fsdp_auto_wrap_policy"),
    ({"FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "NO_SHARD"}, "fsdp_sharding_strategy"),
])
def test_unsupported_fsdp_settings_are_refused_by_name(env, named):
    with pytest.raises(ConfigError, match=named):
        plan_from_env({"ACCELERATE_USE_FSDP": "true", **env})


def test_a_block_class_the_network_lacks_and_fp16_are_refused_before_training(tmp_path):
    result = config_launch("fsdp.yaml", "--results_path", str(tmp_path), "--run_name", "r",
                           launcher_flags=("--fsdp_transformer_layer_cls_to_wrap", "TransformerBlock"))
    assert result.returncode != 0
    assert "fsdp_transformer_layer_cls_to_wrap names TransformerBlock" in result.stdout + result.stderr
    assert not list_checkpoints(tmp_path / "r")

    from trainer.train import build_parser, run
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELERATE_USE_FSDP", "true")
        args = vars(build_parser().parse_args([*TINY, "--results_path", str(tmp_path), "--mixed_precision", "fp16"]))
        with pytest.raises(ConfigError, match="fp16 with FSDP"):
            run(args)


# ----------------------------------------------------------------------------------------------
# Training sharded

@pytest.mark.slow
def test_fsdp_learns_what_ddp_learns_resumes_bit_exactly_and_shares_checkpoints_with_ddp(tmp_path, capsys):
    fsdp_out = fsdp_launch("--results_path", str(tmp_path / "fsdp"), "--run_name", "r", "--train_num_steps", "7")
    assert "FSDP2 over ResnetBlock, LinearAttention, Attention (ZeRO-3" in fsdp_out.stdout
    launch_ok(*COMMON, "--results_path", str(tmp_path / "ddp"), "--run_name", "r", "--train_num_steps", "7")
    fsdp_run, ddp_run = tmp_path / "fsdp" / "r", tmp_path / "ddp" / "r"

    # Same data, seeds and updates: only the order of the gradient sums differs.
    assert_same(final_weights(fsdp_run), final_weights(ddp_run), atol=2e-5)
    state = json.loads((list_checkpoints(fsdp_run)[-1] / "state.json").read_text())
    assert state["sharded"] and state["world_size"] == 2 and state["step"] == 7
    assert (fsdp_run / "samples" / "step-00000006.png").is_file()

    # Stopped at step 3 and resumed sharded (ZeRO-2 this time): the same run, bit for bit.
    fsdp_launch("--results_path", str(tmp_path / "b"), "--run_name", "r", "--train_num_steps", "3")
    zero2 = fsdp_launch("--results_path", str(tmp_path / "b"), "--resume", "latest", "--train_num_steps", "7",
                        launcher_flags=("--fsdp_reshard_after_forward", "false"))
    assert "(ZeRO-2" in zero2.stdout
    assert_same(final_weights(fsdp_run), final_weights(tmp_path / "b" / "r"))

    # A DDP run continues an FSDP checkpoint, and FSDP a DDP one; one process continues either.
    launch_ok(*COMMON, "--results_path", str(tmp_path / "fsdp"), "--resume", "latest", "--train_num_steps", "9")
    fsdp_launch("--results_path", str(tmp_path / "ddp"), "--resume", "latest", "--train_num_steps", "9")
    assert_same(final_weights(fsdp_run), final_weights(ddp_run), atol=2e-5)
    train(tmp_path / "fsdp", "--resume", "latest", "--train_num_steps", "10")
    assert json.loads((list_checkpoints(fsdp_run)[-1] / "state.json").read_text())["sharded"] is False
