"""FID and KID during training (trainer/fid.py), with a tiny stand-in for the Inception network (the real
weights need a download): the scores against closed forms, the cached data features, and the flags in a run."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, train
from trainer.build import build_dataset, build_diffusion, build_network
from trainer.config import build_config
from trainer.errors import ConfigError
from trainer.fid import WEIGHTS_MISSING, FeatureNet, FidMonitor
from trainer.parallel import Plan, make_accelerator
from trainer.train import build_parser, main


class StandIn(torch.nn.Module):
    """Images [N, 3, H, W] in [0, 255] -> 6 features: a fixed 3x3 convolution, squashed, pooled."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return torch.tanh(self.conv(x / 128 - 1)).mean((2, 3))


@pytest.fixture
def standin(tmp_path, monkeypatch):
    monkeypatch.setenv("EDDY_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "standin.pt"
    torch.jit.script(StandIn()).save(str(path))
    return str(path)


def monitor(standin, **flags):
    cfg = build_config({**vars(build_parser().parse_args(TINY)), "fid_every": 2, "fid_weights": standin,
                        "fid_num_samples": 64, **flags}, has_gpu=False)
    accelerator = make_accelerator(cfg, Plan())
    return FidMonitor(cfg, build_diffusion(cfg, build_network(cfg)), build_dataset(cfg, progress=False), accelerator)


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), with symmetric square roots."""
    def sqrtm(s):
        w, v = torch.linalg.eigh(s)
        return v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T

    a, b = a.double(), b.double()
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    root = sqrtm(sa)
    return float((a.mean(0) - b.mean(0)).square().sum() + sa.trace() + sb.trace() - 2 * sqrtm(root @ sb @ root).trace())


def test_fid_and_kid_match_their_closed_forms(standin, one_thread):
    m = monitor(standin)
    real = torch.cat(m.kid.real_features)  # [64, 6]: the data side, float64
    assert real.shape == (64, 6) and m.fid.real_features_num_samples == 64

    same = m.score(real, step=0)
    shifted = m.score(real + 0.5, step=0)
    other = torch.randn(64, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.3 + 1
    assert abs(same["eval/fid"]) < 1e-6
    assert shifted["eval/fid"] == pytest.approx(6 * 0.5**2, rel=1e-6)  # the same covariance, moved by 0.5 in each
    assert m.score(other, step=0)["eval/fid"] == pytest.approx(frechet(real, other), rel=1e-6)
    assert abs(same["eval/kid_mean"]) < 1e-3 * shifted["eval/kid_mean"]
    assert same["eval/kid_std"] == 0  # the subset is the whole of both sets: one value


def test_the_data_features_are_computed_once_and_cached(standin, tmp_path, monkeypatch, one_thread):
    calls = []
    forward = FeatureNet.forward
    monkeypatch.setattr(FeatureNet, "forward", lambda self, x: calls.append(len(x)) or forward(self, x))
    first = monitor(standin, fid_num_samples=80)
    assert calls == [64, 16] and len(list((tmp_path / "cache" / "fid").glob("*.npz"))) == 1
    calls.clear()
    second = monitor(standin, fid_num_samples=80)
    assert calls == []  # read from the cache
    assert torch.equal(torch.cat(first.kid.real_features), torch.cat(second.kid.real_features))
    monitor(standin, fid_num_samples=10)
    assert calls == [10]  # another sample count is another key


def test_a_run_logs_fid_and_keeps_the_best_checkpoint(standin, tmp_path, one_thread):
    run_dir = train(tmp_path, "--train_num_steps", "4", "--save_and_sample_every", "2", "--num_samples", "0",
                    "--checkpoints_total_limit", "2", "--fid_every", "2", "--fid_weights", standin,
                    "--fid_num_samples", "8", "--report_to", "wandb", "--wandb_checkpoints", "best")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "eval/fid" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["eval/fid"] > 0 and "eval/kid_mean" in r and r["eval/kid_std"] >= 0 for r in rows)
    best_step, best = min(((r["step"], r["eval/fid"]) for r in rows), key=lambda e: e[1])
    state = json.loads((run_dir / "checkpoints" / "best" / "state.json").read_text())
    assert state["step"] == best_step and state["best_metric"] == pytest.approx(best)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best", "step-00000002", "step-00000004"]
    # --wandb_checkpoints best: each new best went to W&B, aliased best, and nothing else did.
    from wandb_records import artifacts

    improved = [r["step"] for i, r in enumerate(rows) if all(r["eval/fid"] < q["eval/fid"] for q in rows[:i])]
    logged = artifacts(run_dir)
    # W&B adds the alias latest to the newest version by itself.
    assert [sorted(a["aliases"]) for a in logged] == [["best", "latest", f"step-{step}"] for step in improved]
    assert all(json.loads(a["metadata"])["checkpoint"] == "best" for a in logged)


def test_without_weights_the_run_says_so_once_and_finishes(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("EDDY_CACHE", str(tmp_path / "cache"))
    run_dir = train(tmp_path, "--train_num_steps", "4", "--save_and_sample_every", "4", "--num_samples", "0",
                    "--fid_every", "2")
    assert capsys.readouterr().out.count(WEIGHTS_MISSING) == 1
    assert "eval/fid" not in (run_dir / "metrics.jsonl").read_text()
    assert (run_dir / "checkpoints" / "step-00000004").is_dir() and not (run_dir / "checkpoints" / "best").exists()


def test_bad_weights_are_an_error_before_training(tmp_path, capsys):
    garbage = tmp_path / "inception-2015-12-05.pkl"
    garbage.write_bytes(b"not a TorchScript archive")
    for path, says in ((tmp_path / "missing.pt", "does not exist"), (garbage, "is not a TorchScript file")):
        args = [*TINY, "--results_path", str(tmp_path), "--fid_every", "2", "--fid_weights", str(path)]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"--fid_weights {path}" in err and says in err
    assert not list(tmp_path.glob("*/checkpoints/*"))
    torch.jit.script(torch.nn.Identity()).save(str(tmp_path / "identity.pt"))  # gives [N, 3, H, W], not features
    with pytest.raises(ConfigError, match="--fid_weights .* the network returns"):
        FeatureNet(str(tmp_path / "identity.pt"), torch.device("cpu"), 8)


@pytest.mark.parametrize("run", [["--model", "unet3d", "--dataset", "moving_shapes", "--frames", "4"],
                                 ["--dataset", "navier_stokes"]])
def test_fid_every_is_for_image_runs(tmp_path, capsys, run):
    assert main([*run, "--fid_every", "10", "--results_path", str(tmp_path)]) == 2
    assert "--fid_every scores generated images" in capsys.readouterr().err
