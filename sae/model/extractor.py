"""Activations of one InceptionV1 layer, computing nothing past it.

The forward pass executes the steps of ``layers.STEPS`` that the target layer
depends on (its ancestors), in lucent's order, calling lucent's own modules so
the result equals what a forward hook on ``net.<layer>`` sees in a full
forward pass, and hooks on any module the target does not need never fire.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from torch import Tensor, nn

from .layers import BLOCK_LAYERS, INPUT, LOGITS, STEP_INDEX, STEPS, Step, ancestors, check_layer, layer_channels, layer_shape
from .ops import apply_step
from .preprocess import preprocess
from .weights import RANDOM, load_inceptionv1, weights_source

log = logging.getLogger("sae.model")

UNKNOWN = "unknown"
# model.autocast: the reduced precision the convolutions may run in on CUDA (activations stay float32).
AUTOCAST_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _release_schedule(steps: tuple[Step, ...]) -> tuple[tuple[str, ...], ...]:
    """For each step, the tensors no later step reads, so they can be dropped right after it."""
    last_use: dict[str, int] = {}
    for i, step in enumerate(steps):
        for name in step.inputs:
            last_use[name] = i
    releases: list[list[str]] = [[] for _ in steps]
    for name, i in last_use.items():
        releases[i].append(name)
    return tuple(tuple(names) for names in releases)


def run_steps(net: nn.Module, steps: tuple[Step, ...], known: dict[str, Tensor]) -> Tensor:
    """Evaluate ``steps`` in order from the tensors in ``known``; return the last step's output.

    A step may overwrite its input when no later step reads it and this function made it (never a tensor
    of ``known``, which belongs to the caller).
    """
    env = dict(known)
    for step, releases in zip(steps, _release_schedule(steps)):
        owned = step.inputs[0] in releases and step.inputs[0] not in known
        env[step.name] = apply_step(net, step, [env[name] for name in step.inputs], owned=owned)
        for name in releases:
            del env[name]
    return env[steps[-1].name]


def run_from(net: nn.Module, layer: str, activations: Tensor) -> Tensor:
    """Continue lucent's InceptionV1 from a block layer's activations to the pre-softmax logits.

    activations: (B, C, H', W') activations of ``layer`` (one of BLOCK_LAYERS), e.g. an SAE
    reconstruction of mixed4b at (B, 512, 14, 14) for 224-px images. Returns (B, 1008) logits, the output
    of ``net.softmax2_pre_activation_matmul``.
    """
    check_layer(layer)
    if layer not in BLOCK_LAYERS:
        raise ValueError(
            f"run_from continues only from a block layer, where the network is a single chain: {', '.join(BLOCK_LAYERS)}; "
            f"{layer!r} is inside a block."
        )
    if activations.ndim != 4 or activations.shape[1] != layer_channels(layer):
        raise ValueError(
            f"Expected (B, {layer_channels(layer)}, H, W) activations of {layer!r}, got {tuple(activations.shape)}."
        )
    parameter = next(net.parameters())
    activations = activations.to(device=parameter.device, dtype=parameter.dtype)
    return run_steps(net, STEPS[STEP_INDEX[layer] + 1 : STEP_INDEX[LOGITS] + 1], {layer: activations})


class InceptionExtractor(nn.Module):
    """RGB images (B, 3, H, W) in [0, 255] -> float32 activations (B, d_in, H', W') of ``layer``.

    The network is lucent's InceptionV1 (``self.net``, frozen, eval mode), loaded by ``load_inceptionv1``
    unless ``net`` is given (then ``pretrained`` and ``weights`` are not used). ``self.pretrained`` is False
    for random weights, and for a ``net`` of unknown origin, so runs can be tagged accordingly.
    ``channels_last=True`` converts ``net`` (in place, so also for whoever shares it) and the input to NHWC,
    a speed option; the output is the same values, contiguous NCHW.

    ``compile``: run the truncated forward through ``torch.compile`` (True), eagerly (False), or None = auto:
    compiled on CUDA, eager on CPU (where compiling costs 10-30 s for a modest gain). The first compiled call
    logs its compile time. ``autocast``: None (fp32), "bf16" or "fp16" convolutions on CUDA; the output is
    float32 either way. CPU runs ignore it (with one log line), so a config written for a GPU still runs.
    """

    def __init__(
        self,
        layer: str,
        pretrained: bool = True,
        weights: str | os.PathLike | None = None,
        channels_last: bool = False,
        net: nn.Module | None = None,
        compile: bool | None = None,
        autocast: str | None = None,
    ) -> None:
        super().__init__()
        if compile not in (None, True, False):
            raise ValueError(f"model.compile={compile!r} must be true, false or null (auto: on for CUDA).")
        if autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"model.autocast={autocast!r} must be one of null, bf16, fp16 (CUDA only).")
        self.layer = check_layer(layer)
        self.d_in = layer_channels(layer)
        if net is None:
            net = load_inceptionv1(pretrained=pretrained, weights=weights)
        elif weights is not None:
            raise ValueError("Pass either net or weights to InceptionExtractor, not both.")
        self.net = net.eval().requires_grad_(False)
        self.weights_source = weights_source(net) or UNKNOWN
        if self.weights_source == UNKNOWN:
            log.warning("InceptionExtractor got a net not loaded by load_inceptionv1; reporting pretrained=False.")
        self.pretrained = self.weights_source not in (RANDOM, UNKNOWN)
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self._steps = ancestors(self.layer)
        self.compile, self.autocast = compile, autocast
        self.compile_seconds: float | None = None  # wall time of the first compiled call, once it happened
        self._compiled = None
        self._warned_autocast = False

    def _run(self, x: Tensor) -> Tensor:
        return run_steps(self.net, self._steps, {INPUT: x})

    def uses_compile(self, device: torch.device) -> bool:
        return self.compile if self.compile is not None else device.type == "cuda"

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) uint8 or float pixels in [0, 255] -> (B, d_in, H', W') float32, contiguous NCHW."""
        parameter = next(self.net.parameters())
        # Move before preprocessing: uint8 crosses the bus in a quarter of the bytes of float32.
        x = preprocess(images.to(parameter.device, non_blocking=True)).to(parameter.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast(parameter.device):
            if not self.uses_compile(parameter.device):
                activations = self._run(x)
            elif self._compiled is None:
                self._compiled = torch.compile(self._run, dynamic=False)
                start = time.perf_counter()
                activations = self._compiled(x)
                self.compile_seconds = time.perf_counter() - start
                log.info("compiled the %s extractor in %.1f s", self.layer, self.compile_seconds)
            else:
                activations = self._compiled(x)
        return activations.float().contiguous()

    def _autocast(self, device: torch.device):
        """bf16/fp16 autocast on CUDA when asked for; a no-op context otherwise."""
        if self.autocast is not None and device.type == "cuda":
            return torch.autocast("cuda", dtype=AUTOCAST_DTYPES[self.autocast])
        if self.autocast is not None and not self._warned_autocast:
            log.info("model.autocast=%s applies on CUDA only; extracting in float32 on %s", self.autocast, device)
            self._warned_autocast = True
        return torch.autocast(device.type, enabled=False)

    def forward_from(self, activations: Tensor) -> Tensor:
        """(B, d_in, H', W') activations of this (block) layer -> (B, 1008) pre-softmax logits."""
        return run_from(self.net, self.layer, activations)

    def output_shape(self, image_size: int | tuple[int, int]) -> tuple[int, int, int]:
        """(d_in, H', W') for images of side ``image_size``."""
        return layer_shape(self.layer, image_size)

    def train(self, mode: bool = True) -> InceptionExtractor:
        # The network is a fixed feature map: a parent module's .train() must not change it.
        super().train(mode)
        self.net.eval()
        return self

    def extra_repr(self) -> str:
        return (f"layer={self.layer!r}, d_in={self.d_in}, weights={self.weights_source!r}, "
                f"compile={self.compile}, autocast={self.autocast}")

