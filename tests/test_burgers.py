"""The Burgers control data of trainer/data/burgers.py: the solver against a hand-written step, its order
and invariants, the random problems, the layout and masks, the score, the cache, and the errors.

All on the CPU, float64 where round-off is asserted; full-length simulations only for a few trajectories.
"""

import numpy as np
import pytest
import torch

from trainer.data import burgers as bu
from trainer.errors import ConfigError, DataError

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def reference_steps(u0: np.ndarray, f: np.ndarray, dt: float, nu: float) -> np.ndarray:
    """(2) written out point by point: one step per row of f [K, N], from u0 [N] -> [K + 1, N]."""
    n = len(u0)
    dx = 1.0 / (n + 1)
    states = [np.array(u0, dtype=np.float64)]
    for row in f:
        u, new = states[-1], np.empty(n)
        for i in range(n):
            left = u[i - 1] if i > 0 else 0.0  # u(0) = 0
            right = u[i + 1] if i < n - 1 else 0.0  # u(1) = 0
            transport = (right**2 - left**2) / (2 * dx)
            diffusion = nu * (left - 2 * u[i] + right) / dx**2
            new[i] = u[i] + dt * (-0.5 * transport + diffusion + row[i])
        states.append(new)
    return np.stack(states)


def problems(n: int = 3, control: str = "full", seed: int = 0):
    return bu.draw(range(n), seed=seed, control=control)


# ----------------------------------------------------------------------------------------------
# 1. Solver


def test_steps_match_a_hand_written_reference():
    """Three steps on a 7-point grid, each under its own control row, against (2) with explicit loops; the
    saved states are the state after every step (3 intervals of 1 step)."""
    rng = np.random.default_rng(0)
    u0, f = rng.normal(size=7), rng.normal(size=(3, 7))
    dt, nu = 2e-3, 0.05
    expected = reference_steps(u0, f, dt, nu)
    u = bu.simulate(torch.tensor(u0)[None], torch.tensor(f)[None], nu=nu, t_end=3 * dt, n_intervals=3,
                    steps_per_interval=1)[0]
    np.testing.assert_allclose(u.numpy(), expected, rtol=0, atol=1e-14)


def test_halving_the_time_step_halves_the_error():
    """Forward Euler is first order: the differences between the solutions at dt, dt/2 and dt/4 shrink by 2.
    The default dt = 1e-4 is within 3e-4 of a solution at half that step (measured 1.3e-4)."""
    u0, f = problems(2)
    final = {s: bu.simulate(u0, f, steps_per_interval=s)[:, -1] for s in (200, 400, 800)}
    coarse, fine = (final[200] - final[400]).abs().max(), (final[400] - final[800]).abs().max()
    assert 1.8 < coarse / fine < 2.2
    default = bu.simulate(u0, f)[:, -1]
    assert (default - bu.simulate(u0, f, steps_per_interval=2000)[:, -1]).abs().max() < 3e-4


def test_zero_initial_state_with_zero_control_stays_zero():
    u = bu.simulate(torch.zeros(2, 128, dtype=F64), torch.zeros(2, 10, 128, dtype=F64), steps_per_interval=100)
    assert u.shape == (2, 11, 128) and torch.equal(u, torch.zeros_like(u))


def test_boundaries_stay_zero_and_the_mirror_image_is_a_solution():
    """The boundary values stay exactly 0 under a control that is nonzero up to the ends; and (1) with zero
    boundaries maps solutions to solutions under x -> 1 - x, u -> -u, f -> -f."""
    u0, f = problems(2)
    f = f + 1.0  # nonzero next to both boundaries
    u = bu.simulate(u0, f, steps_per_interval=100, with_boundary=True)
    assert u.shape == (2, 11, 130)
    assert torch.equal(u[..., [0, -1]], torch.zeros(2, 11, 2, dtype=F64))
    assert u[..., [1, -2]].abs().min() > 0
    mirrored = bu.simulate(-u0.flip(-1), -f.flip(-1), steps_per_interval=100)
    torch.testing.assert_close(mirrored, -u[..., 1:-1].flip(-1), rtol=0, atol=1e-12)


def test_control_row_k_acts_on_the_states_after_t_k():
    """Row k of f drives u(k/10) to u((k+1)/10): changing it leaves states 0..k exactly as they were."""
    u0, f = problems(1)
    base = bu.simulate(u0, f, steps_per_interval=50)
    for k in (0, 4, 9):
        changed = f.clone()
        changed[:, k] += 1.0
        u = bu.simulate(u0, changed, steps_per_interval=50)
        assert torch.equal(u[:, : k + 1], base[:, : k + 1])
        assert (u[:, k + 1] - base[:, k + 1]).abs().max() > 1e-3


