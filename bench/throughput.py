"""Throughput of the activation pipeline and the SAE step against a naive baseline, side by side in one run.

    python bench/throughput.py --quick --out bench/throughput.json     # about 2-3 minutes on 2 CPU threads

Naive baselines (what a first script would do): lucent's full forward with a forward hook on the layer, NCHW,
float32, eager, under no_grad (extraction); a dense eager SAE step whose inputs require grad (SAE step); and
JPEG -> PIL decode -> full forward with a hook -> dense SAE step, in one loop (end to end). The fast paths
are the project's own: `InceptionExtractor` (truncated, channels_last, inference mode), `SAEModule`'s step,
and training through Lightning with `ImageActivationDataModule` (DataLoader workers, shuffle windows).

Every fast/naive pair runs interleaved on the same inputs and is reported as a ratio; the machine may be busy
with other work, so ratios are what carry over, absolute rates less so.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

LAYERS = ("conv2d0", "conv2d2", "mixed3a", "mixed3b", "mixed4a")
ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")
SPARSE_FAMILY = ("topk", "batchtopk")
D_IN, EXPANSION, BATCH, K = 480, 8, 4096, 32


# -- timing ----------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict, device: torch.device, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn (so drift hits all of them alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def sgemm_peak(device: torch.device, n: int, repeats: int) -> float:
    """This machine's dense float32 matmul rate (FLOP/s): the best of `repeats` n x n products."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = min(interleaved({"mm": lambda: torch.mm(a, b)}, device, 1, 1)["mm"] for _ in range(repeats))
    return 2 * n**3 / best


