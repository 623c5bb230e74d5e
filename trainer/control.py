"""Generate controls for held-out control problems, re-simulate them with the solver, and score them:
`python trainer/control.py CHECKPOINT [flags]` or `./launch.sh control ...`.

CHECKPOINT is a joint model of (state trajectory, control) trained on built-in control data (a run folder,
a checkpoint folder, or `latest`):

- `--dataset burgers` (trainer/data/burgers.py, DiffPhyCon's 1D Burgers task): the initial and the target
  state are given; scored as DiffPhyCon scores it, J_actual = mean over the observed x of
  (u(T) - u_target)^2, with the control energy sum f^2 beside it;
- `--dataset ns_control` (trainer/data/ns_control.py, Kolmogorov flow steered by its forcing amplitude per
  interval): the initial vorticity is given; J = the kinetic energy of the final frame + --energy_weight x
  the mean squared amplitude, with the control cost mean(a^2) beside it.

For each of the first --num_problems problems of the test split the sampler generates the trajectory and
the control together, the given entries written back after every step, steered by:

- objective guidance (models/guidance.py): --guidance_scale lambda times the gradient of an objective
  J(x0_hat) through the network, on the schedule --guidance_schedule. The built-in objective is the task's
  J on the generated trajectory (Burgers: the final state's mismatch with the target on the observed points
  plus --energy_weight times the mean squared control; physical units); --objective module:function names
  your own, `J(x0_hat, cond) -> [B]` on model-space samples, `cond` holding "x_known" and "known";
- prior reweighting (Burgers): --prior, a model of the control alone (`--burgers_part control`, same setting
  and schedule), with --gamma: the control's noise estimate becomes eps_joint + (gamma - 1) eps_prior.
  --gamma 1 is the joint model alone.

The generated control (zeroed where the setting does not control) is re-simulated from the true initial
state. Beside it, from the same problems: the data set's own controls, no control, and the unguided joint
model (same noise). Written to <run>/control/<time>_<label>/ (or --out):

    report.json   settings, per-method mean / median J_actual and control cost, the per-problem values
    report.png    J_actual per method, and problem 0 re-simulated under each control
    controls.npz  the generated and the unguided controls, the data's, the re-simulated states, per-problem J
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # trainer/trainer.py must not shadow the package

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.guidance import SCALE_SCHEDULES, Guidance, Prior, check_prior, evaluate_objective, load_objective  # noqa: E402
from models.sampling import sampler_by_name  # noqa: E402
from trainer.config import validate_sampling  # noqa: E402
from trainer.errors import ConfigError, EddyError  # noqa: E402
from trainer.sample import WEIGHTS, add_sampling_flags, checkpoint_config, load_weights, output_folder, \
    resolve_checkpoint  # noqa: E402

# DiffPhyCon (Wei et al. 2024), Table 1, best J_actual on 1D Burgers, as a third-party summary of the paper
# copies it (not checked against the paper itself); full observation with full control is not in that summary.
ANCHORS = {
    ("full", "partial"): {"DiffPhyCon": 0.00037, "SL": 0.00078, "BC": 0.00856, "BPPO": 0.00852},
    ("partial", "full"): {"DiffPhyCon": 0.01103, "SL": 0.09752, "BC": 0.02836, "BPPO": 0.02771},
    ("partial", "partial"): {"DiffPhyCon": 0.00494, "SL": 0.02328, "BC": 0.00952, "BPPO": 0.00891},
}
ANCHOR_NOTE = ("DiffPhyCon, Table 1 (best J_actual), as quoted by a third-party summary and not checked against "
               "the paper; their protocol: 90,000 training trajectories, the first 50 test problems.")

EXAMPLES = """\
examples:
  python trainer/train.py --dataset burgers --run_name joint                      the joint model (state, control)
  python trainer/train.py --dataset burgers --burgers_part control --run_name prior   the prior of the control
  python trainer/control.py results/joint                                          unguided, scored by the solver
  python trainer/control.py results/joint --guidance_scale 0.1 --energy_weight 0.01
  python trainer/control.py results/joint --prior results/prior --gamma 0.5 --guidance_scale 0.1
  python trainer/control.py results/joint --objective my_objectives:smooth_control --guidance_scale 1
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainer/control.py", epilog=EXAMPLES,
                                description="Generate controls with a joint model, re-simulate and score them.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="A joint Burgers model: run folder, checkpoint folder "
                   "or `latest` (trained with --dataset burgers --burgers_part joint).")
    p.add_argument("--prior", default=None, help="A model of the control alone (--burgers_part control, the same "
                   "--burgers_observe/--burgers_control and schedule) for prior reweighting.")
    p.add_argument("--gamma", type=float, default=1.0, help="Prior weight gamma: 1 samples the joint model "
                   "(default); below 1 flattens the prior over controls (needs --prior).")
    p.add_argument("--objective", default=None, help="module:function of your objective J(x0_hat, cond) -> [B] "
                   "(default: the final-state mismatch on the observed points plus --energy_weight x control^2).")
    p.add_argument("--guidance_scale", type=float, default=0.0, help="lambda of objective guidance (default 0: "
                   "no guidance).")
    p.add_argument("--guidance_schedule", choices=SCALE_SCHEDULES, default="constant",
                   help="lambda over the steps: constant, rising (0 at the noisy end to lambda at the clean end), "
                        "or beta (following the noise schedule).")
    p.add_argument("--energy_weight", type=float, default=0.0, help="Weight of the mean squared control in the "
                   "built-in objective (default 0, as DiffPhyCon's released Burgers inference).")
    p.add_argument("--num_problems", type=int, default=50, help="Test problems to solve (default: 50, DiffPhyCon's).")
    p.add_argument("--batch_size", type=int, default=50, help="Problems sampled at once (default: 50).")
    add_sampling_flags(p, "control")
    p.add_argument("--out", default=None, help="Output folder, new or empty (default: <run>/control/<time>_<label>/).")
    p.add_argument("--device", default=None, help="Torch device (default: cuda if available, else cpu).")
    p.add_argument("--results_path", default="results", help="Folder of runs that `latest` searches.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        report = control(**args)
    except EddyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_table(report))
    return 0


