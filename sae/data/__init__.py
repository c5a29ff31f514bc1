"""Image sources, vector sources, the activation stream and the DataModules."""

from sae.data.datamodule import ActivationDataModule, ImageActivationDataModule, VectorDataModule
from sae.data.images import CropSpec, ImageFolder, ImageSource, ImageSourceError, SampleImages, to_rgb
from sae.data.responses import ResponseDataModule, ResponseFileError, load_responses, stimulus_paths
from sae.data.stream import ActivationStream, ImageStream, StreamSampler, derive_seed, to_vectors
from sae.data.vectors import ShardedVectors, ShardStream, VectorFileError, VectorStream, check_vectors, load_vectors

__all__ = [
    "ActivationDataModule",
    "ActivationStream",
    "CropSpec",
    "ImageActivationDataModule",
    "ImageFolder",
    "ImageSource",
    "ImageSourceError",
    "ImageStream",
    "ResponseDataModule",
    "ResponseFileError",
    "SampleImages",
    "ShardStream",
    "ShardedVectors",
    "StreamSampler",
    "VectorDataModule",
    "VectorFileError",
    "VectorStream",
    "check_vectors",
    "derive_seed",
    "load_responses",
    "load_vectors",
    "stimulus_paths",
    "to_rgb",
    "to_vectors",
]
