"""The operations of ``layers.STEPS``: lucent's values, computed the fast way where it is the same math.

Lucent's InceptionV1 pads every convolution and max-pool with an explicit ``F.pad`` copy, runs LRN through
torch's ``F.local_response_norm`` (a 3-D average pool over a 5-D view) and its ReLUs out of place. Measured on
a 2-core CPU, mixed3b, channels_last, 16 images at 224 px (torch profiler, share of the forward): the pads
14%, LRN 40%, the ReLUs 7%. Here, when no forward hook is registered on the module (hooks must see lucent's
calls, see ``layers.py``):

* symmetric paddings go into the convolution / max-pool (zeros / -inf: what ``F.pad`` would write), and the
  stride-2 max-pools' right/bottom padding becomes ``ceil_mode``, which keeps the same windows;
* LRN sums its 9-channel window with one (C, C) band matmul;
* a ReLU overwrites its input when nothing else reads it and no gradient is being recorded.

Results equal lucent's up to float32 rounding (``tests/test_model.py`` compares every layer with a forward
hook on lucent's own full forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as module_globals

from .layers import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE, Step

assert LRN_BETA == 0.5, "local_response_norm computes the power -beta as an rsqrt"


def apply_step(net: nn.Module, step: Step, inputs: list[Tensor], owned: bool = False) -> Tensor:
    """Evaluate one step on its input tensors as lucent's forward does (values, and gradients where recorded).

    ``owned``: the caller will not read ``inputs[0]`` again, so the step may overwrite it.
    """
    x = inputs[0]
    if step.op == "conv":
        return _conv(getattr(net, step.name), step, x)
    if step.op == "relu":
        relu = getattr(net, step.name)
        if owned and not torch.is_grad_enabled() and not _has_hooks(relu):
            # Lucent's (redirected) ReLU only differs from relu in its backward, which is not recorded here.
            return x.relu_()
        return relu(x)
    if step.op == "maxpool":
        return _maxpool(getattr(net, step.name), step, x)
    if step.op == "lrn":
        return local_response_norm(x)
    if step.op == "concat":
        return getattr(net, step.name)(tuple(inputs), 1)
    if step.op == "avgpool":
        return _global_average(x)
    if step.op == "linear":
        return getattr(net, step.name)(x)
    raise AssertionError(f"unhandled op {step.op!r}")


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run any forward hook (its own or a global one)."""
    # torch's hook dicts are private, but torch has no public way to ask whether a module has hooks.
    return bool(module._forward_hooks or module._forward_pre_hooks
                or module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks)


def _conv(conv: nn.Conv2d, step: Step, x: Tensor) -> Tensor:
    left, right, top, bottom = step.pad
    if left == right and top == bottom and conv.padding == (0, 0) and not _has_hooks(conv):
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, (top, left), conv.dilation, conv.groups)
    # Lucent pads explicitly (asymmetrically for conv2d0) and convolves without implicit padding.
    padded = F.pad(x, step.pad) if any(step.pad) else x
    return conv(padded)


def _maxpool(pool: nn.Module, step: Step, x: Tensor) -> Tensor:
    size, stride = (step.kernel, step.kernel), (step.stride, step.stride)
    left, right, top, bottom = step.pad
    if not _has_hooks(pool):
        if left == right and top == bottom and max(top, left) <= step.kernel // 2:
            return F.max_pool2d(x, size, stride, (top, left))  # max_pool2d pads with -inf itself
        if (left, top) == (0, 0) and _ceil_mode_matches(x.shape[-2:], step):
            return F.max_pool2d(x, size, stride, 0, ceil_mode=True)
    # -inf padding: padded cells never win the max, unlike zeros after a pre-ReLU layer.
    padded = F.pad(x, step.pad, value=float("-inf"))
    return pool(padded, kernel_size=size, stride=stride, padding=0, ceil_mode=False)


def _ceil_mode_matches(sides: torch.Size, step: Step) -> bool:
    """Whether ceil_mode yields the windows of padding right/bottom: the same output size, every window starting
    inside the input (ceil_mode drops a last window that would start in the padding)."""
    _, right, _, bottom = step.pad
    for side, pad in zip(sides, (bottom, right)):
        padded = (side + pad - step.kernel) // step.stride + 1
        ceiled = -(-(side - step.kernel) // step.stride) + 1
        if side < step.kernel or padded != ceiled or (ceiled - 1) * step.stride >= side:
            return False
    return True


def local_response_norm(x: Tensor) -> Tensor:
    """Lucent's ``F.local_response_norm(x, 9, alpha, 0.5, 1)``: x / (k + alpha * mean of x^2 over 9 channels)^beta.

    x (B, C, H, W), NCHW or channels_last; the result has x's memory format. torch squares, pads and
    average-pools a 5-D view; here the window sum is one (C, C) band matmul over the channel axis, and the
    power -beta is an rsqrt (lucid's beta is 0.5).
    """
    channels = x.shape[1]
    # torch pads size // 2 channels before and (size - 1) // 2 after: output c sums inputs c - 4 .. c + 4.
    ones = torch.ones(channels, channels, dtype=x.dtype, device=x.device)
    band = ones.triu(-(LRN_SIZE // 2)).tril_((LRN_SIZE - 1) // 2).mul_(LRN_ALPHA / LRN_SIZE)  # (C_in, C_out)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        scaled = (x.permute(0, 2, 3, 1).square() @ band).permute(0, 3, 1, 2)  # NHWC rows @ band
    else:
        scaled = (band.T @ x.square().flatten(2)).view_as(x)  # (C_out, C_in) @ (B, C_in, HW)
    return x * scaled.add_(LRN_K).rsqrt_()


def _global_average(mixed5b: Tensor) -> Tensor:
    """(B, 1024, 7, 7) -> (B, 1024): lucent's 7x7 average pool followed by a reshape to (-1, 1024)."""
    if mixed5b.shape[-2:] != (7, 7):
        # Smaller maps cannot be pooled; larger ones lucent would reshape from (B, 1024, h, w) to
        # (B*h*w, 1024), interleaving channels and positions: meaningless logits.
        raise ValueError(f"The classifier needs mixed5b at 7x7 (224-px images); got {tuple(mixed5b.shape[-2:])}.")
    pooled = F.avg_pool2d(mixed5b, kernel_size=(7, 7), stride=(1, 1), padding=(0,), ceil_mode=False, count_include_pad=False)
    return pooled.reshape(-1, 1024)
