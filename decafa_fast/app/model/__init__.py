"""The DeCaFA model: U-Net stages, transfer layers, fusion, and the loss of eq. (10)."""
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
