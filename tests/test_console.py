"""What a user sees: train.py --help, a quiet console by default, a bar in steps, a run that always validates
before it ends, and debug=fast writing no logger files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from sae.model.layers import LAYERS
from tests.helpers import REPO
from tests.helpers import assert_ok, run_train

SMALL = ["layer=conv2d2", "model.pretrained=false", "data.image_size=48", "data.batch_size=512", "data.num_workers=0",
         "data.vectors_per_window=4096", "data.image_batch_size=8", "data.val_images=8", "sae.expansion=2",
         "sae.init_sample=1024"]


def help_text() -> str:
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help__describes_the_project_options_and_every_layer_in_columns():
    text = help_text()
    assert text.startswith("train.py: train a sparse autoencoder") and "sae.l1_coefficient" in text
    assert "eval:" not in text and "== Config ==" not in text, "no evaluate.py group, no config dump"
    assert max(len(line) for line in text.splitlines()) <= 120
    # every layer follows from the listed stem, blocks, branches and the pre-ReLU rule, and nothing else does
    stem = re.search(r"stem\s+(.*)", text).group(1).split()
    blocks = re.search(r"blocks\s+(.*)", text).group(1).split()
    branch_lines = text.split("branches", 1)[1].split("pre-ReLU", 1)[0]
    branches = [b.replace("BLOCK", "") for b in re.findall(r"BLOCK_\w+", branch_lines)]
    convs = [s for s in stem if s.startswith("conv")] + [b + x for b in blocks for x in branches if x != "_pool"]
    listed = set(stem) | set(blocks) | {b + x for b in blocks for x in branches} | {c + "_pre_relu_conv" for c in convs}
    assert listed == set(LAYERS)
    assert f"{len(listed)} in all" in text


def test_train_py__is_quiet_counts_steps_and_validates_before_it_ends(tmp_path: Path):
    # 3 steps, validation every 500: without the final validation a sweep would get no val/loss
    result = run_train([*SMALL, "logger=csv", "trainer.max_steps=3", "trainer.val_check_interval=500"], tmp_path)
    assert_ok(result)
    console = result.stdout + result.stderr
    for noise in ("Tip:", "FLOPs", "Epoch 0", "v_num", "deprecated", "GPU available"):
        assert noise not in console, noise
    assert console.count("RANDOM weights") == 1
    assert re.search(r"train: 100%.*3/3", console) and "vec/s=" in console
    header, *rows = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("val/loss")
    assert any(row.split(",")[column] for row in rows), "validated once at the end"


def test_debug_fast__writes_no_logger_files(tmp_path: Path):
    result = run_train(["model.pretrained=false", "debug=fast"], tmp_path, timeout=240)
    assert_ok(result)
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert not names & {"wandb", "csv", "tensorboard", "wandb-fallback"}, names
    assert "W&B" not in result.stdout + result.stderr
