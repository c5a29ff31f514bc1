"""What several test modules share: the repository, small image folders, the entry points run as a user runs
them, a finished run as train.py leaves it, and hand-drawn units with a known curve answer.

A plain module (not a test module, not conftest): tests import these names; fixtures live in conftest.py.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

REPO = Path(__file__).resolve().parents[1]


# -- files ----------------------------------------------------------------------------------------------
def write_images(root: Path, n: int, size: tuple[int, int] = (96, 80), seed: int = 0) -> list[Path]:
    """`n` small random JPEGs/PNGs in two class folders (ImageFolder layout)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        path = folder / f"img{i:03d}.{'jpg' if i % 3 else 'png'}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


# -- the entry points, as processes ----------------------------------------------------------------------
def script_env(**extra: str) -> dict:
    """The environment of a test's train.py / evaluate.py process: offline W&B, unbuffered output."""
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **extra}


def run_script(script: str, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` in the repository; flags (-m, --help) go before the overrides, as argparse wants."""
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    return subprocess.run([sys.executable, script, *flags, *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env or script_env())


def run_train(args: list[str], tmp_path: Path, timeout: float = 300, env: dict | None = None):
    """train.py with its run and sweep directories under tmp_path."""
    dirs = [f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/multi"]
    return run_script("train.py", *dirs, *args, timeout=timeout, env=script_env(**(env or {})))


def run_evaluate(args: list[str], cwd_tmp: Path, timeout: float = 240):
    """evaluate.py with Hydra's own directories under cwd_tmp."""
    dirs = [f"hydra.run.dir={cwd_tmp}/hydra", f"hydra.sweep.dir={cwd_tmp}/hydra-multi"]
    return run_script("evaluate.py", *dirs, *args, timeout=timeout)


def train_cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *overrides]


def single_thread_env() -> dict:
    """For runs compared bit for bit: one thread, so no reduction order depends on scheduling."""
    return script_env(OMP_NUM_THREADS="1")


def run(run_dir: Path, *overrides: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """train.py in run_dir on one thread (the resume tests' runs)."""
    return subprocess.run(train_cmd(run_dir, *overrides), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=single_thread_env())


def text(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, text(result)[-6000:]


# -- train.py in this process ----------------------------------------------------------------------------
def train_with(run_dir: Path, *overrides: str):
    """train.py's `train(cfg)` in this process (Hydra's compose: no process start-up per case)."""
    from hydra import compose, initialize_config_dir

    import train as train_script

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.output_dir={run_dir}", "model.pretrained=false", "logger=csv",
                                           "debug=fast", *overrides])
    return train_script.train(cfg)


def assert_refused(run_dir: Path, error: type, message: str, *overrides: str) -> None:
    from sae.errors import user_error

    with pytest.raises(Exception) as raised:
        train_with(run_dir, *overrides)
    bad_input = user_error(raised.value)
    assert isinstance(bad_input, error), repr(raised.value)
    assert message in str(bad_input), str(bad_input)
    assert not (run_dir / "checkpoints").exists(), "refused before any training"


def vector_run(path: Path) -> list[str]:
    return ["data=vectors", f"data.path={path}", "data.check_width=false", "data.batch_size=64", "sae.init_sample=256"]


# -- a finished run --------------------------------------------------------------------------------------
EVAL_LAYER, EVAL_CHANNELS = "mixed3a", 256


def make_run(root: Path, images: Path, seed: int = 0) -> Path:
    """A finished training run as train.py leaves it: sae.safetensors + sae.json + config_resolved.yaml."""
    from sae.nn import build_sae, save_sae

    torch.manual_seed(seed)
    sae = build_sae("relu", EVAL_CHANNELS, d_sae=2 * EVAL_CHANNELS)
    save_sae(sae, root, scale=1.0, metadata={"layer": EVAL_LAYER, "model_weights": "random", "input_scale": 1.0,
                                             "global_step": 10})
    model = {"_target_": "sae.model.InceptionExtractor", "layer": EVAL_LAYER, "pretrained": False, "weights": None,
             "channels_last": False}
    data = {"_target_": "sae.data.ImageActivationDataModule", "extractor": model, "root": str(images),
            "batch_size": 1024, "image_size": 224, "val_images": 4, "holdout": True, "num_workers": 0,
            "image_batch_size": 4, "seed": 0}
    config = {"layer": {"name": EVAL_LAYER, "channels": EVAL_CHANNELS}, "model": model, "data": data, "seed": 0}
    (root / "config_resolved.yaml").write_text(yaml.safe_dump(config))
    return root


# -- hand-drawn units with a known curve answer ----------------------------------------------------------
K = 41  # px: kernel side of the hand-built units, and the stimuli's side


class DrawnUnits(nn.Module):
    """Channels = ReLU(zero-mean kernel * grey image): each channel responds to what its kernel depicts."""

    def __init__(self, kernels: list[torch.Tensor]) -> None:
        super().__init__()
        weight = torch.stack([k - k.mean() for k in kernels]).unsqueeze(1)
        self.conv = nn.Conv2d(1, len(kernels), K, bias=False)
        self.conv.weight.data.copy_(weight / weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(images.float().mean(1, keepdim=True) / 255.0))


def drawn_field():
    """The receptive field of DrawnUnits: a valid K x K convolution."""
    from sae.model import ReceptiveField

    return ReceptiveField(size=K, stride=1, offset=(K - 1) / 2)


def kernel_coords() -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.arange(K, dtype=torch.float32) - (K - 1) / 2
    return torch.meshgrid(c, c, indexing="ij")  # y, x


def edge_kernel(theta_deg: float) -> torch.Tensor:
    """A dark-to-light step edge across the disc, its normal pointing towards theta."""
    y, x = kernel_coords()
    t = math.radians(theta_deg)
    return torch.where(x * math.cos(t) - y * math.sin(t) > 0, 1.0, -1.0) * (x**2 + y**2 < (K / 2.5) ** 2)


def line_kernel(theta_deg: float) -> torch.Tensor:
    """A 3 px bar through the centre along theta + 90 (the line stimulus at orientation theta)."""
    y, x = kernel_coords()
    t = math.radians(theta_deg)
    along, across = -x * math.sin(t) - y * math.cos(t), x * math.cos(t) - y * math.sin(t)
    return ((across.abs() <= 1.5) & (along.abs() <= K / 3)).float()