def test_a_control_row_per_step_is_the_same_as_piecewise_constant_rows():
    u0, f = problems(1)
    per_step = f.repeat_interleave(40, dim=1)  # [1, 400, N]
    torch.testing.assert_close(bu.simulate(u0, per_step, steps_per_interval=40),
                               bu.simulate(u0, f, steps_per_interval=40), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="divide"):
        bu.simulate(u0, f[:, :7], steps_per_interval=40)
    with pytest.raises(ConfigError, match="diffusion number"):  # dt = 1 / 300: nu dt / dx^2 = 0.55
        bu.simulate(u0, f, steps_per_interval=30)


# ----------------------------------------------------------------------------------------------
# 2. Random problems


def test_draws_follow_the_protocol_and_depend_only_on_seed_and_index():
    u0, f = bu.draw(range(200), seed=3)
    x = bu.grid()
    peak, trough = x[u0.argmax(-1)], x[u0.argmin(-1)]
    assert (u0.amax(-1) <= 2 + 1e-6).all() and (u0.amin(-1) >= -2 - 1e-6).all()
    assert ((peak > 0.1) & (peak < 0.5)).float().mean() > 0.9  # the positive bump is centred in [0.2, 0.4]
    assert ((trough > 0.5) & (trough < 0.9)).float().mean() > 0.9  # the negative one in [0.6, 0.8]
    assert f.shape == (200, 10, 128) and f.abs().amax((1, 2)).min() > 0
    assert torch.equal(u0, u0.float().double()) and torch.equal(f, f.float().double())  # float32 values
    u0_one, f_one = bu.draw([57], seed=3)
    assert torch.equal(u0_one[0], u0[57]) and torch.equal(f_one[0], f[57])
    assert not torch.equal(bu.draw([57], seed=4)[0][0], u0[57])
    _, f_partial = bu.draw(range(20), seed=3, control="partial")
    assert torch.equal(f_partial[..., 32:96], torch.zeros(20, 10, 64, dtype=F64))
    assert f_partial[..., :32].abs().amax() > 0 and f_partial[..., 96:].abs().amax() > 0


