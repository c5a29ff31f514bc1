"""A run directory has one owner and one history: a fresh run never replaces a finished one, two processes never
write one directory, Ctrl-C keeps the work, and a resume continues the same logs, W&B run and record."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sae.nn import build_sae, load_sae, save_sae
from sae.nn.base import SAEConfigError
from sae.run.rundir import RunDirBusyError, RunLock
from sae.train.guards import load_checkpoint_file
from tests.helpers import REPO
from tests.helpers import run, single_thread_env, text, train_cmd

SMALL = ["data=vectors", "data.check_width=false", "data.batch_size=64", "data.val_fraction=0.1", "sae.expansion=2",
         "sae.init_sample=256", "trainer.max_steps=20", "trainer.val_check_interval=10", "trainer.log_every_n_steps=5",
         "callbacks.model_checkpoint.every_n_train_steps=10", "model.pretrained=false"]


@pytest.fixture(scope="module")
def vectors(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vectors") / "acts.npy"
    np.save(path, np.random.default_rng(0).normal(size=(3000, 16)).astype(np.float32))
    return path


def errors(result) -> list[str]:
    return [line for line in text(result).splitlines() if "ERROR" in line or "Traceback" in line]


def test_fresh_run__refuses_a_directory_holding_a_run_and_overwrite_replaces_it(vectors, tmp_path):
    args = [*SMALL, f"data.path={vectors}", "logger=csv"]
    assert run(tmp_path, *args).returncode == 0
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 20
    before = (tmp_path / "sae.safetensors").read_bytes()
    refused = run(tmp_path, *args, "seed=1")
    assert refused.returncode == 2, text(refused)[-3000:]
    assert len(errors(refused)) == 1 and "already holds a run" in errors(refused)[0]
    for option in ("ckpt_path=last", "hydra.run.dir", "overwrite=true"):
        assert option in errors(refused)[0]
    assert (tmp_path / "sae.safetensors").read_bytes() == before, "the finished run is untouched"

    replaced = run(tmp_path, *args, "seed=1", "overwrite=true")
    assert replaced.returncode == 0, text(replaced)[-3000:]
    assert (tmp_path / "sae.safetensors").read_bytes() != before
    steps = [int(row["step"]) for row in csv.DictReader((tmp_path / "csv" / "metrics.csv").open())]
    assert steps == sorted(steps), "the old run's rows were removed, not mixed with the new ones"


def test_lock__a_second_process_is_refused_while_the_first_writes(vectors, tmp_path):
    with RunLock(tmp_path):
        result = run(tmp_path, *SMALL, f"data.path={vectors}", "logger=none", timeout=120)
    assert result.returncode == 2, text(result)[-3000:]
    assert len(errors(result)) == 1 and f"being written by another process (pid {os.getpid()}" in errors(result)[0]
    assert not (tmp_path / "checkpoints").exists()


def test_lock__of_a_killed_process_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from sae.run.rundir import RunLock; "
                               f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(600)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusyError, match=f"pid {holder.pid} host"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path) as lock:  # the kernel released the dead process's lock
        assert f"pid {os.getpid()}" in lock.path.read_text()
    assert lock.path.read_text() == "", "released: an empty lock file"


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared"


def test_ctrl_c__saves_last_ckpt_at_the_step_boundary_and_says_how_to_continue(vectors, tmp_path):
    args = [*SMALL, f"data.path={vectors}", "logger=csv", "trainer.max_steps=100000",
            "callbacks.model_checkpoint.every_n_train_steps=100000"]  # Ctrl-C long before the first checkpoint
    process = subprocess.Popen(train_cmd(tmp_path, *args), cwd=REPO, env=single_thread_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(tmp_path / "csv" / "metrics.csv", process)  # training has run a few steps
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, output[-3000:]
    assert "Ctrl-C: saving last.ckpt" in output and "ckpt_path=last" in output and "Traceback" not in output
    step = load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")["global_step"]
    assert 5 <= step < 100000


def test_second_ctrl_c__aborts_at_once():
    from callbacks.preemption import PreemptionCheckpoint

    callback = PreemptionCheckpoint()
    callback._on_signal(signal.SIGINT, None)
    assert callback._received and not callback.aborted
    with pytest.raises(KeyboardInterrupt):
        callback._on_signal(signal.SIGINT, None)
    assert callback.aborted


def test_resume__continues_one_history(vectors, tmp_path):
    """Same W&B run id, CSV rows appended (not deleted), the original command kept beside the resume's, the
    saved input scale kept (no init sample drawn), and the progress bar counting to max_steps."""
    args = [*SMALL, f"data.path={vectors}", "logger=wandb"]
    first = run(tmp_path, *args, "trainer.max_steps=10")
    assert first.returncode == 0, text(first)[-3000:]
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    (tmp_path / ".sae.json.0123456789ab.tmp").write_bytes(b"left by a killed export")
    (tmp_path / "checkpoints" / ".last.ckpt.0123456789ab.tmp").write_bytes(b"left by a killed save")

    resumed = run(tmp_path, *args, "ckpt_path=last", "trainer.max_steps=20")
    assert resumed.returncode == 0, text(resumed)[-3000:]
    assert "input scale" not in text(resumed), "the saved input scale and b_dec are kept, not recomputed"
    assert "/20 [" in text(resumed), "the progress bar's total is max_steps"
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs), runs
    assert "ckpt_path=last" not in (tmp_path / ".hydra" / "overrides.yaml").read_text()
    assert "ckpt_path=last" in yaml.safe_load((tmp_path / ".hydra" / "resume-1" / "overrides.yaml").read_text())
    assert not list(tmp_path.rglob("*.tmp")), "temp files of dead writers are removed at the next start"


def test_resume__csv_history_is_appended(vectors, tmp_path):
    args = [*SMALL, f"data.path={vectors}", "logger=csv"]
    assert run(tmp_path, *args, "trainer.max_steps=10").returncode == 0
    rows_before = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    assert run(tmp_path, *args, "ckpt_path=last", "trainer.max_steps=20").returncode == 0
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    steps = [int(row["step"]) for row in rows if row.get("train/loss")]
    assert steps == [4, 9, 14, 19], "the first run's rows are kept and the resumed ones follow"
    assert [row["step"] for row in rows[: len(rows_before)]] == [row["step"] for row in rows_before]


def test_export__a_kill_between_the_two_renames_is_detected(tmp_path):
    save_sae(build_sae("relu", 4, d_sae=8), tmp_path)
    old_weights = (tmp_path / "sae.safetensors").read_bytes()
    save_sae(build_sae("relu", 4, d_sae=8), tmp_path)
    (tmp_path / "sae.safetensors").write_bytes(old_weights)  # the json was renamed, the weights not yet
    with pytest.raises(SAEConfigError, match="two different exports"):
        load_sae(tmp_path)


def test_ckpt_path_auto__starts_fresh_then_resumes_in_the_same_directory(vectors, tmp_path):
    """What a requeued scheduler job does: the same command twice; the second continues the first."""
    args = [*SMALL, f"data.path={vectors}", "logger=none", "ckpt_path=auto"]
    assert run(tmp_path, *args, "trainer.max_steps=10").returncode == 0
    again = run(tmp_path, *args)
    assert again.returncode == 0, text(again)[-3000:]
    assert "resuming from" in text(again) and load_sae(tmp_path)[1]["global_step"] == 20
