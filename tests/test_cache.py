"""The activation cache: `python -m sae.cache` writes shards + manifest; `data=vectors data.path=DIR` reads them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sae.cache import CacheError, CacheWriter, main as cache_main
from sae.data import ImageActivationDataModule, SampleImages, VectorDataModule
from sae.data.vectors import MANIFEST_NAME, ShardedVectors, ShardStream, VectorFileError
from sae.model import InceptionExtractor
from tests.helpers import REPO

SMALL = ["layer=conv2d0", "model.pretrained=false", "data.image_size=32", "data.batch_size=256",
         "data.num_workers=0", "data.vectors_per_window=1024", "data.image_batch_size=4"]


def rows_as_set(x: torch.Tensor) -> set[bytes]:
    return {row.tobytes() for row in x.numpy().astype(np.float16)}


def test_cache__round_trip_gives_the_stream_vectors(tmp_path):
    """The cache holds exactly the training stream's vectors (in float16), and streams all of them back."""
    cache_main([*SMALL, f"out={tmp_path / 'cache'}", "vectors=3000", "shard_vectors=1024"])
    manifest = json.loads((tmp_path / "cache" / MANIFEST_NAME).read_text())
    assert manifest["complete"] and manifest["vectors"] == 3000 and manifest["dtype"] == "float16"
    assert [s["rows"] for s in manifest["shards"]] == [1024, 1024, 952]

    extractor = InceptionExtractor("conv2d0", pretrained=False, channels_last=True)
    data = ImageActivationDataModule(extractor, source=SampleImages(), batch_size=256, image_size=32,
                                     crop_scale=(0.05, 1.0), vectors_per_window=1024, image_batch_size=4,
                                     num_workers=0, val_images=32, holdout=False)
    stream = iter(data.train_dataloader())
    expected = torch.cat([next(stream) for _ in range(12)])[:3000]
    cache = ShardedVectors(tmp_path / "cache")
    assert cache.shape == (3000, 64)
    assert torch.equal(cache.rows(0, 3000), expected.half().float()), "same vectors, same order"

    epoch = torch.cat(list(_take(ShardStream(cache, 0, torch.device("cpu"), 100, seed=1, block_rows=256,
                                             shuffle_vectors=512), 30)))
    assert rows_as_set(epoch) == rows_as_set(cache.rows(0, 3000)), "one epoch: every vector once, as a set"
    assert not torch.equal(epoch, cache.rows(0, 3000)), "shuffled"


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_cache__interrupted_write_resumes_to_the_same_cache(tmp_path):
    cache_main([*SMALL, f"out={tmp_path / 'whole'}", "vectors=2048", "shard_vectors=512"])
    cache_main([*SMALL, f"out={tmp_path / 'resumed'}", "vectors=2048", "shard_vectors=512"])
    manifest_path = tmp_path / "resumed" / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    # Simulate a run killed after two shards: the manifest lists only what was complete.
    manifest["shards"], manifest["complete"] = manifest["shards"][:2], False
    manifest_path.write_text(json.dumps(manifest))
    (tmp_path / "resumed" / "shard_00003.npy").unlink()
    cache_main([*SMALL, f"out={tmp_path / 'resumed'}", "vectors=2048", "shard_vectors=512"])
    assert torch.equal(ShardedVectors(tmp_path / "whole").rows(0, 2048), ShardedVectors(tmp_path / "resumed").rows(0, 2048))


def test_cache__refuses_to_mix_configurations(tmp_path):
    cache_main([*SMALL, f"out={tmp_path / 'c'}", "vectors=512", "shard_vectors=256"])
    with pytest.raises(CacheError, match="another identity"):
        cache_main([*SMALL, "seed=1", f"out={tmp_path / 'c'}", "vectors=512", "shard_vectors=256"])
    with pytest.raises(CacheError, match="multiple of data.batch_size"):
        cache_main([*SMALL, f"out={tmp_path / 'd'}", "vectors=512", "shard_vectors=300"])
    with pytest.raises(CacheError, match="out=DIR"):
        cache_main([*SMALL, "vectors=512"])


def test_cache__float16_overflow_is_a_clear_error(tmp_path):
    writer = CacheWriter(tmp_path, d_in=4, shard_vectors=8, target_vectors=8)
    with pytest.raises(CacheError, match="dtype=float32"):
        writer.add(torch.full((8, 4), 1e6))


def test_vector_datamodule__streams_a_cache_directory(tmp_path):
    writer = CacheWriter(tmp_path / "c", d_in=8, shard_vectors=300, target_vectors=1000)
    data = torch.randn(1000, 8)
    writer.add(data)
    writer.finish()
    dm = VectorDataModule(str(tmp_path / "c"), batch_size=64, val_fraction=0.1, expected_width=8)
    assert dm.d_in == 8 and isinstance(dm.cache.shards[0], np.memmap), "memory-mapped, not loaded"
    val = torch.cat(list(dm.val_dataloader()))
    assert torch.equal(val, data[:100].half().float())
    train = torch.cat(_take(dm.train_dataloader(), 900 // 64))
    assert rows_as_set(train) <= rows_as_set(data[100:])
    assert dm.sample_vectors(50).shape == (50, 8)
    with pytest.raises(VectorFileError, match="480 channels"):
        VectorDataModule(str(tmp_path / "c"), expected_width=480)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VectorFileError, match="manifest.json"):
        VectorDataModule(str(tmp_path / "empty"))


def test_cache__cli_writes_a_cache_that_data_vectors_reads(tmp_path):
    """`python -m sae.cache ...` as a user runs it, then the `data=vectors data.path=DIR` config on its output."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    env = {**os.environ, "WANDB_MODE": "offline"}
    run = subprocess.run([sys.executable, "-m", "sae.cache", *SMALL, f"out={tmp_path / 'c'}", "vectors=2048"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("config", overrides=["layer=conv2d0", "data=vectors", f"data.path={tmp_path / 'c'}",
                                                "data.batch_size=256"])
    data = instantiate(cfg.data)
    assert data.d_in == 64 and len(data.cache) == 2048
    assert next(iter(data.train_dataloader())).shape == (256, 64)

    bad = subprocess.run([sys.executable, "-m", "sae.cache", *SMALL, "vectors=10"], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env=env)
    output = bad.stdout + bad.stderr
    assert bad.returncode == 2 and "out=DIR" in output and "Traceback" not in output
