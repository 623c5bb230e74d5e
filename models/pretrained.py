"""A trained model as a folder that `models` loads back in one call: `config.json` + `model.safetensors`.

    config.json         {"network": {"class": "Unet" | "Unet3D", "kwargs": {...}},
                         "diffusion": {...GaussianDiffusion keyword arguments...},
                         "extra": {...}}   (e.g. the training run's config and the data's normalization)
    model.safetensors   the network's weights (the EMA weights, when exported from a run)

`load_pretrained(folder)` rebuilds the network and its `GaussianDiffusion` from config.json alone and
loads the weights strictly, so the folder needs nothing of the training code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG, WEIGHTS = "config.json", "model.safetensors"


def save_pretrained(folder: str | Path, network: torch.nn.Module, *, network_class: str, network_kwargs: dict,
                    diffusion_kwargs: dict, extra: dict | None = None) -> Path:
    """Write `network`'s weights and the arguments that rebuild it into `folder` (created; may exist empty)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"network": {"class": network_class, "kwargs": network_kwargs}, "diffusion": diffusion_kwargs,
              "extra": extra or {}}
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in network.state_dict().items()}, str(folder / WEIGHTS))
    return folder


def load_pretrained(folder: str | Path, device: str | torch.device = "cpu"):
    """The `GaussianDiffusion` (with its network, in eval mode) saved in `folder` by `save_pretrained`."""
    import models
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} does not exist: {folder} is not a saved Eddy model "
                                    f"(it needs {CONFIG} and {WEIGHTS})")
    config = json.loads((folder / CONFIG).read_text())
    spec = config["network"]
    if spec["class"] not in ("Unet", "Unet3D"):
        raise ValueError(f"{folder / CONFIG} names the network {spec['class']!r}; models has Unet and Unet3D")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["kwargs"].items()}
    network = getattr(models, spec["class"])(**kwargs)
    network.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
    diffusion = models.GaussianDiffusion(network, **config["diffusion"])
    return diffusion.to(device).eval()
