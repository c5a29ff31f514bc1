"""A known-answer check of the interpretability index (Klindt et al. 2023) and of the direction finders.

Stimuli come in groups of one colour and one grating (`sae.data.simulate_responses`); a synthetic layer's units
respond to one group each (monosemantic) or to a mixture of groups (polysemantic). The index must rank the
monosemantic layer above the polysemantic one under the pixel and mean-colour distances, and cosine k-means
and an SAE, fitted on training stimuli, must recover the groups' directions and score above the units on held-out
stimuli. (LPIPS with a random AlexNet, the only LPIPS available offline, checks plumbing only: its distances
are not perceptual, so it takes no part in a known-answer check.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from sae.analysis import ii_protocol
from sae.data.simulate_responses import cluster_images, mixing_matrix, simulate
from sae.nn import build_sae

DISTANCES = ["pixel", "mean_colour"]
CFG = OmegaConf.create({"distances": DISTANCES, "k": 5, "seed": 0, "kmeans_iters": 50, "iters": 200,
                        "kmeans_init": "identity"})


def _median_ii(acts: dict, images: torch.Tensor) -> dict[str, dict[str, float]]:
    values, unavailable = ii_protocol.score_families(acts, set(), images, CFG)
    assert not unavailable
    return {d: {kind: float(np.nanmedian(v)) for kind, v in per_kind.items()} for d, per_kind in values.items()}


def test_cluster_images__groups_share_colour_and_differ_across_groups():
    images, labels = cluster_images(64, clusters=4, size=16, seed=0)
    assert images.shape == (64, 3, 16, 16) and images.dtype == torch.uint8
    means = images.float().mean(dim=(2, 3))
    within = torch.stack([means[labels == c].std(0).mean() for c in range(4)]).max()
    across = torch.stack([means[labels == c].mean(0) for c in range(4)]).std(0).mean()
    assert within < 0.1 * across


def test_mixing_matrix__spread_one_is_one_unit_per_group():
    assert torch.equal(mixing_matrix(6, 6, spread=1), torch.eye(6))
    mixed = mixing_matrix(6, 12, spread=3)
    assert ((mixed > 0).sum(1) == 3).all() and torch.allclose(mixed.norm(dim=1), torch.ones(6))


def test_ii__monosemantic_units_beat_polysemantic_units_under_pixel_and_mean_colour():
    mono = simulate(400, clusters=8, units=8, spread=1, seed=0)
    poly = simulate(400, clusters=8, units=8, spread=3, seed=0)
    assert torch.equal(mono.images, poly.images)  # the same stimuli, only the layer differs
    ii = _median_ii({"mono": mono.responses, "poly": poly.responses}, mono.images)
    for name in DISTANCES:
        assert ii[name]["mono"] > ii[name]["poly"], (name, ii[name])


def _train_sae(x: torch.Tensor, d_sae: int, steps: int = 300, seed: int = 0):
    torch.manual_seed(seed)
    sae = build_sae("topk", x.shape[1], d_sae=d_sae, k=1)
    sae.init_b_dec_(x)
    sae.init_from_sample_(x)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = x[torch.randint(x.shape[0], (128,), generator=generator)]
        out = sae(batch)
        loss = sae.loss(batch, out).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.project_decoder_grad_()
        optimizer.step()
        sae.normalize_decoder_()
    return sae.eval()


@pytest.fixture(scope="module")
def polysemantic():
    """A polysemantic layer (8 groups, each driving 4 of 16 units) and the families fitted on its training half."""
    recording = simulate(800, clusters=8, units=16, spread=4, seed=1)
    fit, score = ii_protocol.split_fit_score(800, 0.5, seed=0)
    families = ii_protocol.fit_families(recording.responses[fit], ["kmeans", "pca", "random"], CFG)
    sae = _train_sae(recording.responses[fit], d_sae=16)
    return recording, fit, score, families, sae


def test_kmeans_and_sae__recover_the_group_directions_from_training_stimuli(polysemantic):
    recording, _, _, families, sae = polysemantic
    found = ii_protocol.recovery({"kmeans": families["kmeans"].vectors, "sae": sae.W_dec.detach(),
                                  "neurons": torch.eye(16)}, recording.truth)
    assert found["kmeans"]["fraction_above_0.9"] == 1.0, found
    assert found["sae"]["fraction_above_0.9"] >= 7 / 8, found
    assert found["neurons"]["fraction_above_0.9"] == 0.0  # every unit mixes groups: no unit is a group


def test_ii__recovered_directions_beat_the_polysemantic_units_on_held_out_stimuli(polysemantic):
    recording, _, score, families, sae = polysemantic
    x = recording.responses[score]
    matched = (recording.truth @ sae.W_dec.detach().T).argmax(dim=1)  # the feature that found each group
    with torch.inference_mode():
        acts = {"units": x, "kmeans": families["kmeans"].encode(x), "sae": sae.encode(x)[:, matched],
                "truth": x @ recording.truth.T}
    ii = _median_ii(acts, recording.images[score])
    for name in DISTANCES:
        for found in ("kmeans", "sae", "truth"):
            assert ii[name][found] > ii[name]["units"], (name, ii[name])
