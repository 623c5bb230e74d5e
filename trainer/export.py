"""Export a checkpoint's EMA (or raw) weights as a folder that `models.load_pretrained` reads in one call:
`python trainer/export.py CHECKPOINT --out DIR [--push_to_hub USER/NAME]` or `./launch.sh export ...`.

DIR gets `config.json` (the network's and the diffusion's arguments, the run's config and, for physical
fields, the data's normalization) and `model.safetensors`. With --push_to_hub the folder is uploaded to
the Hugging Face Hub (a model repository, created if missing; needs a token from `huggingface-cli login`);
offline, the folder is kept and the command says how to upload it later.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script, Python puts trainer/ first on sys.path, where trainer/trainer.py would shadow
    # the package `trainer`. Put the repository root there instead.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import json  # noqa: E402

from trainer.errors import ConfigError, EddyError  # noqa: E402
from trainer.sample import WEIGHTS, checkpoint_config, load_weights, output_folder, resolve_checkpoint  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainer/export.py", description="Export an Eddy checkpoint as a model folder.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="A run folder (its newest intact checkpoint), a checkpoint folder, or `latest`.")
    p.add_argument("--out", required=True, help="The folder to write; must be new or empty.")
    p.add_argument("--weights", choices=tuple(WEIGHTS), default="ema", help="EMA or raw weights (default: ema).")
    p.add_argument("--push_to_hub", metavar="USER/NAME", default=None,
                   help="Also upload the folder to this Hugging Face Hub model repository.")
    p.add_argument("--private", action="store_true", help="With --push_to_hub: create the repository private.")
    p.add_argument("--results_path", default="results", help="Folder of runs that `latest` searches.")
    return p


def export(checkpoint: str | Path, *, out: str | Path, weights: str = "ema", push_to_hub: str | None = None,
           private: bool = False, results_path: str | Path = "results", say=print) -> Path:
    """Write the model folder (and upload it). Raises EddyError subclasses for what the user can fix."""
    from models import save_pretrained
    from trainer.build import build_network, diffusion_spec, network_spec

    if weights not in WEIGHTS:
        raise ConfigError(f"--weights {weights!r} is not one of: {', '.join(WEIGHTS)}.")
    run_dir, ckpt_dir = resolve_checkpoint(str(checkpoint), results_path)
    cfg, state = checkpoint_config(ckpt_dir, run_dir, has_gpu=False)
    folder = output_folder(out, run_dir, "")
    net = build_network(cfg)
    load_weights(net, ckpt_dir / WEIGHTS[weights])
    name, kwargs = network_spec(cfg)
    extra = {"run_config": cfg.to_dict(), "checkpoint": str(ckpt_dir.resolve()), "step": state.get("step"),
             "weights": weights}
    normalization = run_dir / "normalization.json"
    if normalization.is_file():
        extra["normalization"] = json.loads(normalization.read_text())
    save_pretrained(folder, net, network_class=name, network_kwargs=kwargs, diffusion_kwargs=diffusion_spec(cfg),
                    extra=extra)
    say(f"exported {weights} weights of {ckpt_dir} (step {state.get('step')}) to {folder}: config.json, "
        f"model.safetensors; load with models.load_pretrained({str(folder)!r})")
    if push_to_hub:
        _push(folder, push_to_hub, private, say)
    return folder


def _push(folder: Path, repo_id: str, private: bool, say) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    later = f"upload it later with: huggingface-cli upload {repo_id} {folder}"
    try:
        api = HfApi()
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model")
    except OfflineModeIsEnabled:
        raise EddyError(f"--push_to_hub {repo_id}: the Hugging Face Hub is switched off here (HF_HUB_OFFLINE=1); "
                        f"the folder is saved at {folder}; {later}") from None
    except Exception as e:  # no network, no token, no rights: the folder stays
        raise EddyError(f"--push_to_hub {repo_id} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        f"the folder is saved at {folder}; {later}") from None
    say(f"uploaded to https://huggingface.co/{repo_id}")


def main(argv: list[str] | None = None) -> int:
    try:
        export(**vars(build_parser().parse_args(argv)))
    except EddyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
