"""The project's SAE training step against the same step of public SAE trainers, interleaved in one process.

    pip install -e ".[bench]"           # the peers: EleutherAI's sparsify (eai-sparsify) and SAELens (sae-lens)
    python bench/peers.py               # 30 rounds; --rounds N, --quick (5 rounds), --out peers.json

Every round runs each contender's step once, in turn, on the same batch (d_in 480, d_sae 3840, batch 4096,
k 32, float32, 2 threads by default), so the machine's load hits all of them alike; each reported ratio is the
median over rounds of that round's time ratio. A peer that is not installed is skipped with the command that
installs it.

The steps, each as its own trainer runs it between logging steps:
- project: ``SAEModule``'s step (training_step, decoder-gradient projection, Adam, decoder renormalisation),
  no Lightning (``bench/throughput.py``'s ``module_step``).
- sparsify: ``SparseCoder`` with its trainer's sequence: decoder rows to unit norm, forward with the dead mask,
  ``fvu + auxk_alpha * auxk_loss`` backward, parallel-gradient removal, ``torch.optim.Adam``, zero_grad, and
  its firing bookkeeping.
- SAELens: ``TopKTrainingSAE`` / ``StandardTrainingSAE``'s ``training_forward_pass``, its trainer's firing
  bookkeeping, backward, gradient-norm clipping, Adam, zero_grad.

AuxK rows mark the first 1% or 50% of the latents dead before every step (every contender gets the same mask,
and its coefficient 1/32). The ReLU row also reports the project's step as a fraction of the sgemm rate
measured alongside it (an n=2048 ``torch.mm`` in every round), for the step's matmul FLOPs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.throughput import BATCH, D_IN, EXPANSION, K, matmul_probe, module_step, step_flops  # noqa: E402

D_SAE = D_IN * EXPANSION
AUXK_COEFFICIENT = 1 / 32
INSTALL = {"sparsify": 'pip install "eai-sparsify>=1.3"', "saelens": 'pip install "sae-lens>=6"'}
SCENARIOS = {"topk": 0, "auxk 1% dead": D_SAE // 100, "auxk 50% dead": D_SAE // 2}


class Contender:
    """A step to time and what it needs before each call (untimed)."""

    def __init__(self, step, prepare=lambda: None):
        self.step, self.prepare = step, prepare


# -- the project ---------------------------------------------------------------------------------------
def project(arch: str, x: torch.Tensor, n_dead: int) -> Contender:
    from sae.train import SAEModule

    step = module_step(arch, x, **({"aux_k_coefficient": AUXK_COEFFICIENT} if arch == "topk" else {}))
    module = step.module

    def prepare():
        # Keep the first n_dead latents dead whatever fired last step (a window of 10M vectors, as module_step sets).
        module.member.vectors_since_fired[:n_dead] = int(module.member.dead_window)
    assert isinstance(module, SAEModule)
    return Contender(step, prepare)


# -- EleutherAI's sparsify -------------------------------------------------------------------------------
def sparsify(x: torch.Tensor, n_dead: int, weights: dict) -> Contender | None:
    if x.device.type == "cpu":  # its Triton decoder is for GPUs; on CPU it takes the eager embedding_bag
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints which decoder it picked
            from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return None
    sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K), device=x.device)
    with torch.no_grad():  # the project's initial weights, so both select the same latents on the first step
        sae.encoder.weight.copy_(weights["W_enc"].T)
        sae.W_dec.copy_(weights["W_dec"])
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4 / (D_SAE / 2**14) ** 0.5)
    dead = torch.zeros(D_SAE, dtype=torch.bool, device=x.device)
    dead[:n_dead] = True
    did_fire = torch.zeros(D_SAE, dtype=torch.bool, device=x.device)
    since_fired = torch.zeros(D_SAE, dtype=torch.long, device=x.device)

    def step():
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=dead if n_dead else None)
        did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + AUXK_COEFFICIENT * out.auxk_loss
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0
            did_fire.zero_()
    return Contender(step)


# -- SAELens ---------------------------------------------------------------------------------------------
def saelens(arch: str, x: torch.Tensor, n_dead: int) -> Contender | None:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import sae_lens
            from sae_lens.saes.sae import TrainStepInput
    except ImportError:
        return None
    common = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": str(x.device)}
    if arch == "topk":
        sae = sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(k=K, aux_loss_coefficient=AUXK_COEFFICIENT,
                                                                      **common))
    else:
        sae = sae_lens.StandardTrainingSAE(sae_lens.StandardTrainingSAEConfig(l1_coefficient=1.0, **common))
    coefficients = {name: c if isinstance(c, float) else c.value for name, c in sae.get_coefficients().items()}
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.999))
    dead = torch.zeros(D_SAE, dtype=torch.bool, device=x.device)
    dead[:n_dead] = True
    since_fired = torch.zeros(D_SAE, device=x.device)
    sae.train()

    def step():
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefficients,
                                                       dead_neuron_mask=dead if n_dead else None,
                                                       n_training_steps=0, is_logging_step=False))
        with torch.no_grad():
            did_fire = out.feature_acts.bool().float().sum(-2).bool()
            since_fired.add_(1)
            since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return Contender(step)


# -- timing ----------------------------------------------------------------------------------------------
def rounds_of(contenders: dict[str, Contender], rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per step of each contender in every round; the order rotates so none always runs first."""
    names, times = list(contenders), {name: [] for name in contenders}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            contenders[name].prepare()
            start = time.perf_counter()
            contenders[name].step()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median_ratio(times: dict[str, list[float]], a: str, b: str) -> float | None:
    if a not in times or b not in times:
        return None
    return statistics.median(ta / tb for ta, tb in zip(times[a], times[b]))


