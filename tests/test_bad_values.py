"""Every bad value ends in one line naming it and the fix (exit 2), before any work where it can be checked up
front: numeric ranges, data statistics, damaged weights and checkpoints, the command line itself, and an export
whose layer disagrees with its run. Inputs that only look odd (vectors of a huge scale, corrupt held-out images,
logger=none) train."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from pathlib import Path

import pytest
import torch

from sae.checks import BadConfigError
from sae.data import ImageActivationDataModule, VectorFileError
from sae.errors import user_error
from sae.model import InceptionExtractor, WeightsError
from sae.model.weights import load_inceptionv1
from sae.nn import load_sae
from sae.run.preflight import preflight
from sae.train.guards import CheckpointError, DataStatisticsError, NonFiniteLossError
from tests.helpers import REPO, write_images
from tests.helpers import assert_refused, train_with, vector_run

REAL_RUN = ["trainer.fast_dev_run=false", "trainer.max_steps=3", "trainer.val_check_interval=3"]


@pytest.fixture
def vectors_file(tmp_path):
    path = tmp_path / "acts.npy"
    np.save(path, np.random.default_rng(0).normal(size=(600, 32)).astype(np.float32))
    return path


@pytest.mark.parametrize(("override", "message"), [
    ("sae.lr=-1", "sae.lr=-1 must be > 0."),
    ("sae.init_sample=0", "sae.init_sample=0 must be > 0."),
    ("sae.lr_decay_fraction=2", "sae.lr_decay_fraction=2 must be in [0, 1]."),
    ("sae.dead_window=0", "sae.dead_window=0 must be > 0."),
    ("trainer.max_steps=0", "trainer.max_steps=0 must be > 0."),
    ("trainer.max_steps=-1", "trainer.max_steps=-1 must be > 0."),
    ("trainer.max_steps=inf", "trainer.max_steps=inf must be a whole number"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0 must be > 0."),
    ("data.batch_size=0", "data.batch_size=0 must be > 0."),
    ("data.val_fraction=1.5", "data.val_fraction=1.5 must be in [0, 1)."),
])
def test_numeric_option_out_of_range__is_refused_before_any_work(tmp_path, vectors_file, override, message):
    assert_refused(tmp_path / "run", BadConfigError, message, *vector_run(vectors_file), override)


def test_image_options_out_of_range__are_refused(tmp_path, image_folder):
    for override, message in [("data.val_images=0", "data.val_images=0 must be > 0."),
                              ("data.crop_scale=[0.5,0.1]", "data.crop_scale=[0.5, 0.1] must be [low, high]")]:
        assert_refused(tmp_path / "run", BadConfigError, message, "data=imagefolder", f"data.root={image_folder}",
                       "layer=conv2d0", override)


def test_all_zero_vectors__name_the_real_cause(tmp_path):
    np.save(tmp_path / "zero.npy", np.zeros((300, 8), np.float32))
    assert_refused(tmp_path / "run", VectorFileError, "all 300 vectors are zero", *vector_run(tmp_path / "zero.npy"))


def test_vectors_of_a_huge_scale__train_and_export_finite_weights(tmp_path, vectors_file):
    np.save(tmp_path / "big.npy", np.load(vectors_file) * np.float32(1e30))
    train_with(tmp_path / "run", *vector_run(tmp_path / "big.npy"), *REAL_RUN)
    sae, meta = load_sae(tmp_path / "run")  # checks every tensor is finite
    assert 1e-32 < meta["input_scale"] < 1e-29


def test_input_statistics__zero_or_non_finite_samples_name_the_cause():
    from sae.train.module import input_scale_of

    with pytest.raises(DataStatisticsError, match="all 4 sampled input vectors are zero"):
        input_scale_of(torch.zeros(4, 3))
    with pytest.raises(DataStatisticsError, match="NaN or inf"):
        input_scale_of(torch.full((4, 3), float("nan")))
    assert input_scale_of(torch.full((4, 3), 1e30)) == pytest.approx(1e-30)


def test_unreadable_vectors_file__is_one_line_without_library_advice(tmp_path):
    (tmp_path / "text.npy").write_text("not an array")
    assert_refused(tmp_path / "run", VectorFileError, "cannot be read", *vector_run(tmp_path / "text.npy"))


def test_weights_file_with_nan__is_refused(tmp_path):
    state = {k: torch.full_like(v, float("nan")) for k, v in load_inceptionv1(pretrained=False).state_dict().items()}
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(WeightsError, match="holds NaN or inf"):
        load_inceptionv1(weights=tmp_path / "nan.pth")


def test_checkpoint_without_loops_or_optimizer__is_a_checkpoint_error(tmp_path, vectors_file):
    train_with(tmp_path / "run", *vector_run(vectors_file), *REAL_RUN)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    full = torch.load(last, weights_only=True)
    for damage in ("loops", "optimizer_states"):
        torch.save({k: v for k, v in full.items() if k != damage}, last)
        with pytest.raises(Exception) as raised:
            train_with(tmp_path / "run", *vector_run(vectors_file), *REAL_RUN, "ckpt_path=last")
        assert isinstance(user_error(raised.value), CheckpointError), repr(raised.value)
        assert damage in str(user_error(raised.value))


def test_divergence_before_any_checkpoint__does_not_promise_one(tmp_path, vectors_file):
    with pytest.raises(Exception) as raised:
        train_with(tmp_path / "run", *vector_run(vectors_file), *REAL_RUN, "sae.lr=1e30", "sae.lr_warmup_steps=0",
                   "callbacks.model_checkpoint.every_n_train_steps=1000")
    error = user_error(raised.value)
    assert isinstance(error, NonFiniteLossError), repr(raised.value)
    assert "No checkpoint had been written yet" in str(error) and "ckpt_path=last" not in str(error)


def test_logger_none__trains_without_the_lr_monitor_complaining(tmp_path, vectors_file):
    train_with(tmp_path / "run", *vector_run(vectors_file), *REAL_RUN, "logger=none")
    assert (tmp_path / "run" / "sae.safetensors").is_file()


def folder_with_broken_images(root: Path, good: int, broken: int, name: str) -> Path:
    """`good` readable images and `broken` files named NAME<i>.jpg that no decoder reads."""
    write_images(root, good)
    for i in range(broken):
        (root / f"{name}{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


def test_corrupt_held_out_images__are_skipped_and_counted(tmp_path):
    root = folder_with_broken_images(tmp_path / "images", good=8, broken=4, name="broken")
    datamodule = ImageActivationDataModule(InceptionExtractor("conv2d0", pretrained=False), root=str(root),
                                           image_size=32, val_images=10, num_workers=0)
    images = datamodule.held_out_images()
    assert datamodule.held_out_skipped == 4 and images.shape[0] == 6
    train_with(tmp_path / "run", "data=imagefolder", f"data.root={root}", "layer=conv2d0", "data.image_size=32",
               "data.val_images=10", "data.num_workers=0", "data.vectors_per_window=2048", "data.batch_size=256",
               "sae.init_sample=256", "sae.expansion=2", *REAL_RUN)  # validation runs on the readable ones


@pytest.mark.parametrize(("argv", "message"), [
    (["layer=mixed3bb"], "layer=mixed3bb is not an option of the 'layer' config group. Did you mean layer=mixed3b"),
    (["sae.lrr=1"], "sae.lrr is not an option of this config. Did you mean sae.lr?"),
    (["sae=topkk"], "Did you mean sae=topk?"),
    (["-m", "sae.k=1,2", "callbacks=[default,datasetexamples]"], "Did you mean callbacks=dataset_examples?"),
])
def test_command_line__unknown_key_or_choice_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        preflight("config", argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_command_line__valid_commands_pass(capsys):
    for argv in (["layer=mixed3b", "sae.expansion=8"], ["-m", "sae.l1_coefficient=1,3,10"], ["~callbacks.lr_monitor"],
                 ["sae=multi", "sae.sweep.l1_coefficient=[0.1,0.2]"], ["+callbacks.feature_visualization.every_n_steps=9"],
                 ["-m", "hydra/launcher=slurm", "ckpt_path=auto"], ["experiment=gorton2024", "data.root=/d"]):
        preflight("config", argv)
    preflight("evaluate", ["run=X", "eval=fast", "data=imagefolder", "data.root=/d"])


def test_train_py__run_dir_that_is_a_file_and_unknown_layer_exit_2_in_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    for args in (["layer=mixed3bb"], [f"hydra.run.dir={tmp_path / 'file'}"]):
        result = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
        assert "Did you mean layer=mixed3b" in result.stderr or "is a file" in result.stderr


def test_evaluate__an_export_of_another_layer_is_refused(tmp_path, image_folder):
    import evaluate
    from sae.analysis.evaluation import load_run
    from sae.nn import build_sae, save_sae
    from tests.helpers import make_run

    run = make_run(tmp_path / "run", image_folder)  # config_resolved.yaml: mixed3a (256 channels)
    save_sae(build_sae("relu", 256, d_sae=512), run, metadata={"layer": "mixed4c_3x3"})  # same width
    with pytest.raises(BadConfigError, match="names layer 'mixed4c_3x3' but the run's config_resolved.yaml"):
        evaluate.check_layer_of(load_run(run))
    save_sae(build_sae("relu", 480, d_sae=512), run, metadata={"layer": "mixed3a"})  # a wider layer's SAE
    with pytest.raises(BadConfigError, match="d_in=480 but layer 'mixed3a' has 256 channels"):
        evaluate.check_layer_of(load_run(run))


def test_held_out_image_folder_all_corrupt__is_one_error(tmp_path):
    root = folder_with_broken_images(tmp_path / "images", good=3, broken=6, name="z")
    datamodule = ImageActivationDataModule(InceptionExtractor("conv2d0", pretrained=False), root=str(root),
                                           image_size=32, val_images=6, num_workers=0, holdout=True)
    datamodule.val_indices = [i for i in range(len(datamodule.source)) if "z" in datamodule.source.describe(i)]
    with pytest.raises(Exception, match="none of the 6 held-out images could be decoded"):
        datamodule.held_out_images()
