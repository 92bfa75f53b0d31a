"""medsam3-monai: Medical SAM3 and MedSAM3 (text-promptable SAM3 for medical images), the MONAI way."""

__version__ = "0.1.0"