def build(x: torch.Tensor, peers: tuple[str, ...]) -> tuple[dict[str, Contender], list[str]]:
    contenders, skipped = {}, []
    for scenario, n_dead in SCENARIOS.items():
        ours = project("topk", x, n_dead)
        contenders[f"project {scenario}"] = ours
        weights = {"W_enc": ours.step.module.sae.W_enc.detach(), "W_dec": ours.step.module.sae.W_dec.detach()}
        for peer, make in (("sparsify", lambda: sparsify(x, n_dead, weights)),
                           ("saelens", lambda: saelens("topk", x, n_dead))):
            if peer not in peers:
                continue
            made = make()
            if made is None:
                skipped.append(peer)
            else:
                contenders[f"{peer} {scenario}"] = made
    contenders["project relu"] = project("relu", x, 0)
    made = saelens("relu", x, 0) if "saelens" in peers else None
    if made is not None:
        contenders["saelens relu"] = made
    probe = matmul_probe(x.device)
    contenders["sgemm"] = Contender(probe)
    return contenders, sorted(set(skipped))


def report(times: dict[str, list[float]], probe_flops: float) -> dict:
    def med(name):
        return statistics.median(times[name]) if name in times else None

    rows = []
    for scenario in SCENARIOS:
        row = {"step": scenario, "project_s": med(f"project {scenario}")}
        for peer in ("sparsify", "saelens"):
            row[f"{peer}_s"] = med(f"{peer} {scenario}")
            row[f"project/{peer}"] = median_ratio(times, f"project {scenario}", f"{peer} {scenario}")
        if scenario != "topk":
            for who in ("project", "sparsify", "saelens"):
                row[f"{who} auxk/topk"] = median_ratio(times, f"{who} {scenario}", f"{who} topk")
        rows.append(row)
    relu = {"step": "relu", "project_s": med("project relu"), "saelens_s": med("saelens relu"),
            "project/saelens": median_ratio(times, "project relu", "saelens relu")}
    flops = step_flops("relu", False)
    # Fraction of the sgemm rate: (flops / t_step) / (probe_flops / t_probe), per round, then the median.
    relu["fraction_of_sgemm"] = statistics.median(
        flops / t / (probe_flops / p) for t, p in zip(times["project relu"], times["sgemm"]))
    relu["sgemm_gflops"] = probe_flops / med("sgemm") / 1e9
    rows.append(relu)
    return {"rows": rows}


def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="5 rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", default="sparsify,saelens", help="comma-separated peers to time (default: both)")
    parser.add_argument("--out", type=Path, help="write the per-round times and the ratios as JSON here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    from sae.hostmem import reuse_freed_host_memory

    # As train.py does; process-wide, so the peers run with it too (it speeds them up as well).
    reuse = reuse_freed_host_memory()
    torch.manual_seed(0)
    x = torch.randn(BATCH, D_IN)
    contenders, skipped = build(x, tuple(args.peers.split(",")))
    for peer in skipped:
        print(f"{peer} not installed, skipped: {INSTALL[peer]}")
    rounds = 5 if args.quick else args.rounds
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, freed host memory kept: {reuse}; "
          f"d_in {D_IN}, d_sae {D_SAE}, batch {BATCH}, k {K}, fp32; {rounds} rounds of {len(contenders)} steps",
          flush=True)
    times = rounds_of(contenders, rounds)
    result = report(times, contenders["sgemm"].step.flops)
    columns = ["step", "project_s", "sparsify_s", "saelens_s", "project/sparsify", "project/saelens",
               "project auxk/topk", "sparsify auxk/topk", "saelens auxk/topk", "fraction_of_sgemm", "sgemm_gflops"]
    widths = [max(len(c), 8) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in result["rows"]:
        print("  ".join(fmt(row.get(c)).rjust(w) for c, w in zip(columns, widths)))
    print("(_s: median seconds per step; ratios: medians of per-round time ratios, < 1 = the project is faster)")
    if args.out:
        result.update(rounds=rounds, threads=torch.get_num_threads(), torch=torch.__version__, times=times,
                      skipped=skipped)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
