"""Networks built from nnU-Net's plans (M2SNet / MSNet decoders on the plans' encoder)."""

from nnunet_selfreg.networks.m2snet import M2SDecoder, M2SNet, MSNet, SubtractionUnit, build_m2snet

__all__ = ["M2SDecoder", "M2SNet", "MSNet", "SubtractionUnit", "build_m2snet"]
