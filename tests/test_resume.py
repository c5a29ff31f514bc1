"""Exact resume: a run killed (SIGTERM, then SIGKILL between checkpoints) and resumed with ckpt_path=last ends
with the same dictionary as a run that was never interrupted; checkpoints are atomic, finite and validated."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sae.train.guards import CheckpointError, NonFiniteLossError, SafeCheckpointIO, load_checkpoint_file
from tests.helpers import REPO, assert_ok, run, single_thread_env, text, train_cmd

# Small and deterministic: one CPU thread, relu SAE with resampling and warm-up inside the run, so that the
# optimizer, the LR schedule, the dead-feature counters and resampling all have state to restore.
VECTOR_RUN = ["data=vectors", "data.check_width=false", "data.batch_size=128", "data.val_fraction=0.1",
              "sae.expansion=4", "sae.init_sample=512", "sae.lr_warmup_steps=8", "sae.dead_window=256",
              "sae.resample={every_n_steps:10,until_step:30}", "trainer.max_steps=40",
              "trainer.val_check_interval=20", "callbacks.model_checkpoint.every_n_train_steps=10",
              "logger=csv", "model.pretrained=false"]


def run_until(run_dir: Path, checkpoint: str, sig: int, *overrides: str, timeout: float = 180) -> tuple[int, str]:
    """Start train.py, send `sig` as soon as checkpoints/`checkpoint` (and last.ckpt) exist; (status, output)."""
    targets = [run_dir / "checkpoints" / checkpoint, run_dir / "checkpoints" / "last.ckpt"]
    process = subprocess.Popen(train_cmd(run_dir, *overrides), cwd=REPO, env=single_thread_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while not all(t.exists() for t in targets) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(sig)
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    return process.returncode, output


def W_dec(run_dir: Path) -> torch.Tensor:
    return load_file(run_dir / "sae.safetensors")["W_dec"]


@pytest.fixture(scope="module")
def vectors(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vectors") / "acts.npy"
    rng = np.random.default_rng(0)
    # Sparse non-negative codes of a random dictionary: a little like a ReLU layer's activations.
    codes = rng.exponential(size=(6000, 96)) * (rng.random((6000, 96)) < 0.05)
    np.save(path, (codes @ rng.normal(size=(96, 32))).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def uninterrupted(vectors, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    assert_ok(run(run_dir, *VECTOR_RUN, f"data.path={vectors}"))
    return run_dir


def test_resume__sigterm_then_sigkill_then_resume_equals_uninterrupted_run(vectors, uninterrupted, tmp_path):
    args = [*VECTOR_RUN, f"data.path={vectors}"]
    status, output = run_until(tmp_path, "step0000010.ckpt", signal.SIGTERM, *args)
    assert status == 143, output[-3000:]
    assert "SIGTERM: saved" in output and not (tmp_path / "sae.safetensors").exists()
    term_step = load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")["global_step"]
    assert 10 <= term_step < 40, "SIGTERM saved last.ckpt at the step boundary where it arrived"

    status, output = run_until(tmp_path, "step0000030.ckpt", signal.SIGKILL, *args, "ckpt_path=last")
    assert status == -signal.SIGKILL, output[-3000:]
    assert not (tmp_path / "sae.safetensors").exists(), "the kill came before the end of the run"

    assert_ok(run(tmp_path, *args, "ckpt_path=last"))
    # Exactly equal: on CPU with one thread every op is deterministic, and the data stream, the schedules,
    # the resampling generator (seeded by step) and Adam's state are all restored, so there is no reason for
    # even one ulp of difference.
    assert torch.equal(W_dec(tmp_path), W_dec(uninterrupted))
    assert load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 40


def test_resume__every_member_of_a_multi_run_resumes_exactly(vectors, tmp_path):
    """sae=multi keeps each member's training state (scale, counters, Adam groups, resampling) in the checkpoint."""
    args = [*VECTOR_RUN, f"data.path={vectors}", "sae=multi", "sae.sweep.l1_coefficient=[0.1,0.4]"]
    assert_ok(run(tmp_path / "whole", *args))
    status, output = run_until(tmp_path / "cut", "step0000010.ckpt", signal.SIGTERM, *args)
    assert status == 143, output[-3000:]
    assert_ok(run(tmp_path / "cut", *args, "ckpt_path=last"))
    for name in ("l1_coefficient=0.1", "l1_coefficient=0.4"):
        assert torch.equal(W_dec(tmp_path / "cut" / "members" / name), W_dec(tmp_path / "whole" / "members" / name))


