"""sae.model against the real lucent InceptionV1 (random weights: no download here)."""

from __future__ import annotations

import copy
import logging
import socket

import pytest
import torch
from lucent.modelzoo.inceptionv1.InceptionV1 import InceptionV1
from lucent.optvis.transform import preprocess_inceptionv1

from sae.model import (
    BLOCK_LAYERS, LAYERS, WEIGHTS_URL, InceptionExtractor, ReceptiveField, UnknownLayerError, WeightsError,
    WeightsUnavailableError, crop_box, hub_cache_path, layer_channels, layer_shape, load_inceptionv1, preprocess,
    preprocess_unit, receptive_field, run_from,
)

SMALL = 64  # px; lucent's forward reaches mixed5b (at 2x2) but not its 7x7 average pool
FULL = 224  # px; the classifier needs mixed5b at 7x7


class _StopForward(Exception):
    pass


def _images(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)


def _lucent_input(images: torch.Tensor) -> torch.Tensor:
    """Lucid's input scaling written out independently of sae.model.preprocess."""
    return images.float() - 117.0


def _hooked_forward(net, x, names, stop_after=None) -> dict[str, torch.Tensor]:
    """Run lucent's own full forward on x, recording the outputs of the modules ``names``."""
    seen: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = output.detach().clone()
            if name == stop_after:
                raise _StopForward  # lucent's forward cannot finish below 224 px; everything before ran
        return hook

    handles = [getattr(net, name).register_forward_hook(record(name)) for name in names]
    try:
        with torch.no_grad():
            net(x)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return load_inceptionv1(pretrained=False)


@pytest.fixture(scope="module")
def small_images():
    return _images(SMALL)


@pytest.fixture(scope="module")
def small_reference(net, small_images):
    return _hooked_forward(net, _lucent_input(small_images), LAYERS, stop_after="mixed5b")


@pytest.fixture(scope="module")
def full_images():
    return _images(FULL, batch=1, seed=1)


@pytest.fixture(scope="module")
def full_reference(net, full_images):
    return _hooked_forward(net, _lucent_input(full_images), (*LAYERS, "softmax2_pre_activation_matmul"))


# ---------------------------------------------------------------- layers


def test_layers__are_lucent_modules_in_forward_order(net, small_reference):
    # The hooks fire in forward order, so the dict's insertion order is lucent's order.
    assert tuple(small_reference) == LAYERS
    # conv2d0-2, mixed3a-b, mixed4a-e, mixed5a-b: the chain points between which the graph branches.
    assert len(BLOCK_LAYERS) == 12 and set(BLOCK_LAYERS) <= set(LAYERS)
    for family in ("conv2d0_pre_relu_conv", "maxpool0", "maxpool4", "maxpool10", "mixed3a_pool", "mixed5b"):
        assert family in LAYERS


@pytest.mark.parametrize(
    "layer, shape",
    [("conv2d0", (64, 112, 112)), ("conv2d2", (192, 56, 56)), ("mixed3a", (256, 28, 28)),
     ("mixed3b", (480, 28, 28)), ("mixed4a", (508, 14, 14)), ("mixed5b", (1024, 7, 7))],
)
def test_layer_shapes(layer, shape, full_reference):
    assert layer_shape(layer, FULL) == shape
    assert tuple(full_reference[layer].shape[1:]) == shape


def test_layer_shape__matches_the_network_for_every_layer(small_reference, full_reference):
    for name in LAYERS:
        assert layer_shape(name, SMALL) == tuple(small_reference[name].shape[1:]), name
        assert layer_shape(name, (FULL, FULL)) == tuple(full_reference[name].shape[1:]), name
        assert layer_channels(name) == full_reference[name].shape[1], name


def test_layer_channels():
    assert (layer_channels("mixed3b"), layer_channels("conv2d0"), layer_channels("mixed3a")) == (480, 64, 256)


def test_unknown_layer__lists_valid_names(net):
    with pytest.raises(UnknownLayerError) as raised:
        InceptionExtractor("mixed3c", net=net)
    message = str(raised.value)
    assert isinstance(raised.value, ValueError)
    assert "Did you mean" in message and "'mixed3b'" in message
    assert all(name in message for name in LAYERS)
    for function in (layer_channels, receptive_field):
        with pytest.raises(UnknownLayerError):
            function("mixed_3b")


