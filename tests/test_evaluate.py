"""evaluate.py end to end on a small run (real lucent InceptionV1, random weights), loading runs and
checkpoints, the multi-run comparison, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import lightning
import pytest
import torch

from sae.analysis.compare import pareto_front, write_comparison
from sae.analysis.evaluation import RunNotFoundError, load_run
from sae.nn import build_sae
from sae.train.module import SAEModule
from tests.helpers import EVAL_CHANNELS, EVAL_LAYER, assert_ok, make_run, run_evaluate

LAYER, CHANNELS = EVAL_LAYER, EVAL_CHANNELS
FAST = ["eval=fast", "logger=none"]


def test_evaluate__writes_metrics_plots_tables_and_the_browser(tmp_path: Path, images: Path):
    run = make_run(tmp_path / "run", images)
    assert_ok(run_evaluate([f"run={run}", *FAST], tmp_path))
    out = run / "eval"
    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in json"))
    assert metrics["run"]["layer"] == LAYER and metrics["run"]["model_weights"] == "random"
    assert metrics["run"]["held_out_images"] == 4
    reconstruction = metrics["reconstruction"]
    assert set(reconstruction) >= {"mse", "explained_variance", "fvu", "l0", "dead_fraction"}
    assert reconstruction["n_vectors"] == 4 * 28 * 28
    assert metrics["fidelity"]["available"] and 0 <= metrics["fidelity"]["top1_sae"] <= 1
    curves = metrics["curves"]
    assert curves["n_units"] == {"neurons": CHANNELS, "features": 2 * CHANNELS}
    assert 0 < curves["gap_neurons_and_features_deg"] <= curves["gap_neurons_deg"] <= 360
    assert set(metrics["interpretability"]["pixel"]) == {"features", "neurons", "kmeans", "pca", "random"}
    ii = json.loads((out / "interpretability.json").read_text())
    assert ii["position"] == "centre" and ii["fit_images"] == ii["scored_images"] == 2 and not ii["in_sample"]
    assert curves["applicable"] and {"features", "neurons"} <= set(curves["null"]) <= set(curves["verdict"]) | {
        "gap_features_deg", "gap_neurons_and_features_deg", "gap_neurons_deg"}  # every count beside its null
    for name in ("density.png", "curves_orientations.png", "curves.csv", "interpretability.json",
                 "interpretability.png", "index.html", "neurons.html"):
        assert (out / name).is_file(), name
    assert len((out / "curves.csv").read_text().splitlines()) == 1 + CHANNELS + 2 * CHANNELS
    visualized = metrics["browser"]["features"]
    assert len(visualized) == 3 and all((out / "features" / f"f{f}_viz.png").is_file() for f in visualized)
    alive = 2 * CHANNELS - reconstruction["n_dead"]
    assert metrics["browser"]["pages"] == {"features": alive, "neurons": CHANNELS}, "a page per alive feature, per neuron"
    assert len(list((out / "features").glob("f*.html"))) == alive
    assert len(list((out / "neurons").glob("n*.html"))) == CHANNELS
    units = json.loads((out / "features.js").read_text().split("=", 1)[1].rstrip().rstrip(";"))
    assert len(units["rows"]) == 2 * CHANNELS, "one row per feature"
    assert f"features/f{visualized[0]}_viz.png" in {r.get("viz") for r in units["rows"]}
    assert "RANDOM weights" in (out / "index.html").read_text()


def test_evaluate__several_runs_are_evaluated_and_compared(tmp_path: Path, images: Path):
    runs = [make_run(tmp_path / "sweep" / name, images, seed=i) for i, name in enumerate(("a", "b"))]
    result = run_evaluate([f"runs=[{tmp_path}/sweep/*]", *FAST, "eval.sections=[reconstruction]"], tmp_path)
    assert_ok(result)
    assert all((run / "eval" / "metrics.json").is_file() for run in runs)
    compare = tmp_path / "sweep" / "compare"
    assert len((compare / "compare.csv").read_text().splitlines()) == 3
    assert (compare / "compare.png").is_file() and "a/eval/index.html" in (compare / "compare.html").read_text()


def test_evaluate_multirun__each_job_evaluates_a_run_then_they_are_compared(tmp_path: Path, images: Path):
    runs = [make_run(tmp_path / "sweep" / name, images, seed=i) for i, name in enumerate(("a", "b"))]
    sweep_dir = tmp_path / "hydra-multi"  # run_evaluate's hydra.sweep.dir
    result = run_evaluate(["-m", f"run={runs[0]},{runs[1]}", *FAST,
                           "eval.sections=[reconstruction]"], tmp_path)
    assert_ok(result)
    assert all((run / "eval" / "metrics.json").is_file() for run in runs)
    rows = (sweep_dir / "compare" / "compare.csv").read_text().splitlines()
    assert len(rows) == 3 and (sweep_dir / "compare" / "compare.png").is_file()


def test_evaluate__a_missing_run_is_one_clear_error(tmp_path: Path):
    result = run_evaluate([f"run={tmp_path}/nowhere", *FAST], tmp_path)
    assert result.returncode == 2
    assert "RunNotFoundError" in result.stderr + result.stdout and "sae.json" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_load_run__a_checkpoint_gives_the_sae_in_raw_units(tmp_path: Path):
    module = SAEModule(d_in=8, expansion=2, metadata={"layer": LAYER, "model_weights": "random"})
    module.input_scale.fill_(4.0)
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__, "global_step": 0}, checkpoints / "last.ckpt")
    run = load_run(ckpt=checkpoints / "last.ckpt")
    x = torch.rand(5, 8)
    assert torch.allclose(run.sae.encode(x), module.sae.encode(x * 4.0), atol=1e-5)
    assert torch.allclose(run.sae(x).x_hat, module.sae(x * 4.0).x_hat / 4.0, atol=1e-5)
    assert run.meta["input_scale"] == 4.0 and run.directory == tmp_path / "run" and run.layer == LAYER


def test_load_run__names_what_is_missing(tmp_path: Path):
    with pytest.raises(RunNotFoundError, match="sae.safetensors"):
        load_run(tmp_path)
    with pytest.raises(RunNotFoundError, match="exactly one"):
        load_run()


def test_compare__the_frontier_keeps_runs_no_other_run_beats(tmp_path: Path):
    rows = [{"l0": 10, "explained_variance": 0.9}, {"l0": 20, "explained_variance": 0.8},
            {"l0": 5, "explained_variance": 0.7}, {"l0": 30, "explained_variance": 0.95}]
    assert pareto_front(rows) == [2, 0, 3]
    for name, l0 in (("x", 10.0), ("y", 20.0)):
        path = tmp_path / name / "eval"
        path.mkdir(parents=True)
        metrics = {"run": {"layer": LAYER}, "reconstruction": {"l0": l0, "explained_variance": 0.5},
                   "fidelity": {"available": False, "reason": "test"}}
        (path / "metrics.json").write_text(json.dumps(metrics))
    rows = write_comparison([tmp_path / "x", tmp_path / "y"], tmp_path / "out")
    assert [r["on_frontier"] for r in rows] == ["yes", "no"]
    assert rows[0]["kl_sae"] is None, "a missing section is an empty cell, not an error"
    with pytest.raises(FileNotFoundError, match="evaluate the run first"):
        write_comparison([tmp_path / "nothing"], tmp_path / "out")


def test_wandb_run_id__finds_the_runs_newest_wandb_run(tmp_path: Path):
    from evaluate import wandb_run_id

    assert wandb_run_id(tmp_path) is None and wandb_run_id(None) is None
    for name in ("offline-run-20260101_000000-aaaa1111", "run-20260202_000000-bbbb2222", "latest-run"):
        (tmp_path / "wandb" / name).mkdir(parents=True)
    assert wandb_run_id(tmp_path) == "bbbb2222"


@pytest.mark.parametrize("inputs", ["images", "crops"])
def test_interpretability_section__identical_top_images_score_highest(tmp_path: Path, inputs: str):
    from omegaconf import OmegaConf

    from sae.analysis.sections import HeldOut, scan
    from sae.analysis.studies import interpretability_section

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 16, 16), generator=generator, dtype=torch.uint8)
    images[:5] = images[0]  # unit 0's top five: five copies of one image
    acts = torch.zeros(10, 3, 1, 1)
    acts[:5, 0] = torch.arange(5, 0, -1).float().view(5, 1, 1)
    acts[5:, 1] = torch.arange(5, 0, -1).float().view(5, 1, 1)  # unit 1's top five: unrelated noise
    held = HeldOut(images, acts, "mixed3b")
    cfg = OmegaConf.create({"distances": ["pixel", "mean_colour"], "position": "max", "inputs": inputs, "k": 5,
                            "crop_size": 16, "families": ["kmeans", "random"], "fit_fraction": 0, "fit_sample": None,
                            "kmeans_k": 2, "kmeans_iters": 3, "random_k": 2, "device": None, "seed": 0})
    section = interpretability_section(held, {"features": scan(held), "neurons": scan(held)}, tmp_path, cfg)
    for name in ("pixel", "mean_colour"):
        ii = section.units["neurons"][f"ii_{name}"]
        assert ii[0] == 0.0 and ii[1] < 0, "identical images: maximal II; noise: lower"
        assert ii[2] != ii[2], "a unit that never fires has no II (NaN), and is counted apart"
        assert section.metrics[name]["neurons"]["n_never_fire"] == 1
    assert (tmp_path / "interpretability.png").is_file() and (tmp_path / "interpretability.json").is_file()


def test_interpretability_section__centre_ranks_by_the_centre_position_and_fits_out_of_sample(tmp_path: Path):
    from omegaconf import OmegaConf

    from sae.analysis.sections import HeldOut, scan
    from sae.analysis.studies import interpretability_section

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 24, 24), generator=generator, dtype=torch.uint8)  # mixed3b: a 3x3 grid
    images[::2] = images[0]  # the even images are one image
    acts = torch.zeros(20, 3, 3, 3)
    acts[::2, 0, 1, 1] = 1.0 + torch.arange(10).float()  # neuron 0 at the centre: the even images ...
    acts[1::2, 0, 0, 0] = 100.0 + torch.arange(10).float()  # ... but its maxima are in a corner of the odd ones
    held = HeldOut(images, acts, "mixed3b")
    cfg = OmegaConf.create({"distances": ["pixel"], "position": "centre", "inputs": "crops", "k": 3, "crop_size": 16,
                            "families": ["kmeans", "pca", "random"], "fit_fraction": 0.5, "fit_sample": None,
                            "kmeans_k": None, "kmeans_init": "identity", "kmeans_iters": 5, "components": None,
                            "iters": 50, "random_k": None, "device": None, "seed": 0})
    section = interpretability_section(held, {}, tmp_path, cfg, sae=build_sae("relu", 3, d_sae=6))
    assert section.units["neurons"]["ii_pixel"][0] > -1e-3, "the centre's top images: copies of one image"
    result = json.loads((tmp_path / "interpretability.json").read_text())
    assert result["fit_images"] == result["scored_images"] == 10 and not result["in_sample"]
    assert result["families"]["kmeans"]["init"] == "identity" and set(result["summary"]["pixel"]) == {
        "features", "neurons", "kmeans", "pca", "random"}
    assert "above_random" in result["summary"]["pixel"]["kmeans"]
    cfg.position, cfg.inputs = "max", "images"  # the previous protocol ranks neuron 0 by its corner maxima: unrelated odd images
    maxima = scan(held)
    legacy = interpretability_section(held, {"neurons": maxima, "features": maxima}, tmp_path, cfg)
    assert legacy.units["neurons"]["ii_pixel"][0] < -0.1
