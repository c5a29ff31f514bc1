"""The Gorton experiment on the known-answer network: do SAE features recover the curve detectors that no
neuron holds?

    python bench/planted_curves.py                                   # the default SAE (ReLU), conf defaults
    python bench/planted_curves.py --sae relu topk --steps 1500 --data-root DIR
    python bench/planted_curves.py --runs RUN_DIR [RUN_DIR ...]      # measure finished runs only

The planted network's mixed3b stream over the images (`data=imagefolder data.root=DIR`: random crops, every
position) is cached once with `python -m sae.cache model=planted layer=mixed3b ...` (`--vectors`, resumable),
then each SAE is trained through `train.py model=planted layer=mixed3b data=vectors data.path=CACHE sae=ARCH`
(the conf/ defaults otherwise, 5000 steps unless `--steps`) and evaluated through
`evaluate.py run=RUN data=imagefolder data.root=DIR eval.sections=[reconstruction,curves]`, as a user would.
The planted network (sae/model/planted.py) has 16 curve detectors at mixed3b, 6 of them pure channels; the
other 10 live only in superposition. Reported per run:

* from metrics.json's curves.planted (the curve criterion applied): planted curves recovered by features
  where no pure neuron covers them (best-matching decoder row at cos > 0.9, passing the criterion, preferred
  orientation within 360/64 degrees), by neurons, and the false positives;
* criterion-free, from the export (load_sae): how many of the superposed curves have a best-matching decoder
  row at cos > 0.9 whose radial tuning peaks within 360/64 degrees of the planted orientation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sae.analysis.curves import curve_detectors, curve_stimuli, radial_tuning, stimulus_size, unit_responses  # noqa: E402
from sae.model import InceptionExtractor, load_inceptionv1  # noqa: E402
from sae.model.planted import planted_truth  # noqa: E402
from sae.nn import load_sae  # noqa: E402

MAX_ERROR = 360.0 / 64
MIN_COSINE = 0.9


def _data(data_root: str) -> list[str]:
    return ["data=sample"] if data_root == "sample" else ["data=imagefolder", f"data.root={data_root}"]


def _run(command: list[str]) -> None:
    subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cache(data_root: str, vectors: int, out: Path) -> Path:
    """The planted mixed3b stream over data_root, written once (sae.cache resumes an interrupted cache)."""
    command = [sys.executable, "-m", "sae.cache", "model=planted", "layer=mixed3b", *_data(data_root), f"out={out}",
               f"vectors={vectors}", "dtype=float32"]
    _run(command)
    return out


def train(arch: str, steps: int | None, vectors: Path, out: Path, extra: list[str]) -> float:
    command = [sys.executable, str(REPO / "train.py"), "model=planted", "layer=mixed3b", "data=vectors",
               f"data.path={vectors}", f"sae={arch}", "logger=csv", f"hydra.run.dir={out}", *extra]
    if steps is not None:
        command.append(f"trainer.max_steps={steps}")
    start = time.perf_counter()
    _run(command)
    return time.perf_counter() - start


def evaluate(run: Path, data_root: str) -> dict:
    command = [sys.executable, str(REPO / "evaluate.py"), f"run={run}", "eval.sections=[reconstruction,curves]",
               "logger=none"]
    if json.loads((run / "sae.json").read_text()).get("data") == "sae.data.VectorDataModule":  # evaluate on images
        command += _data(data_root)
    _run(command)
    return json.loads((run / "eval" / "metrics.json").read_text())


def angle_error(a, b) -> np.ndarray:
    return np.abs((np.asarray(a, dtype=float) - np.asarray(b, dtype=float) + 180.0) % 360.0 - 180.0)


def measure(run: Path, extractor, stimuli, truth) -> dict:
    sae, meta = load_sae(run)
    if meta.get("model_weights") not in ("planted", "n/a (precomputed vectors)"):  # vectors: cached from planted
        raise SystemExit(f"{run} was not trained on the planted network (model_weights={meta.get('model_weights')}).")
    rows = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=1)
    cosine = truth.direction @ rows.T  # (n_features, d_sae)
    best_cos, best = cosine.max(1)
    curves = [i for i, kind in enumerate(truth.kind) if kind == "curve"]
    hidden = [i for i in curves if truth.pure_channel[i] is None]
    tuning = radial_tuning(unit_responses(extractor, sae.eval(), stimuli, units=best[hidden].tolist()), stimuli)
    report = curve_detectors(tuning)
    error = angle_error(report.preferred_orientation.numpy(), truth.orientation_deg[hidden])
    found = (best_cos[hidden].numpy() > MIN_COSINE) & (error <= MAX_ERROR)
    return {
        "run": str(run), "architecture": sae.architecture, "d_sae": sae.d_sae, "steps": meta.get("global_step"),
        "hidden": len(hidden), "recovered": int(found.sum()), "recall": float(found.mean()),
        "cos>0.9": int((best_cos[hidden] > MIN_COSINE).sum()), "median_cos": float(best_cos[hidden].median()),
        "max_error_of_recovered": float(error[found].max()) if found.any() else float("nan"),
        "missed": [float(truth.orientation_deg[i]) for i, ok in zip(hidden, found) if not ok],
        "other_features_cos>0.9": int((best_cos[[i for i in range(len(truth)) if i not in curves]] > MIN_COSINE).sum()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", nargs="+", default=["relu"])
    parser.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: the conf's)")
    parser.add_argument("--vectors", type=int, default=1_000_000, help="planted mixed3b vectors to cache")
    parser.add_argument("--data-root", default="/work/shared/data/imagenet-sample-1k")
    parser.add_argument("--out", default="outputs/bench_planted_curves")
    parser.add_argument("--runs", nargs="*", default=None, help="measure these finished runs; train nothing")
    parser.add_argument("--no-eval", action="store_true", help="skip evaluate.py (criterion-free numbers only)")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides, e.g. data.batch_size=2048")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    runs, walls = [], {}
    if args.runs:
        runs = [Path(r) for r in args.runs]
    else:
        vectors = cache(args.data_root, args.vectors, Path(args.out) / "cache")
        for arch in args.sae:
            out = Path(args.out) / f"{arch}-{args.steps or 'default'}"
            walls[str(out)] = train(arch, args.steps, vectors, out, args.overrides)
            runs.append(out)
    net = load_inceptionv1(weights="planted")
    extractor = InceptionExtractor("mixed3b", net=net)
    stimuli = curve_stimuli(stimulus_size("mixed3b"))
    truth = planted_truth("mixed3b")
    pure = [i for i, c in enumerate(truth.pure_channel) if c is not None]
    own = radial_tuning(unit_responses(extractor, None, stimuli, units=[truth.pure_channel[i] for i in pure]), stimuli)
    pure_error = angle_error(curve_detectors(own).preferred_orientation.numpy(), truth.orientation_deg[pure])
    print(f"pure curve neurons: {len(pure)} at {sorted(truth.orientation_deg[pure].tolist())} deg; "
          f"max tuning error {pure_error.max():.2f} deg")
    for run in runs:
        metrics = evaluate(run, args.data_root) if not args.no_eval else {}
        planted = (metrics.get("curves") or {}).get("planted")
        if planted:
            print(f"{run}: curves.planted: {planted['n_planted']} planted, {planted['n_pure']} pure; recovered by "
                  f"neurons {planted['recovered_by_neurons']}, by features {planted['recovered_by_features']}; "
                  f"{planted['recovered_by_features_not_by_neurons']}/{planted['n_not_covered_by_neurons']} that no "
                  f"neuron covers ({100 * planted['recall_features_where_neurons_miss']:.1f}%); false positives: "
                  f"{planted['false_positive_features']} features, {planted['false_positive_neurons']} neurons; "
                  f"explained variance {metrics['reconstruction'].get('explained_variance', float('nan')):.3f}")
        result = measure(run, extractor, stimuli, truth)
        wall = walls.get(str(run))
        print(f"{result['architecture']} d_sae={result['d_sae']} steps={result['steps']}"
              + (f" wall={wall:.0f}s" if wall else "") + f": recovered {result['recovered']}/{result['hidden']} "
              f"curves that no neuron holds ({100 * result['recall']:.1f}%); cos>0.9: {result['cos>0.9']}, median "
              f"best cos {result['median_cos']:.3f}; max orientation error of those {result['max_error_of_recovered']:.2f} "
              f"deg; other planted "
              f"features at cos>0.9: {result['other_features_cos>0.9']}; missed at {result['missed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
