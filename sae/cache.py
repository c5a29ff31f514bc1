"""Write a layer's activations to disk once, to train many SAEs on them at disk speed.

    python -m sae.cache layer=mixed3b data=imagefolder data.root=DIR out=CACHE vectors=20000000
    python train.py layer=mixed3b data=vectors data.path=CACHE

A Hydra entry point (conf/cache.yaml): `out=`, `vectors=` (or `images=`), `shard_vectors=` and `dtype=` belong
to the cache; every other argument is an override of train.py's config, composed the same way. The vectors are the training
stream itself (random crops, every position or `data.positions_per_image`, shuffled across each window of
many images), written in order as `.npy` shards (float16 by default: half the disk and read time; the
float16 rounding, 2^-11 relative, is far below an SAE's reconstruction error) with `manifest.json`.

Each shard and the manifest are written atomically. An interrupted run resumes where it stopped when run
again with the same arguments: the stream is a pure function of the batch index, so the resumed cache is
identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from sae.data.vectors import CACHE_FORMAT, MANIFEST_NAME
from sae.errors import UserError
from sae.nn.io import atomic_write_bytes
from sae.run.configs import register_configs
from sae.run.task import run_task

log = logging.getLogger("sae.cache")

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
DTYPES = {"float16": np.float16, "float32": np.float32}


class CacheError(UserError, ValueError):
    """A cache request that cannot be met: bad arguments, or an existing cache made differently."""


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """np.save to a temp file next to `path`, fsync, then rename: readers never see a torn shard."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CacheWriter:
    """Appends (n, d) vectors to `directory` as shards of `shard_vectors` rows and keeps the manifest current.

    `identity` (the configuration that produced the vectors) is stored in the manifest; reopening a directory
    whose manifest has another identity, width, dtype or shard size is refused rather than mixed.
    """

    def __init__(self, directory: str | Path, d_in: int, shard_vectors: int, target_vectors: int,
                 dtype: str = "float16", identity: dict[str, Any] | None = None):
        if dtype not in DTYPES:
            raise CacheError(f"dtype={dtype!r}: choose float16 (default, half the disk) or float32.")
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype, self.shard_vectors = dtype, int(shard_vectors)
        fresh = {"format": CACHE_FORMAT, "d_in": int(d_in), "dtype": dtype, "shard_vectors": self.shard_vectors,
                 "target_vectors": int(target_vectors), "identity": identity or {}, "shards": [], "complete": False}
        path = self.directory / MANIFEST_NAME
        self.manifest = json.loads(path.read_text()) if path.is_file() else fresh
        for key in ("format", "d_in", "dtype", "shard_vectors", "target_vectors", "identity"):
            if self.manifest.get(key) != fresh[key]:
                raise CacheError(
                    f"{self.directory} already holds a cache made with another {key} "
                    f"({self.manifest.get(key)!r} there, {fresh[key]!r} now). Choose another out= or delete it."
                )
        self._buffer: list[np.ndarray] = []
        self._buffered = 0

    @property
    def written(self) -> int:
        """Vectors already on disk (complete shards only)."""
        return sum(s["rows"] for s in self.manifest["shards"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def add(self, vectors: Tensor) -> None:
        """Buffer (n, d) vectors; write every full shard."""
        with np.errstate(over="ignore"):  # reported below, with the fix
            array = vectors.detach().to("cpu", torch.float32).numpy().astype(DTYPES[self.dtype])
        if not np.isfinite(array).all():
            hint = " float16 overflowed: rerun with dtype=float32." if np.isfinite(vectors.cpu().numpy()).all() else ""
            raise CacheError(f"non-finite activations at vector {self.written + self._buffered}.{hint}")
        self._buffer.append(array)
        self._buffered += len(array)
        while self._buffered >= self.shard_vectors:
            self._write_shard(self.shard_vectors)

    def finish(self) -> None:
        """Write what is left as a last (shorter) shard and mark the cache complete."""
        if self._buffered:
            self._write_shard(self._buffered)
        self.manifest["complete"] = True
        self._write_manifest()

    def _write_shard(self, rows: int) -> None:
        data = np.concatenate(self._buffer)
        shard, rest = data[:rows], data[rows:]
        name = f"shard_{len(self.manifest['shards']):05d}.npy"
        save_npy_atomic(self.directory / name, shard)
        self.manifest["shards"].append({"file": name, "rows": int(rows)})
        self._write_manifest()
        self._buffer, self._buffered = ([rest] if len(rest) else []), len(rest)

    def _write_manifest(self) -> None:
        self.manifest["vectors"] = self.written
        atomic_write_bytes(self.directory / MANIFEST_NAME, json.dumps(self.manifest, indent=1).encode())


def write_cache(datamodule, out: str | Path, target_vectors: int, shard_vectors: int = 262144,
                dtype: str = "float16", identity: dict | None = None) -> CacheWriter:
    """Stream `datamodule`'s training vectors into a cache at `out` until it holds `target_vectors` (resumable)."""
    batch = datamodule.batch_size
    if shard_vectors % batch:
        raise CacheError(f"shard_vectors={shard_vectors} must be a multiple of data.batch_size={batch} (exact resume).")
    writer = CacheWriter(out, datamodule.d_in, shard_vectors, target_vectors, dtype, identity)
    if writer.complete:
        log.info("%s is already complete (%d vectors)", out, writer.written)
        return writer
    datamodule.load_state_dict({"batches": writer.written // batch, "seed": datamodule.seed})
    done = first = writer.written
    log.info("writing %d vectors of width %d to %s (resuming at %d)", target_vectors, datamodule.d_in, out, done)
    from sae.console import Progress

    progress = Progress("cache", target_vectors, logger=log, unit=" vectors")
    for vectors in datamodule.train_dataloader():
        vectors = vectors[: target_vectors - done]
        writer.add(vectors)
        done += len(vectors)
        if done >= target_vectors:
            break
        progress.update(done, first)  # every 10 s: vectors written, rate, ETA
    writer.finish()
    log.info("wrote %d vectors in %d shards to %s", writer.written, len(writer.manifest["shards"]), out)
    return writer


def write(cfg: DictConfig) -> CacheWriter:
    """Write the cache that `cfg` (conf/cache.yaml, composed) asks for."""
    if not cfg.get("out"):
        raise CacheError("give out=DIR, the folder to write the cache to.")
    if (cfg.get("vectors") is None) == (cfg.get("images") is None):
        raise CacheError("give exactly one of vectors=N (vectors to write) or images=N (images to extract).")
    if "extractor" not in cfg.data:
        raise CacheError("the cache extracts activations from images: use data=imagefolder data.root=DIR or data=sample.")
    datamodule = instantiate(cfg.data)
    datamodule.device = "cuda" if torch.cuda.is_available() else "cpu"
    target = int(cfg.vectors) if cfg.vectors is not None else int(cfg.images) * datamodule.vectors_per_image
    identity = {"layer": cfg.layer.name, "seed": cfg.seed,
                "data": OmegaConf.to_container(cfg.data, resolve=True), "batch_size": datamodule.batch_size}
    for speed_only in ("extractor", "num_workers"):  # do not change the vectors: a resume may differ
        identity["data"].pop(speed_only, None)
    identity["model"] = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
                         if k in ("pretrained", "weights", "autocast")}
    batch = datamodule.batch_size
    shard_vectors = int(cfg.shard_vectors) if cfg.shard_vectors is not None else 262144 // batch * batch
    return write_cache(datamodule, cfg.out, target, shard_vectors, str(cfg.dtype), identity)


def main(argv: list[str] | None = None) -> int:
    """In process (tests, notebooks): compose conf/cache.yaml with the overrides `argv` and write the cache."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("cache", overrides=list(argv or []))
    write(cfg)
    return 0


@hydra.main(version_base="1.3", config_path="../conf", config_name="cache")
def cli(cfg: DictConfig) -> None:
    run_task(lambda: write(cfg))


if __name__ == "__main__":
    from sae.run.preflight import preflight

    register_configs()  # the generated groups (layer=...) before Hydra composes
    preflight("cache")  # an unknown option or group choice: one line and exit 2, before Hydra starts
    cli()
