"""lora-null: LoRA initialized in the null space of pre-trained knowledge activations (Tang et al., 2025).

Pipeline, one module per stage: data → calibrate → null_space → initialize (adapters: the PEFT side;
safeguards: the checks that refuse a bad init) → export; saving, integration (what every front end shares) and
the CLI on top.
"""

from . import console  # noqa: F401  (first: it drops import notices before PEFT brings in bitsandbytes)
from .calibration.covariances import Covariances, collect_covariances
from .calibration.leakage import holdout_leakage, leakage_from_covariance
from .calibration.taps import run_activation_pass
from .config import LoraNullConfig
from .errors import (
    CalibrationDataError,
    ConfigError,
    ExportError,
    FunctionNotPreservedError,
    InsufficientCalibrationError,
    InvalidRankError,
    LoraNullError,
    NonFiniteActivationsError,
    NoTargetModulesError,
    OutputExistsError,
    OwnTextUnavailableError,
    UnsupportedModelError,
)
from .frontends.jobs import init_to_folder
from .init.api import initialize_lora_null_weights, lora_null_init
from .init.peft_layers import apply_variant
from .io.export import export_for_original_base
from .io.merge import merge_to_full_model
from .io.saving import load_initialized, save_initial_adapter, save_initialized
from .meter.measure import forgetting
from .meter.reference import ForgettingReference, forgetting_reference
from .null_space import basis_factors, effective_rank, null_basis, projected_factors
from .report import InitReport, LayerReport

__version__ = "0.1.0"

__all__ = [
    "CalibrationDataError",
    "ConfigError",
    "Covariances",
    "ExportError",
    "ForgettingReference",
    "FunctionNotPreservedError",
    "InitReport",
    "InsufficientCalibrationError",
    "InvalidRankError",
    "LayerReport",
    "LoraNullConfig",
    "LoraNullError",
    "NoTargetModulesError",
    "NonFiniteActivationsError",
    "OutputExistsError",
    "OwnTextUnavailableError",
    "UnsupportedModelError",
    "apply_variant",
    "basis_factors",
    "collect_covariances",
    "effective_rank",
    "export_for_original_base",
    "forgetting",
    "forgetting_reference",
    "holdout_leakage",
    "init_to_folder",
    "initialize_lora_null_weights",
    "leakage_from_covariance",
    "load_initialized",
    "lora_null_init",
    "merge_to_full_model",
    "null_basis",
    "projected_factors",
    "run_activation_pass",
    "save_initial_adapter",
    "save_initialized",
]