def test_resume__image_stream_resumes_exactly(tmp_path):
    args = ["model.pretrained=false", "layer=conv2d1", "data.image_size=32", "data.batch_size=256",
            "data.num_workers=0", "data.vectors_per_window=2048", "data.image_batch_size=8", "data.val_images=4",
            "sae.expansion=2", "sae.init_sample=512", "trainer.max_steps=12", "trainer.val_check_interval=12",
            "callbacks.model_checkpoint.every_n_train_steps=4", "logger=csv"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert_ok(run(reference, *args))
    status, output = run_until(resumed, "step0000004.ckpt", signal.SIGKILL, *args)
    assert status == -signal.SIGKILL and not (resumed / "sae.safetensors").exists(), output[-3000:]
    assert_ok(run(resumed, *args, "ckpt_path=last"))
    assert torch.equal(W_dec(resumed), W_dec(reference))


def test_resume__ckpt_path_last_without_the_run_directory_names_the_fix(tmp_path):
    result = run(tmp_path, *VECTOR_RUN, "data.path=unused.npy", "ckpt_path=last", timeout=60)
    assert result.returncode == 2
    assert "hydra.run.dir=" in text(result) and "last.ckpt does not exist" in text(result)
    assert "Traceback" not in text(result)


def test_resume__with_a_different_width_or_layer_is_refused(vectors, uninterrupted):
    for change, named in [("sae.expansion=2", "d_sae=64"), ("layer=conv2d0", "layer=conv2d0")]:
        result = run(uninterrupted, *VECTOR_RUN, f"data.path={vectors}", change, "ckpt_path=last", timeout=60)
        assert result.returncode == 2, text(result)[-3000:]
        assert "ResumeMismatchError" in text(result) and named in text(result)
        assert "d_sae=128" in text(result), "the message says what the checkpoint holds"


def test_resume__corrupt_last_checkpoint_names_the_file_and_an_earlier_one(vectors, uninterrupted, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a torn write (what atomic saves prevent)
    result = run(run_dir, *VECTOR_RUN, f"data.path={vectors}", "ckpt_path=last", timeout=60)
    assert result.returncode == 2
    assert f"{last} is corrupt or truncated" in text(result)
    assert f"ckpt_path={run_dir / 'checkpoints' / 'step0000040.ckpt'}" in text(result)


def test_nan_guard__stops_naming_the_step_and_keeps_the_last_good_checkpoint(vectors, tmp_path):
    # lr=1e30: the first update makes the weights ~1e30, so the next forward pass overflows to inf.
    args = [*VECTOR_RUN, f"data.path={vectors}", "sae.lr=1e30", "sae.lr_warmup_steps=0",
            "callbacks.model_checkpoint.every_n_train_steps=1"]
    result = run(tmp_path, *args)
    assert result.returncode == 3, text(result)[-3000:]
    assert "NonFiniteLossError" in text(result) and "Traceback" not in text(result)
    step = int(text(result).split(" at step ")[1].split(" ")[0])
    last = load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")  # validated: whole and finite
    assert 1 <= last["global_step"] <= step
    assert not (tmp_path / "sae.safetensors").exists(), "a diverged SAE is never exported"


def test_checkpoint_io__never_writes_non_finite_weights(tmp_path):
    io, path = SafeCheckpointIO(), tmp_path / "last.ckpt"
    good = {"state_dict": {"sae.W_dec": torch.ones(2, 2)}, "global_step": 5}
    io.save_checkpoint(good, path)
    with pytest.raises(NonFiniteLossError, match="NaN or inf at step 6"):
        io.save_checkpoint({"state_dict": {"sae.W_dec": torch.full((2, 2), float("nan"))}, "global_step": 6}, path)
    assert io.load_checkpoint(path)["global_step"] == 5


def test_checkpoint_io__an_interrupted_write_keeps_the_previous_file(tmp_path):
    io, path = SafeCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {}, "global_step": 1}, path)
    with pytest.raises(Exception):
        io.save_checkpoint({"state_dict": {}, "global_step": 2, "unpicklable": lambda: 0}, path)
    assert io.load_checkpoint(path)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "no temp file is left behind"


def test_checkpoint_io__a_truncated_file_is_a_checkpoint_error(tmp_path):
    io, path = SafeCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.randn(100)}, "global_step": 1}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated.*no other checkpoint"):
        io.load_checkpoint(path)