def load_model(checkpoint: str, *, weights: str, device: torch.device, results_path: str, what: str):
    """(config, run folder, checkpoint folder, GaussianDiffusion in eval mode) of a Burgers run."""
    from trainer.build import build_diffusion, build_network
    from trainer.config import is_burgers, is_flow_control

    run_dir, ckpt_dir = resolve_checkpoint(str(checkpoint), results_path)
    cfg, state = checkpoint_config(ckpt_dir, run_dir, has_gpu=device.type == "cuda")
    if not (is_burgers(cfg) or is_flow_control(cfg)):
        raise ConfigError(f"{what} {checkpoint} was trained on {cfg.data.train_data_dir or cfg.data.dataset}, whose data "
                          f"define no control problem (no control channels, observed or controlled region): "
                          f"control needs a model trained with --dataset burgers or --dataset ns_control.")
    net = build_network(cfg)
    load_weights(net, ckpt_dir / WEIGHTS[weights])
    return cfg, run_dir, ckpt_dir, build_diffusion(cfg, net).to(device).eval()


class BurgersTask:
    """The Burgers problems (trainer/data/burgers.py): reach u_target at T; scored by J_actual."""

    metric, cost = "J_actual", "energy"

    def __init__(self, dataset, cfg):
        from trainer.data import burgers

        self.burgers, self.dataset = burgers, dataset
        self.settings = dict(observe=cfg.data.burgers_observe, control=cfg.data.burgers_control)
        self.reference = ANCHORS.get((self.settings["observe"], self.settings["control"]))
        self.reference_note = ANCHOR_NOTE

    def describe(self) -> str:
        return f"Burgers control problems (observe {self.settings['observe']}, control {self.settings['control']})"

    def problems(self, n: int):
        self.u0, self.u_target, self.f_data = self.dataset.problems(range(n))
        return self.dataset.x_known(self.u0, self.u_target)

    def objective(self, energy_weight: float) -> Callable:
        """J(x0_hat) = mean over the observed x of (u_hat(T) - u_target)^2 + energy_weight * mean f_hat^2 over the
        controlled entries, in physical units; u_target is the given final state of `cond["x_known"]`."""
        observed = self.burgers.region(self.settings["observe"])
        controlled = self.burgers.region(self.settings["control"])
        dataset = self.dataset

        def J(x0, cond):
            u, f = dataset.unpack(x0)
            u_target, _ = dataset.unpack(cond["x_known"])
            mismatch = (u[:, -1] - u_target[:, -1])[:, observed.to(x0.device)].square().mean(-1)
            return mismatch + energy_weight * f[..., controlled.to(x0.device)].square().flatten(1).mean(1)

        return J

    def score(self, x_model: torch.Tensor, x_plain: torch.Tensor, energy_weight: float):
        """(per-problem metric, per-problem cost, arrays for controls.npz, final states for the plot)."""
        f_model, f_plain = self.dataset.unpack(x_model)[1], self.dataset.unpack(x_plain)[1]
        scored = self.burgers.score(self.u0, f_model, self.u_target, f_data=self.f_data, **self.settings)
        plain = self.burgers.score(self.u0, f_plain, self.u_target, **self.settings)
        metric = {"model": scored["J"], "unguided": plain["J"], "data controls": scored["J_data"],
                  "no control": scored["J_zero"]}
        cost = {"model": scored["energy"], "unguided": plain["energy"], "data controls": scored["energy_data"],
                "no control": torch.zeros_like(scored["energy"])}
        arrays = dict(f=f_model, u=scored["u"], f_unguided=f_plain, u0=self.u0, u_target=self.u_target, f_data=self.f_data)
        curves = {"target": self.u_target[0], "model control": scored["u"][0, -1], "unguided": plain["u"][0, -1],
                  "initial state": self.u0[0]}
        return metric, cost, arrays, curves


