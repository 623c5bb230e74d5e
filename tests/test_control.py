"""Control of the Burgers equation end to end: a joint model and a control prior trained on the built-in data,
controls generated with guidance and prior reweighting, re-simulated and scored; and the clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import train
from trainer.control import control
from trainer.data import burgers
from trainer.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

BURGERS = ["--dataset", "burgers", "--burgers_trajectories", "24", "--burgers_test_trajectories", "6", "--dim", "8",
           "--dim_mults", "1", "2", "--attn_heads", "1", "--attn_dim_head", "8", "--timesteps", "40",
           "--sampling_timesteps", "4", "--batch_size", "4", "--num_samples", "2", "--train_num_steps", "3",
           "--save_and_sample_every", "3", "--report_to", "none", "--preset", "tiny"]


def J_wrong_shape(x0, cond):
    return x0.sum()


def J_control_energy(x0, cond):
    return x0[:, 1].square().flatten(1).mean(1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from accelerate.state import AcceleratorState, GradientState

    results = tmp_path_factory.mktemp("burgers")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDDY_CACHE", str(results / "cache"))
    joint = train(results, *BURGERS, "--burgers_observe", "partial", run_name="joint")
    prior = train(results, *BURGERS, "--burgers_observe", "partial", "--burgers_part", "control", run_name="prior")
    full = train(results, *BURGERS, "--burgers_part", "control", run_name="full_prior")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield {"joint": joint, "prior": prior, "full_prior": full, "results": results}
    mp.undo()


def test_a_control_run_is_re_simulated_and_scored_beside_its_baselines(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("EDDY_CACHE", str(runs["results"] / "cache"))
    report = control(str(runs["joint"]), prior=str(runs["prior"]), gamma=0.5, guidance_scale=0.05,
                     energy_weight=0.01, num_problems=5, batch_size=3, out=str(tmp_path / "c"), progress=False,
                     say=lambda m: None)
    assert set(report["J_actual"]) == {"model", "unguided", "data controls", "no control"}
    assert report["settings"]["observe"] == "partial" and report["reference"]["DiffPhyCon"] == 0.01103
    saved = json.loads((tmp_path / "c" / "report.json").read_text())
    assert saved["per_problem"]["model"] == report["per_problem"]["model"]
    assert (tmp_path / "c" / "report.png").stat().st_size > 0

    # The scores are the solver's: re-simulating the saved controls gives them again.
    out = np.load(tmp_path / "c" / "controls.npz")
    u0, target = torch.from_numpy(out["u0"]), torch.from_numpy(out["u_target"])
    again = burgers.score(u0, torch.from_numpy(out["f"]), target, observe="partial", control="full")
    np.testing.assert_allclose(again["J"].numpy(), out["J_model"], rtol=1e-12)
    assert np.all(out["J_data_controls"] < 1e-10)  # the data's own controls reach the data's own targets
    assert np.all(out["J_no_control"] > out["J_data_controls"])
    assert out["f"].shape == (5, burgers.N_INTERVALS, burgers.N_POINTS)
    # The unguided row is the joint model alone: the same as a run without guidance or prior.
    plain = control(str(runs["joint"]), num_problems=5, batch_size=3, out=str(tmp_path / "p"), progress=False,
                    say=lambda m: None)
    assert plain["per_problem"]["model"] == plain["per_problem"]["unguided"] == report["per_problem"]["unguided"]


def test_a_users_objective_by_dotted_path_steers_the_control(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("EDDY_CACHE", str(runs["results"] / "cache"))
    report = control(str(runs["joint"]), objective="test_control:J_control_energy", guidance_scale=2.0, num_problems=4,
                     batch_size=4, out=str(tmp_path / "o"), progress=False, say=lambda m: None)
    assert report["control_cost"]["model"]["mean"] < report["control_cost"]["unguided"]["mean"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(objective="no_such_module:J", guidance_scale=1.0), "module 'no_such_module' could not be imported"),
    (dict(objective="test_control:J_wrong_shape", guidance_scale=1.0), r"returned \(\); it must return a tensor"),
    (dict(prior="full_prior", gamma=0.5), "in the joint model's setting"),
    (dict(prior="joint", gamma=0.5), "it must model the control alone"),
    (dict(gamma=0.5), "--gamma 0.5 reweights a prior: pass --prior"),
    (dict(num_problems=7), "the test split holds 6 problems"),
])
def test_bad_control_flags_are_refused_before_sampling(runs, tmp_path, monkeypatch, kwargs, message):
    monkeypatch.setenv("EDDY_CACHE", str(runs["results"] / "cache"))
    if "prior" in kwargs:
        kwargs = {**kwargs, "prior": str(runs[kwargs["prior"]])}
    kwargs = {"num_problems": 4, **kwargs}
    with pytest.raises(ConfigError, match=message):
        control(str(runs["joint"]), out=str(tmp_path / "x"), progress=False, say=lambda m: None, **kwargs)
    assert not (tmp_path / "x").exists()


def test_a_run_whose_data_define_no_control_problem_is_refused(tmp_path):
    run = train(tmp_path, "--train_num_steps", "1", "--save_and_sample_every", "1")
    with pytest.raises(ConfigError, match="define no control problem"):
        control(str(run), progress=False, say=lambda m: None)


def test_fluid_control_is_generated_steered_towards_low_energy_and_re_simulated(tmp_path, monkeypatch):
    monkeypatch.setenv("EDDY_CACHE", str(tmp_path / "cache"))
    run = train(tmp_path, "--model", "unet3d", "--dataset", "ns_control", "--num_trajectories", "6",
                "--num_test_trajectories", "3", "--dim", "8", "--dim_mults", "1", "2", "--attn_heads", "1",
                "--attn_dim_head", "8", "--timesteps", "40", "--sampling_timesteps", "3", "--batch_size", "2",
                "--num_samples", "1", "--train_num_steps", "2", "--save_and_sample_every", "2", "--report_to", "none",
                "--preset", "tiny", run_name="flow")
    assert (run / "samples" / "step-00000002.gif").is_file()
    report = control(str(run), guidance_scale=5.0, energy_weight=0.1, num_problems=3, batch_size=3,
                     out=str(tmp_path / "c"), progress=False, say=lambda m: None)
    assert report["metric"] == "J" and set(report["J_actual"]) == {"model", "unguided", "data controls", "no control"}
    out = np.load(tmp_path / "c" / "controls.npz")
    from trainer.data import ns_control

    again = ns_control.score(torch.from_numpy(out["omega0"]), torch.from_numpy(out["a"]), 0.1)
    np.testing.assert_allclose(again["J"].numpy(), out["J_model"], rtol=1e-10)
    assert out["a"].shape == (3, ns_control.CONTROL_STEPS)
    with pytest.raises(ConfigError, match="no prior model of the control alone"):
        control(str(run), prior=str(run), gamma=0.5, progress=False, say=lambda m: None)
