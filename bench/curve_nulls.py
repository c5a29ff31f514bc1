"""False-positive rate of the curve-detector criterion: units that cannot be curve detectors, but as sparse.

    python bench/curve_nulls.py                       # mixed3b, 3 random-weights networks, 128 images
    python bench/curve_nulls.py --quick               # 1 network, 32 images, 16 orientations: a smoke run
    python bench/curve_nulls.py --sae RUN_DIR         # also the features of a trained SAE (its own network)

Families, each through the evaluation's own path (`sae.analysis.curve_study.unit_family`: the stimuli at
the layer's receptive field with half-a-stride jitter, natural scales from held-out images):

* neurons of InceptionV1 with random weights (target: <= 0.5% pass, 2 of mixed3b's 480);
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
    from sae.model import InceptionExtractor

    torch.manual_seed(seed)
    extractor = InceptionExtractor(layer, pretrained=False) if sae_run is None else _run_extractor(sae_run)
    acts = extract(extractor, images)
    probe = curve_study.Probe.build(extractor, orientations=orientations, batch_size=64)
    families = {"neurons": curve_study.neuron_family(probe, acts)}
    for density in densities:
        matched = torch.full((n_directions,), float(density))
        families[f"random_directions_{density:g}"] = curve_study.direction_family(probe, acts, matched, seed=seed)
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
    return {c: [round(float(v), 5) if v == v else None for v in values.tolist()] for c, values in columns.items()}


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
    args = parser.parse_args()
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
    if args.sae:
        results["sae"] = measure_network(args.layer, images, 0, [], 0, args.orientations, sae_run=args.sae)
    results["totals"] = _totals(results)
    results["seconds"] = round(time.perf_counter() - began, 1)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"{'family':<28}{'pass':>8}{'units':>8}{'rate %':>9}   failures by check")
    for name, total in results["totals"].items():
        print(f"{name:<28}{total['n_curve']:>8}{total['n_units']:>8}{100 * total['rate']:>9.3f}   {total['failures']}")
    print(f"{results['seconds']} s; written to {args.out}")


def _totals(results: dict) -> dict:
    totals: dict[str, dict] = {}
    for network in results["networks"] + ([results["sae"]] if "sae" in results else []):
        for name, family in network.items():
            name = "sae_features" if name == "sae_features" else name
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