class FlowTask:
    """The fluid control problems (trainer/data/ns_control.py): low kinetic energy at the final frame at a small
    control cost, J = E(T) + energy_weight mean(a^2); scored by re-simulation."""

    metric, cost = "J", "control cost mean(a^2)"

    def __init__(self, dataset, cfg):
        from trainer.data import ns_control

        self.ns, self.dataset, self.settings = ns_control, dataset, {}
        self.reference, self.reference_note = None, None

    def describe(self) -> str:
        return "fluid control problems (Kolmogorov flow, forcing amplitude per interval)"

    def problems(self, n: int):
        self.omega0, self.a_data = self.dataset.problems(range(n))
        return self.dataset.x_known(self.omega0)

    def objective(self, energy_weight: float) -> Callable:
        dataset, ns = self.dataset, self.ns

        def J(x0, cond):
            omega, a = dataset.unpack(x0)
            return ns.kinetic_energy(omega[:, -1]) + energy_weight * a.square().mean(-1)

        return J

    def score(self, x_model: torch.Tensor, x_plain: torch.Tensor, energy_weight: float):
        a_model, a_plain = self.dataset.unpack(x_model)[1], self.dataset.unpack(x_plain)[1]
        runs = {"model": a_model, "unguided": a_plain, "data controls": self.a_data,
                "no control": torch.zeros_like(self.a_data)}
        scored = {k: self.ns.score(self.omega0, a, energy_weight) for k, a in runs.items()}
        metric = {k: v["J"] for k, v in scored.items()}
        cost = {k: v["cost"] for k, v in scored.items()}
        arrays = dict(a=a_model, a_unguided=a_plain, a_data=self.a_data, omega0=self.omega0,
                      omega_final=scored["model"]["frames"][:, -1],
                      energy_final={k: v["energy"] for k, v in scored.items()}["model"])
        curves = {k: self.ns.kinetic_energy(v["frames"][0]) for k, v in scored.items()}  # energy over the frames
        return metric, cost, arrays, curves


def control_task(cfg, dataset):
    from trainer.config import is_burgers

    return BurgersTask(dataset, cfg) if is_burgers(cfg) else FlowTask(dataset, cfg)


