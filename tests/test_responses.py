"""Recorded responses (data=responses): safe loaders in every format, one-line errors, and train.py then
evaluate.py on a small simulated recording, with no InceptionV1."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sae.data.responses import ResponseDataModule, ResponseFileError, load_responses, load_stimuli, stimulus_paths
from sae.data.simulate_responses import simulate, write_recording
from tests.helpers import run_script


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recording")
    return write_recording(simulate(240, clusters=6, units=8, spread=3, size=16, seed=0), out)


def test_load_responses__every_format_gives_the_same_array(tmp_path: Path):
    array = np.random.default_rng(0).random((5, 3)).astype(np.float32)
    np.save(tmp_path / "r.npy", array)
    torch.save(torch.from_numpy(array), tmp_path / "r.pt")
    from safetensors.torch import save_file

    save_file({"responses": torch.from_numpy(array)}, tmp_path / "r.safetensors")
    (tmp_path / "r.csv").write_text("u0,u1,u2\n" + "\n".join(",".join(f"{v:.9g}" for v in row) for row in array))
    for name in ("r.npy", "r.pt", "r.safetensors", "r.csv"):
        assert torch.allclose(load_responses(tmp_path / name), torch.from_numpy(array)), name


def test_load_responses__refuses_pickles_and_ragged_csv(tmp_path: Path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(ResponseFileError, match="numeric array"):
        load_responses(tmp_path / "objects.npy")
    (tmp_path / "ragged.csv").write_text("1,2,3\n4,5\n")
    with pytest.raises(ResponseFileError, match="different numbers of values"):
        load_responses(tmp_path / "ragged.csv")


def test_stimulus_paths__a_list_file_is_relative_to_itself_and_names_missing_images(recording: Path):
    images = sorted((recording / "stimuli").iterdir())
    (recording / "list.txt").write_text("# stimuli in row order\n" + "\n".join(f"stimuli/{p.name}" for p in images))
    assert stimulus_paths(recording / "list.txt") == images == stimulus_paths(recording / "stimuli")
    (recording / "bad.txt").write_text("stimuli/nope.png\n")
    with pytest.raises(ResponseFileError, match="do not exist"):
        stimulus_paths(recording / "bad.txt")
    assert load_stimuli(images[:2], 8).shape == (2, 3, 8, 8)


def test_response_datamodule__row_and_image_counts_must_agree(recording: Path, tmp_path: Path):
    np.save(tmp_path / "short.npy", np.load(recording / "responses.npy")[:-1])
    with pytest.raises(ResponseFileError, match="239 response rows but .* 240 stimulus images"):
        ResponseDataModule(str(tmp_path / "short.npy"), str(recording / "stimuli"))
    module = ResponseDataModule(str(recording / "responses.npy"), str(recording / "stimuli"), val_fraction=0.25)
    assert module.d_in == 8 and len(module.val_rows) == 60 and len(module.train_rows) == 180


def _run(script: str, args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return run_script(script, f"hydra.run.dir={tmp}", *args, timeout=600)


def test_train__mismatched_counts_are_one_line_and_exit_2(recording: Path, tmp_path: Path):
    np.save(tmp_path / "short.npy", np.load(recording / "responses.npy")[:-1])
    result = _run("train.py", ["data=responses", f"data.path={tmp_path / 'short.npy'}",
                               f"data.images={recording / 'stimuli'}", "logger=none", "callbacks=none"], tmp_path / "run")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "ResponseFileError" in result.stderr + result.stdout and "Traceback" not in result.stderr


def test_train_then_evaluate__scores_units_families_and_features_on_held_out_stimuli(recording: Path, tmp_path: Path):
    run = tmp_path / "run"
    data = ["data=responses", f"data.path={recording / 'responses.npy'}", f"data.images={recording / 'stimuli'}",
            "data.batch_size=64", "data.image_size=16"]
    trained = _run("train.py", [*data, "sae=topk", "sae.k=1", "sae.expansion=2", "trainer.max_steps=30",
                                "logger=csv", "callbacks=none"], run)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert json.loads((run / "sae.json").read_text())["layer"] == "responses"
    evaluated = _run("evaluate.py", [f"run={run}", "logger=none", "eval.interpretability.distances=[pixel,mean_colour]",
                                     f"eval.interpretability.truth={recording / 'truth.npy'}",
                                     "eval.interpretability.families=[kmeans,pca,ica,nmf,random]"], tmp_path / "ev")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads((run / "eval" / "interpretability.json").read_text())
    for distance in ("pixel", "mean_colour"):
        assert set(result["summary"][distance]) == {"features", "neurons", "kmeans", "pca", "ica", "nmf", "random", "truth"}
    assert result["scored_stimuli"] == 48 and result["in_sample"] is False
    assert result["recovery"]["truth"]["fraction_above_0.9"] == 1.0
    for page in ("index.html", "neurons.html", "kmeans.html", "nmf.html"):
        assert (run / "eval" / page).is_file()
    assert any((run / "eval" / "neurons").glob("n*_top.png"))


def test_simulate_responses__the_command_writes_a_recording_train_py_accepts(tmp_path: Path):
    from sae.data.simulate_responses import main

    main([str(tmp_path / "rec"), "--stimuli", "40", "--clusters", "4", "--units", "6", "--size", "8"])
    responses = load_responses(tmp_path / "rec" / "responses.npy")
    assert responses.shape == (40, 6) and (responses >= 0).all()
    assert np.load(tmp_path / "rec" / "truth.npy").shape == (4, 6)
    module = ResponseDataModule(str(tmp_path / "rec" / "responses.npy"), str(tmp_path / "rec" / "stimuli"))
    assert module.d_in == 6
