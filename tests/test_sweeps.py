"""Sweeps through Hydra's submitit launcher: each job its own run directory and W&B run, all in one W&B group
named after the sweep; a job with bad input fails alone and the others finish."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np

from sae.nn import load_sae
from tests.helpers import REPO


def test_submitit_local__two_jobs_one_failing_each_own_wandb_run_in_the_sweep_group(tmp_path):
    vectors = tmp_path / "acts.npy"
    np.save(vectors, np.random.default_rng(0).normal(size=(800, 16)).astype(np.float32))
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}",
         "model.pretrained=false", "logger=wandb", "data=vectors", f"data.path={vectors}", "data.check_width=false",
         "data.batch_size=64", "sae.init_sample=256", "trainer.max_steps=4", "sae.expansion=-1,2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, "the sweep reports that a job failed"
    assert "expansion=-1 must be a number > 0" in output, output[-3000:]

    assert not (sweep / "0" / "sae.safetensors").exists()
    sae, meta = load_sae(sweep / "1")  # the good job ran to the end despite its failing neighbour
    assert sae.d_sae == 32 and meta["global_step"] == 4

    runs = {job: list((sweep / job / "wandb").glob("offline-run-*/*.wandb")) for job in ("0", "1")}
    assert len(runs["1"]) == 1, "one W&B run per job"
    for (job, files), value in zip(runs.items(), ("-1", "2")):
        for file in files:  # the group and the name are in the run record of the offline run file
            record = file.read_bytes()
            named = re.search(rb"mixed3b-relu [^\x00-\x1f]*", record)  # the run's name: its values, not a number
            assert f"sweep:{sweep}".encode() in record and named and f"sae.expansion={value},".encode() in named[0]
