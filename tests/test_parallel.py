"""One contract for every parallel mode: one process, DDP, FSDP2 and DeepSpeed ZeRO-2 (two CPU processes
for the last three, launched as users launch them).

Every mode resumes bit for bit, also when the resumed half runs compiled; the sharded modes learn what DDP learns (up to the order of the
gradient sums); and a checkpoint written in one mode continues in another, and in one process.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import TINY, accelerate_launch, config_launch, train
from test_train import assert_same, final_weights
from trainer.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow

# One memory layout for all: FSDP2 keeps its weights contiguous (channels-last inputs only), and the two layouts
# round differently, which Adam magnifies for the smallest gradients.
COMMON = ["--grad_accum", "2", "--save_and_sample_every", "3", "--dropout", "0.1", "--num_samples", "3",
          "--channels_last", "false"]


@dataclass(frozen=True)
class Mode:
    name: str
    config: str | None      # accelerate_configs/ file, None: --multi_gpu DDP, "" : one process in this process
    atol: float | None      # agreement with DDP (None: not compared)
    says: str               # what the start-up print names
    tag: dict               # what its checkpoints record
    replicas: bool          # whether the ranks hold the same weights, compared at the end (replicas.json)
    resume_flags: tuple[str, ...] = ()  # launcher flags of the resumed half (another setting of the same mode)
    resumed_says: str = ""               # what the resumed half's start-up print names


MODES = [
    Mode("single", "", None, "one process", {"parallel": "replicated", "sharded": False, "deepspeed": False}, True),
    Mode("ddp", None, None, "weights replicated (DDP)", {"parallel": "replicated", "sharded": False}, True),
    # Sharded, the resumed half runs as ZeRO-2 (weights kept from forward to backward).
    Mode("fsdp", "fsdp.yaml", 2e-5, "FSDP2 over ResnetBlock, LinearAttention, Attention (ZeRO-3",
         {"parallel": "fsdp", "sharded": True}, False, ("--fsdp_reshard_after_forward", "false"), "(ZeRO-2"),
    # DeepSpeed reduces and scales the gradients in another order than DDP (each micro-batch, divided
    # before the sum), so the sums round differently; Adam magnifies that for the smallest gradients.
    Mode("deepspeed", "deepspeed_zero2.yaml", 5e-5, "DeepSpeed ZeRO-2 (optimizer state and gradients sharded",
         {"parallel": "zero", "deepspeed": True}, True),
]


def launch(mode: Mode, results: Path, *args: str, launcher_flags: tuple[str, ...] = ()) -> str:
    """Train the tiny config in `mode` into results/r; returns what it printed."""
    if mode.config == "":
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            train(results, *COMMON, *args, run_name="r")
        return out.getvalue()
    flags = [*COMMON, "--results_path", str(results), "--run_name", "r", *args]
    if mode.config is None:
        result = accelerate_launch("trainer/train.py", *TINY, *flags)
    else:
        result = config_launch(mode.config, *flags, launcher_flags=launcher_flags)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def state(run: Path) -> dict:
    return json.loads((list_checkpoints(run)[-1] / "state.json").read_text())


def tagged(run: Path, tag: dict) -> bool:
    """Whether the newest checkpoint of `run` records the mode `tag` describes."""
    saved = state(run)
    return all(saved[k] == v for k, v in tag.items())


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("ddp")
    launch(MODES[1], results, "--train_num_steps", "7")
    return results / "r"


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_every_mode_resumes_bit_exactly_agrees_with_ddp_and_shares_its_checkpoints(mode, ddp_reference, tmp_path):
    ddp = MODES[1]
    if mode is ddp:
        straight = ddp_reference
    else:
        out = launch(mode, tmp_path / "a", "--train_num_steps", "7")
        assert mode.says in out
        straight = tmp_path / "a" / "r"
    assert state(straight)["step"] == 7 and tagged(straight, mode.tag)
    assert state(straight)["world_size"] == (1 if mode.config == "" else 2)
    assert (straight / "samples" / "step-00000006.png").is_file()
    replicas = straight / "replicas.json"
    assert replicas.is_file() == mode.replicas and (not mode.replicas or json.loads(replicas.read_text())["identical"])
    if mode.atol is not None:  # same data, seeds and updates: only the order of the gradient sums differs
        assert_same(final_weights(straight), final_weights(ddp_reference), atol=mode.atol)

    # Stopped at step 3 and resumed compiled (dynamo's graphs run by the eager backend): the same run, bit for bit.
    launch(mode, tmp_path / "b", "--train_num_steps", "3")
    out = launch(mode, tmp_path / "b", "--resume", "latest", "--train_num_steps", "7", "--compile", "--compile_backend",
                 "eager", launcher_flags=mode.resume_flags)
    assert mode.resumed_says in out and "runs eagerly" not in out
    assert_same(final_weights(straight), final_weights(tmp_path / "b" / "r"))

    # DDP continues this mode's checkpoint and this mode continues DDP's; one process continues either.
    if mode is not ddp:
        shutil.copytree(ddp_reference, tmp_path / "c" / "r")
        launch(ddp, tmp_path / "b", "--resume", "latest", "--train_num_steps", "9")
        launch(mode, tmp_path / "c", "--resume", "latest", "--train_num_steps", "9")
        assert tagged(tmp_path / "b" / "r", ddp.tag) and tagged(tmp_path / "c" / "r", mode.tag)
        if mode.atol is not None:  # both at step 9 from runs that agreed at step 7
            assert_same(final_weights(tmp_path / "b" / "r"), final_weights(tmp_path / "c" / "r"), atol=mode.atol)
        train(tmp_path / "c", "--resume", "latest", "--train_num_steps", "10", run_name="r")
        assert state(tmp_path / "c" / "r")["step"] == 10 and tagged(tmp_path / "c" / "r", MODES[0].tag)


def test_one_process_continues_a_two_process_run_at_the_same_data_position(ddp_reference, tmp_path, capsys):
    """The same global batch on one process (8 per step instead of 2 x 4) continues where the run stopped."""
    shutil.copytree(ddp_reference, tmp_path / "r")
    before = state(tmp_path / "r")
    train(tmp_path, "--resume", "latest", "--batch_size", "8", "--train_num_steps", str(before["step"] + 1))
    assert "resuming with a different layout" in capsys.readouterr().out
    after = state(tmp_path / "r")
    assert after["world_size"] == 1 and after["step"] == before["step"] + 1
    assert after["data_offset"] == before["data_offset"] + 8 * 2  # one step: 8 samples x 2 micro-batches
    assert after["images_seen"] == before["images_seen"] + 16
