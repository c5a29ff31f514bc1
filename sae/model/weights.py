"""Loading lucent's InceptionV1 with lucid's weights, a local copy, or (loudly) random weights.

Three sources, chosen explicitly and never substituted for one another:

* ``pretrained=True``: lucent's URL through ``torch.hub.load_state_dict_from_url``,
  i.e. the file ``torch.hub.get_dir()/checkpoints/inception5h.pth``. A cached
  file is read without touching the network; a failed download raises
  ``WeightsUnavailableError`` (quickly, offline) that says how to proceed.
* ``weights=PATH``: a local state dict (``torch.save(net.state_dict())`` or
  ``.safetensors``), validated key by key and shape by shape (``WeightsError``).
* ``pretrained=False``: lucent's default initialisation, with a WARNING.
* ``weights="planted"``: a known-answer network, weights constructed so that conv2d2, mixed3a and mixed3b
  hold known features (``planted.py``; ``planted_truth(layer)`` gives them). ``pretrained`` is not used.

The returned module carries where its weights came from (``weights_source``)
so that runs can record it.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from lucent.modelzoo.inceptionv1.InceptionV1 import InceptionV1, model_urls
from torch import Tensor, nn

from sae.errors import UserError
from sae.safeload import load_error_text, torch_load

log = logging.getLogger("sae.model")

WEIGHTS_URL: str = model_urls["inceptionv1"]
DOWNLOAD_TIMEOUT_S = 15.0  # per socket operation; keeps an offline attempt from hanging
_SOURCE_ATTR = "sae_weights_source"
RANDOM = "random"
PLANTED = "planted"

EXPECTED_FORMAT = (
    "a state dict of lucent's InceptionV1 (keys like 'conv2d0_pre_relu_conv.weight' with shape (64, 3, 7, 7), "
    "... 'softmax2_pre_activation_matmul.bias' with shape (1008,)), saved with "
    "torch.save(net.state_dict(), 'inception5h.pth') or safetensors.torch.save_file(net.state_dict(), 'x.safetensors')"
)


class WeightsUnavailableError(UserError, RuntimeError):
    """Lucid's pretrained weights are neither cached nor downloadable."""


class WeightsError(UserError, ValueError):
    """A weights file is missing, unreadable, or not an InceptionV1 state dict."""


def hub_cache_path() -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps lucent's InceptionV1 weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(WEIGHTS_URL).path)


def weights_source(net: nn.Module) -> str | None:
    """"random", "planted", "file:PATH" or "hub:URL" for a net from ``load_inceptionv1``; None for any other net."""
    return getattr(net, _SOURCE_ATTR, None)


RANDOM_WEIGHTS_SEED = 0


def load_inceptionv1(pretrained: bool = True, weights: str | os.PathLike | None = None) -> nn.Module:
    """Lucent's InceptionV1 in eval mode with frozen parameters.

    Raises WeightsUnavailableError (pretrained weights not cached and not downloadable)
    or WeightsError (a bad ``weights`` file). Never falls back to random weights.
    """
    if weights is not None and str(weights) != PLANTED and not pretrained:
        raise WeightsError(
            f"model.pretrained=false asks for random weights but model.weights={weights!s} asks for a file; drop one."
        )
    # Random weights are always the same network (seed 0, whatever the global RNG state), so an SAE trained
    # on them can be evaluated later on the very network it saw.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        net = InceptionV1(pretrained=False)
    if str(weights) == PLANTED:
        from .planted import plant_

        plant_(net)
        source = PLANTED
    elif weights is not None:
        path = Path(weights).expanduser()
        _load_checked(net, read_state_dict(path), origin=str(path))
        source = f"file:{path}"
    elif pretrained:
        _load_checked(net, _lucid_state_dict(), origin=str(hub_cache_path()))
        source = f"hub:{WEIGHTS_URL}"
    else:
        log.warning(
            "InceptionV1 has RANDOM weights (model.pretrained=false): its activations, and any SAE trained on "
            "them, say nothing about the real network. Use this for testing only."
        )
        source = RANDOM
    net.eval()
    net.requires_grad_(False)
    setattr(net, _SOURCE_ATTR, source)
    return net


def hub_state_dict(url: str) -> dict[str, Tensor]:
    """The state dict at `url` through torch.hub's cache, downloading it once with a short socket timeout (an
    offline attempt fails in seconds instead of hanging). Download errors (OSError, HTTPException) propagate
    for the caller to explain."""
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, weights_only=True)
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _lucid_state_dict() -> dict[str, Tensor]:
    cache = hub_cache_path()
    was_cached = cache.is_file()
    try:
        return hub_state_dict(WEIGHTS_URL)
    except (OSError, http.client.HTTPException) as err:
        if was_cached:
            raise WeightsError(f"Cannot read the cached weights {cache} ({load_error_text(err)}); delete the file and "
                               "retry.") from err
        raise WeightsUnavailableError(
            f"Cannot download lucid's InceptionV1 weights from {WEIGHTS_URL} into the torch hub cache {cache} "
            f"({type(err).__name__}: {err}). Fix: put a copy of that file at {cache}, or load a local copy with "
            f"model.weights=PATH, or (for testing only) use random weights with model.pretrained=false."
        ) from err
    except Exception as err:  # a cached or just-downloaded file that torch.load rejects
        raise WeightsError(f"Cannot read the weights at {cache} ({load_error_text(err)}); delete the file and retry.") \
            from err


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a ``.pth``/``.pt`` (torch.save) or ``.safetensors`` file, on the CPU."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"Weights file {path} does not exist. Expected {EXPECTED_FORMAT}.")
    try:
        if path.suffix == ".safetensors":
            state = _read_safetensors(path)
        else:
            state = torch_load(path, map_location="cpu")
    except Exception as err:  # unpickling, zip and header errors come in many types
        raise WeightsError(f"Cannot read weights file {path} ({load_error_text(err)}). Expected {EXPECTED_FORMAT}.") \
            from err
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a dict of tensors. Expected {EXPECTED_FORMAT}.")
    return dict(state)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    """Parse the safetensors layout: u64 header length, JSON header, then raw little-endian data."""
    if sys.byteorder != "little":
        raise WeightsError("Reading .safetensors needs a little-endian machine; save the weights with torch.save.")
    data = path.read_bytes()
    (header_length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_length])
    header.pop("__metadata__", None)
    base = 8 + header_length
    tensors = {}
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        dtype, shape = _SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"]
        # bytearray copies the slice into writable memory that the tensor then owns.
        raw = bytearray(data[base + start : base + end])
        tensors[name] = torch.frombuffer(raw, dtype=dtype).reshape(shape) if raw else torch.empty(shape, dtype=dtype)
    return tensors


def _load_checked(net: nn.Module, state: Mapping[str, Tensor], origin: str) -> None:
    """Load ``state`` into ``net`` after checking every key and shape, naming the first offenders."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
        if keys:
            shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise WeightsError(
            f"{origin} is not an InceptionV1 state dict ({'; '.join(problems)}). Expected {EXPECTED_FORMAT}."
        )
    nonfinite = [k for k in expected if state[k].is_floating_point() and not bool(torch.isfinite(state[k]).all())]
    if nonfinite:
        raise WeightsError(f"{origin} holds NaN or inf in {len(nonfinite)} tensor(s) ({', '.join(nonfinite[:3])}): a "
                           "damaged or diverged file. Use an intact copy of lucid's InceptionV1 weights.")
    net.load_state_dict(state)
