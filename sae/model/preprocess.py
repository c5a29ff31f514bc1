"""Input scaling for lucid's InceptionV1.

Lucid's graph was trained on pixels in [0, 255] with the ImageNet mean 117
subtracted, so it expects inputs in [-117, 138]. Lucent's feature
visualisation applies ``x * 255 - 117`` to images x in [0, 1]
(``lucent.optvis.transform.preprocess_inceptionv1``); these functions are that
same map, for the two ways images arrive here.
"""

from __future__ import annotations

import torch
from torch import Tensor

LUCID_MEAN = 117.0


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"Expected RGB images of shape (B, 3, H, W), got {tuple(images.shape)}.")


def preprocess(images: Tensor) -> Tensor:
    """RGB pixels in [0, 255] (uint8 or float), (B, 3, H, W) -> float32 (B, 3, H, W) in [-117, 138]."""
    _check_images(images)
    # Cast before subtracting: uint8 arithmetic would wrap around below zero.
    return images.to(torch.float32) - LUCID_MEAN


def preprocess_unit(x: Tensor) -> Tensor:
    """RGB in [0, 1], (B, 3, H, W) -> float32 (B, 3, H, W) in [-117, 138] (lucent's preprocess_inceptionv1)."""
    _check_images(x)
    return x.to(torch.float32) * 255.0 - LUCID_MEAN
