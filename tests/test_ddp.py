"""trainer=ddp: two gloo processes on CPU, launched by Lightning from train.py, train the same SAE as one process
with twice the batch (so the ranks drew disjoint halves of the stream and their gradients were averaged),
report the same validation metrics, and only rank zero exports."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from tests.helpers import assert_ok, run

RUN = ["data=vectors", "data.check_width=false", "data.val_fraction=0.1", "sae.expansion=4", "sae.init_sample=512",
       "trainer.max_steps=12", "trainer.val_check_interval=12", "callbacks.model_checkpoint.every_n_train_steps=6",
       "logger=csv", "model.pretrained=false"]


def last_val(run_dir: Path) -> dict[str, float]:
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    return {k: float(v) for row in rows for k, v in row.items() if k.startswith("val/") and v}


def test_ddp__two_gloo_processes_equal_one_process_with_twice_the_batch(tmp_path):
    vectors = tmp_path / "acts.npy"
    rng = np.random.default_rng(0)
    np.save(vectors, (rng.exponential(size=(4000, 64)) * (rng.random((4000, 64)) < 0.1) @ rng.normal(size=(64, 24)))
            .astype(np.float32))
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    assert_ok(run(ddp, *RUN, f"data.path={vectors}", "data.batch_size=64", "trainer=ddp", "trainer.accelerator=cpu",
                  "trainer.devices=2"))
    assert_ok(run(single, *RUN, f"data.path={vectors}", "data.batch_size=128"))

    # Rank r's batch b is rows [(2b + r) * 64, (2b + r + 1) * 64) of the epoch's permutation: together exactly
    # the single process's batch b. Only the summation order of the gradient all-reduce differs (float32,
    # ~1e-7 relative per step), so after 12 Adam steps the weights agree far inside 1e-6.
    W_ddp, W_single = load_file(ddp / "sae.safetensors")["W_dec"], load_file(single / "sae.safetensors")["W_dec"]
    torch.testing.assert_close(W_ddp, W_single, atol=1e-6, rtol=0)

    val_ddp, val_single = last_val(ddp), last_val(single)
    assert val_ddp.keys() == val_single.keys() and "val/mse" in val_ddp
    for key in val_ddp:
        assert abs(val_ddp[key] - val_single[key]) <= 1e-5 * max(1.0, abs(val_single[key])), key

    rank1_log = (ddp / "train_ddp_process_1.log").read_text()
    assert "exported" not in rank1_log and "exported" in (ddp / "train.log").read_text(), "rank zero exports alone"
