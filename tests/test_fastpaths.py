"""Every fast path equals the plain one: compiled and channels_last extraction, sparse decode, the fused
encoder bias; GPU-only paths (autocast, pinned copies) import everywhere and are skipped cleanly on CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from sae.data import ImageActivationDataModule, SampleImages
from sae.model import InceptionExtractor, load_inceptionv1
from sae.model.extractor import run_steps
from sae.model.ops import apply_step, local_response_norm
from sae.model.layers import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE, STEPS, ancestors
from sae.nn import build_sae
from tests.helpers import REPO

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def net():
    return load_inceptionv1(pretrained=False)


def pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_extractor__compiled_equals_eager(net):
    images = pixels(2, 32)
    eager = InceptionExtractor("conv2d0", net=net, compile=False)
    compiled = InceptionExtractor("conv2d0", net=net, compile=True)
    with torch.inference_mode():
        expected, actual = eager(images), compiled(images)
    assert compiled.compile_seconds is not None and compiled.compile_seconds > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_extractor__channels_last_equals_nchw_deep_in_the_net():
    plain = InceptionExtractor("mixed3b", pretrained=False)
    fast = InceptionExtractor("mixed3b", net=load_inceptionv1(pretrained=False), channels_last=True)
    images = pixels(2, 64)
    with torch.inference_mode():
        expected, actual = plain(images), fast(images)
    assert actual.is_contiguous() and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("channels", [5, 64, 192])
@pytest.mark.parametrize("channels_last", [False, True])
def test_local_response_norm__equals_torchs_in_either_memory_format(channels, channels_last):
    x = 40 * torch.randn(2, channels, 6, 7, generator=torch.Generator().manual_seed(channels))
    expected = F.local_response_norm(x, size=LRN_SIZE, alpha=LRN_ALPHA, beta=LRN_BETA, k=LRN_K)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    actual = local_response_norm(x)
    assert actual.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


class _TorchCalls(TorchFunctionMode):
    """Records the names of the torch functions called inside it."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_extractor__fused_padding_equals_explicit_padding_with_gradients(net):
    """The hook-free path (padding inside conv / max-pool, no padded copy) and lucent's modules on padded
    copies (taken when a module has a hook) agree."""
    x = torch.randn(2, 480, 9, 9, requires_grad=True)
    steps = ancestors("mixed4a")[-14:]  # mixed4a's block: 3x3 / 5x5 convs and the stride-1 max-pool, all padded
    assert {s.op for s in steps if any(s.pad)} == {"conv", "maxpool"}
    with _TorchCalls() as calls:
        fast = run_steps(net, steps, {"maxpool4": x})
    assert "pad" not in calls.names
    (fast_grad,) = torch.autograd.grad(fast.square().sum(), x)
    handles = [getattr(net, s.name).register_forward_pre_hook(lambda module, inputs: None) for s in steps]
    try:
        with _TorchCalls() as calls:
            plain = run_steps(net, steps, {"maxpool4": x})
        assert calls.names.count("pad") == 3
        (plain_grad,) = torch.autograd.grad(plain.square().sum(), x)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())
    torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-4, atol=1e-4 * plain_grad.abs().max().item())


@pytest.mark.parametrize("side", [5, 6, 7, 8, 56, 57])
def test_maxpool__ceil_mode_equals_lucents_right_bottom_padding(side, net):
    """The stride-2 max-pools: ceil_mode in place of a -inf row and column on the right and bottom."""
    step = next(s for s in STEPS if s.name == "maxpool4")
    x = torch.randn(2, 480, side, side)
    with _TorchCalls() as calls:
        fast = apply_step(net, step, [x])
    assert "pad" not in calls.names
    plain = net.maxpool4(F.pad(x, step.pad, value=float("-inf")), kernel_size=(3, 3), stride=(2, 2), padding=0,
                         ceil_mode=False)
    assert torch.equal(fast, plain)


def test_extractor__compile_is_auto_on_cuda_only(net):
    auto = InceptionExtractor("conv2d0", net=net)
    assert auto.uses_compile(torch.device("cuda")) and not auto.uses_compile(torch.device("cpu"))
    with torch.inference_mode():
        auto(pixels(1, 32))
    assert auto.compile_seconds is None, "no compile on CPU unless asked"


