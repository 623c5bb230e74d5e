"""The Trainer built in this process, with a fake strategy and a tiny network: skipped steps, rollback,
failed saves and a stop signal, without a subprocess or an environment variable."""

from __future__ import annotations

import errno

import pytest
import torch

from conftest import TINY
from trainer.build import build_dataset, build_diffusion, build_network
from trainer.checkpoint import CheckpointManager, list_checkpoints, read_checkpoint
from trainer.config import build_config
from trainer.errors import EddyError
from trainer.parallel import Plan, Strategy, make_accelerator
from trainer.trainer import Trainer
from trainer.tracking import NullTracker
from trainer.train import build_parser


def tiny_config(**overrides):
    return build_config({**vars(build_parser().parse_args(TINY)), **overrides}, has_gpu=False)


class FaultyStrategy(Strategy):
    """One process, with a non-finite gradient norm at the steps in `bad_steps` and a stop request at `stop_at`."""

    def __init__(self, accelerator, cfg, bad_steps=(), stop_at=None):
        super().__init__(accelerator, cfg)
        self.bad_steps, self.stop_at, self.trainer = set(bad_steps), stop_at, None
        self.clipped = 0

    def clip(self, max_norm):
        step, self.clipped = self.trainer.state.step, self.clipped + 1
        if step == self.stop_at:
            self.trainer._stop.requested = True
        norm = super().clip(max_norm)
        return norm * float("inf") if step in self.bad_steps else norm


class RecordingTracker(NullTracker):
    def __init__(self):
        self.logged = []

    def log(self, metrics, step):
        self.logged.append((step, metrics))


def make_trainer(tmp_path, *, bad_steps=(), stop_at=None, before_commit=None, tracker=None, **overrides):
    cfg = tiny_config(results_path=str(tmp_path), **overrides)
    accelerator = make_accelerator(cfg, Plan())
    strategy = FaultyStrategy(accelerator, cfg, bad_steps, stop_at)
    torch.manual_seed(cfg.train.seed)
    diffusion = build_diffusion(cfg, build_network(cfg))
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    checkpoints = CheckpointManager(run_dir, cfg.run.checkpoints_total_limit, is_main=True, say=print,
                                    before_commit=before_commit)
    trainer = Trainer(cfg, accelerator, strategy, diffusion, build_dataset(cfg, progress=False), checkpoints,
                      tracker=tracker)
    strategy.trainer = trainer
    return trainer


def weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_a_nonfinite_step_is_skipped_without_touching_weights_or_ema(tmp_path):
    trainer = make_trainer(tmp_path, bad_steps={2}, train_num_steps=2, save_and_sample_every=100, num_samples=0)
    trainer.train()
    before = (weights(trainer.strategy.net), weights(trainer.ema.ema_model), trainer.ema.step.item())
    trainer.cfg.train.train_num_steps = 3
    state = trainer.train()
    assert state.step == 3 and state.nonfinite_skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before[0].values(), weights(trainer.strategy.net).values()))
    assert all(torch.equal(a, b) for a, b in zip(before[1].values(), weights(trainer.ema.ema_model).values()))
    assert trainer.ema.step.item() == before[2]
    assert all(p.grad is None for p in trainer.strategy.net.parameters())  # the bad gradients were dropped


def test_a_run_of_nonfinite_steps_rolls_back_to_the_last_checkpoint_and_gives_up_after_max_rollbacks(tmp_path, capsys):
    trainer = make_trainer(tmp_path, bad_steps=set(range(4, 100)), train_num_steps=20, save_and_sample_every=3,
                           num_samples=0, max_nonfinite_steps=2, max_rollbacks=2)
    with pytest.raises(EddyError, match="after 2 rollbacks"):
        trainer.train()
    out = capsys.readouterr().out
    # Steps 4 and 5 are skipped (a skipped step still counts), then back to step 3: three lives, two rollbacks.
    assert out.count("rolled back from step 5 to step-00000003") == 2
    assert trainer.state.step == 5 and trainer.state.rollbacks == 2 and trainer.state.nonfinite_skipped == 6
    saved = read_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    assert saved.state["step"] == 3


def test_a_failed_save_keeps_the_last_checkpoint_and_training_goes_on(tmp_path, capsys):
    def fail_at_4(step):
        if step == 4:
            def fail():
                raise OSError(errno.ENOSPC, "No space left on device")
            return fail
        return None

    trainer = make_trainer(tmp_path, before_commit=fail_at_4, train_num_steps=6, save_and_sample_every=2,
                           num_samples=0)
    state = trainer.train()
    assert state.step == 6
    assert "saving the checkpoint of step 4 failed" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000002", "step-00000006"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_a_stop_request_saves_and_logs_the_last_partial_window(tmp_path):
    tracker = RecordingTracker()
    trainer = make_trainer(tmp_path, stop_at=6, tracker=tracker, train_num_steps=100, save_and_sample_every=100,
                           log_every=4, num_samples=0)
    state = trainer.train()
    assert state.step == 7  # the request is seen by the step during which it came
    assert [step for step, _ in tracker.logged] == [4, 7]
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000007"]


def test_grad_accum_clips_once_per_step(tmp_path):
    trainer = make_trainer(tmp_path, grad_accum=3, train_num_steps=2, save_and_sample_every=100, num_samples=0)
    state = trainer.train()
    assert trainer.strategy.clipped == 2 and state.images_seen == 2 * 3 * 4


def test_data_wait_is_the_share_of_time_spent_waiting_for_batches(tmp_path, monkeypatch):
    import time

    from trainer.data.builtin import TwoModesDataset

    real = TwoModesDataset.image
    monkeypatch.setattr(TwoModesDataset, "image", lambda self, i: time.sleep(0.05) or real(self, i))
    tracker = RecordingTracker()
    trainer = make_trainer(tmp_path, tracker=tracker, train_num_steps=4, log_every=2, save_and_sample_every=100,
                           num_samples=0)
    trainer.train()
    # 4 steps of 4 items of at least 0.05 s each, loaded in this thread: the wait counts all of it.
    assert trainer._data_wait >= 4 * 4 * 0.05
    waits = [metrics["data_wait"] for _, metrics in tracker.logged]
    assert len(waits) == 2 and all(0 < w <= 1.0 for w in waits), waits
