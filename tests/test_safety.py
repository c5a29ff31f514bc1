"""No file a user opens runs code: crafted checkpoints, weights, vectors and run directories whose loading would
create a marker file are refused in one line, and the marker never appears, also with
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 in the environment (which turns every torch.load that does not pass
weights_only itself into an unsafe one)."""

from __future__ import annotations

import builtins
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sae.checks import BadConfigError, build_from_config
from sae.data import VectorFileError, load_vectors
from sae.model import WeightsError, read_state_dict
from sae.nn import build_sae, save_sae
from sae.safeload import UNSAFE_HINTS
from sae.train.guards import CheckpointError, load_checkpoint_file
from tests.helpers import run_script, script_env

FORCE_UNSAFE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class CreatesMarker:
    """Unpickling this calls open(path, "w"): a file appears if, and only if, a load ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"sae.W_dec": torch.zeros(2, 2)}, "global_step": 1, "x": CreatesMarker(marker)}, path)
    return path


def assert_safe_message(text: str) -> None:
    assert not any(hint in text for hint in UNSAFE_HINTS), f"advises unsafe loading: {text}"


@pytest.fixture(params=[False, True], ids=["default-env", FORCE_UNSAFE])
def environment(request, monkeypatch):
    if request.param:
        monkeypatch.setenv(FORCE_UNSAFE, "1")
    else:
        monkeypatch.delenv(FORCE_UNSAFE, raising=False)
    return request.param


def test_crafted_files__really_run_code_when_loaded_unsafely(tmp_path):
    # The known answer first: the crafted file does create the marker when a load is not weights-only, so
    # the tests below, where it never appears, show the loads are safe (not that the file is harmless).
    marker = tmp_path / "marker"
    torch.load(crafted_checkpoint(tmp_path / "x.ckpt", marker), weights_only=False)
    assert marker.exists()


def test_crafted_checkpoint__is_refused_without_running_code(tmp_path, environment):
    marker = tmp_path / "marker"
    with pytest.raises(CheckpointError, match="Python objects") as raised:
        load_checkpoint_file(crafted_checkpoint(tmp_path / "last.ckpt", marker), weights_only=False)
    assert not marker.exists()
    assert_safe_message(str(raised.value))


def test_crafted_weights_and_vectors__are_refused_without_running_code(tmp_path, environment):
    marker = tmp_path / "marker"
    torch.save({"conv2d0_pre_relu_conv.weight": CreatesMarker(marker)}, tmp_path / "weights.pth")
    torch.save(CreatesMarker(marker), tmp_path / "vectors.pt")
    np.save(tmp_path / "vectors.npy", np.array([CreatesMarker(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(WeightsError) as raised:
        read_state_dict(tmp_path / "weights.pth")
    assert_safe_message(str(raised.value))
    for name in ("vectors.pt", "vectors.npy"):
        with pytest.raises(VectorFileError, match="Python objects") as raised:
            load_vectors(tmp_path / name)
        assert_safe_message(str(raised.value))
    assert not marker.exists()


@pytest.mark.parametrize("target", ["builtins.open", "os.system", "torch.load", "subprocess.run",
                                    "hydra.utils.instantiate"])
def test_saved_config__builds_only_the_projects_own_classes(tmp_path, target):
    marker = tmp_path / "marker"
    node = {"_target_": "sae.data.ImageActivationDataModule",
            "extractor": {"_target_": target, "args": [f"touch {marker}"]}}
    with pytest.raises(BadConfigError, match="not one of this project's data or model classes"):
        build_from_config(node, "data")
    with pytest.raises(BadConfigError, match="_args_"):
        build_from_config({"_target_": "sae.data.SampleImages", "_args_": [["astronaut"]]}, "data")
    assert not marker.exists()


def _run(script: str, *args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return run_script(script, *args, timeout=timeout, env=script_env(OMP_NUM_THREADS="1", **(env or {})))


def _errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if "ERROR" in line or "Traceback" in line]


@pytest.mark.parametrize("force_unsafe", [False, True], ids=["default-env", FORCE_UNSAFE])
def test_train_resume__from_a_crafted_checkpoint_exits_2_and_runs_nothing(tmp_path, force_unsafe):
    marker, run_dir = tmp_path / "marker", tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    crafted_checkpoint(run_dir / "checkpoints" / "last.ckpt", marker)
    np.save(tmp_path / "acts.npy", np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32))
    result = _run("train.py", f"hydra.run.dir={run_dir}", "ckpt_path=last", "data=vectors",
                  f"data.path={tmp_path / 'acts.npy'}", "data.check_width=false", "data.batch_size=32",
                  "sae.init_sample=64", "logger=none", env={FORCE_UNSAFE: "1"} if force_unsafe else {})
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    errors = _errors(result)
    assert len(errors) == 1 and "CheckpointError" in errors[0] and "Python objects" in errors[0], errors
    assert_safe_message(result.stdout + result.stderr)
    assert not marker.exists()


def crafted_run(root: Path, marker: Path, evil_file: Path) -> Path:
    """A run directory with a genuine export whose config_resolved.yaml names code to run."""
    sae = build_sae("relu", 256, d_sae=512)
    save_sae(sae, root, metadata={"layer": "mixed3a", "model_weights": "random"})
    config = {"layer": {"name": "mixed3a"}, "seed": 0,
              "model": {"_target_": "torch.load", "f": str(evil_file), "weights_only": False},
              "data": {"_target_": "builtins.open", "file": str(marker), "mode": "w", "extractor": "x"}}
    (root / "config_resolved.yaml").write_text(yaml.safe_dump(config))
    return root


def test_evaluate__a_crafted_run_directory_exits_2_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    evil = crafted_checkpoint(tmp_path / "evil.pt", marker)
    run = crafted_run(tmp_path / "run", marker, evil)
    result = _run("evaluate.py", f"run={run}", "eval=fast", "logger=none", f"hydra.run.dir={tmp_path}/hydra",
                  env={FORCE_UNSAFE: "1"})
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    errors = _errors(result)
    assert len(errors) == 1 and "not one of this project's data or model classes" in errors[0], errors
    assert not marker.exists()