def test_extractor__autocast_is_ignored_on_cpu_and_checked(net):
    images = pixels(2, 32)
    with torch.inference_mode():
        expected = InceptionExtractor("conv2d0", net=net)(images)
        actual = InceptionExtractor("conv2d0", net=net, autocast="bf16")(images)
    assert actual.dtype == torch.float32 and torch.equal(actual, expected)
    with pytest.raises(ValueError, match="bf16, fp16"):
        InceptionExtractor("conv2d0", net=net, autocast="int8")
    with pytest.raises(ValueError, match="true, false or null"):
        InceptionExtractor("conv2d0", net=net, compile="yes")


def test_datamodule__layer_shape_needs_no_forward(net):
    """The layer's shape comes from the architecture: a compiled extractor is not compiled for a dry run."""
    extractor = InceptionExtractor("mixed3a", net=net, compile=True)
    data = ImageActivationDataModule(extractor, source=SampleImages(), image_size=224, holdout=False, val_images=2)
    assert data.layer_shape == (256, 28, 28) and extractor.compile_seconds is None


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_sparse_decode__equals_dense_values_and_gradients(architecture):
    torch.manual_seed(0)
    dense = build_sae(architecture, 24, d_sae=192, k=6, sparse_decode=False)
    sparse = build_sae(architecture, 24, d_sae=192, k=6, sparse_decode=True)
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(64, 24)
    dead = torch.zeros(192, dtype=torch.bool)
    dead[::3] = True
    grads = []
    for sae in (dense, sparse):
        out = sae(x)
        sae.loss(x, out, dead_mask=dead).loss.backward()
        grads.append({name: p.grad for name, p in sae.named_parameters()})
        grads[-1].update(sae.named_buffers())  # BatchTopK's threshold, learned from the kept activations
        grads[-1]["x_hat"] = out.x_hat.detach()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_encoder__fused_bias_equals_the_textbook_formula():
    """pre_acts = x @ W_enc + (b_enc - b_dec @ W_enc) is (x - b_dec) @ W_enc + b_enc, gradients included."""
    torch.manual_seed(0)
    sae = build_sae("relu", 32, d_sae=96)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(50, 32)
    sae.pre_acts(x).square().sum().backward()
    fused = {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad()
    expected = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    expected.square().sum().backward()
    torch.testing.assert_close(sae.pre_acts(x), expected, rtol=1e-5, atol=1e-5)
    for name, p in sae.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(fused[name], p.grad, rtol=1e-4, atol=1e-4, msg=name)


@cuda
def test_extractor__autocast_on_cuda_stays_close_to_float32(net):
    images = pixels(4, 64).cuda()
    gpu_net = load_inceptionv1(pretrained=False).cuda()
    with torch.inference_mode():
        reference = InceptionExtractor("mixed3b", net=gpu_net, compile=False)(images)
        approx = InceptionExtractor("mixed3b", net=gpu_net, compile=False, autocast="bf16")(images)
    assert approx.dtype == torch.float32
    assert float((approx - reference).norm() / reference.norm()) < 0.05


@pytest.mark.parametrize(("script", "option"), [("throughput.py", "--quick"), ("peers.py", "--rounds"),
                                                ("e2e.py", "--windows")])
def test_bench__harness_imports_and_describes_itself(script, option):
    result = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and option in result.stdout


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_bench__module_step_runs_without_a_trainer(arch):
    # bench/peers.py and bench/throughput.py time SAEModule's step with no Trainer attached.
    from bench.throughput import D_IN, module_step

    step = module_step(arch, torch.randn(64, D_IN))
    before = step.module.sae.W_dec.detach().clone()
    step()
    assert not torch.equal(before, step.module.sae.W_dec)


def _heap_ranges() -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith("[heap]"):
                start, end = line.split()[0].split("-")
                ranges.append((int(start, 16), int(end, 16)))
    return ranges


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc options")
def test_reuse_freed_host_memory__serves_large_tensors_from_the_heap():
    """A child process (the setting is process-wide): after the call, a 64 MB tensor lives in the [heap]
    that malloc keeps and reuses, not in a fresh mapping that is unmapped again when it is freed."""
    code = (
        "import torch, tests.test_fastpaths as t\n"
        "from sae.hostmem import reuse_freed_host_memory\n"
        "def in_heap(x): return any(a <= x.data_ptr() < b for a, b in t._heap_ranges())\n"
        "before = in_heap(torch.empty(16 * 2**20))\n"
        "assert reuse_freed_host_memory()\n"
        "after = torch.empty(16 * 2**20)\n"
        "after.fill_(1.0)\n"
        "print(before, in_heap(after), float(after.sum()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    before, after, total = result.stdout.split()
    assert (before, after, float(total)) == ("False", "True", 16 * 2**20)
