"""train.py as a user runs it, against the rate that extraction alone and the SAE step alone predict together.

    python bench/e2e.py                       # mixed3b, TopK and ReLU, the 1k ImageNet sample (../shared/...)
    python bench/e2e.py --arch topk --windows 2 --root DIR

For each architecture, in one process and in this order:
- extraction alone: ``ImageActivationDataModule`` with train.py's ``data=imagefolder`` settings (JPEG decode in
  workers, the extractor, shuffle windows of 131072 vectors), iterated for ``--windows`` whole windows after the
  first: vectors/s (r_extract);
- the SAE step alone: ``SAEModule``'s step on a batch of those activations (``bench/throughput.py``'s
  ``module_step``): vectors/s (r_step);
- ``train.py layer=mixed3b data=imagefolder sae=ARCH model.pretrained=false logger=csv`` in a subprocess for
  1 + ``--windows`` windows; its ``train/vectors_per_second`` (Throughput callback) over the windows after the
  first, each interval covering one window's extraction and its 32 steps.

Prints predicted = 1 / (1 / r_extract + 1 / r_step) (the two share the CPU, one after the other) and
train.py's rate as a fraction of it. Absolute rates move with the machine's load; the fraction is the measure.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.throughput import BATCH, module_step  # noqa: E402

WINDOW = 131072  # data.vectors_per_window in conf/data/imagefolder.yaml
STEPS_PER_WINDOW = WINDOW // BATCH


def extraction_rate(root: Path, windows: int) -> tuple[float, torch.Tensor]:
    """Vectors/s of the training stream alone over `windows` windows after the first; and one batch of it."""
    from sae.data import ImageActivationDataModule
    from sae.model import InceptionExtractor

    extractor = InceptionExtractor("mixed3b", pretrained=False, channels_last=True)
    data = ImageActivationDataModule(extractor, root=str(root), batch_size=BATCH, vectors_per_window=WINDOW,
                                     image_batch_size=32, num_workers=2, val_images=64, seed=0)
    batches = iter(data.train_dataloader())
    first = next(batches)
    for _ in range(STEPS_PER_WINDOW - 1):
        next(batches)
    start = time.perf_counter()
    for _ in range(windows * STEPS_PER_WINDOW):
        next(batches)
    seconds = time.perf_counter() - start
    return windows * WINDOW / seconds, first.float()


def step_rate(arch: str, batch: torch.Tensor, steps: int) -> float:
    step = module_step(arch, batch / batch.norm(dim=1).mean() * batch.shape[1] ** 0.5)
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH / (time.perf_counter() - start)


def train_rate(arch: str, root: Path, windows: int, out: Path) -> list[float]:
    steps = (1 + windows) * STEPS_PER_WINDOW
    command = [sys.executable, "train.py", "layer=mixed3b", "data=imagefolder", f"data.root={root}", f"sae={arch}",
               "model.pretrained=false", "logger=csv", f"trainer.max_steps={steps}",
               f"trainer.log_every_n_steps={STEPS_PER_WINDOW}", f"hydra.run.dir={out}"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    rates = [float(r["train/vectors_per_second"]) for r in rows if r.get("train/vectors_per_second")]
    return rates[1:]  # the first interval has no extraction in it (its window was extracted before step 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["topk", "relu"])
    parser.add_argument("--windows", type=int, default=2, help="timed windows of 131072 vectors (32 steps each)")
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "imagenet-sample-1k")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    from sae.hostmem import reuse_freed_host_memory

    reuse_freed_host_memory()  # as train.py does
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; images {args.root}", flush=True)
    r_extract, batch = extraction_rate(args.root, args.windows)
    print(f"extraction alone: {r_extract:,.0f} vectors/s", flush=True)
    for arch in args.arch:
        r_step = step_rate(arch, batch, 2 * STEPS_PER_WINDOW // 4)
        with tempfile.TemporaryDirectory() as tmp:
            rates = train_rate(arch, args.root, args.windows, Path(tmp) / "run")
        predicted = 1 / (1 / r_extract + 1 / r_step)
        r_train = statistics.mean(rates)
        print(f"{arch}: step alone {r_step:,.0f} vectors/s; predicted together {predicted:,.0f}; train.py "
              f"{r_train:,.0f} (windows: {', '.join(f'{r:,.0f}' for r in rates)}) = {r_train / predicted:.0%} of "
              "predicted", flush=True)


if __name__ == "__main__":
    main()
