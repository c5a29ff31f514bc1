"""InceptionV1 (lucid's "inception5h", as ported by lucent) written down as data.

The network is a list of named ``Step``s in the exact order lucent's
``InceptionV1.forward`` evaluates them. Each step names its inputs, so the
same list drives three things without duplicating the architecture:

* the extractor (``extractor.py``) runs only the ancestors of a target layer;
* ``layer_shape`` / ``layer_channels`` propagate sizes without any tensors;
* ``receptive_field.py`` propagates kernel/stride/padding geometry.

A step's ``name`` is lucent's name for the tensor it produces. Where lucent
holds a module of that name (convolutions, ReLUs, max-pools, concatenations,
the final linear layer), the extractor calls that very module whenever forward hooks
are registered on it (lucent's objectives, tests), so they still fire; without hooks it
may run the same math faster (see ``ops.py``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cache

from sae.errors import UserError

INPUT = "input"  # the preprocessed image, (B, 3, H, W)

# (left, right, top, bottom), F.pad's order for the last two dimensions.
Pad = tuple[int, int, int, int]
NO_PAD: Pad = (0, 0, 0, 0)


@dataclass(frozen=True)
class Step:
    """One operation of the forward pass.

    op is one of:
      "conv"    zero-pad by ``pad`` then ``net.<name>`` (a square Conv2d, ``kernel``, ``stride``)
      "relu"    ``net.<name>`` (lucent's (redirected) ReLU)
      "maxpool" pad with -inf by ``pad`` then ``net.<name>`` (``kernel``, ``stride``, no implicit padding)
      "lrn"     local response norm across channels (a function in lucent, no module)
      "concat"  ``net.<name>`` concatenating ``inputs`` along channels, in order
      "avgpool" 7x7 average pool then flatten to (B, 1024) (a function in lucent)
      "linear"  ``net.<name>`` (the classifier)
    """

    name: str
    op: str
    inputs: tuple[str, ...]
    kernel: int = 1
    stride: int = 1
    pad: Pad = NO_PAD
    channels: int = 0  # output channels for convs; derived for every other op


# Output channels of each inception block's branches, as in lucid's graph:
# (1x1, 3x3 bottleneck, 3x3, 5x5 bottleneck, 5x5, pool reduce).
MIXED_BRANCH_CHANNELS: dict[str, tuple[int, int, int, int, int, int]] = {
    "mixed3a": (64, 96, 128, 16, 32, 32),
    "mixed3b": (128, 128, 192, 32, 96, 64),
    "mixed4a": (192, 96, 204, 16, 48, 64),
    "mixed4b": (160, 112, 224, 24, 64, 64),
    "mixed4c": (128, 128, 256, 24, 64, 64),
    "mixed4d": (112, 144, 288, 32, 64, 64),
    "mixed4e": (256, 160, 320, 32, 128, 128),
    "mixed5a": (256, 160, 320, 48, 128, 128),
    "mixed5b": (384, 192, 384, 48, 128, 128),
}

PAD_1: Pad = (1, 1, 1, 1)
PAD_2: Pad = (2, 2, 2, 2)
# The stride-2 max-pools pad only right and bottom (TensorFlow "SAME" for even sizes).
PAD_RIGHT_BOTTOM: Pad = (0, 1, 0, 1)

# Lucent's F.local_response_norm constants (lucid's depth_radius=4, bias=1, alpha=1e-4, beta=0.5).
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 9, 9.99999974738e-05, 0.5, 1.0


def _conv(name: str, source: str, channels: int, kernel: int = 1, stride: int = 1, pad: Pad = NO_PAD) -> Step:
    return Step(f"{name}_pre_relu_conv", "conv", (source,), kernel, stride, pad, channels)


def _relu(name: str) -> Step:
    return Step(name, "relu", (f"{name}_pre_relu_conv",))


def _maxpool(name: str, source: str, stride: int, pad: Pad) -> Step:
    return Step(name, "maxpool", (source,), kernel=3, stride=stride, pad=pad)


def _mixed_block(block: str, source: str) -> list[Step]:
    """The steps of one inception block, in the order lucent's forward runs them."""
    c1, c3_bottleneck, c3, c5_bottleneck, c5, c_pool_reduce = MIXED_BRANCH_CHANNELS[block]
    b = block
    return [
        _conv(f"{b}_1x1", source, c1),
        _conv(f"{b}_3x3_bottleneck", source, c3_bottleneck),
        _conv(f"{b}_5x5_bottleneck", source, c5_bottleneck),
        _maxpool(f"{b}_pool", source, stride=1, pad=PAD_1),
        _relu(f"{b}_1x1"),
        _relu(f"{b}_3x3_bottleneck"),
        _relu(f"{b}_5x5_bottleneck"),
        _conv(f"{b}_pool_reduce", f"{b}_pool", c_pool_reduce),
        _conv(f"{b}_3x3", f"{b}_3x3_bottleneck", c3, kernel=3, pad=PAD_1),
        _conv(f"{b}_5x5", f"{b}_5x5_bottleneck", c5, kernel=5, pad=PAD_2),
        _relu(f"{b}_pool_reduce"),
        _relu(f"{b}_3x3"),
        _relu(f"{b}_5x5"),
        Step(b, "concat", (f"{b}_1x1", f"{b}_3x3", f"{b}_5x5", f"{b}_pool_reduce")),
    ]


def _build_steps() -> tuple[Step, ...]:
    steps = [
        _conv("conv2d0", INPUT, 64, kernel=7, stride=2, pad=(2, 3, 2, 3)),
        _relu("conv2d0"),
        _maxpool("maxpool0", "conv2d0", stride=2, pad=PAD_RIGHT_BOTTOM),
        Step("localresponsenorm0", "lrn", ("maxpool0",)),
        _conv("conv2d1", "localresponsenorm0", 64),
        _relu("conv2d1"),
        _conv("conv2d2", "conv2d1", 192, kernel=3, pad=PAD_1),
        _relu("conv2d2"),
        Step("localresponsenorm1", "lrn", ("conv2d2",)),
        _maxpool("maxpool1", "localresponsenorm1", stride=2, pad=PAD_RIGHT_BOTTOM),
    ]
    steps += _mixed_block("mixed3a", "maxpool1")
    steps += _mixed_block("mixed3b", "mixed3a")
    steps.append(_maxpool("maxpool4", "mixed3b", stride=2, pad=PAD_RIGHT_BOTTOM))
    steps += _mixed_block("mixed4a", "maxpool4")
    for previous, block in zip(["mixed4a", "mixed4b", "mixed4c", "mixed4d"], ["mixed4b", "mixed4c", "mixed4d", "mixed4e"]):
        steps += _mixed_block(block, previous)
    steps.append(_maxpool("maxpool10", "mixed4e", stride=2, pad=PAD_RIGHT_BOTTOM))
    steps += _mixed_block("mixed5a", "maxpool10")
    steps += _mixed_block("mixed5b", "mixed5a")
    steps.append(Step("avgpool0", "avgpool", ("mixed5b",), kernel=7))
    steps.append(Step("softmax2_pre_activation_matmul", "linear", ("avgpool0",), channels=1008))
    return tuple(steps)


STEPS: tuple[Step, ...] = _build_steps()
STEP_INDEX: dict[str, int] = {step.name: i for i, step in enumerate(STEPS)}
LOGITS = "softmax2_pre_activation_matmul"

# Addressable = a spatial (B, C, H, W) tensor that lucent exposes as a module output.
LAYERS: tuple[str, ...] = tuple(s.name for s in STEPS if s.op in ("conv", "relu", "maxpool", "concat"))
BLOCK_LAYERS: tuple[str, ...] = ("conv2d0", "conv2d1", "conv2d2", *MIXED_BRANCH_CHANNELS)


class UnknownLayerError(UserError, ValueError):
    """A layer name that is not one of ``LAYERS``."""


def check_layer(name: str, allowed: tuple[str, ...] = LAYERS) -> str:
    """Return ``name`` if it is in ``allowed``; otherwise raise listing every valid name."""
    if name in allowed:
        return name
    close = difflib.get_close_matches(str(name), allowed, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownLayerError(
        f"Unknown InceptionV1 layer {name!r}.{hint} Valid layers (lucent module names, forward order): "
        + ", ".join(allowed)
    )


@cache
def ancestors(layer: str) -> tuple[Step, ...]:
    """The steps needed to compute ``layer`` from the input, in forward order, ending with ``layer``."""
    needed = {layer}
    for step in reversed(STEPS[: STEP_INDEX[layer] + 1]):
        if step.name in needed:
            needed.update(step.inputs)
    return tuple(s for s in STEPS[: STEP_INDEX[layer] + 1] if s.name in needed)


def _output_channels(step: Step, channels: dict[str, int]) -> int:
    if step.op == "concat":
        return sum(channels[i] for i in step.inputs)
    if step.op in ("conv", "linear"):
        return step.channels
    return channels[step.inputs[0]]


def _output_side(step: Step, side: int, before: int, after: int) -> int:
    return (side + before + after - step.kernel) // step.stride + 1


@cache
def _all_channels() -> dict[str, int]:
    channels = {INPUT: 3}
    for step in STEPS:
        channels[step.name] = _output_channels(step, channels)
    return channels


def layer_channels(name: str) -> int:
    """Channels C of ``name``'s activations (e.g. mixed3b -> 480)."""
    return _all_channels()[check_layer(name)]


def layer_shape(name: str, image_size: int | tuple[int, int]) -> tuple[int, int, int]:
    """(C, H', W') of ``name`` for a (B, 3, H, W) input, ``image_size`` = H = W or (H, W)."""
    check_layer(name)
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    sides: dict[str, tuple[int, int]] = {INPUT: (height, width)}
    for step in ancestors(name):
        h, w = sides[step.inputs[0]]
        if step.op in ("conv", "maxpool"):
            left, right, top, bottom = step.pad
            h, w = _output_side(step, h, top, bottom), _output_side(step, w, left, right)
        if h < 1 or w < 1:
            raise ValueError(f"A {height}x{width} image is too small to reach layer {name!r} (empty at {step.name!r}).")
        sides[step.name] = (h, w)
    return (layer_channels(name), *sides[name])
