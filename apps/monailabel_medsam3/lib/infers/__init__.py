from .medsam3 import MedSAM3Infer

__all__ = ["MedSAM3Infer"]
