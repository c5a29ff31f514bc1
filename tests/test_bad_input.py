"""Bad input through train.py's own path: a clear error naming the problem and the fix, raised before any
training (nothing is checkpointed), or, for odd images and a failing W&B, a run that carries on.

Unit-level checks of the same errors live with their modules (tests/test_data.py, test_nn.py, test_model.py);
resuming with another layer or width, and corrupt checkpoints, are in tests/test_resume.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sae.data import ImageSourceError, VectorFileError
from sae.errors import user_error
from sae.run.rundir import OutputDirError
from sae.model import WeightsError
from sae.nn import SAEConfigError, load_sae
from tests.helpers import REPO, assert_refused, train_with, vector_run


@pytest.fixture
def vectors_file(tmp_path) -> Path:
    path = tmp_path / "acts.npy"
    np.save(path, np.random.default_rng(0).normal(size=(600, 32)).astype(np.float32))
    return path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sae.expansion=0"], "expansion=0 must be a number > 0"),
        (["sae.expansion=1.3"], "gives d_sae=41.6, not a positive integer; pass d_sae"),
        (["sae=topk", "sae.expansion=2", "sae.k=100"], "k=100 exceeds d_sae=64"),
    ],
    ids=["expansion<=0", "non-integer-d_sae", "k>d_sae"],
)
def test_bad_sae_size__is_refused_naming_the_fix(tmp_path, vectors_file, overrides, message):
    assert_refused(tmp_path / "run", SAEConfigError, message, *vector_run(vectors_file), *overrides)


def test_image_folder__missing_empty_or_all_corrupt_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(4):
        (corrupt / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    for root, message in [(tmp_path / "nowhere", "does not exist"), (tmp_path / "empty", "no image files"),
                          (corrupt, "could be decoded")]:
        assert_refused(tmp_path / "run", ImageSourceError, message, "data=imagefolder", f"data.root={root}")


def test_vectors__nan_or_wrong_width_is_refused(tmp_path):
    data = np.random.default_rng(0).normal(size=(300, 480)).astype(np.float32)
    data[11, 5] = np.inf
    np.save(tmp_path / "inf.npy", data)
    np.save(tmp_path / "narrow.npy", np.zeros((300, 32), np.float32))
    assert_refused(tmp_path / "run", VectorFileError, "NaN or inf (first at row 11)",
                   "data=vectors", f"data.path={tmp_path / 'inf.npy'}")
    assert_refused(tmp_path / "run", VectorFileError, "width 32 but the configured layer has 480 channels",
                   "data=vectors", f"data.path={tmp_path / 'narrow.npy'}", "layer=mixed3b")


def test_weights_file__with_wrong_keys_is_refused(tmp_path):
    torch.save({"conv2d0.weight": torch.zeros(3)}, tmp_path / "weights.pt")
    with pytest.raises(Exception) as raised:
        train_with(tmp_path / "run", "layer=conv2d0", f"model.weights={tmp_path / 'weights.pt'}")
    assert isinstance(user_error(raised.value), WeightsError), repr(raised.value)
    assert "weights.pt" in str(user_error(raised.value))


def test_unwritable_output_directory__is_refused_naming_the_setting(tmp_path, vectors_file):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert_refused(blocker / "run", OutputDirError, "hydra.run.dir=", *vector_run(vectors_file))


def test_odd_images__grayscale_cmyk_rgba_16bit_and_tiny_are_converted_and_trained_on(tmp_path):
    root = tmp_path / "odd"
    root.mkdir()
    Image.new("L", (40, 30), 90).save(root / "gray.png")
    Image.new("CMYK", (40, 30), (0, 200, 30, 0)).save(root / "cmyk.jpg")
    Image.new("RGBA", (40, 30), (200, 0, 0, 100)).save(root / "rgba.png")
    Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50).save(root / "deep.png")
    Image.new("RGB", (5, 4), (0, 0, 255)).save(root / "tiny.png")  # far smaller than the 64-pixel crop
    train_with(tmp_path / "run", "data=imagefolder", f"data.root={root}", "layer=conv2d0", "data.image_size=64",
               "data.val_images=1", "data.num_workers=0", "data.image_batch_size=4", "data.vectors_per_window=4096",
               "data.batch_size=512", "sae.init_sample=512", "sae.expansion=2")
    sae, meta = load_sae(tmp_path / "run")
    assert meta["layer"] == "conv2d0" and all(bool(torch.isfinite(p).all()) for p in sae.parameters())


# -- W&B failures: training goes on ------------------------------------------------------------------------
def _train_process(run_dir: Path, env: dict, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "train.py", f"hydra.run.dir={run_dir}", "model.pretrained=false", "logger=wandb", *overrides],
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_wandb_failing_mid_run__training_continues_and_metrics_fall_back_to_csv(tmp_path, vectors_file):
    psutil = pytest.importorskip("psutil")
    run_dir = tmp_path / "run"
    process = _train_process(run_dir, {"WANDB_MODE": "offline"}, *vector_run(vectors_file),
                             "trainer.max_steps=30", "trainer.val_check_interval=30", "trainer.log_every_n_steps=2",
                             "callbacks.model_checkpoint.every_n_train_steps=5")
    try:
        deadline = time.monotonic() + 280  # generous: a loaded machine starts Python, torch and W&B slowly
        while not (run_dir / "checkpoints" / "step0000005.ckpt").exists() and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[0][-3000:]
            time.sleep(0.05)
        assert (run_dir / "checkpoints" / "step0000005.ckpt").exists(), "the run never reached step 5"
        services = [p for p in psutil.Process(process.pid).children(recursive=True) if p.name().startswith("wandb")]
        assert services, "W&B runs its service as a child process"
        for service in services:
            service.send_signal(signal.SIGKILL)  # what a crashed W&B service or a lost connection to it looks like
        output, _ = process.communicate(timeout=180)
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    assert output.count("W&B failed during the run") == 1, "one warning, not one per step"
    assert load_sae(run_dir)[1]["global_step"] == 30
    fallback = (run_dir / "wandb-fallback" / "metrics.csv").read_text().splitlines()
    steps = [int(float(row.split(",")[fallback[0].split(",").index("step")])) for row in fallback[1:]]
    assert max(steps) == 29, "metrics after the failure are kept, to the last step"


def test_wandb_unreachable_at_start__the_run_goes_offline(tmp_path, vectors_file):
    # A fake key and a closed local port: wandb.init retries until init_timeout, then the run continues offline.
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    process = _train_process(tmp_path / "run", env, *vector_run(vectors_file), "logger.init_timeout=3",
                             "trainer.max_steps=5")
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 0, output[-3000:]
    assert "W&B could not start" in output and "logging offline" in output
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "the offline copy to `wandb sync` later"
    assert (tmp_path / "run" / "sae.safetensors").exists()
