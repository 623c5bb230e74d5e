"""FSDP2: how a launch's FSDP settings are read and refused. Training sharded on two CPU processes
(against DDP, bit-exact resume, checkpoints shared with the other modes) is in test_parallel.py.
"""

from __future__ import annotations

import pytest

from conftest import TINY, config_launch
from trainer.checkpoint import list_checkpoints
from trainer.errors import ConfigError
from trainer.parallel.fsdp import DEFAULT_WRAP, FsdpPlan, plan_from_env


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

