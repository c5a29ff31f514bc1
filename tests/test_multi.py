"""Shared-stream sweeps (`sae=multi`): K SAEs on one activation stream, each equal to its own run."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch

from sae.data import VectorDataModule
from sae.nn import load_sae
from sae.train import SAEModule
from sae.train.multi import MultiSAEModule, member_configs, member_kwargs
from tests.helpers import assert_ok, run_train

SHARED = dict(d_in=16, expansion=4, init_sample=256, b_dec_init="mean", lr_warmup_steps=2, metadata={"layer": "x"})


def fit(module, data, steps: int = 6) -> None:
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)


@pytest.fixture
def vectors(tmp_path):
    path = tmp_path / "v.npy"
    np.save(path, np.random.default_rng(0).standard_normal((4096, 16)).astype(np.float32) ** 2)
    return str(path)


def test_multi__each_member_equals_its_separate_run(vectors):
    """Summing the members' losses gives each exactly its own gradient; one Adam with a group per member steps
    each as its own optimizer would. So member i ends where a separate run with its settings ends."""
    members = [{"l1_coefficient": 0.1}, {"architecture": "topk", "k": 4, "lr": 1e-3}]
    L.seed_everything(0)
    multi = MultiSAEModule(members=members, **SHARED)
    fit(multi, VectorDataModule(vectors, batch_size=128, expected_width=16))
    for i, overrides in enumerate(members):
        L.seed_everything(0)
        for earlier in members[:i]:  # the members built before this one drew their initial weights first
            SAEModule(**member_kwargs(SHARED, earlier))
        single = SAEModule(**member_kwargs(SHARED, overrides))
        fit(single, VectorDataModule(vectors, batch_size=128, expected_width=16))
        member = multi.members[i]
        assert float(member.input_scale) == float(single.input_scale)
        for name, value in single.sae.state_dict().items():
            torch.testing.assert_close(member.sae.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_member_configs__explicit_members_then_the_sweep_product():
    named = member_configs([{"name": "base"}], {"l1_coefficient": [0.1, 0.2], "lr": [1e-3, 1e-4], "k": None})
    assert list(named) == ["base", "l1_coefficient=0.1,lr=0.001", "l1_coefficient=0.1,lr=0.0001",
                           "l1_coefficient=0.2,lr=0.001", "l1_coefficient=0.2,lr=0.0001"]
    assert named["l1_coefficient=0.2,lr=0.0001"] == {"l1_coefficient": 0.2, "lr": 1e-4}
    with pytest.raises(ValueError, match="sae.sweep.l1_coefficient"):
        member_configs([], {"k": None})
    with pytest.raises(ValueError, match="distinct"):
        member_configs([{"name": "a"}, {"name": "a"}], None)


def test_member_kwargs__drops_shared_hyperparameters_another_architecture_does_not_take():
    shared = {"architecture": "relu", "l1_coefficient": 0.2, "lr": 1e-3}
    assert member_kwargs(shared, {"architecture": "topk", "k": 8}) == {"architecture": "topk", "k": 8, "lr": 1e-3}
    assert member_kwargs(shared, {"l1_coefficient": 0.5})["l1_coefficient"] == 0.5


def test_train_multi__members_train_log_and_export(tmp_path):
    """train.py sae=multi: one run trains every member on the image stream and exports each as its own SAE."""
    result = run_train(["model.pretrained=false", "logger=csv", "layer=conv2d0", "data.image_size=32",
                        "data.batch_size=256", "data.num_workers=0", "data.vectors_per_window=1024",
                        "data.val_images=4", "sae=multi", "sae.init_sample=512", "trainer.max_steps=4",
                        "trainer.val_check_interval=4", "trainer.log_every_n_steps=1", "sae.sweep.l1_coefficient=[0.1,0.4]",
                        "sae.members=[{name: tk, architecture: topk, k: 8}]"], tmp_path)
    assert_ok(result)
    run = tmp_path / "run"
    assert json.loads((run / "members.json").read_text())["members"] == {
        name: f"members/{name}" for name in ("tk", "l1_coefficient=0.1", "l1_coefficient=0.4")}
    sae, meta = load_sae(run / "members" / "l1_coefficient=0.4")
    assert sae.architecture == "relu" and sae.l1_coefficient == 0.4 and meta["member"] == "l1_coefficient=0.4"
    topk, _ = load_sae(run / "members" / "tk")
    assert topk.architecture == "topk" and topk.k == 8
    header = next(run.rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"tk/train/loss", "l1_coefficient=0.1/train/loss", "l1_coefficient=0.4/val/fvu"} <= set(header)
    # Callbacks see every member, each under its own prefix.
    for name in ("tk", "l1_coefficient=0.1", "l1_coefficient=0.4"):
        assert {f"{name}/sparsity/l0", f"{name}/sparsity/dead_fraction"} <= set(header), name
        assert (run / "plots" / name / "val_density_step0000004.png").is_file(), name
    assert "train/loss" not in header and "sparsity/l0" not in header, "no unprefixed copy of a member's values"
