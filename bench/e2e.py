"""train.py as a user runs it, against the rate that extraction alone and the SAE step alone predict together.

    python bench/e2e.py                       # mixed3b, TopK and ReLU, the 1k ImageNet sample (../shared/...)
    python bench/e2e.py --arch topk --windows 2 --rounds 3 --root DIR

For each architecture, ``--rounds`` rounds in one process, each in this order:
- extraction alone: ``ImageActivationDataModule`` with train.py's ``data=imagefolder`` settings (JPEG decode in
  workers, the extractor, shuffle windows of 131072 vectors), one stream iterated for ``--windows`` more whole
  windows: vectors/s (r_extract);
- the SAE step alone: ``SAEModule``'s step (``bench/throughput.py``'s ``module_step``), trained on the first
  window's batches as far as train.py's first window, then timed over as many steps as train.py's timed
  windows take, from the same saved state each round: vectors/s (r_step). The same stage of training matters:
  the step's cost changes as the SAE trains (TopK's screened selection, ``bench/README.md``);
- ``train.py layer=mixed3b data=imagefolder sae=ARCH model.pretrained=false logger=csv`` in a subprocess for
  1 + ``--windows`` windows; its ``train/vectors_per_second`` (Throughput callback) over the windows after the
  first, each interval covering one window's extraction and its 32 steps.

Prints, per round, predicted = 1 / (1 / r_extract + 1 / r_step) (the two share the CPU, one after the other) and
train.py's rate as a fraction of it, then the median fraction. The parts are measured next to each train.py run
because the machine's speed drifts by 10% over minutes; the fraction is the measure.
"""

from __future__ import annotations

import argparse
import copy
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


def training_stream(root: Path):
    """train.py's ``data=imagefolder`` stream at mixed3b (random weights), as an iterator of (B, d_in) batches."""
    from sae.data import ImageActivationDataModule
    from sae.model import InceptionExtractor

    extractor = InceptionExtractor("mixed3b", pretrained=False, channels_last=True)
    data = ImageActivationDataModule(extractor, root=str(root), batch_size=BATCH, vectors_per_window=WINDOW,
                                     image_batch_size=32, num_workers=2, val_images=64, seed=0)
    return iter(data.train_dataloader())


def extraction_rate(stream, windows: int) -> float:
    """Vectors/s of the stream alone over its next `windows` whole windows."""
    start = time.perf_counter()
    for _ in range(windows * STEPS_PER_WINDOW):
        next(stream)
    return windows * WINDOW / (time.perf_counter() - start)


class StepAlone:
    """``SAEModule``'s step trained on `batches` (cycled) for `warm_steps` steps, set up from the first as train.py
    is (input scale, b_dec); each ``rate`` starts from that state."""

    def __init__(self, arch: str, batches: list[torch.Tensor], warm_steps: int) -> None:
        self.batches, self.warm_steps = batches, warm_steps
        self.step = module_step(arch, batches[0])
        for i in range(warm_steps):
            self.step(batches[i % len(batches)])
        self.saved = copy.deepcopy((self.step.module.state_dict(), self.step.optimizer.state_dict()))

    def rate(self, timed_steps: int) -> float:
        """Vectors/s over the next `timed_steps` steps from the saved state."""
        module_state, optimizer_state = copy.deepcopy(self.saved)
        self.step.module.load_state_dict(module_state)
        self.step.optimizer.load_state_dict(optimizer_state)
        start = time.perf_counter()
        for i in range(self.warm_steps, self.warm_steps + timed_steps):
            self.step(self.batches[i % len(self.batches)])
        return timed_steps * BATCH / (time.perf_counter() - start)


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
    parser.add_argument("--rounds", type=int, default=3, help="extraction, step and train.py measured this many times")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    from sae.hostmem import reuse_freed_host_memory

    reuse_freed_host_memory()  # as train.py does
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; images {args.root}", flush=True)
    stream = training_stream(args.root)
    first_window = [next(stream).float().clone() for _ in range(STEPS_PER_WINDOW)]
    for arch in args.arch:
        # train.py's rate is read over the windows after the first: the step alone is timed at those steps.
        alone = StepAlone(arch, first_window, STEPS_PER_WINDOW)
        fractions = []
        for round_ in range(args.rounds):
            r_extract = extraction_rate(stream, args.windows)
            r_step = alone.rate(args.windows * STEPS_PER_WINDOW)
            with tempfile.TemporaryDirectory() as tmp:
                rates = train_rate(arch, args.root, args.windows, Path(tmp) / "run")
            predicted = 1 / (1 / r_extract + 1 / r_step)
            r_train = statistics.mean(rates)
            fractions.append(r_train / predicted)
            print(f"{arch} round {round_ + 1}: extraction alone {r_extract:,.0f} vectors/s, step alone {r_step:,.0f}; "
                  f"predicted together {predicted:,.0f}; train.py {r_train:,.0f} (windows: "
                  f"{', '.join(f'{r:,.0f}' for r in rates)}) = {r_train / predicted:.0%} of predicted", flush=True)
        print(f"{arch}: train.py / predicted, median of {args.rounds} rounds: {statistics.median(fractions):.0%} "
              f"(rounds: {', '.join(f'{f:.0%}' for f in fractions)})", flush=True)


if __name__ == "__main__":
    main()
