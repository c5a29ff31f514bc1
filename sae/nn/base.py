"""The sparse autoencoder every architecture shares, and the registry that builds one by name.

Notation (shapes use B = batch, d_in = input width, d_sae = dictionary size)::

    pre_acts = (x - b_dec) @ W_enc + b_enc          (B, d_sae)
    f        = activation(pre_acts)                 (B, d_sae)   the hook each architecture overrides
    x_hat    = f @ W_dec + b_dec                    (B, d_in)

Loss convention (one for every architecture)
--------------------------------------------
Training inputs are scaled by a scalar so that their mean norm is sqrt(d_in), i.e. about one per
element. The reconstruction term is the per-element mean squared error

    mse = mean over batch and d_in of (x_hat - x)^2  =  mean_b ||x_b - x_hat_b||^2 / d_in,

which is what ``SAELoss.mse`` reports and what ``SAELoss.loss`` contains, so the plotted number and
the optimised number are the same. On inputs with mean squared norm d_in it is exactly the summed
squared error of Rajamanoharan et al. (2024) on inputs of unit mean squared norm, so their L0
coefficients carry over, and it is close to the normalised MSE of Gao et al. (2024). Then

    loss = mse + sparsity_scale * sparsity_loss(out) + aux_loss(x, out, dead_mask)

where ``sparsity_scale`` (a warm-up factor from the trainer) multiplies only the sparsity term and
each architecture's coefficient lives inside its own hook.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae.errors import UserError

from .init import geometric_median, tied_init_


class SAEConfigError(UserError, ValueError):
    """A bad SAE hyperparameter or export file. The message names the value and the fix; callers
    (train.py, evaluate.py) print it as one line, and it is still a ValueError for everyone else."""


class SAEOutput(NamedTuple):
    x_hat: Tensor  # (B, d_in) reconstruction
    f: Tensor  # (B, d_sae) feature activations
    pre_acts: Tensor  # (B, d_sae) encoder pre-activations (NaN where TopK's CPU training forward screens them)
    # (values (B, K), indices (B, K)): f's non-zero entries, where the architecture selects them (the TopK family;
    # entries of value 0 may repeat an index), else None. Batch statistics read these K columns, not all of f.
    active: tuple[Tensor, Tensor] | None = None

    def column_sums(self) -> Tensor:
        """(d_sae,) the sum of f over the batch (detached)."""
        if self.active is None:
            return self.f.detach().sum(dim=0)
        values, indices = self.active
        return self.f.new_zeros(self.f.shape[-1]).index_add_(0, indices.flatten(), values.detach().flatten())


class SAELoss(NamedTuple):
    loss: Tensor  # scalar: what the optimiser minimises
    mse: Tensor  # scalar: per-element mean squared error
    sparsity: Tensor  # scalar: sparsity_loss(out), before the warm-up factor
    aux: Tensor  # scalar: aux_loss(...), coefficient included


def check_positive_int(name: str, value: Any) -> int:
    """Return ``int(value)`` if it is a positive integer (bools rejected), else raise a ValueError saying so."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise SAEConfigError(f"{name}={value!r} is not a positive integer; pass a whole number >= 1")
    return int(value)


def _is_finite_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def check_nonnegative_float(name: str, value: Any) -> float:
    """Return ``float(value)`` if it is a finite number >= 0, else raise a ValueError saying so."""
    if not _is_finite_real(value) or value < 0:
        raise SAEConfigError(f"{name}={value!r} must be a finite number >= 0")
    return float(value)


def check_auto_flag(name: str, value: Any) -> bool | None:
    """Return `value` if it is True, False or None (auto), else raise a ValueError saying so."""
    if value not in (None, True, False):
        raise SAEConfigError(f"{name}={value!r} must be True, False or None (auto)")
    return value


def check_positive_float(name: str, value: Any) -> float:
    """Return ``float(value)`` if it is a finite number > 0, else raise a ValueError saying so."""
    if not _is_finite_real(value) or value <= 0:
        raise SAEConfigError(f"{name}={value!r} must be a finite number > 0")
    return float(value)