def control(checkpoint: str, *, prior: str | None = None, gamma: float = 1.0, objective: str | None = None,
            guidance_scale: float = 0.0, guidance_schedule: str = "constant", energy_weight: float = 0.0,
            num_problems: int = 50, batch_size: int = 50, sampler: str | None = None,
            sampling_timesteps: int | None = None, ddim_eta: float | None = None, seed: int = 0, weights: str = "ema",
            out: str | None = None, device: str | None = None, results_path: str = "results",
            progress: bool = True, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Solve, re-simulate and score the control problems (see the module doc); returns the report. Every
    check runs before any sampling; a user error raises an EddyError naming the flag."""
    from trainer.build import build_dataset
    from trainer.config import is_flow_control

    if num_problems < 1 or batch_size < 1:
        raise ConfigError(f"--num_problems and --batch_size must be at least 1, got {num_problems} and {batch_size}.")
    if guidance_scale < 0 or energy_weight < 0:
        raise ConfigError("--guidance_scale and --energy_weight must be at least 0.")
    if gamma != 1.0 and prior is None:
        raise ConfigError(f"--gamma {gamma} reweights a prior: pass --prior, a model trained with --burgers_part "
                          f"control, or drop --gamma.")
    if objective is not None and guidance_scale == 0:
        raise ConfigError("--objective steers only with --guidance_scale above 0.")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg, run_dir, ckpt_dir, diffusion = load_model(checkpoint, weights=weights, device=dev, results_path=results_path,
                                                   what="CHECKPOINT")
    data = cfg.data
    if prior is not None and is_flow_control(cfg):
        raise ConfigError("--prior: the fluid control data have no prior model of the control alone; drop --prior "
                          "and --gamma.")
    if data.burgers_part != "joint":
        raise ConfigError(f"CHECKPOINT {checkpoint} generates the control alone (--burgers_part control): pass the "
                          f"joint model, and this one as --prior.")
    d = cfg.diffusion
    sampler = sampler or d.sampler
    steps = sampling_timesteps or d.sampling_timesteps
    eta = ddim_eta if ddim_eta is not None else (d.ddim_eta if sampler == "ddim" else 0.0)
    validate_sampling(sampler, steps, d.timesteps, eta)
    steered = guidance_scale > 0 or gamma != 1.0
    if steered and not getattr(sampler_by_name(sampler), "steerable", False):
        raise ConfigError(f"--sampler {sampler} cannot take guidance or a prior.")

    the_prior = None
    if prior is not None:
        pcfg, _, _, prior_diffusion = load_model(prior, weights=weights, device=dev, results_path=results_path,
                                                 what="--prior")
        setting = (pcfg.data.burgers_observe, pcfg.data.burgers_control)
        if pcfg.data.burgers_part != "control" or setting != (data.burgers_observe, data.burgers_control):
            raise ConfigError(f"--prior {prior} models {pcfg.data.burgers_part} channels with observe/control {setting}; "
                              f"it must model the control alone (--burgers_part control) in the joint model's setting "
                              f"{(data.burgers_observe, data.burgers_control)}.")
        the_prior = Prior(prior_diffusion, (1,), gamma=gamma)
        try:
            check_prior(diffusion, the_prior)
        except ValueError as e:
            raise ConfigError(f"--prior {prior}: {e}.") from None

    dataset = build_dataset(cfg, split="test", progress=progress)
    if num_problems > len(dataset):
        flag = "--num_test_trajectories" if is_flow_control(cfg) else "--burgers_test_trajectories"
        raise ConfigError(f"--num_problems {num_problems}: the test split holds {len(dataset)} problems "
                          f"({flag} of the run).")
    task = control_task(cfg, dataset)
    x_known = task.problems(num_problems).float().to(dev)

    guidance = None
    if guidance_scale > 0:
        if objective is None:
            J = task.objective(energy_weight)
        else:
            try:
                J = load_objective(objective)
            except ValueError as e:
                raise ConfigError(f"--objective: {e}.") from None
        guidance = Guidance(J, guidance_scale, guidance_schedule)
        probe = x_known[:2].clone()  # the objective's shape, checked before any sampling
        try:
            evaluate_objective(guidance, probe, {"x_known": probe, "known": diffusion.known_mask(probe)})
        except ValueError as e:
            raise ConfigError(f"--objective: {e}.") from None
        except Exception as e:  # noqa: BLE001 - the user's function failed on a valid input
            raise ConfigError(f"--objective {objective or 'built-in'} failed on a batch of samples shaped "
                              f"{list(probe.shape)}: {type(e).__name__}: {e}") from None

    label = f"{sampler}_{steps}" + (f"_guided{guidance_scale:g}" if guidance else "") + \
        (f"_gamma{gamma:g}" if the_prior and gamma != 1 else "")
    out_dir = output_folder(out, run_dir, label, kind="control")
    say(f"solving {num_problems} {task.describe()} with {ckpt_dir} on {dev}: {sampler.upper()} {steps} steps"
        + (f", guidance {guidance_scale:g} ({guidance_schedule})" if guidance else "")
        + (f", prior {prior} gamma {gamma:g}" if the_prior else ""))

    t0 = time.perf_counter()
    generated = {"steered": [], "unguided": []}
    for b, start in enumerate(range(0, num_problems, batch_size)):
        known = x_known[start:start + batch_size]
        for kind in (("steered", "unguided") if steered else ("unguided",)):
            g = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + b)  # the same noise for both
            x = diffusion.sample(len(known), x_known=known, generator=g, sampler=sampler, sampling_timesteps=steps,
                                 progress=progress, guidance=guidance if kind == "steered" else None,
                                 prior=the_prior if kind == "steered" else None, **({"eta": eta} if sampler == "ddim" else {}))
            generated[kind].append(x.double().cpu())
    if not steered:
        generated["steered"] = generated["unguided"]
    seconds = time.perf_counter() - t0

    per_problem, cost, arrays, curves = task.score(torch.cat(generated["steered"]), torch.cat(generated["unguided"]),
                                                   energy_weight)
    report = {
        "checkpoint": str(ckpt_dir), "prior": prior, "step": json.loads((ckpt_dir / "state.json").read_text())["step"],
        "task": task.describe(), "metric": task.metric, "cost": task.cost,
        "settings": {**task.settings, "num_problems": num_problems, "sampler": sampler, "sampling_timesteps": steps,
                     "eta": eta, "seed": seed, "weights": weights, "guidance_scale": guidance_scale,
                     "guidance_schedule": guidance_schedule, "objective": objective or "built-in",
                     "energy_weight": energy_weight, "gamma": gamma, "batch_size": batch_size},
        "J_actual": {k: _stats(v) for k, v in per_problem.items()},
        "control_cost": {k: _stats(v) for k, v in cost.items()},
        "per_problem": {k: v.tolist() for k, v in per_problem.items()},
        "seconds_sampling": seconds,
        "reference": task.reference, "reference_note": task.reference_note,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    np.savez_compressed(out_dir / "controls.npz", **{k: v.numpy() for k, v in arrays.items()},
                        **{f"J_{k.replace(' ', '_')}": v.numpy() for k, v in per_problem.items()})
    plot_report(report, curves, out_dir / "report.png")
    report["out"] = str(out_dir)
    return report


def _stats(v: torch.Tensor) -> dict[str, float]:
    finite = v[torch.isfinite(v)]
    return {"mean": float(v.mean()), "median": float(v.median()), "finite": int(len(finite)),
            "mean_finite": float(finite.mean()) if len(finite) else float("nan")}


def plot_report(report: dict[str, Any], curves: dict[str, torch.Tensor], path: Path) -> Path:
    """J_actual per method (log scale), and problem 0 re-simulated: its final state against the target
    (Burgers), or its kinetic energy over the frames under each control (fluid)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=120)
    names = list(report["J_actual"])
    values = [report["J_actual"][n]["mean"] for n in names]
    left.bar(names, values, color=["tab:blue", "tab:cyan", "tab:gray", "tab:red"])
    for name, value in (report["reference"] or {}).items():
        left.axhline(value, ls="--", lw=0.8, color="k" if name == "DiffPhyCon" else "0.7")
    left.set(yscale="log", ylabel=f"{report['metric']} (mean over problems)", title="re-simulated by the solver")
    left.tick_params(axis="x", labelrotation=15)
    if "target" in curves:
        x = np.arange(1, len(curves["target"]) + 1) / (len(curves["target"]) + 1)
        for label, y in curves.items():
            right.plot(x, y, **({"color": "k", "lw": 2} if label == "target" else {}), label=label)
        right.set(xlabel="x", ylabel="u", title="problem 0: u(T) re-simulated")
    else:
        for label, y in curves.items():
            right.plot(np.arange(len(y)), y, marker=".", label=label)
        right.set(xlabel="frame", ylabel="kinetic energy", title="problem 0 re-simulated")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def summary_table(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"{report['task']}, {s['num_problems']} problems ({s['sampler']} {s['sampling_timesteps']} steps; "
             f"guidance {s['guidance_scale']:g}, gamma {s['gamma']:g})",
             f"{'method':<15} {report['metric'] + ' mean':>14} {'median':>10} {'cost mean':>12}   cost: {report['cost']}"]
    for name, stats in report["J_actual"].items():
        lines.append(f"{name:<15} {stats['mean']:>14.5f} {stats['median']:>10.5f} "
                     f"{report['control_cost'][name]['mean']:>12.4g}")
    if report["reference"]:
        lines.append("reference: " + ", ".join(f"{k} {v}" for k, v in report["reference"].items()))
        lines.append(report["reference_note"])
    lines.append(f"written to {report['out']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
