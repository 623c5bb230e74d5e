"""DeepSpeed ZeRO-2: two CPU processes launched with accelerate_configs/deepspeed_zero2.yaml train
through a real DeepSpeed engine (gloo, fp32 master partitions, reduce-scattered gradients).

Here: how a launch's DeepSpeed settings are read and refused, bf16 with a skipped step, and the fp32
schedule. Training against DDP, bit-exact resume and checkpoints shared with the other modes are in
test_parallel.py.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import TINY, config_launch, python
from test_train import final_weights
from trainer.checkpoint import list_checkpoints
from trainer.config import Config
from trainer.errors import ConfigError
from trainer.parallel.zero import ZeroPlan, plan_from_env

def ds_launch(*args: str, launcher_flags: tuple[str, ...] = (), env: dict | None = None,
              ok: bool = True) -> subprocess.CompletedProcess:
    result = config_launch("deepspeed_zero2.yaml", *args, launcher_flags=launcher_flags, env=env)
    if ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def tiny_config(**train) -> Config:
    cfg = Config()
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


# ----------------------------------------------------------------------------------------------
# Reading the launch's DeepSpeed settings

def test_plan_from_env_reads_the_accelerate_keys_and_takes_deepspeed_from_accelerate():
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1",
           "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4",
           "ACCELERATE_CONFIG_DS_FIELDS": "zero_stage", "OTHER": "kept"}
    plan = plan_from_env(env)
    assert plan.stage == 1 and plan.pinned == {"gradient_accumulation_steps": "4"}
    assert env == {"OTHER": "kept"}  # Accelerate no longer sees a DeepSpeed launch
    assert plan_from_env({}) is None
    assert plan_from_env({"ACCELERATE_USE_DEEPSPEED": "true"}).stage == 2


def test_the_deepspeed_config_comes_from_the_flags():
    cfg = tiny_config(batch_size=4, grad_accum=3, max_grad_norm=0.5)
    ds = ZeroPlan(stage=2).config(cfg, world_size=2, bf16=True)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 2 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    # A launch that pins a value the flags contradict is refused, naming both.
    plan = ZeroPlan(pinned={"gradient_accumulation_steps": "1"})
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps: 1, but --grad_accum gives 3"):
        plan.config(cfg, world_size=2, bf16=True)
    assert ZeroPlan(pinned={"gradient_accumulation_steps": "3", "gradient_clipping": "auto"}).config(
        cfg, world_size=2, bf16=False)["gradient_accumulation_steps"] == 3


@pytest.mark.parametrize("env,named", [
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "ZeRO stage 3.*fsdp.yaml"),
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"}, "ZeRO stage 0.*multi_gpu.yaml"),
    ({"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, "offload_optimizer_device"),
    ({"ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "nvme"}, "offload_param_device"),
])
def test_unsupported_deepspeed_settings_are_refused_by_name(env, named):
    with pytest.raises(ConfigError, match=named):
        plan_from_env({"ACCELERATE_USE_DEEPSPEED": "true", **env})


@pytest.mark.parametrize("content,named", [
    ({"optimizer": {"type": "Adam"}}, "defines `optimizer`"),
    ({"fp16": {"enabled": True}}, "enables fp16"),
    ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer"),
])
def test_a_deepspeed_json_config_is_checked_too(tmp_path, content, named):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=named):
        plan_from_env({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)})
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read it as JSON"):
        plan_from_env({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)})


def test_a_json_config_keeps_its_other_keys_and_pins_what_it_sets(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}, "train_batch_size": "auto",
                                "gradient_clipping": 2.0}))
    plan = plan_from_env({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)})
    with pytest.raises(ConfigError, match=r"gradient_clipping: 2.0, but --max_grad_norm gives 1.0"):
        plan.config(tiny_config(), world_size=1, bf16=False)
    ds = plan.config(tiny_config(max_grad_norm=2.0), world_size=1, bf16=False)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True} and ds["gradient_clipping"] == 2.0


def test_deepspeed_missing_and_fp16_are_refused_before_training(tmp_path, monkeypatch):
    import trainer.parallel.zero

    monkeypatch.setattr(trainer.parallel.zero.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"not installed.*\.\[deepspeed\]"):
        plan_from_env({"ACCELERATE_USE_DEEPSPEED": "true"})
    monkeypatch.undo()

    from trainer.train import build_parser, run
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    args = vars(build_parser().parse_args([*TINY, "--results_path", str(tmp_path), "--mixed_precision", "fp16"]))
    with pytest.raises(ConfigError, match="fp16 with DeepSpeed"):
        run(args)
    assert not any(tmp_path.iterdir())


def test_a_launch_that_contradicts_the_flags_stops_before_training(tmp_path):
    result = ds_launch("--results_path", str(tmp_path), "--run_name", "r", "--grad_accum", "2",
                       launcher_flags=("--gradient_accumulation_steps", "4"), ok=False)
    assert result.returncode != 0
    assert "gradient_accumulation_steps: 4, but --grad_accum gives 2" in result.stdout + result.stderr
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------------
# Training with the engine


@pytest.mark.slow
def test_bf16_under_deepspeed_skips_a_nonfinite_step_and_keeps_fp32_masters(tmp_path):
    out = ds_launch("--mixed_precision", "bf16", "--results_path", str(tmp_path), "--run_name", "r",
                    "--train_num_steps", "5", "--save_and_sample_every", "5", env={"EDDY_INJECT_FAULTS": "nan_loss@2"})
    assert "mixed precision bf16, DeepSpeed ZeRO-2" in out.stdout
    assert "step 2: non-finite loss or gradient norm; step skipped (1 so far)" in out.stdout
    state = json.loads((list_checkpoints(tmp_path / "r")[-1] / "state.json").read_text())
    assert state["nonfinite_skipped"] == 1 and state["step"] == 5
    weights = final_weights(tmp_path / "r")
    for sd in (weights["model"], weights["ema"]):
        assert all(t.dtype == torch.float32 and bool(t.isfinite().all()) for t in sd.values())
    # The engine trains bf16 weights; the checkpoint holds the fp32 masters, which bf16 cannot represent.
    model = torch.cat([t.flatten() for t in weights["model"].values()])
    assert (model.bfloat16().float() != model).float().mean() > 0.5


ENGINE_CASTS_BUFFERS = r"""
import os, socket, sys, types
import torch, torch.distributed as dist
import deepspeed
from trainer.build import build_diffusion, build_network
from trainer.config import build_config
from trainer.parallel.zero import ZeroPlan

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("gloo")
real = deepspeed.initialize