def test_generate_stores_what_the_solver_gives():
    u, f = bu.generate(3, seed=1, start=5, batch_size=2, steps_per_interval=40, progress=False)
    u0, f64 = bu.draw(range(5, 8), seed=1)
    assert u.dtype == f.dtype == torch.float32 and u.shape == (3, 11, 128) and f.shape == (3, 10, 128)
    assert torch.equal(f.double(), f64) and torch.equal(u[:, 0].double(), u0)
    torch.testing.assert_close(u, bu.simulate(u0, f64, steps_per_interval=40).float(), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# 3. Layout and masks


def test_pack_and_unpack_round_trip():
    u, f = torch.randn(4, 11, 128, dtype=F64), torch.randn(4, 10, 128, dtype=F64)
    x = bu.pack(u, f)
    assert x.shape == (4, 2, 16, 128)
    assert torch.equal(x[:, 0, :11], u) and torch.equal(x[:, 1, :10], f)  # the layout, identity statistics
    assert torch.equal(x[:, 0, 11:], torch.zeros(4, 5, 128, dtype=F64)) and not x[:, 1, 10:].any()
    back_u, back_f = bu.unpack(x)
    assert torch.equal(back_u, u) and torch.equal(back_f, f)
    stats = bu.statistics(3 * u + 1, 0.5 * f - 2)
    x = bu.pack(3 * u + 1, 0.5 * f - 2, stats)
    assert abs(x[:, 0, :11].mean()) < 1e-12 and abs(x[:, 1, :10].std(unbiased=False) - 1) < 1e-12
    back_u, back_f = bu.unpack(x, stats)
    torch.testing.assert_close(back_u, 3 * u + 1, rtol=1e-15, atol=1e-14)
    torch.testing.assert_close(back_f, 0.5 * f - 2, rtol=1e-15, atol=1e-14)
    one_u, one_f = bu.unpack(bu.pack(3 * u[0] + 1, 0.5 * f[0] - 2, stats), stats)  # an unbatched sample
    assert torch.equal(one_u, back_u[0]) and torch.equal(one_f, back_f[0])
    with pytest.raises(DataError, match="pack needs"):
        bu.pack(u[:, :10], f)


def test_partial_masks_cover_exactly_the_outer_quarters():
    outer = torch.cat([torch.ones(32), torch.zeros(64), torch.ones(32)]).bool()
    assert torch.equal(bu.region("partial"), outer) and bu.region("full").all()

    known = bu.known_mask()
    assert known.shape == (2, 16, 128)
    assert known[0, [0, 10]].all() and not known[0, 1:10].any() and known[0, 11:].all()
    assert not known[1, :10].any() and known[1, 10:].all()

    known = bu.known_mask("partial", "partial")
    assert known[0, [0, 10]].all()  # u0 and the target on the outer quarters, 0 in the middle half
    assert torch.equal(known[0, 1:10], ~outer.expand(9, -1))  # the unobserved state is given (as 0)
    assert torch.equal(bu.known_mask("partial")[1], bu.known_mask()[1])
    assert torch.equal(known[1, :10], ~outer.expand(10, -1))  # the uncontrolled control too
    control = bu.control_mask("partial")
    assert torch.equal(control[1, :10], outer.expand(10, -1)) and control.sum() == 10 * 64
    assert not (control & known).any() and bu.control_mask().sum() == 10 * 128


# ----------------------------------------------------------------------------------------------
# 4. Score


@pytest.mark.parametrize("observe,control", [("full", "full"), ("partial", "full"), ("full", "partial"),
                                             ("partial", "partial")])
def test_the_data_controls_reach_their_own_target_and_zero_control_does_not(observe, control):
    """Re-simulating the stored (float32) u0 and f gives back the stored u(T): J of the data's own controls
    is float32 rounding (the J of the stored trajectory is 0, its target being its own u(T))."""
    u, f = bu.generate(3, seed=2, control=control, progress=False)
    u0, target, f_data = u[:, 0].double(), u[:, -1].double(), f.double()
    result = bu.score(u0, f_data, target, observe=observe, control=control, f_data=f_data)
    assert result["J"].shape == (3,) and (result["J"] < 1e-12).all()
    assert torch.equal(result["J_data"], result["J"]) and torch.equal(result["energy_data"], result["energy"])
    torch.testing.assert_close(result["energy"], f_data.square().sum((1, 2)))
    assert (result["J_zero"] > 1e-4).all()
    torch.testing.assert_close(result["u"][:, -1].float(), u[:, -1], rtol=0, atol=1e-6)


def test_score_zeroes_the_uncontrolled_entries_and_averages_over_the_observed_points():
    u0, f = problems(2)
    target = torch.zeros(2, 128, dtype=F64)
    partial = bu.score(u0, f, target, control="partial")
    torch.testing.assert_close(partial["energy"], f[..., bu.region("partial")].square().sum((1, 2)))
    masked = bu.score(u0, f * bu.region("partial"), target)
    torch.testing.assert_close(partial["J"], masked["J"], rtol=0, atol=0)
    blown = bu.score(u0, f * torch.tensor([1.0, 1e4], dtype=F64)[:, None, None], target)  # |u|^2 dt > 2 nu
    assert torch.isfinite(blown["J"][0]) and blown["J"][1] == torch.inf
    observed = bu.score(u0, f, target, observe="partial")
    final = bu.simulate(u0, f)[:, -1]
    torch.testing.assert_close(observed["J"], final[:, bu.region("partial")].square().mean(-1))


# ----------------------------------------------------------------------------------------------
# 5. Dataset and cache


def test_dataset_is_generated_once_and_its_known_entries_are_the_problem(tmp_path, monkeypatch):
    monkeypatch.setenv("EDDY_CACHE", str(tmp_path))
    train = bu.burgers_dataset(split="train", num_train=6, num_test=2, progress=False)
    monkeypatch.setattr(bu, "generate", lambda *a, **k: pytest.fail("the cache was not used"))
    test = bu.burgers_dataset(split="test", num_train=6, num_test=2, observe="partial")
    assert len(train) == 6 and len(test) == 2 and train.image_size == (16, 128) and train.channels == 2
    item = train[-1]
    assert set(item) == {"x"} and item["x"].shape == (2, 16, 128) and item["x"].dtype == torch.float32
    xs = torch.stack([train[i]["x"] for i in range(6)])
    assert abs(xs[:, 0, :11].mean()) < 1e-5 and abs(xs[:, 1, :10].std(unbiased=False) - 1) < 1e-5
    assert test.normalization == train.normalization and not torch.equal(test.u[0], train.u[0])
    u, f = train.unpack(item["x"])
    torch.testing.assert_close(u, train.u[-1], rtol=0, atol=1e-5)

    # Partial observation: the unobserved state is 0 in the items, and a sampler's known entries agree with them.
    u, _ = test.unpack(test[0]["x"])
    assert u[:, 32:96].abs().max() < 1e-5 and u[:, :32].abs().max() > 1e-3
    u0, target, _ = test.problems([0])
    known = test.known_mask()
    given = test.x_known(u0.float(), target.float())[0]
    torch.testing.assert_close(given[known], test[0]["x"][known], rtol=0, atol=1e-6)


def test_unknown_setting_names_raise():
    u0, f = problems(1)
    with pytest.raises(ConfigError, match="observe='half'"):
        bu.score(u0, f, u0, observe="half")
    with pytest.raises(ConfigError, match="control='middle'"):
        bu.known_mask(control="middle")
    with pytest.raises(ConfigError, match="counts"):
        bu.burgers_dataset(split="train", counts="huge")
    with pytest.raises(ConfigError, match="split"):
        bu.burgers_dataset(split="valid")
    with pytest.raises(DataError, match="states must be"):
        bu.BurgersData(np.zeros((2, 10, 128)), np.zeros((2, 10, 128)))
