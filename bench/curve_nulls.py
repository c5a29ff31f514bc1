"""False-positive rate of the curve-detector criterion: units that cannot be curve detectors, but as sparse.

    python bench/curve_nulls.py                       # mixed3b, 3 random-weights networks, 128 images
    python bench/curve_nulls.py --quick               # 1 network, 32 images, 16 orientations: a smoke run
    python bench/curve_nulls.py --sae RUN_DIR         # also the features of a trained SAE (its own network)
    python bench/curve_nulls.py --rescore curve_nulls.json --set min_curve_vs_angle=1.1   # other thresholds

Families, each through the evaluation's own path (`sae.analysis.curve_study.unit_family`: the stimuli at
the layer's receptive field with half-a-stride jitter, natural scales from held-out images):

* neurons of InceptionV1 with random weights (target: <= 0.5% pass, 2 of mixed3b's 480); network 0 is the
  project's random network (model.pretrained=false), networks 1.. are lucent's initialisation under other seeds;
* random unit directions in the random network's channel space, thresholded to fire on 10%, 1% and 0.1% of
  held-out positions (the range of SAE feature densities; target <= 0.25%);
* with --sae: the features of a trained SAE (e.g. `python train.py model.pretrained=false ...`; target
  <= 0.25% on random weights).

Images: ../shared/data/imagenet-sample-1k (centre crops at 224 px), the last --images files. Prints one
row per family (passing / units, and how many fail each check) and writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data" / "imagenet-sample-1k"


def load_images(root: Path, n: int, size: int = 224) -> torch.Tensor:
    """(n, 3, size, size) uint8 centre crops of the last n images under root (sorted)."""
    from sae.data.images import ImageFolder, center_crop_box, crop_to_tensor

    source = ImageFolder(root)
    tiles = []
    for index in range(len(source) - n, len(source)):
        image = source.load(index)
        tiles.append(crop_to_tensor(image, center_crop_box(*image.size), size, False))
    return torch.stack(tiles)


def measure_network(layer: str, images: torch.Tensor, seed: int, densities, n_directions: int, orientations: int,
                    sae_run: str | None = None) -> dict:
    """Pass counts of the random network's neurons and of density-matched random directions."""
    from sae.analysis import curve_study
    from sae.analysis.evaluation import extract
    extractor = _random_network(layer, seed) if sae_run is None else _run_extractor(sae_run)
    acts = extract(extractor, images)
    probe = curve_study.Probe.build(extractor, orientations=orientations, batch_size=64)
    families = {"neurons": curve_study.neuron_family(probe, acts)}
    for i, density in enumerate(densities):  # independent directions for every density and network
        matched = torch.full((n_directions,), float(density))
        families[f"random_directions_{density:g}"] = curve_study.direction_family(probe, acts, matched,
                                                                                 seed=100 * seed + i)
    if sae_run is not None:
        from sae.analysis.evaluation import load_run

        families["sae_features"] = curve_study.feature_family(probe, acts, load_run(sae_run).sae)
    return {name: {"n_units": len(f.report.is_curve), "n_curve": f.report.n_curve,
                   "preferred": f.report.preferred_orientation[f.report.is_curve].tolist(),
                   "failures": f.report.failures(), "units": _unit_columns(f.report)} for name, f in families.items()}


def _unit_columns(report) -> dict:
    """Every unit's measured quantities, so that other thresholds can be tried on the saved JSON."""
    columns = {c: getattr(report, c) for c in ("peak", "relative_peak", "half_width", "peak_sharpness",
                                               "curve_vs_line", "curve_vs_angle", "split_fraction", "split_shift")}
    columns["single_peak"] = report.single_peak.float()
    return {c: [None if math.isnan(v) else round(float(v), 5) for v in values.tolist()] for c, values in columns.items()}


def _random_network(layer: str, seed: int):
    """Seed 0: the project's random-weights InceptionV1 (model.pretrained=false); others: lucent's
    initialisation under another seed."""
    import logging

    from sae.model import InceptionExtractor

    if seed == 0:
        return InceptionExtractor(layer, pretrained=False)
    from lucent.modelzoo.inceptionv1.InceptionV1 import InceptionV1

    torch.manual_seed(seed)
    logging.getLogger("sae.model").setLevel(logging.ERROR)  # "a net not loaded by load_inceptionv1": known
    return InceptionExtractor(layer, net=InceptionV1(pretrained=False).eval())