# -- images ----------------------------------------------------------------------------------------------
def image_files(tmp: Path, n: int) -> tuple[list[Path], Path, str]:
    """JPEGs to read: the shared ImageNet sample when present, else `n` synthetic 320-px JPEGs."""
    shared = REPO.parent / "shared" / "data" / "imagenet-sample-1k"
    if shared.is_dir():
        files = sorted(p for p in shared.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        return files, shared, f"{shared} ({len(files)} files)"
    rng = np.random.default_rng(0)
    root = tmp / "images"
    for i in range(n):
        (root / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        smooth = rng.normal(128, 60, size=(40, 50, 3)).clip(0, 255).astype(np.uint8)  # JPEG-like content
        Image.fromarray(smooth).resize((400, 320), Image.BICUBIC).save(root / f"c{i % 4}" / f"{i:04d}.jpg", quality=90)
    return sorted(root.rglob("*.jpg")), root, f"{n} synthetic 400x320 JPEGs"


def decode_crop(path: Path, size: int = 224) -> torch.Tensor:
    """The naive per-image path: PIL decode, centre square, resize: (3, size, size) uint8."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        w, h = image.size
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        out = image.resize((size, size), Image.BILINEAR, box=box)
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)


class HookedNet:
    """Naive extraction: lucent's full forward, NCHW float32, with a forward hook on `net.<layer>`."""

    def __init__(self, net, layer: str):
        self.net, self.acts = net, None
        getattr(net, layer).register_forward_hook(lambda module, inputs, output: setattr(self, "acts", output))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from sae.model import preprocess

        with torch.no_grad():
            self.net(preprocess(images.to(next(self.net.parameters()).device)))
        return self.acts


# -- extraction ------------------------------------------------------------------------------------------
def bench_extraction(images: torch.Tensor, device, repeats: int, compile_layers: tuple[str, ...]) -> list[dict]:
    from sae.model import InceptionExtractor, load_inceptionv1

    naive_net, fast_net = load_inceptionv1(pretrained=False).to(device), load_inceptionv1(pretrained=False).to(device)
    images, rows = images.to(device), []
    for layer in LAYERS:
        naive = HookedNet(naive_net, layer)
        fast = InceptionExtractor(layer, net=fast_net, channels_last=True, compile=False)
        with torch.inference_mode():
            reference, ours = naive(images), fast(images)
            error = float((ours - reference).abs().max() / reference.abs().max())
            fns = {"naive": lambda: naive(images), "fast": lambda: fast(images)}
            if layer in compile_layers:
                compiled = InceptionExtractor(layer, net=fast_net, channels_last=True, compile=True)
                compiled(images)  # compiles
                fns["compiled"] = lambda: compiled(images)
            seconds = interleaved(fns, device, repeats)
        per_image = reference[0].numel() // reference.shape[1]
        row = {"layer": layer, "batch": len(images), "vectors_per_image": per_image, "max_rel_error": error}
        for name, t in seconds.items():
            row[f"{name}_images_per_s"] = len(images) / t
            row[f"{name}_vectors_per_s"] = len(images) * per_image / t
        row["speedup"] = seconds["naive"] / seconds["fast"]
        if "compiled" in seconds:
            row["compiled_speedup"] = seconds["naive"] / seconds["compiled"]
            row["compile_seconds"] = compiled.compile_seconds
        rows.append(row)
    if device.type == "cuda":
        rows.append(autocast_error(fast_net, images))
    return rows


def autocast_error(net, images: torch.Tensor) -> dict:
    """Relative error of bf16/fp16 autocast activations vs float32 at mixed3b (GPU only)."""
    from sae.model import InceptionExtractor

    out = {"layer": "mixed3b autocast"}
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        reference = InceptionExtractor("mixed3b", net=net, compile=False)(images)
        for dtype in ("bf16", "fp16"):
            approx = InceptionExtractor("mixed3b", net=net, compile=False, autocast=dtype)(images)
            out[f"{dtype}_rel_error"] = float((approx - reference).norm() / reference.norm())
    return out


# -- the SAE step ----------------------------------------------------------------------------------------
def arch_hparams(arch: str, sparse: bool | None = None) -> dict:
    return {"k": K, "sparse_decode": sparse} if arch in SPARSE_FAMILY else {}


def naive_step(arch: str, x: torch.Tensor):
    """A dense eager step: inputs that require grad, dense decode, Adam."""
    from sae.nn import build_sae

    sae = build_sae(arch, D_IN, expansion=EXPANSION, **arch_hparams(arch, sparse=False)).to(x.device)
    optimizer = torch.optim.Adam(sae.parameters())
    dead = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)
    x = x.clone().requires_grad_(True)

    def step():
        loss = sae.loss(x, sae(x), dead_mask=dead).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step.x = x  # the input leaf, for a loop that feeds new batches into it
    return step


def module_step(arch: str, x: torch.Tensor, sparse: bool | None = None, k: int = K, **extra):
    """`SAEModule`'s own step (training_step, decoder-gradient projection, Adam, decoder renorm), no Lightning,
    set up from x as training is (input scale, b_dec, thresholds). ``step()`` trains on x, ``step(batch)`` on
    another batch of the same stream."""
    from sae.train import SAEModule

    hp = {**arch_hparams(arch, sparse), **({"k": k} if arch in SPARSE_FAMILY else {}), **extra}
    module = SAEModule(D_IN, architecture=arch, expansion=EXPANSION, resample=None, **hp).to(x.device)
    module.member.dead_window.fill_(10_000_000)
    # As training starts: the input scale, b_dec at the geometric median (which TopK's screen centres on) and
    # JumpReLU's thresholds, from the batch itself.
    module.member.prepare(x, default_dead_window=10_000_000)
    optimizer = torch.optim.Adam(module.sae.parameters(), fused=True)  # as SAEModule.configure_optimizers

    def step(batch: torch.Tensor | None = None):
        batch = x if batch is None else batch
        out = module.training_step(batch, 0)
        out["loss"].backward()
        module.on_before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.on_train_batch_end(out, batch, 0)
    step.module, step.optimizer = module, optimizer
    return step


def step_flops(arch: str, sparse: bool, k: int = K, batch: int = BATCH, aux: bool = True) -> float:
    """Matmul FLOPs of one step. Dense: 3 forward/backward products per matrix less the input gradient = 5
    of 2*B*d_in*d_sae. Sparse decode: encoder forward + W_enc gradient dense, decoder 3 products of k rows,
    plus AuxK's gather of k_aux = d_in/2 rows (forward and W_dec gradient)."""
    dense = 2 * batch * D_IN * D_IN * EXPANSION
    if arch not in SPARSE_FAMILY or not sparse:
        return 5 * dense
    return 2 * dense + 3 * 2 * batch * k * D_IN + (2 * 2 * batch * (D_IN // 2) * D_IN if aux else 0)


def bare_step(arch: str, x: torch.Tensor, **hp):
    """The SAE alone, as SAEModule drives it but without its logging statistics: forward, loss, backward,
    decoder-gradient projection, Adam, decoder renorm. Shows what the module's per-step metrics cost."""
    from sae.nn import build_sae

    sae = build_sae(arch, D_IN, expansion=EXPANSION, **{**arch_hparams(arch), **hp}).to(x.device)
    optimizer = torch.optim.Adam(sae.parameters())
    dead = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)

    def step():
        sae.loss(x, sae(x), dead_mask=dead).loss.backward()
        sae.project_decoder_grad_()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.normalize_decoder_()
    return step


def matmul_probe(device: torch.device, n: int = 2048):
    """A big sgemm, timed alongside each step so the peak and the step see the same machine load."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    probe = lambda: torch.mm(a, b)  # noqa: E731
    probe.flops = 2 * n**3
    return probe


def bench_sae_step(device, repeats: int, ks: tuple[int, ...]) -> tuple[list[dict], list[dict]]:
    from sae.nn.topk import SPARSE_DECODE_MAX_DENSITY

    torch.manual_seed(0)
    x, probe = torch.randn(BATCH, D_IN, device=device), matmul_probe(device)
    rows = []
    variants = [(arch, {}) for arch in ARCHITECTURES] + [("topk", {"aux_k_coefficient": 0.0})]
    for arch, hp in variants:
        seconds = interleaved({"naive": naive_step(arch, x), "fast": module_step(arch, x, **hp),
                               "bare": bare_step(arch, x, **hp), "sgemm": probe}, device, repeats)
        sparse = arch in SPARSE_FAMILY and K / (D_IN * EXPANSION) <= SPARSE_DECODE_MAX_DENSITY
        flops, peak = step_flops(arch, sparse, aux=hp.get("aux_k_coefficient", 1) > 0), probe.flops / seconds["sgemm"]
        rows.append({"architecture": arch + (" (no AuxK)" if hp else ""), "sparse_decode": sparse,
                     "naive_vectors_per_s": BATCH / seconds["naive"], "fast_vectors_per_s": BATCH / seconds["fast"],
                     "bare_vectors_per_s": BATCH / seconds["bare"], "speedup": seconds["naive"] / seconds["fast"],
                     "gflop_per_step": flops / 1e9, "sgemm_gflops": peak / 1e9,
                     "fraction_of_peak": flops / seconds["fast"] / peak, "bare_fraction_of_peak": flops / seconds["bare"] / peak})
    relu = next(r for r in rows if r["architecture"] == "relu")
    for row in rows:
        row["vs_fast_relu"] = row["fast_vectors_per_s"] / relu["fast_vectors_per_s"]
    decode = []
    for k in ks:
        seconds = interleaved({"dense": module_step("topk", x, sparse=False, k=k),
                               "sparse": module_step("topk", x, sparse=True, k=k)}, device, repeats)
        decode.append({"k": k, "density": k / (D_IN * EXPANSION), "dense_vectors_per_s": BATCH / seconds["dense"],
                       "sparse_vectors_per_s": BATCH / seconds["sparse"], "sparse_speedup": seconds["dense"] / seconds["sparse"]})
    return rows, decode


# -- end to end ------------------------------------------------------------------------------------------
class StepTimes:
    """Wall time at the start of every training batch (after its data arrived), and GPU busy samples."""

    def __init__(self, device: torch.device):
        import lightning as L

        times, busy = [], []

        class Callback(L.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                sync(device)
                times.append(time.perf_counter())

        self.callback, self.times, self.busy, self.device = Callback(), times, busy, device

    def sample_gpu(self, stop: threading.Event) -> None:
        while not stop.wait(0.1):
            try:
                self.busy.append(torch.cuda.utilization(self.device))
            except Exception:  # noqa: BLE001 - no NVML: leave busy empty
                return


def e2e_fast(root: Path, module_kwargs: dict, device, windows: int, positions: int | None, window_batches: int = 4) -> dict:
    """Training through Lightning on ImageActivationDataModule (workers decode JPEGs) and the module given."""
    import lightning as L

    from sae.data import ImageActivationDataModule
    from sae.model import InceptionExtractor
    from sae.train import SAEModule
    from sae.train.multi import MultiSAEModule

    extractor = InceptionExtractor("mixed3b", pretrained=False, channels_last=True)
    per_image = positions or 28 * 28
    # 7 images x 784 positions: 4 batches of 4096 with 0.5% left over (windows of 2 batches: 14 images).
    image_batch = (7 * window_batches // 4) if positions is None else max(1, BATCH // per_image // 2)
    data = ImageActivationDataModule(extractor, root=str(root), batch_size=BATCH, positions_per_image=positions,
                                     vectors_per_window=window_batches * BATCH, image_batch_size=image_batch,
                                     num_workers=1, val_images=8, seed=0)
    images_per_window = math.ceil(window_batches * BATCH / (per_image * image_batch)) * image_batch
    per_window = images_per_window * per_image // BATCH
    common = dict(d_in=D_IN, expansion=EXPANSION, init_sample=BATCH, b_dec_init="mean", resample=None)
    if "members" in module_kwargs:
        module = MultiSAEModule(**common, **module_kwargs)
    else:
        module = SAEModule(**common, **module_kwargs)
    timer = StepTimes(device)
    steps = (1 + windows) * per_window + 1
    trainer = L.Trainer(accelerator=device.type, devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[timer.callback])
    stop = threading.Event()
    if device.type == "cuda":
        threading.Thread(target=timer.sample_gpu, args=(stop,), daemon=True).start()
    trainer.fit(module, datamodule=data)
    stop.set()
    t = timer.times
    seconds = t[(1 + windows) * per_window] - t[per_window]  # whole windows: their extraction and their steps
    out = {"vectors_per_s": windows * per_window * BATCH / seconds, "steps_timed": windows * per_window,
           "seconds_per_step": seconds / (windows * per_window)}
    if timer.busy:
        out["gpu_busy_fraction"] = statistics.mean(timer.busy) / 100
    return out


def e2e_naive(files: list[Path], arch: str, device, steps: int, positions: int | None) -> dict:
    """One loop: PIL-decode JPEGs, full forward with a hook, all positions in file order, dense naive step."""
    from sae.model import load_inceptionv1

    hooked = HookedNet(load_inceptionv1(pretrained=False).to(device), "mixed3b")
    state = {}
    pending, index, rng = [], 0, torch.Generator().manual_seed(0)

    def next_batch() -> torch.Tensor:
        nonlocal pending, index
        have = sum(len(p) for p in pending)
        if have < BATCH:  # decode just enough images, then one batched forward
            n = math.ceil((BATCH - have) / (positions or 28 * 28))
            images = torch.stack([decode_crop(files[(index + i) % len(files)]) for i in range(n)])
            acts = hooked(images).permute(0, 2, 3, 1).reshape(n, -1, D_IN)
            if positions is not None:
                acts = acts[:, torch.randperm(acts.shape[1], generator=rng)[:positions]]
            pending.append(acts.reshape(-1, D_IN))
            index += n
        batch = torch.cat(pending)
        pending = [batch[BATCH:]]
        return batch[:BATCH]

    def step():
        x = next_batch()
        if "step" not in state:
            state["step"] = naive_step(arch, x)
        with torch.no_grad():
            state["step"].x.copy_(x)
        state["step"]()

    seconds = interleaved({"naive": step}, device, steps, warmup=1)["naive"]
    return {"vectors_per_s": BATCH / seconds, "steps_timed": steps, "seconds_per_step": seconds}


# -- activation cache ------------------------------------------------------------------------------------
def bench_cache(tmp: Path, vectors: int) -> dict:
    """Write `vectors` random float16 rows of width 480 with CacheWriter, then stream one epoch back."""
    from sae.cache import CacheWriter
    from sae.data.vectors import ShardedVectors, ShardStream

    writer = CacheWriter(tmp / "cache", D_IN, shard_vectors=65536, target_vectors=vectors)
    start = time.perf_counter()
    for chunk in torch.randn(vectors, D_IN).split(BATCH):
        writer.add(chunk)
    writer.finish()
    write_s = time.perf_counter() - start
    stream = ShardStream(ShardedVectors(tmp / "cache"), 0, torch.device("cpu"), BATCH, seed=0)
    start, it = time.perf_counter(), iter(stream)
    for _ in range(stream.batches_per_epoch):
        next(it)
    read_s = time.perf_counter() - start
    read = stream.batches_per_epoch * BATCH
    return {"vectors": vectors, "write_vectors_per_s": vectors / write_s, "read_vectors_per_s": read / read_s,
            "read_MB_per_s": read * D_IN * 2 / read_s / 1e6}


# -- report ----------------------------------------------------------------------------------------------
def table(title: str, rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:,.3g}" if isinstance(v, float) and abs(v) < 100 else f"{v:,.0f}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [f"\n## {title}", "  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def run(args) -> dict:
    def save(result: dict) -> None:  # after every section: a run cut short still leaves its numbers
        if args.out:
            from sae.nn.io import atomic_write_bytes

            atomic_write_bytes(args.out, json.dumps(result, indent=1).encode())

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")
    quick = args.quick
    from sae.hostmem import reuse_freed_host_memory

    # As train.py does (reuse_host_memory: true). Process-wide, so the naive baselines get it too.
    reuse_host_memory = reuse_freed_host_memory()
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
              "reuse_host_memory": reuse_host_memory,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
              or platform.machine(), "quick": quick, "batch": BATCH, "d_in": D_IN, "expansion": EXPANSION}
    with tempfile.TemporaryDirectory() as tmp:
        files, root, described = image_files(Path(tmp), 48)
        result["images"] = described
        result["sgemm_gflops"] = sgemm_peak(device, 2048, 3 if quick else 6) / 1e9
        print(f"torch {torch.__version__}, {result['threads']} threads, {device} ({result['device_name']}); "
              f"images: {described}; sgemm peak {result['sgemm_gflops']:.1f} GFLOP/s; "
              f"freed host memory kept for reuse: {reuse_host_memory}", flush=True)
        batch = torch.stack([decode_crop(f) for f in files[: 8 if quick else 32]])
        result["extraction"] = bench_extraction(batch, device, 2 if quick else 5, () if quick else ("mixed3b",))
        save(result)
        print(table("Extraction (images/s, vectors/s; naive = full forward + hook, NCHW)", result["extraction"],
                    ["layer", "naive_images_per_s", "fast_images_per_s", "fast_vectors_per_s", "speedup",
                     "compiled_speedup", "compile_seconds", "max_rel_error"]), flush=True)
        ks = (32, 128) if quick else (16, 32, 64, 128, 256)
        result["sae_step"], result["topk_decode"] = bench_sae_step(device, 1 if quick else 5, ks)
        save(result)
        print(table(f"SAE step (d_in {D_IN}, x{EXPANSION}, batch {BATCH}, k {K}; naive = dense, grads on inputs; "
                    "fast = SAEModule's step; bare = the SAE without the module's metrics; peak = sgemm timed alongside)",
                    result["sae_step"], ["architecture", "sparse_decode", "naive_vectors_per_s", "fast_vectors_per_s",
                                         "bare_vectors_per_s", "speedup", "vs_fast_relu", "gflop_per_step",
                                         "sgemm_gflops", "fraction_of_peak", "bare_fraction_of_peak"]), flush=True)
        print(table("TopK decode: dense matmul vs sparse gather (SAEModule step)", result["topk_decode"],
                    ["k", "density", "dense_vectors_per_s", "sparse_vectors_per_s", "sparse_speedup"]), flush=True)
        windows, window_batches = (1, 2) if quick else (3, 4)
        e2e = []
        for arch in ("relu", "topk"):
            kwargs = {"architecture": arch, **({"k": K} if arch == "topk" else {})}
            fast = e2e_fast(root, kwargs, device, windows, None, window_batches)
            naive = e2e_naive(files, arch, device, 2 if quick else 8, None)
            e2e.append({"run": f"mixed3b {arch}", "naive_vectors_per_s": naive["vectors_per_s"],
                        "fast_vectors_per_s": fast["vectors_per_s"], "speedup": fast["vectors_per_s"] / naive["vectors_per_s"],
                        **{k: v for k, v in fast.items() if k == "gpu_busy_fraction"}})
        result["end_to_end"] = e2e
        print(table("End to end, JPEG -> optimizer step (fast: Lightning + ImageActivationDataModule + SAEModule)",
                    e2e, ["run", "naive_vectors_per_s", "fast_vectors_per_s", "speedup", "gpu_busy_fraction"]), flush=True)
        save(result)
        result["shared_stream"] = bench_sweep(root, device, windows, window_batches)
        save(result)
        print(table("Shared stream: 4 SAEs on one stream vs 4 separate runs (both through Lightning)",
                    result["shared_stream"], ["sweep", "positions_per_image", "single_vectors_per_s", "shared_vectors_per_s",
                                              "speedup_vs_4_runs"]), flush=True)
        result["cache"] = bench_cache(Path(tmp), 262144 if quick else 2097152)
        print(table("Activation cache (float16 shards, shuffled block streaming)", [result["cache"]],
                    ["vectors", "write_vectors_per_s", "read_vectors_per_s", "read_MB_per_s"]), flush=True)
        save(result)
    return result


# Two common 4-member sweeps whose members each cost what the single run costs (so 4 separate runs take 4x
# one run): ReLU over the L1 coefficient, and TopK (k 32) over the learning rate.
SWEEPS = {
    "relu, l1_coefficient 0.1-0.8": ("relu", [{"l1_coefficient": c} for c in (0.1, 0.2, 0.4, 0.8)]),
    "topk k 32, lr 1e-3-3e-2": ("topk", [{"lr": lr} for lr in (1e-3, 3e-3, 1e-2, 3e-2)]),
}


def bench_sweep(root: Path, device, windows: int, window_batches: int) -> list[dict]:
    """Speedup of one 4-member run over 4 single runs, with all positions and with 64 positions per image."""
    rows = []
    for sweep, (architecture, members) in SWEEPS.items():
        for positions in (None, 64):
            single = e2e_fast(root, {"architecture": architecture}, device, windows, positions, window_batches)
            shared = e2e_fast(root, {"architecture": architecture, "members": members}, device, windows, positions,
                              window_batches)
            rows.append({"sweep": sweep, "positions_per_image": positions or "all (784)",
                         "single_vectors_per_s": single["vectors_per_s"], "shared_vectors_per_s": shared["vectors_per_s"],
                         "speedup_vs_4_runs": 4 * single["seconds_per_step"] / shared["seconds_per_step"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps: about 2-3 minutes")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    run(args)
    if args.out:
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