# ---------------------------------------------------------------- extractor


@pytest.mark.parametrize("layer", LAYERS)
def test_extractor__equals_forward_hook_on_full_network(layer, net, small_images, small_reference):
    extractor = InceptionExtractor(layer, net=net)
    with torch.inference_mode():
        activations = extractor(small_images)
    assert activations.dtype == torch.float32
    reference = small_reference[layer]
    # LRN as a band matmul and padding inside the convolutions sum in another order: float32 rounding only.
    torch.testing.assert_close(activations, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


def _fired_modules(net, extractor, images) -> list[str]:
    fired: list[str] = []
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: fired.append(name))
        for name, module in net.named_children()
    ]
    try:
        with torch.inference_mode():
            extractor(images)
    finally:
        for handle in handles:
            handle.remove()
    return fired


def test_extractor__stops_at_target_layer(net, small_images, small_reference):
    fired = _fired_modules(net, InceptionExtractor("mixed3b_5x5", net=net), small_images)
    through_mixed3a = list(LAYERS[: LAYERS.index("mixed3a") + 1])
    # mixed3b_5x5 needs all of mixed3a, then only the 5x5 branch of mixed3b, in lucent's order.
    assert fired == through_mixed3a + [
        "mixed3b_5x5_bottleneck_pre_relu_conv", "mixed3b_5x5_bottleneck", "mixed3b_5x5_pre_relu_conv", "mixed3b_5x5",
    ]
    assert fired == [name for name in small_reference if name in fired]  # same relative order as lucent


def test_extractor__block_layer_runs_every_branch_and_nothing_after(net, small_images):
    fired = _fired_modules(net, InceptionExtractor("mixed3b", net=net), small_images)
    assert fired == list(LAYERS[: LAYERS.index("mixed3b") + 1])
    assert "maxpool4" not in fired and "softmax2" not in fired


def test_extractor__attributes(net):
    extractor = InceptionExtractor("mixed3b", net=net)
    assert (extractor.layer, extractor.d_in, extractor.pretrained) == ("mixed3b", 480, False)
    assert isinstance(extractor.net, InceptionV1) and extractor.net is net
    extractor.train()
    assert not extractor.net.training
    assert not any(p.requires_grad for p in extractor.net.parameters())
    assert extractor.output_shape(FULL) == (480, 28, 28)


def test_extractor__uint8_and_float_pixels_agree(net, small_images):
    extractor = InceptionExtractor("conv2d2", net=net)
    with torch.inference_mode():
        assert torch.equal(extractor(small_images), extractor(small_images.float()))


