"""Which input pixels an activation can see.

Walks ``layers.STEPS`` (the same graph the extractor runs) composing each
convolution's and max-pool's kernel, stride and left/top padding. With the
field of the input to a step spanning ``size`` pixels from ``start``, stepping
``stride`` pixels per position, a k x k window with stride s and left padding p
gives output position 0 the input positions -p .. k-1-p, hence

    start' = start - p * stride,  size' = size + (k - 1) * stride,  stride' = stride * s.

ReLUs and the local response norm (across channels only) are pointwise in
space. A concatenation sees the union of its branches' fields; in InceptionV1
every branch is centred on the same pixel (symmetric padding), so the union is
the largest branch's field.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from .layers import INPUT, Step, ancestors, check_layer, layer_shape


@dataclass(frozen=True)
class ReceptiveField:
    """Output (i, j) sees the size x size input window centred at (offset + i*stride, offset + j*stride)."""

    size: int
    stride: int
    offset: float

    @property
    def start(self) -> int:
        """Input coordinate of the first pixel seen by output position 0 (may be negative: padding)."""
        return int(self.offset - (self.size - 1) / 2)


def _compose(step: Step, fields: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    """(start, size, stride) of ``step``'s output from those of its inputs."""
    if step.op == "concat":
        strides = {stride for _, _, stride in fields}
        if len(strides) != 1:
            raise AssertionError(f"{step.name}: branches with different strides {strides}")
        start = min(s for s, _, _ in fields)
        end = max(s + size for s, size, _ in fields)
        return start, end - start, strides.pop()
    start, size, stride = fields[0]
    if step.op in ("conv", "maxpool"):
        left, _, top, _ = step.pad
        if left != top:
            raise AssertionError(f"{step.name}: different left and top padding; the field is not square")
        return start - left * stride, size + (step.kernel - 1) * stride, stride * step.stride
    return start, size, stride  # relu, lrn: pointwise in space


@cache
def receptive_field(layer: str) -> ReceptiveField:
    """The receptive field of one spatial position of ``layer``, in input pixels."""
    check_layer(layer)
    fields = {INPUT: (0, 1, 1)}
    for step in ancestors(layer):
        fields[step.name] = _compose(step, [fields[name] for name in step.inputs])
    start, size, stride = fields[layer]
    return ReceptiveField(size=size, stride=stride, offset=start + (size - 1) / 2)


def crop_box(layer: str, i: int, j: int, image_size: int | tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the input pixels that ``layer``'s position (i, j) sees, clipped to the image.

    Half-open: ``image[..., top:bottom, left:right]`` is the crop.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    _, rows, cols = layer_shape(layer, (height, width))
    if not (0 <= i < rows and 0 <= j < cols):
        raise IndexError(f"Position ({i}, {j}) is outside {layer!r}'s {rows}x{cols} grid for a {height}x{width} image.")
    field = receptive_field(layer)
    top, left = field.start + i * field.stride, field.start + j * field.stride
    return max(top, 0), max(left, 0), min(top + field.size, height), min(left + field.size, width)
