"""STDiT / MVDiT model code on openvid_kernels ops, loading the released OpenVid-1M checkpoints unchanged."""

from openvid_models.checkpoint import load_state_dict
from openvid_models.configs import MODEL_SIZES
from openvid_models.diffusion import IDDPM, forward_with_cfg
from openvid_models.dpm_solver import DPMSolverSampler
from openvid_models.mvdit import MVDiT, MVDiTBlock
from openvid_models.stdit import STDiT, STDiTBlock
from openvid_models.vae import VideoAutoencoder

__all__ = ["DPMSolverSampler", "IDDPM", "MODEL_SIZES", "MVDiT", "MVDiTBlock", "STDiT", "STDiTBlock", "VideoAutoencoder",
           "forward_with_cfg", "load_state_dict"]