def initialize_like_older_versions(*args, **kwargs):  # they cast every buffer to the training precision
    out = real(*args, **kwargs)
    for buf in kwargs["model"].buffers():
        buf.data = buf.data.to(torch.bfloat16)
    return out

deepspeed.initialize = initialize_like_older_versions
cfg = build_config({"preset": "tiny", "dim": 8, "dim_mults": (1, 2), "image_size": 8, "channels": 1,
                    "timesteps": 1000, "batch_size": 2}, has_gpu=False)
diffusion = build_diffusion(cfg, build_network(cfg))
reference = {n: b.clone() for n, b in diffusion.named_buffers()}
accelerator = types.SimpleNamespace(device=torch.device("cpu"), num_processes=1, mixed_precision="bf16",
                                    is_main_process=True)
strategy = ZeroPlan().strategy(accelerator, cfg)
strategy.wrap(diffusion, lambda params: torch.optim.AdamW(params, lr=1e-3))
bad = [n for n, b in diffusion.named_buffers() if b.dtype != torch.float32 or not torch.equal(b, reference[n])]
print("buffers:", "fp32 and unchanged" if not bad else f"changed: {bad}")
print("weights:", next(strategy.net.parameters()).dtype)
dist.destroy_process_group()
"""


def test_the_schedule_stays_fp32_when_the_engine_casts_every_buffer_to_bf16():
    """Older DeepSpeed versions cast every buffer of the module to bf16, which breaks the schedule."""
    result = python("-c", ENGINE_CASTS_BUFFERS)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "buffers: fp32 and unchanged" in result.stdout and "weights: torch.bfloat16" in result.stdout, result.stdout
