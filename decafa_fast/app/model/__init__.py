"""The DeCaFA model: U-Net stages, transfer layers, fusion, the loss of eq. (10), and its checkpoints
(`checkpoint`: save and load with a checksum of the content, imported on its own)."""
from .decafa import LAMBDA_SCHEMES, DeCaFA, DeCaFAConfig, count_parameters, stage_lambdas
from .loss import decafa_loss
from .transfer import TRANSFER_MODES
from .unet import UNet

__all__ = [
    "DeCaFA",
    "DeCaFAConfig",
    "LAMBDA_SCHEMES",
    "TRANSFER_MODES",
    "UNet",
    "count_parameters",
    "decafa_loss",
    "stage_lambdas",
]
