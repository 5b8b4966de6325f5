"""vggkit: the VGG networks of Simonyan & Zisserman (2014) as a practical toolkit."""

from .backbone import VGGBackbone, backbone
from .configs import PAPER_PARAMETERS, list_models, resolve
from .model import VGG, FullyConvVGG
from .evaluate import evaluate
from .extract import Features, extract_features, probe
from .finetune import FinetuneResult, finetune
from .lpips_distance import LPIPS
from .perceptual import PerceptualLoss, StyleLoss
from .predict import load, predict
from .preprocess import Preprocess
from .protocols import class_heatmap, class_score_maps, dense_predict
from .runtime import optimize
from .train import init_from, train
from .receptive_field import effective_receptive_field, receptive_field
from .weights import (
    WeightsError,
    WeightsUnavailableError,
    count_parameters,
    create_model,
    export_state_dict,
    save_checkpoint,
)

__version__ = "0.1.0"

__all__ = [
    "VGG", "FullyConvVGG", "VGGBackbone", "Preprocess", "WeightsError", "WeightsUnavailableError",
    "PAPER_PARAMETERS", "backbone", "count_parameters", "create_model", "effective_receptive_field",
    "export_state_dict", "list_models", "optimize", "receptive_field", "resolve", "save_checkpoint",
    "class_heatmap", "class_score_maps", "dense_predict", "evaluate",
    "Features", "FinetuneResult", "extract_features", "finetune", "load", "predict", "probe",
    "init_from", "train", "LPIPS", "PerceptualLoss", "StyleLoss",
]
