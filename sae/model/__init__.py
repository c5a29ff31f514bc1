"""InceptionV1 (lucent's port of lucid's inception5h): layers, weights, activations, receptive fields.

Depends only on torch, torchvision and lucent.
"""

from .extractor import InceptionExtractor, run_from
from .layers import BLOCK_LAYERS, LAYERS, UnknownLayerError, check_layer, layer_channels, layer_shape
from .preprocess import preprocess, preprocess_unit
from .receptive_field import ReceptiveField, crop_box, receptive_field
from .weights import (
    WEIGHTS_URL, WeightsError, WeightsUnavailableError, hub_cache_path, load_inceptionv1, read_state_dict,
    weights_source,
)

__all__ = [
    "BLOCK_LAYERS", "LAYERS", "UnknownLayerError", "check_layer", "layer_channels", "layer_shape",
    "load_inceptionv1", "WeightsError", "WeightsUnavailableError", "WEIGHTS_URL", "hub_cache_path",
    "read_state_dict", "weights_source",
    "preprocess", "preprocess_unit",
    "InceptionExtractor", "run_from",
    "ReceptiveField", "receptive_field", "crop_box",
]