def test_preprocess__matches_lucid_range():
    pixels = torch.tensor([0, 117, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    assert preprocess(pixels).flatten().tolist() == [-117.0, 0.0, 138.0]
    assert preprocess(pixels.float()).flatten().tolist() == [-117.0, 0.0, 138.0]
    unit = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(preprocess_unit(unit), preprocess_inceptionv1()(unit))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        preprocess(torch.zeros(3, 8, 8))


@pytest.mark.parametrize("layer", ["conv2d0", "maxpool1", "mixed3b", "mixed4a"])
def test_channels_last__matches_nchw(layer, net, small_images, small_reference):
    extractor = InceptionExtractor(layer, net=copy.deepcopy(net), channels_last=True)
    with torch.inference_mode():
        activations = extractor(small_images)
    assert activations.is_contiguous()
    reference = small_reference[layer]
    # Different kernels sum in a different order: equal up to float32 rounding of the layer's scale.
    torch.testing.assert_close(activations, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


# ---------------------------------------------------------------- splicing back in


@pytest.mark.parametrize("layer", BLOCK_LAYERS)
def test_run_from__splices_back_to_logits(layer, net, full_reference):
    logits = run_from(net, layer, full_reference[layer])
    assert logits.shape == (1, 1008)
    _assert_same_logits(logits, full_reference["softmax2_pre_activation_matmul"])


def test_run_from__extractor_then_forward_from_equals_full_forward(net, full_images, full_reference):
    extractor = InceptionExtractor("mixed4b", net=net)
    with torch.inference_mode():
        logits = extractor.forward_from(extractor(full_images))
    _assert_same_logits(logits, full_reference["softmax2_pre_activation_matmul"])


def _assert_same_logits(logits, reference):
    # Equal up to float32 rounding: the extractor pads inside its convolutions and sums LRN windows by matmul.
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


def test_run_from__refuses_inner_layers_and_small_images(net, small_reference):
    with pytest.raises(ValueError, match="block layer"):
        run_from(net, "mixed4b_3x3", torch.zeros(1, 224, 14, 14))
    with pytest.raises(ValueError, match="224"):
        run_from(net, "mixed4a", small_reference["mixed4a"])


# ---------------------------------------------------------------- weights


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights__local_state_dict_reproduces_outputs(suffix, tmp_path, small_images):
    torch.manual_seed(1)
    source = load_inceptionv1(pretrained=False)
    path = tmp_path / f"inception{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        safetensors_torch = pytest.importorskip("safetensors.torch")
        safetensors_torch.save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = InceptionExtractor("mixed3a", weights=str(path))
    assert loaded.pretrained and loaded.weights_source == f"file:{path}"
    with torch.inference_mode():
        assert torch.equal(loaded(small_images), InceptionExtractor("mixed3a", net=source)(small_images))


def test_weights__wrong_keys_or_shapes_named_in_error(tmp_path, net):
    state = dict(net.state_dict())
    del state["mixed4c_3x3_pre_relu_conv.bias"]
    state["classifier.weight"] = torch.zeros(3)
    state["conv2d0_pre_relu_conv.weight"] = torch.zeros(64, 3, 5, 5)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as raised:
        load_inceptionv1(weights=path)
    message = str(raised.value)
    for expected in ("mixed4c_3x3_pre_relu_conv.bias", "classifier.weight", "conv2d0_pre_relu_conv.weight",
                     "(64, 3, 5, 5)", "torch.save(", str(path)):
        assert expected in message


def test_weights__missing_or_unreadable_file_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_inceptionv1(weights=tmp_path / "nowhere.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(WeightsError, match="not a dict of tensors"):
        load_inceptionv1(weights=tmp_path / "tensor.pth")
    (tmp_path / "garbage.pth").write_bytes(b"<html>not weights</html>")
    with pytest.raises(WeightsError, match="Cannot read"):
        load_inceptionv1(weights=tmp_path / "garbage.pth")


def test_random_weights__warn_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="sae.model"):
        extractor = InceptionExtractor("conv2d0", pretrained=False)
    assert "RANDOM" in caplog.text
    assert extractor.pretrained is False and extractor.weights_source == "random"
    with pytest.raises(WeightsError, match="drop one"):
        load_inceptionv1(pretrained=False, weights="x.pth")


def test_untagged_net__is_not_reported_as_pretrained(caplog):
    with caplog.at_level(logging.WARNING, logger="sae.model"):
        extractor = InceptionExtractor("conv2d0", net=InceptionV1())
    assert extractor.pretrained is False and "not loaded by load_inceptionv1" in caplog.text


def test_pretrained__cached_hub_file_is_used_without_network(tmp_path, monkeypatch, net, small_images):
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # restored after the test
    torch.hub.set_dir(str(tmp_path))
    hub_cache_path().parent.mkdir(parents=True)
    torch.save(net.state_dict(), hub_cache_path())
    extractor = InceptionExtractor("mixed3a", pretrained=True)
    assert extractor.pretrained and extractor.weights_source == f"hub:{WEIGHTS_URL}"
    with torch.inference_mode():
        assert torch.equal(extractor(small_images), InceptionExtractor("mixed3a", net=net)(small_images))


def test_pretrained__offline_error_names_url_cache_and_fixes(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # restored after the test
    torch.hub.set_dir(str(tmp_path))  # an empty cache, so the download is attempted

    def unreachable(*args, **kwargs):  # the machine is offline, whether or not this one is
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    timeout_before = socket.getdefaulttimeout()
    with pytest.raises(WeightsUnavailableError) as raised:
        load_inceptionv1(pretrained=True)
    message = str(raised.value)
    assert socket.getdefaulttimeout() == timeout_before
    for expected in (WEIGHTS_URL, str(tmp_path / "checkpoints" / "inception5h.pth"),
                     "model.weights=PATH", "model.pretrained=false"):
        assert expected in message


# ---------------------------------------------------------------- receptive fields


def test_receptive_field__hand_derived_values():
    # A k x k window, stride s, left padding p on a field (size r, stride j, first pixel a) gives
    # r' = r + (k-1) j, j' = j s, a' = a - p j; the centre (offset) is a + (r-1)/2.
    # conv2d0: 7x7 / 2, pad 2:      r = 7,             j = 2, a = -2  -> offset 1
    assert receptive_field("conv2d0") == ReceptiveField(size=7, stride=2, offset=1.0)
    # maxpool0: 3x3 / 2, pad 0 (right/bottom only): r = 7 + 2*2 = 11, j = 4, a = -2 -> offset 3
    # LRN and conv2d1 (1x1) change nothing.
    assert receptive_field("conv2d1") == ReceptiveField(size=11, stride=4, offset=3.0)
    # conv2d2: 3x3 / 1, pad 1:      r = 11 + 2*4 = 19, j = 4, a = -2 - 4 = -6 -> offset 3
    assert receptive_field("conv2d2") == ReceptiveField(size=19, stride=4, offset=3.0)
    # maxpool1: 3x3 / 2, pad 0:     r = 19 + 2*4 = 27, j = 8, a = -6 -> offset 7
    # mixed3a, widest branch 1x1 then 5x5 pad 2: r = 27 + 4*8 = 59, j = 8, a = -6 - 16 = -22 -> offset 7
    #   (3x3 branch: 27 + 2*8 = 43; pool branch 3x3 pad 1 then 1x1: 43; all centred on offset 7)
    assert receptive_field("mixed3a") == ReceptiveField(size=59, stride=8, offset=7.0)
    # mixed3b, 5x5 branch on mixed3a: r = 59 + 4*8 = 91, j = 8, a = -22 - 16 = -38 -> offset 7
    assert receptive_field("mixed3b") == ReceptiveField(size=91, stride=8, offset=7.0)
    # maxpool4 3x3 / 2: r = 91 + 2*8 = 107, j = 16, a = -38; mixed4a 5x5 pad 2: r = 107 + 4*16 = 171,
    # j = 16, a = -38 - 32 = -70 -> offset 15
    assert receptive_field("mixed4a") == ReceptiveField(size=171, stride=16, offset=15.0)
    # Branch outputs: mixed3b_1x1 sees only mixed3a's field; the ReLU adds nothing to its conv.
    assert receptive_field("mixed3b_1x1").size == 59
    assert receptive_field("mixed3b_5x5_pre_relu_conv") == receptive_field("mixed3b_5x5")


def test_crop_box__clipped_to_image():
    assert crop_box("conv2d0", 0, 0, SMALL) == (0, 0, 5, 5)  # window -2..4, clipped at 0
    assert crop_box("conv2d0", 10, 3, SMALL) == (18, 4, 25, 11)
    assert crop_box("conv2d0", 31, 31, SMALL) == (60, 60, 64, 64)  # window 60..66, clipped at 64
    assert crop_box("mixed3b", 3, 4, (FULL, 100)) == (0, 0, 24 + 53, 32 + 53)  # centre (31, 39), half-width 45
    with pytest.raises(IndexError):
        crop_box("conv2d0", 32, 0, SMALL)


@pytest.mark.parametrize(
    "layer, image_size, position",
    [("conv2d0", 24, (5, 6)), ("conv2d0", 24, (0, 0)), ("conv2d2", 48, (5, 6)), ("conv2d2", 48, (0, 11)),
     ("mixed3b", 112, (6, 7))],
)
def test_receptive_field__gradient_support_is_the_crop_box(layer, image_size, position, net):
    i, j = position
    pixels = torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)) * 255
    pixels.requires_grad_(True)
    InceptionExtractor(layer, net=net)(pixels)[0, :, i, j].sum().backward()
    support = pixels.grad.abs().sum(dim=(0, 1)) > 0  # (H, W)

    top, left, bottom, right = crop_box(layer, i, j, image_size)
    inside = torch.zeros_like(support)
    inside[top:bottom, left:right] = True
    assert not (support & ~inside).any(), "gradient outside the computed receptive field"
    # Reaches every edge of the box (max-pools route gradient to one cell per window, so not every pixel).
    assert support[top].any() and support[bottom - 1].any()
    assert support[:, left].any() and support[:, right - 1].any()


def test_random_weights__are_the_same_network_whatever_the_global_seed():
    torch.manual_seed(1)
    a = load_inceptionv1(pretrained=False)
    torch.manual_seed(2)
    b = load_inceptionv1(pretrained=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
