"""Neural models for the recipes (installed as ``fbrain.models``)."""

from fbrain.models.conv_tasnet import ConvTasNet
from fbrain.models.spectral_masker import SpectralMasker

__all__ = ["ConvTasNet", "SpectralMasker"]
