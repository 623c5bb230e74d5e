"""Networks and the diffusion process."""

from models.diffusion import GaussianDiffusion
from models.unet import Unet

__all__ = ["GaussianDiffusion", "Unet"]