def _run_extractor(run: str):
    """The run's own InceptionV1 (its model config), for its SAE's features."""
    import yaml

    from sae.model import InceptionExtractor

    config = yaml.safe_load((Path(run) / "config_resolved.yaml").read_text())
    model = config["model"]
    return InceptionExtractor(config["layer"]["name"], pretrained=bool(model.get("pretrained", True)),
                              weights=model.get("weights"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", default="mixed3b")
    parser.add_argument("--networks", type=int, default=3, help="random-weights networks (seeds 0..n-1)")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--directions", type=int, default=2000, help="random directions per density")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.01, 0.001])
    parser.add_argument("--orientations", type=int, default=64)
    parser.add_argument("--sae", default=None, help="a training run whose SAE features are also counted")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="curve_nulls.json")
    parser.add_argument("--rescore", default=None, metavar="JSON",
                        help="no measuring: count the passes of a saved run under --set thresholds")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="thresholds for --rescore")
    args = parser.parse_args()
    if args.rescore:
        thresholds = {k: float(v) for k, v in (item.split("=") for item in args.set)}
        saved = json.loads(Path(args.rescore).read_text())
        for network in saved["networks"] + ([saved["sae"]] if "sae" in saved else []):
            print({name: f"{rescore(f['units'], **thresholds)}/{f['n_units']}" for name, f in network.items()})
        return
    if args.quick:
        args.networks, args.images, args.directions, args.orientations = 1, 32, 300, 16
    torch.set_num_threads(max(1, torch.get_num_threads()))
    images = load_images(Path(args.data), args.images)
    began = time.perf_counter()
    results = {"args": vars(args), "networks": []}
    for seed in range(args.networks):
        results["networks"].append(measure_network(args.layer, images, seed, args.densities, args.directions,
                                                   args.orientations))
        print(f"network {seed}: " + ", ".join(f"{k} {v['n_curve']}/{v['n_units']}"
                                               for k, v in results["networks"][-1].items()), flush=True)
        Path(args.out).write_text(json.dumps(results))  # so far: a long run can be read while it goes on
    if args.sae:
        results["sae"] = measure_network(args.layer, images, 0, [], 0, args.orientations, sae_run=args.sae)
    results["totals"] = _totals(results)
    results["seconds"] = round(time.perf_counter() - began, 1)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"{'family':<28}{'pass':>8}{'units':>8}{'rate %':>9}   failures by check")
    for name, total in results["totals"].items():
        print(f"{name:<28}{total['n_curve']:>8}{total['n_units']:>8}{100 * total['rate']:>9.3f}   {total['failures']}")
    print(f"{results['seconds']} s; written to {args.out}")


def rescore(units: dict, min_relative_peak=0.25, min_half_width=10.0, max_half_width=45.0, min_peak_to_mean=2.5,
            min_curve_vs_line=1.25, min_curve_vs_angle=1.0, min_split_fraction=0.5, max_split_shift=22.5,
            step=360 / 64) -> int:
    """How many of a saved family's units pass under other thresholds (single_peak as measured)."""
    import numpy as np

    c = {k: np.array([np.nan if v is None else v for v in values], dtype=float) for k, values in units.items()}
    with np.errstate(invalid="ignore"):
        passed = ((c["peak"] > 0) & (c["relative_peak"] >= min_relative_peak) & (c["single_peak"] > 0)
                  & (c["half_width"] >= max(min_half_width, step)) & (c["half_width"] <= max_half_width)
                  & (c["peak_sharpness"] >= min_peak_to_mean) & (c["curve_vs_line"] >= min_curve_vs_line)
                  & (c["curve_vs_angle"] >= min_curve_vs_angle) & (c["split_fraction"] >= min_split_fraction)
                  & (c["split_shift"] <= max_split_shift))
    return int(passed.sum())


def _totals(results: dict) -> dict:
    totals: dict[str, dict] = {}
    sae = {"sae_features": results["sae"]["sae_features"]} if "sae" in results else {}
    for network in results["networks"] + [sae]:
        for name, family in network.items():
            total = totals.setdefault(name, {"n_curve": 0, "n_units": 0, "failures": {}})
            total["n_curve"] += family["n_curve"]
            total["n_units"] += family["n_units"]
            for check, count in family["failures"].items():
                total["failures"][check] = total["failures"].get(check, 0) + count
    for total in totals.values():
        total["rate"] = total["n_curve"] / max(total["n_units"], 1)
    return totals


if __name__ == "__main__":
    main()