class SparseAutoencoder(nn.Module):
    """One hidden layer ``x -> f -> x_hat`` with an architecture-specific activation and penalty.

    Subclasses set ``architecture`` and override hooks, never flags: ``activation`` (required),
    ``sparsity_loss``, ``aux_loss``, ``extra_hparams``, ``extra_export_tensors`` /
    ``load_extra_tensors_`` and ``activation_formula``.
    """

    architecture: ClassVar[str] = ""
    constrains_decoder_norm: ClassVar[bool] = False
    # Norm of each W_dec row at initialisation (W_enc starts as W_dec.T). Unit rows for the
    # architectures whose decoder is constrained; the ReLU SAE overrides it.
    init_decoder_row_norm: ClassVar[float] = 1.0

    def __init__(self, d_in: int, d_sae: int) -> None:
        super().__init__()
        self.d_in = check_positive_int("d_in", d_in)
        self.d_sae = check_positive_int("d_sae", d_sae)
        self.W_enc = nn.Parameter(torch.empty(self.d_in, self.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.W_dec = nn.Parameter(torch.empty(self.d_sae, self.d_in))
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """W_dec rows: random directions of norm ``init_decoder_row_norm``; W_enc = W_dec.T; biases 0."""
        tied_init_(self.W_enc, self.W_dec, self.init_decoder_row_norm)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # ----------------------------------------------------------------------------- forward
    def pre_acts(self, x: Tensor) -> Tensor:
        """(B, d_in) -> (B, d_sae): ``(x - b_dec) @ W_enc + b_enc``.

        Computed as ``x @ W_enc + (b_enc - b_dec @ W_enc)``, the same value: the form ``(x - b_dec) @ W_enc``
        makes autograd form the (B, d_in) gradient of ``x - b_dec`` (a sixth B x d_in x d_sae matmul per
        step, a fifth of a dense step's FLOPs) only to sum it over the batch for b_dec; here b_dec's gradient
        is one (d_in, d_sae) x (d_sae,) product, and the bias add is fused into the matmul (addmm).
        """
        return torch.addmm(self.encoder_bias(), x, self.W_enc)

    def encoder_bias(self) -> Tensor:
        """(d_sae,) ``b_enc - b_dec @ W_enc``: the bias of the pre-activations as a function of x alone."""
        return self.b_enc - self.b_dec @ self.W_enc

    def activation(self, pre_acts: Tensor) -> Tensor:
        """(B, d_sae) -> (B, d_sae) feature activations. The hook every architecture overrides."""
        raise NotImplementedError(f"{type(self).__name__} must override activation()")

    def encode(self, x: Tensor) -> Tensor:
        """(B, d_in) -> (B, d_sae) feature activations f."""
        return self.activation(self.pre_acts(x))

    def decode(self, f: Tensor) -> Tensor:
        """(B, d_sae) -> (B, d_in): ``f @ W_dec + b_dec``."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> SAEOutput:
        """(B, d_in) -> SAEOutput(x_hat (B, d_in), f (B, d_sae), pre_acts (B, d_sae))."""
        pre_acts = self.pre_acts(x)
        f = self.activation(pre_acts)
        return SAEOutput(self.decode(f), f, pre_acts)

    # ----------------------------------------------------------------------------- loss
    def sparsity_loss(self, out: SAEOutput) -> Tensor:
        """Scalar sparsity penalty, coefficient included. Zero unless the architecture needs one."""
        return out.f.new_zeros(())

    def aux_loss(self, x: Tensor, out: SAEOutput, dead_mask: Tensor | None) -> Tensor:
        """Scalar auxiliary loss (AuxK for the TopK family). ``dead_mask``: (d_sae,) bool, True = dead."""
        return out.f.new_zeros(())

    def loss(
        self, x: Tensor, out: SAEOutput, sparsity_scale: float = 1.0, dead_mask: Tensor | None = None
    ) -> SAELoss:
        """Total loss on x (B, d_in) given ``out = self(x)``; see the module docstring for the convention."""
        mse = F.mse_loss(out.x_hat, x)  # one fused pass forward and one backward
        sparsity = self.sparsity_loss(out)
        aux = self.aux_loss(x, out, dead_mask)
        return SAELoss(mse + sparsity_scale * sparsity + aux, mse, sparsity, aux)

    # ----------------------------------------------------------------------------- decoder constraint
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale each W_dec row to unit norm (no-op unless ``constrains_decoder_norm``)."""
        if self.constrains_decoder_norm:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove from W_dec.grad the component parallel to each row (no-op unless constrained).

        With unit-norm rows a step along the row only changes its norm, which the next
        normalize_decoder_ undoes; projecting it out keeps Adam's moments for the useful,
        tangential part (Bricken et al. 2023; Gao et al. 2024, section 2.2).
        """
        grad = self.W_dec.grad
        if not self.constrains_decoder_norm or grad is None:
            return
        unit_rows = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        grad.sub_((grad * unit_rows).sum(dim=1, keepdim=True) * unit_rows)

    @torch.no_grad()
    def init_b_dec_(self, sample: Tensor, method: str = "geometric_median") -> None:
        """Set b_dec from a sample of training inputs (N, d_in), in training units.

        ``geometric_median`` (Bricken et al. 2023) is robust to the heavy-tailed outliers in
        activation data; ``mean`` is the cheap alternative; ``zeros`` keeps the default.
        """
        if method == "zeros":
            self.b_dec.zero_()
            return
        if method not in ("geometric_median", "mean"):
            raise SAEConfigError(f"init_b_dec_ method={method!r} is unknown; use 'geometric_median', 'mean' or 'zeros'")
        if sample.ndim != 2 or sample.shape[1] != self.d_in or sample.shape[0] == 0:
            raise SAEConfigError(
                f"init_b_dec_ needs a sample of shape (N, d_in={self.d_in}), got {tuple(sample.shape)}"
            )
        sample = sample.to(device=self.b_dec.device, dtype=torch.float32)
        if not torch.isfinite(sample).all():
            raise SAEConfigError("init_b_dec_ sample contains NaN or inf; filter the activations first")
        center = geometric_median(sample) if method == "geometric_median" else sample.mean(dim=0)
        self.b_dec.copy_(center)

    @torch.no_grad()
    def init_from_sample_(self, sample: Tensor) -> None:
        """Data-dependent initialisation after ``init_b_dec_``, from a sample (N, d_in) in training units.
        Nothing by default; JumpReLU sets its thresholds here."""

    # ----------------------------------------------------------------------------- description & export
    def extra_hparams(self) -> dict[str, Any]:
        """The architecture's own hyperparameters, as ``__init__`` keyword arguments."""
        return {}

    def hparams(self) -> dict[str, Any]:
        """Everything ``build_sae`` needs to rebuild this SAE: architecture, d_in, d_sae and the rest."""
        return {"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae, **self.extra_hparams()}

    def extra_export_tensors(self) -> dict[str, Tensor]:
        """Architecture-specific exported tensors (unchanged by the input scale, e.g. thresholds)."""
        return {}

    @torch.no_grad()
    def load_extra_tensors_(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of ``extra_export_tensors``."""

    @torch.no_grad()
    def export_tensors(self, scale: float = 1.0) -> dict[str, Tensor]:
        """Weights with the training input scale folded in, so the SAE runs on raw-unit inputs.

        Training saw ``scale * x``. With W_enc' = scale W_enc, b_dec' = b_dec / scale,
        W_dec' = W_dec / scale and b_enc' = b_enc, the pre-activations on raw x equal the trained
        ones on scale * x, so f (and any threshold on pre-acts) is unchanged and x_hat' = x_hat / scale.
        Returns detached copies: W_enc (d_in, d_sae), b_enc (d_sae,), W_dec (d_sae, d_in), b_dec (d_in,), extras.
        """
        scale = check_positive_float("scale", scale)
        tensors = {
            "W_enc": self.W_enc * scale,
            "b_enc": self.b_enc,
            "W_dec": self.W_dec / scale,
            "b_dec": self.b_dec / scale,
            **self.extra_export_tensors(),
        }
        return {name: t.detach().clone().contiguous() for name, t in tensors.items()}

    @torch.no_grad()
    def load_exported_(self, tensors: dict[str, Tensor]) -> None:
        """Copy tensors produced by ``export_tensors`` into this SAE (shapes already validated)."""
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(self, name).copy_(tensors[name])
        self.load_extra_tensors_(tensors)

    def activation_formula(self) -> str:
        """How f follows from ``pre``; completed into a full formula by ``encoder_formula``."""
        raise NotImplementedError

    def encoder_formula(self) -> str:
        """Human-readable formula of the exported (raw-unit) SAE, stored in sae.json."""
        return (
            f"pre = (x - b_dec) @ W_enc + b_enc; f = {self.activation_formula()}; "
            "x_hat = f @ W_dec + b_dec  (x in the layer's raw units)"
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.hparams().items())


# ------------------------------------------------------------------------------------- registry
ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {}


def register_architecture(cls: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
    """Class decorator: make ``cls`` buildable by ``build_sae(cls.architecture, ...)``."""
    if not cls.architecture:
        raise SAEConfigError(f"{cls.__name__} must set the class attribute `architecture` before registering")
    ARCHITECTURES[cls.architecture] = cls
    return cls


def _resolve_d_sae(d_in: int, d_sae: int | None, expansion: int | float | None) -> int:
    if (d_sae is None) == (expansion is None):
        raise SAEConfigError(
            f"pass exactly one of d_sae={d_sae!r} and expansion={expansion!r} (d_sae = expansion * d_in)"
        )
    if d_sae is not None:
        return check_positive_int("d_sae", d_sae)
    if not _is_finite_real(expansion) or expansion <= 0:
        raise SAEConfigError(f"expansion={expansion!r} must be a number > 0 (d_sae = expansion * d_in)")
    product = expansion * d_in
    d_sae = round(product)
    if d_sae < 1 or not math.isclose(product, d_sae, rel_tol=1e-9, abs_tol=1e-9):
        raise SAEConfigError(
            f"expansion={expansion!r} times d_in={d_in} gives d_sae={product!r}, not a positive integer; "
            f"pass d_sae directly or pick an expansion whose product with d_in is a whole number"
        )
    return d_sae


def build_sae(
    architecture: str,
    d_in: int,
    d_sae: int | None = None,
    expansion: int | float | None = None,
    **hparams: Any,
) -> SparseAutoencoder:
    """Build a registered SAE by name, sizing it by ``d_sae`` or ``expansion`` (exactly one)."""
    if architecture not in ARCHITECTURES:
        raise SAEConfigError(f"architecture={architecture!r} is unknown; choose one of {sorted(ARCHITECTURES)}")
    cls = ARCHITECTURES[architecture]
    check_positive_int("d_in", d_in)
    d_sae = _resolve_d_sae(d_in, d_sae, expansion)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "d_in", "d_sae")]
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise SAEConfigError(
            f"unknown hyperparameter(s) {unknown} for architecture {architecture!r}; accepted: {accepted}"
        )
    return cls(d_in, d_sae, **hparams)
