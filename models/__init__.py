"""Neural models for the recipes (installed as ``fbrain.models``)."""

from fbrain.models.spectral_masker import SpectralMasker

__all__ = ["SpectralMasker"]
