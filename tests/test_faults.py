"""Fault injection: kill -9 at random moments, crashes mid-save, corruption, NaN losses, failed writes.

Every scenario ends in the same final state as the run that never failed, bit for bit, or in a
clear message. The same chaos test runs at a larger count with `python scripts/fault_injection.py`.
SIGTERM through `accelerate launch` with two processes is in test_multiprocess.py.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest

from conftest import REPO, python, train
from test_train import assert_same, final_weights
from trainer.checkpoint import MARKER, _sha256, list_checkpoints

sys.path.insert(0, str(REPO / "scripts"))
import fault_injection  # noqa: E402

pytestmark = pytest.mark.slow


def test_survives_ten_random_kill_9s_bit_for_bit(tmp_path):
    steps, save_every = 60, 5
    reference = fault_injection.run_reference(tmp_path / "reference", steps, save_every)
    report = fault_injection.chaos(tmp_path / "chaos", reference, kills=10, steps=steps, save_every=save_every,
                                   seed=1)
    print(report.table())
    assert report.kills == 10
    assert report.checkpoints_damaged == 0
    assert max(report.steps_lost) <= save_every
    assert report.identical, report.differences[:5]


def test_two_processes_survive_kill_9_of_a_worker_bit_for_bit(tmp_path):
    """A worker killed with SIGKILL takes its launch down; `--resume auto` continues exactly."""
    steps, save_every = 40, 5
    reference = fault_injection.run_reference(tmp_path / "reference", steps, save_every, processes=2)
    report = fault_injection.chaos(tmp_path / "chaos", reference, kills=3, steps=steps, save_every=save_every,
                                   seed=2, processes=2)
    print(report.table())
    assert report.kills == 3 and report.checkpoints_damaged == 0, report.table()
    assert report.identical, report.differences[:5]


def test_crash_between_write_and_commit_leaves_nothing_resume_would_take(tmp_path):
    cmd = fault_injection.train_command(tmp_path, 9, 3, "--resume", "auto")[1:]  # drop the interpreter
    crashed = python(*cmd, env={"EDDY_INJECT_FAULTS": "crash_before_commit@6"})
    assert crashed.returncode == 137
    run_dir = tmp_path / "run"
    assert (run_dir / "checkpoints" / ".tmp-step-00000006").is_dir()  # written, never committed
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000003"]

    resumed = python(*cmd)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "removed an incomplete checkpoint left by a crash" in resumed.stdout
    assert "from step-00000003" in resumed.stdout
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    reference = fault_injection.run_reference(tmp_path / "reference", 9, 3)
    assert not fault_injection.differences(fault_injection.final_state(reference),
                                           fault_injection.final_state(run_dir))


def test_a_corrupted_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    straight = train(tmp_path / "a", "--train_num_steps", "9", "--save_and_sample_every", "3")
    run_dir = train(tmp_path / "b", "--train_num_steps", "6", "--save_and_sample_every", "3")
    weights = list_checkpoints(run_dir)[-1] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern, same size
    weights.write_bytes(bytes(data))

    train(tmp_path / "b", "--resume", "latest", "--train_num_steps", "9")
    out = capsys.readouterr().out
    assert "step-00000006 is damaged and is skipped" in out and "sha256" in out
    assert "from step-00000003" in out
    assert_same(final_weights(straight), final_weights(run_dir))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_malicious_pickle_in_a_checkpoint_is_refused(tmp_path, capsys):
    run_dir = train(tmp_path, "--train_num_steps", "6", "--save_and_sample_every", "3")
    newest = list_checkpoints(run_dir)[-1]
    witness = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (witness,))

    (newest / "optimizer.pt").write_bytes(pickle.dumps({"optimizer": Exploit()}))
    marker = json.loads((newest / MARKER).read_text())  # forge the manifest so only the pickle is wrong
    marker["files"]["optimizer.pt"] = {"sha256": _sha256(newest / "optimizer.pt"),
                                       "bytes": (newest / "optimizer.pt").stat().st_size}
    (newest / MARKER).write_text(json.dumps(marker))

    train(tmp_path, "--resume", "latest", "--train_num_steps", "7")
    out = capsys.readouterr().out
    assert "could not be loaded safely" in out and "from step-00000003" in out
    assert not witness.exists()


def test_a_nan_loss_skips_the_step_on_every_rank_and_is_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("EDDY_INJECT_FAULTS", "nan_loss@2")
    run_dir = train(tmp_path, "--train_num_steps", "5", "--save_and_sample_every", "5")
    state = json.loads((list_checkpoints(run_dir)[-1] / "state.json").read_text())
    assert state["step"] == 5 and state["nonfinite_skipped"] == 1
    assert state["ema_step"] == 4  # no EMA update for the skipped step
    opt = final_weights(run_dir)["optimizer"]["state"]
    assert all(s["step"].item() == 4 for s in opt.values())  # no optimizer update either
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["nonfinite_skipped"] == 1
    assert all(m["loss"] == m["loss"] for m in logged)  # the skipped step's NaN is kept out of the mean


def test_consecutive_nan_losses_roll_back_to_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDDY_INJECT_FAULTS", "nan_loss@4,nan_loss@5")
    run_dir = train(tmp_path, "--train_num_steps", "8", "--save_and_sample_every", "3",
                    "--max_nonfinite_steps", "2")
    assert "rolled back from step 5 to step-00000003" in capsys.readouterr().out
    state = json.loads((list_checkpoints(run_dir)[-1] / "state.json").read_text())
    assert state["step"] == 8 and state["rollbacks"] == 1 and state["nonfinite_skipped"] == 2


def test_a_run_that_keeps_diverging_stops_with_a_clear_message(tmp_path, monkeypatch, capsys):
    from trainer.train import main

    monkeypatch.setenv("EDDY_INJECT_FAULTS", "nan_loss@1,nan_loss@2")
    from conftest import TINY

    code = main([*TINY, "--results_path", str(tmp_path), "--train_num_steps", "4", "--max_nonfinite_steps", "2",
                 "--max_rollbacks", "0"])
    assert code == 2
    assert "--max_rollbacks" in capsys.readouterr().err


def test_a_failed_write_keeps_the_previous_checkpoint_and_training_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDDY_INJECT_FAULTS", "save_error@6")
    run_dir = train(tmp_path, "--train_num_steps", "9", "--save_and_sample_every", "3")
    out = capsys.readouterr().out
    assert "saving the checkpoint of step 6 failed" in out and "No space left on device" in out
    assert "the newest intact one is step-00000003" in out
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000003", "step-00000009"]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_the_wandb_run_continues_as_the_same_run(tmp_path):
    run_dir = train(tmp_path, "--train_num_steps", "2", "--save_and_sample_every", "2", "--report_to", "wandb")
    train(tmp_path, "--resume", "latest", "--train_num_steps", "4", "--report_to", "wandb")
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    assert len({p.name.rsplit("-", 1)[1] for p in runs}) == 1  # the same run id
