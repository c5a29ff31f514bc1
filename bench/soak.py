"""Soak test: a long run killed again and again (SIGKILL, and every third time SIGTERM), resumed each time with
`ckpt_path=auto` in the same run directory, must end complete, with no corrupt checkpoint and the same dictionary
as an uninterrupted run.

    python bench/soak.py --minutes 30 --kill-after 45 90   # the issue's soak: 30 minutes of kills and resumes
    python bench/soak.py --minutes 10 --images    # image data (data=sample, conv2d1, 32 px crops)
    python bench/soak.py --minutes 2              # a smoke run

Steps: calibrate the step rate (or take --steps) so that the interrupted run lasts about --minutes; train the
reference run beside it (one thread each); train the same run again, killing the process after a random
--kill-after delay each time and restarting it, until it finishes; then read every checkpoint back (whole and finite), compare the final W_dec with the reference
(torch.equal: one CPU thread, deterministic ops) and print a JSON summary (also written to OUT/soak.json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sae.train.guards import CheckpointError, load_checkpoint_file  # noqa: E402


def run_args(data: Path | None, steps: int, ckpt_every: int) -> list[str]:
    common = ["model.pretrained=false", "logger=csv", f"trainer.max_steps={steps}", "trainer.val_check_interval=1000",
              f"callbacks.model_checkpoint.every_n_train_steps={ckpt_every}", "sae.lr_warmup_steps=50",
              "sae.dead_window=20000", "sae.resample.every_n_steps=300", "sae.resample.until_step=2000"]
    if data is None:  # images: the real extraction path
        return [*common, "layer=conv2d1", "data.image_size=32", "data.batch_size=512", "data.num_workers=0",
                "data.vectors_per_window=8192", "data.image_batch_size=16", "data.val_images=8", "sae.expansion=4",
                "sae.init_sample=2048"]
    return [*common, "data=vectors", f"data.path={data}", "data.check_width=false", "data.batch_size=512",
            "sae.expansion=8", "sae.init_sample=2048"]


def start(run_dir: Path, args: list[str], *extra: str) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")
    return subprocess.Popen([sys.executable, "train.py", f"hydra.run.dir={run_dir}", *args, *extra], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def train_once(run_dir: Path, args: list[str]) -> float:
    t0 = time.monotonic()
    if start(run_dir, args).wait() != 0:
        raise SystemExit(f"the run in {run_dir} failed; see {run_dir.parent / (run_dir.name + '.log')}")
    return time.monotonic() - t0


def soak(run_dir: Path, args: list[str], kill_range: tuple[float, float], rng: random.Random) -> dict:
    """Train to the end, killing the process after a random delay each time; count what happened."""
    counts = {"sigkill": 0, "sigterm": 0, "sigterm_saved": 0, "starts": 0, "resumes": 0, "unexpected_exits": []}
    while True:
        if (run_dir / "checkpoints" / "last.ckpt").exists():
            counts["resumes"] += 1
        counts["starts"] += 1
        process = start(run_dir, args, "ckpt_path=auto")
        try:
            status = process.wait(timeout=rng.uniform(*kill_range))
        except subprocess.TimeoutExpired:
            use_term = (counts["sigkill"] + counts["sigterm"]) % 3 == 2
            process.send_signal(signal.SIGTERM if use_term else signal.SIGKILL)
            status = process.wait()
            counts["sigterm" if use_term else "sigkill"] += 1
            counts["sigterm_saved"] += int(use_term and status == 143)
        if status == 0:
            return counts
        if status not in (-signal.SIGKILL, 143, -signal.SIGTERM):
            counts["unexpected_exits"].append(status)
            if len(counts["unexpected_exits"]) > 3:
                raise SystemExit(f"train.py keeps failing ({counts}); see {run_dir.parent / (run_dir.name + '.log')}")


def check_checkpoints(run_dir: Path) -> dict:
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    corrupt = []
    for path in ckpts:
        try:
            load_checkpoint_file(path, weights_only=True)
        except CheckpointError as e:
            corrupt.append(str(e))
    temps = [p.name for p in (run_dir / "checkpoints").glob(".*.tmp")]
    return {"checkpoints": len(ckpts), "corrupt": corrupt, "leftover_temp_files": temps}


def calibrate_steps(out: Path, data: Path | None, a: argparse.Namespace) -> int:
    """Steps for which the interrupted run takes about `--minutes`: the step rate comes from two short runs
    (their difference cancels the start-up time), and a killed run loses its start-up and the steps since its
    last checkpoint each time."""
    seconds = {n: train_once(out / f"calibrate{n}", run_args(data, n, n)) for n in (50, 250)}
    rate = 200 / max(1.0, seconds[250] - seconds[50])
    startup = max(0.0, seconds[50] - 50 / rate)
    mean_life = sum(a.kill_after) / 2
    useful = max(0.2, (mean_life - startup - a.ckpt_every / rate / 2) / mean_life)
    return max(4 * a.ckpt_every, int(rate * a.minutes * 60 * useful))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--images", action="store_true", help="data=sample images instead of vectors")
    parser.add_argument("--ckpt-every", type=int, default=50, help="steps between checkpoints")
    parser.add_argument("--kill-after", type=float, nargs=2, default=(10.0, 40.0), help="seconds, uniform")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: calibrated to --minutes)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="soak-"))
    out.mkdir(parents=True, exist_ok=True)
    data = None
    if not a.images:
        rng = np.random.default_rng(0)
        codes = rng.exponential(size=(50_000, 512)) * (rng.random((50_000, 512)) < 0.01)
        data = out / "vectors.npy"
        np.save(data, (codes @ rng.normal(size=(512, 64))).astype(np.float32))

    steps = a.steps or calibrate_steps(out, data, a)
    args = run_args(data, steps, a.ckpt_every)
    # The reference runs beside the soak (one thread each, deterministic): the budget is the soak's.
    t0 = time.monotonic()
    reference, finished = start(out / "reference", args), []
    waiter = threading.Thread(target=lambda: finished.append((reference.wait(), time.monotonic() - t0)))
    waiter.start()
    counts = soak(out / "soaked", args, tuple(a.kill_after), random.Random(a.seed))
    t_soak = time.monotonic() - t0
    waiter.join()
    status, t_ref = finished[0]
    if status != 0:
        raise SystemExit(f"the reference run failed; see {out / 'reference.log'}")

    W_ref = load_file(out / "reference" / "sae.safetensors")["W_dec"]
    W_soak = load_file(out / "soaked" / "sae.safetensors")["W_dec"]
    final = load_checkpoint_file(out / "soaked" / "checkpoints" / "last.ckpt")
    summary = {
        "steps": steps, "data": "images" if a.images else "vectors", "reference_seconds": round(t_ref, 1),
        "soak_seconds": round(t_soak, 1), **counts, "final_step": final["global_step"],
        "complete": final["global_step"] == steps and (out / "soaked" / "sae.json").exists(),
        **check_checkpoints(out / "soaked"),
        "W_dec_equal": bool(torch.equal(W_ref, W_soak)), "W_dec_max_abs_diff": float((W_ref - W_soak).abs().max()),
        "out": str(out),
    }
    (out / "soak.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    ok = summary["complete"] and summary["W_dec_equal"] and not summary["corrupt"] and not counts["unexpected_exits"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
