"""Networks and the diffusion process."""

from models.diffusion import GaussianDiffusion
from models.pretrained import load_pretrained, save_pretrained
from models.unet import Unet
from models.unet3d import Unet3D

__all__ = ["GaussianDiffusion", "Unet", "Unet3D", "load_pretrained", "save_pretrained"]
