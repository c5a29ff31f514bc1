"""How much the callbacks slow training: the same run with and without them, interleaved, in one process.

    python bench/callbacks_overhead.py                       # sparsity: mixed3b-sized SAE on vectors
    python bench/callbacks_overhead.py --images DIR          # + the visual callbacks on image data

Vectors (the stringent case for SparsityMonitor: no InceptionV1 pass hides its cost): random (N, 480)
vectors, an SAE of expansion 8, batch 4096, `--steps` steps. Configurations alternate run by run
(`--repeats` rounds) so that machine noise hits both alike; reported: each configuration's median wall
time of `trainer.fit` and its ratio to the run without callbacks.

With --images: mixed3b (random weights) on that folder of images, without callbacks vs with
FeatureVisualization and DatasetExamples at their default settings plus `--every` (a schedule much denser
than the default, to show the time budget `max_overhead` at work); the end-of-training renders are
reported separately, since they happen after the last step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from callbacks import DatasetExamples, FeatureVisualization, SparsityMonitor
from sae.train import SAEModule


def fit_seconds(datamodule, d_in: int, callbacks: list, steps: int, root: str) -> float:
    module = SAEModule(d_in=d_in, expansion=8, init_sample=4096)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, max_epochs=-1, val_check_interval=10**9,
                        check_val_every_n_epoch=None, log_every_n_steps=20, num_sanity_val_steps=0, logger=False,
                        callbacks=callbacks, default_root_dir=root, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return time.perf_counter() - start


def compare(configs: dict, make_data, d_in: int, steps: int, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, make_callbacks in configs.items():
            with tempfile.TemporaryDirectory() as root:
                times[name].append(fit_seconds(make_data(), d_in, make_callbacks(), steps, root))
                print(f"  {name}: {times[name][-1]:.2f} s", flush=True)
    return times


def report(times: dict[str, list[float]]) -> None:
    base = statistics.median(times["none"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:>24}: {median:8.2f} s (runs {', '.join(f'{v:.2f}' for v in values)})  ratio {median / base:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=Path, default=None, help="a folder of images for the visual callbacks")
    parser.add_argument("--every", type=int, default=10, help="every_n_steps of the visual callbacks")
    args = parser.parse_args()

    from sae.data import VectorDataModule

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "acts.npy"
        np.save(path, np.random.default_rng(0).standard_normal((65536, 480), dtype=np.float32).clip(min=0))
        print(f"vectors: d_in 480, d_sae 3840, batch 4096, {args.steps} steps, torch threads {torch.get_num_threads()}")
        report(compare({"none": list, "sparsity (default)": lambda: [SparsityMonitor()]},
                       lambda: VectorDataModule(str(path), batch_size=4096), 480, args.steps, args.repeats))

    if args.images is not None:
        from sae.data import ImageActivationDataModule
        from sae.model import InceptionExtractor

        extractor = InceptionExtractor("mixed3b", pretrained=False)
        visual = {}

        def make_visual():
            visual["callbacks"] = [FeatureVisualization(every_n_steps=args.every, at_end=False),
                                   DatasetExamples(every_n_steps=args.every, at_end=False)]
            return visual["callbacks"]

        def data():
            return ImageActivationDataModule(extractor, root=str(args.images), batch_size=4096, num_workers=2)

        print(f"images: mixed3b, batch 4096, {args.steps} steps, visual callbacks every {args.every} steps")
        times = compare({"none": list, "visual, 5% budget": make_visual}, data, 480, args.steps, args.repeats)
        report(times)
        for callback in visual["callbacks"]:
            print(f"{callback.name} (last round): {callback.spent:.1f} s in its runs, postponed "
                  f"{callback.postponed} times, last run {callback.last_cost:.1f} s")


if __name__ == "__main__":
    main()
