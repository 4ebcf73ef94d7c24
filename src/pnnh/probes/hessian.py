"""Curvature of the loss: Hessian-vector products, extreme eigenvalues, trace, spectral density.

Everything is built on one primitive, the Hessian-vector product of the loss
``L(θ) = (1/N) Σ_i ℓ(f(x_i; θ), y_i)`` over a flat parameter vector ``θ``, in one of two kinds::

    Hv = ∂(∇L(θ)·v)/∂θ                   (rev-rev: double backward over a gradient graph
                                          built once per batch and kept across HVPs)
    Hv = ∂/∂ε ∇L(θ + ε v) |_{ε=0}         (fwd-rev: ``jvp(grad(L), θ, v)``, no graph kept)

``hvp_mode="auto"`` runs rev-rev (the faster on CPU) and falls back to the other kind, then to
attention on the math SDPA backend, where a derivative is missing (:meth:`HessianOperator
._resolve`); the result's ``method`` says which ran. Eval-mode BatchNorms are folded into the
layer before them inside the loss (:mod:`pnnh.probes.bnfold`: the same Hessian, a cheaper
graph). On top of it:

- :func:`lanczos` — the Lanczos iteration with full re-orthogonalisation. After ``m`` steps
  ``Vᵀ H V = T`` (tridiagonal); the Ritz values (eigenvalues of ``T``) converge to the extreme
  eigenvalues of ``H`` first. :meth:`HessianOperator.extreme_eigenvalues` starts from the
  gradient (the top eigenspace) and stops once the error bound of the extreme Ritz values
  (:func:`ritz_error_bounds`: the residual ``|β_m s_{m,i}|``, or ``r²/gap``) is below
  ``tol·max|θ|``.
- :meth:`HessianOperator.trace` — :func:`estimate_trace`: XTrace, Hutch++ or Hutchinson, with
  a standard error and a stopping rule on ``z·stderr <= rel_tol·|trace|``.
- :meth:`HessianOperator.spectral_density` — stochastic Lanczos quadrature (SLQ): for random
  unit ``v``, ``vᵀ g(H) v ≈ Σ_j τ_j g(θ_j)`` with Ritz values ``θ_j`` and weights
  ``τ_j = (e_1ᵀ s_j)²``; averaging over ``v`` and smoothing with a Gaussian gives the density.
- :meth:`HessianOperator.dense` — the exact ``P×P`` Hessian (one HVP per basis vector), for
  models with up to a few thousand parameters.
- :func:`block_curvature` — extreme eigenvalues and trace of diagonal blocks ``H_BB``
  (per module or stage).
- :func:`condition_numbers` — from a spectrum: ``condition_number = max|λ| / min|λ|`` over the
  non-zero spectrum ``|λ| > tol·max|λ|``, and ``condition_number_positive = λ_max / λ_min`` over
  the positive spectrum ``λ > tol·max|λ|``.

The loss may be averaged over one batch or, exactly, over a whole data loader: the HVP of the
mean loss over ``N`` samples is ``Σ_b (n_b/N) H_b v`` for batch means ``L_b``, one batch's
graph alive at a time (so each HVP recomputes every batch's forward and gradient).

``pnnh probe hessian`` writes ``hessian.json`` (``lambda_max``, ``lambda_min``, ``trace``,
``condition_number``, ``condition_number_positive``, ``method``, ``hvp``, ...), a spectrum PNG
and, with ``--blocks``, ``hessian_blocks.csv/json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from pnnh.errors import ConfigError
from pnnh.io import save_figure, write_records
from pnnh.probes.bnfold import foldable_pairs, folded
from pnnh.probes.common import ProbeResult, ProbeTarget

NAME = "hessian"
DESCRIPTION = "Hessian extreme eigenvalues, trace, spectrum, condition number"

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]

HVP_MODES = ("auto", "fwd-rev", "rev-rev")
QUADRATURES = ("averaged", "gauss")  # spectral_density: see slq_quadrature
BATCHED_CPU_DIM = 50_000  # hvp_many batches vectors on a CPU up to this many parameters
BLOCK_FWD_REV = 8  # hvp_many: CPU blocks of this many rows or more go forward-over-reverse
HVP_KINDS = {
    "fwd-rev": "fwd-rev (torch.func forward-over-reverse, jvp of grad: no graph kept)",
    "rev-rev": "rev-rev (double backward over a gradient graph built once per batch)",
}


def _math_attention():
    """Scaled-dot-product attention on the math backend: plain differentiable ops, so both
    forward-mode AD and double backward go through (the fused CPU kernel has neither)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


@contextlib.contextmanager
def full_float32():
    """float32 products at float32 precision on CUDA, the user's settings restored after.

    By default cuDNN runs float32 convolutions in TF32 (``torch.backends.cudnn.allow_tf32``:
    a 10-bit mantissa), and users may allow it for matmuls too. Every HVP then carries
    ~1e-3 relative rounding: measured on an H200 (``benchmarks/hessian_vs_pyhessian.py
    --device cuda``), neither pnnh nor PyHessian got ResNet-20's λmax closer than 2.5e-4 to
    the float64 value, whatever ``tol`` asked for (on a CPU, 4e-8). Inside this context
    convolutions and matmuls run in IEEE float32 (:func:`_tf32_knobs` says which settings
    that takes). Nothing changes for computations on the CPU, which has no TF32.
    """
    knobs = _tf32_knobs()
    before = [getattr(obj, name) for obj, name, _ in knobs]
    try:
        for obj, name, value in knobs:
            setattr(obj, name, value)
        yield
    finally:
        for (obj, name, _), old in zip(knobs, before):
            setattr(obj, name, old)


@functools.cache
def _tf32_knobs() -> tuple[tuple[object, str, object], ...]:
    """``(object, attribute, full-precision value)`` of the float32 precision settings: the
    per-operator ``fp32_precision`` of torch >= 2.9 where it exists (reading the older
    ``allow_tf32`` raises there once a user gives convolutions and RNNs different settings),
    else the ``allow_tf32`` flags. Which API torch has does not change: found once, not per
    HVP."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    try:
        if conv is not None and conv.fp32_precision is not None and matmul.fp32_precision:
            return ((conv, "fp32_precision", "ieee"), (matmul, "fp32_precision", "ieee"))
    except (AttributeError, RuntimeError):
        pass
    return ((torch.backends.cudnn, "allow_tf32", False), (matmul, "allow_tf32", False))


def mse_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(1/2N) Σ_i ||y_i - f(x_i)||²`` — the squared loss of the linear-network analyses."""
    return 0.5 * (outputs - targets).pow(2).flatten(1).sum(1).mean()


LOSSES: dict[str, LossFn] = {"ce": F.cross_entropy, "mse": mse_loss}


def select_parameters(model: nn.Module, params: str | Sequence[str] | None = None) -> list[str]:
    """Names of the trainable parameters to differentiate: all of them, or those whose name
    starts with one of the given prefixes (``"blocks"``, ``"head.weight"``, ...)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if params is None or params == "all":
        return names
    prefixes = [params] if isinstance(params, str) else list(params)
    prefixes = [p for pre in prefixes for p in pre.split(",") if p]
    chosen = [n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)]
    if not chosen:
        raise ConfigError(
            f"params: no parameter matches {', '.join(prefixes)!r}; "
            f"names start with: {', '.join(sorted({n.split('.')[0] for n in names}))}",
            field="params",
        )
    return chosen


class HessianOperator:
    """The Hessian of ``loss_fn(model(x), y)`` w.r.t. (a subset of) the model's parameters.

    ``data`` is one ``(inputs, targets)`` batch or an iterable of batches (a DataLoader); with
    several batches the loss is the exact mean over all samples. Vectors are flat tensors of
    length :attr:`dim` in the order of :attr:`names`. The model is used as it is (call
    ``model.eval()`` first for BatchNorm running statistics).

    ``fold_batchnorm=True``: eval-mode BatchNorms are folded into the convolution or linear
    layer before them inside the loss (:mod:`pnnh.probes.bnfold`: the same function of every
    parameter, so the same Hessian, with a cheaper graph); :attr:`folded` lists the pairs.

    ``allow_tf32=False``: gradients and HVPs run in full float32 precision on CUDA, even where
    TF32 is on (cuDNN's default for convolutions; see :func:`full_float32`). ``True`` keeps
    the global settings: faster on large convolutions, with ~1e-3 relative rounding per HVP.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Batch | Iterable[Batch],
        loss_fn: LossFn | str = "ce",
        params: str | Sequence[str] | None = None,
        hvp_mode: str = "auto",
        fold_batchnorm: bool = True,
        allow_tf32: bool = False,
    ):
        if hvp_mode not in HVP_MODES:
            raise ConfigError(f"hvp_mode: one of {', '.join(HVP_MODES)}, got {hvp_mode!r}",
                              field="hvp_mode")
        self.hvp_mode = hvp_mode
        self.allow_tf32 = allow_tf32
        self.hvp_kind: str | None = None  # resolved on the first HVP (see hvp_method)
        self.math_attention = False
        self.hvp_fallbacks: list[str] = []
        self._graph: tuple[torch.Tensor, torch.Tensor] | None = None
        self._graph_tag: tuple[str, bool] | None = None  # (kind, math attention) it serves
        self.model = model
        self.loss_fn = LOSSES[loss_fn] if isinstance(loss_fn, str) else loss_fn
        self.names = select_parameters(model, params)
        named = dict(model.named_parameters())
        self._fixed = {n: p.detach() for n, p in named.items() if n not in self.names}
        self._fixed.update({n: b.detach() for n, b in model.named_buffers()})
        self.shapes = [named[n].shape for n in self.names]
        self.numels = [named[n].numel() for n in self.names]
        self.theta = torch.cat([named[n].detach().reshape(-1) for n in self.names])
        self.dim = self.theta.numel()
        if isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0]):
            self._batches: Iterable[Batch] = [data]
        else:
            self._batches = data
        self.num_samples, first = 0, None
        for x, _ in self._iter():  # one pass over the data: its size, and a sample to fold on
            self.num_samples += int(x.shape[0])
            if first is None and x.shape[0]:
                first = x[:1].clone()
        if self.num_samples == 0:
            raise ConfigError("hessian: the data has no samples", field="data")
        self.folded: list[tuple[str, str]] = []
        self.fold_error: str | None = None  # why folding was given up, if it was
        if fold_batchnorm:
            try:  # one sample shows the graph; a model that cannot run on it is not folded
                self.folded = foldable_pairs(model, first)
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                self.fold_error = f"{type(e).__name__}: {str(e).strip()[:120]}"
        self.hvp_calls = 0
        self.batched: bool | None = None  # hvp_many: batched passes (None: on accelerators)
        self.quadratic_kind: str | None = None  # quadratic_forms: "fwd-fwd" or "hvp" once run
        self.block_kind: str | None = None  # hvp_many's CPU blocks: "fwd-rev" once it ran

    @property
    def theta(self) -> torch.Tensor:
        return self._theta

    @theta.setter
    def theta(self, value: torch.Tensor) -> None:
        self._theta = value
        self._graph = None

    @property
    def hvp_method(self) -> str:
        """Which HVP ran, and why: the kind, any fallback and the attention backend."""
        if self.hvp_kind is None:
            return f"{self.hvp_mode} (not run yet)"
        text = HVP_KINDS[self.hvp_kind]
        if self.hvp_fallbacks:
            text += "; fallback after " + "; ".join(self.hvp_fallbacks)
        if self.math_attention:
            text += ("; attention on the math SDPA backend (the fused CPU kernel has no "
                     "forward-mode or double-backward derivative)")
        if self.folded:
            text += (f"; eval-mode BatchNorm folded into the layer before it ({len(self.folded)} "
                     "pairs, an exact reparametrization)")
        elif self.fold_error:
            text += f"; BatchNorm not folded: {self.fold_error}"
        return text

    # -- plumbing -----------------------------------------------------------------------
    def _iter(self):
        dev = self.theta.device
        for x, y in self._batches:
            yield x.to(dev), y.to(dev)

    def _unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(flat, self.numels)
        return {n: t.view(s) for n, t, s in zip(self.names, parts, self.shapes)}

    def _loss(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with folded(self.model, self.folded):
            out = functional_call(self.model, {**self._fixed, **self._unflatten(flat)}, (x,))
        return self.loss_fn(out, y)

    def _attention(self):
        return _math_attention() if self.math_attention else contextlib.nullcontext()

    def _precision(self):
        return contextlib.nullcontext() if self.allow_tf32 else full_float32()

    def _hvp_batch(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward-over-reverse ``jvp(grad L, θ, v)``: one forward and one backward pass."""
        g = grad(lambda t: self._loss(t, x, y))
        return jvp(g, (self.theta,), (v,))[1]

    def _gradient_graph(self, x: torch.Tensor, y: torch.Tensor):
        """``(θ leaf, ∇L(θ) with its graph)``; kept across HVPs when there is one batch."""
        if self._graph is not None:
            return self._graph
        leaf = self.theta.detach().requires_grad_(True)
        with torch.enable_grad():
            g = torch.autograd.grad(self._loss(leaf, x, y), leaf, create_graph=True)[0]
        if isinstance(self._batches, list) and len(self._batches) == 1:
            self._graph = (leaf, g)
            self._graph_tag = ("rev-rev", self.math_attention)
        return leaf, g

    def _hvp_rev_rev(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Double backward ``∂(∇L·v)/∂θ``; with one batch the gradient graph is built once and
        kept, so each HVP is a single backward pass (PyHessian's scheme). ``v`` may be a
        ``(k, dim)`` block: then the k HVPs share one batched backward pass."""
        leaf, g = self._gradient_graph(x, y)
        batched = v.dim() == 2
        return torch.autograd.grad(g, leaf, grad_outputs=v, retain_graph=True,
                                   is_grads_batched=batched)[0].detach()

    def _hvp_kind_batch(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self._attention():
            if self.hvp_kind == "rev-rev":
                return self._hvp_rev_rev(v, x, y)
            if v.dim() == 2:
                return vmap(self._hvp_batch, in_dims=(0, None, None))(v, x, y)
            return self._hvp_batch(v, x, y)

    def _resolve(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Pick the HVP kind on the first HVP: the requested one (``auto``: double backward
        over a kept graph, the fastest where it works), else double backward (``fwd-rev`` needs
        forward-mode AD, which some ops lack), then with attention on the math backend, then
        forward-over-reverse. Every failure is recorded in :attr:`hvp_method`."""
        order = [("rev-rev", False), ("rev-rev", True), ("fwd-rev", False), ("fwd-rev", True)]
        if self.hvp_mode == "fwd-rev":
            order = [("fwd-rev", False), ("rev-rev", False), ("rev-rev", True), ("fwd-rev", True)]
        errors: list[BaseException] = []
        for kind, math_attn in order:
            if (kind, math_attn) != self._graph_tag:
                self._graph = None  # a graph built for another kind (e.g. by gradient())
            self.hvp_kind, self.math_attention = kind, math_attn
            try:
                out = self._hvp_kind_batch(v, x, y)
            except (NotImplementedError, RuntimeError) as e:  # a missing derivative, or OOM
                self._graph = None
                errors.append(e)
                why = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
                self.hvp_fallbacks.append(f"{kind}{' (math attention)' if math_attn else ''}"
                                          f" failed: {type(e).__name__}: {why}")
                continue
            return out
        self.hvp_kind = None
        raise errors[0]

    def _batch_mean(self, fn) -> torch.Tensor:
        """``Σ_b (n_b/N) fn(x_b, y_b)``: a per-batch quantity averaged exactly over all the data,
        one batch's graph alive at a time."""
        out = None
        with self._precision():
            for x, y in self._iter():
                term = (x.shape[0] / self.num_samples) * fn(x, y)
                out = term if out is None else out + term
        return out

    def _hvp_data(self, v: torch.Tensor) -> torch.Tensor:
        """``Σ_b (n_b/N) H_b v`` over the batches."""
        return self._batch_mean(lambda x, y: self._resolve(v, x, y) if self.hvp_kind is None
                                else self._hvp_kind_batch(v, x, y))

    # -- public API -----------------------------------------------------------------------
    def loss_and_grad(self) -> tuple[float, torch.Tensor]:
        """Mean loss and its gradient over all the data."""
        total, g = 0.0, torch.zeros_like(self.theta)
        with self._precision():
            for x, y in self._iter():
                w = x.shape[0] / self.num_samples
                gb, lb = torch.func.grad_and_value(self._loss)(self.theta, x, y)
                total += w * float(lb)
                g += w * gb
        return total, g

    def gradient(self) -> torch.Tensor:
        """``∇L(θ)``: taken from the kept gradient graph where double backward will run (so the
        graph serves the HVPs that follow), else by :meth:`loss_and_grad`."""
        one = isinstance(self._batches, list) and len(self._batches) == 1
        if one and self.hvp_mode != "fwd-rev" and self.hvp_kind in (None, "rev-rev"):
            try:  # _resolve keeps this graph if rev-rev (as tagged) then works
                with self._attention(), self._precision():
                    return self._gradient_graph(*next(self._iter()))[1].detach()
            except (NotImplementedError, RuntimeError):
                self._graph = None
        return self.loss_and_grad()[1]

    def start_vector(self, start: str, seed: int) -> torch.Tensor | None:
        """Lanczos start: ``random`` (None: Gaussian), ``gradient`` (``∇L``, which lies mostly in
        the top eigenspace of the loss Hessian, free where the gradient graph is kept) or
        ``mixed`` (``g/‖g‖ + r/‖r‖``, overlapping both ends of the spectrum)."""
        if start == "random":
            return None
        g = self.gradient().double()
        if not torch.isfinite(g).all() or float(g.norm()) == 0.0:
            return None
        g = g / g.norm()
        if start == "gradient":
            return g
        r = torch.randn(self.dim, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64).to(g.device)
        return g + r / r.norm()

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector ``v`` (averaged exactly over all batches)."""
        self.hvp_calls += 1
        return self._hvp_data(v.to(self.theta))

    def hvp_many(self, vs: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """``H v`` for every row ``v`` of ``vs``: the rows go through in blocks of
        ``chunk_size`` (all at once by default) as one batched pass (``vmap`` for fwd-rev,
        ``is_grads_batched`` for rev-rev); one at a time where an op has no batching rule, and
        on a CPU for more than ``BATCHED_CPU_DIM`` parameters unless :attr:`batched` is set
        (on the development CPU the batched backward was slower per vector than single HVPs
        on ResNet-20, 272k parameters, and faster on a 938-parameter conv net)."""
        vs = vs.to(self.theta)
        batched = self._use_batched()
        if not batched:
            self.hvp_calls += vs.shape[0]
            return torch.stack([self._hvp_data(v) for v in vs]) if len(vs) else vs.clone()
        step = chunk_size or max(1, vs.shape[0])
        outs = []
        for i in range(0, vs.shape[0], step):
            block = vs[i:i + step]
            if self.hvp_kind is None:  # resolve the HVP kind on a single vector first
                outs.append(self._hvp_data(block[0])[None])
                block = block[1:]
                if block.shape[0] == 0:
                    continue
            try:
                outs.append(self._hvp_block(block))
            except RuntimeError:  # an op without a batching rule: one HVP at a time
                outs.append(torch.stack([self._hvp_data(v) for v in block]))
        self.hvp_calls += vs.shape[0]
        return torch.cat(outs) if outs else torch.zeros_like(vs)

    def _use_batched(self) -> bool:
        """Whether several vectors go through one batched pass: :attr:`batched` if set, else on
        accelerators and on a CPU for at most ``BATCHED_CPU_DIM`` parameters."""
        if self.batched is not None:
            return self.batched
        return self.theta.device.type != "cpu" or self.dim <= BATCHED_CPU_DIM

    def _hvp_block(self, block: torch.Tensor) -> torch.Tensor:
        """A ``(k, dim)`` block of HVPs in one batched pass. On a CPU, for blocks of
        ``BLOCK_FWD_REV`` or more rows, a vmapped forward-over-reverse pass (the rows ride
        along as a larger batch through the convolutions and matmuls) is used even where
        double backward is the single-HVP kind: on the 938-parameter conv net of
        ``benchmarks/hessian_vs_pyhessian.py`` it cost 0.6-0.7x the batched double backward
        per vector; :attr:`block_kind` records it (``None`` when the block went through
        :attr:`hvp_kind`). Falls back to :attr:`hvp_kind` where forward-mode AD is missing."""
        if (self.hvp_kind == "rev-rev" and self.theta.device.type == "cpu"
                and block.shape[0] >= BLOCK_FWD_REV and self.block_kind != "failed"):
            try:
                with self._attention():
                    out = self._batch_mean(
                        lambda x, y: vmap(self._hvp_batch, in_dims=(0, None, None))(block, x, y))
                self.block_kind = "fwd-rev"
                return out
            except (NotImplementedError, RuntimeError):
                self.block_kind = "failed"
        return self._hvp_data(block)

    def _quadratic_fwd_fwd(self, vs: torch.Tensor) -> torch.Tensor:
        """``vᵀ H v = d²/dε² L(θ + ε v)|_{ε=0}`` for every row, by forward-over-forward AD
        (``jvp`` of ``jvp``, vmapped over the rows): no backward pass, no graph."""
        def forms(x, y):
            def second(v):
                def first(t):
                    return jvp(lambda u: self._loss(u, x, y), (t,), (v,))[1]
                return jvp(first, (self.theta,), (v,))[1]
            return vmap(second)(vs)

        with self._attention():
            return self._batch_mean(forms)

    def quadratic_forms(self, vs: torch.Tensor, chunk_size: int = 64) -> torch.Tensor:
        """``vᵀ H v`` for every row ``v`` of ``vs`` (float64): all Hutchinson needs.

        Where :meth:`hvp_many` would batch (small models on a CPU, accelerators) they come
        from forward-over-forward AD in blocks of ``chunk_size`` rows (one vmapped second-order
        forward pass per block, several times cheaper than double backward per vector on the
        development CPU for a 938-parameter conv net); else, or where an op has no
        forward-mode derivative, from ``v · (H v)``. :attr:`quadratic_kind` says which ran."""
        vs = vs.to(self.theta)
        batched = self._use_batched()
        if batched and self.quadratic_kind in (None, "fwd-fwd"):
            try:
                out = torch.cat([self._quadratic_fwd_fwd(vs[i:i + chunk_size])
                                 for i in range(0, vs.shape[0], chunk_size)])
                self.quadratic_kind = "fwd-fwd"
                self.hvp_calls += vs.shape[0]
                return out.double()
            except (NotImplementedError, RuntimeError):
                pass
        self.quadratic_kind = "hvp"
        return (vs.double() * self.hvp_many(vs).double()).sum(1)

    def dense(self, chunk_size: int = 256) -> torch.Tensor:
        """The exact ``dim × dim`` Hessian: ``H e_j`` for every basis vector (vmapped HVPs)."""
        eye = torch.eye(self.dim, dtype=self.theta.dtype, device=self.theta.device)
        h = self.hvp_many(eye, chunk_size)
        return 0.5 * (h + h.T)

    def extreme_eigenvalues(
        self, tol: float = 1e-6, max_iter: int = 200, seed: int = 0, which: str = "both",
        bound: str = "residual", start: str = "auto",
    ) -> dict:
        """Largest and smallest (algebraic) eigenvalues by Lanczos with full re-orthogonalisation.

        Stops when the error bound of both extreme Ritz values is ``<= tol·max|θ|``, or after
        ``max_iter`` steps (``converged`` says which). ``bound="residual"``: the Ritz residual
        ``r = ||Hu − θu|| = |β_m s_{m,i}|``, a guaranteed bound (some eigenvalue lies within
        ``r`` of ``θ``); ``bound="gap"``: ``min(r, r²/gap)`` with the gap to the next Ritz
        value, the usual (Kato–Temple) error estimate, much tighter once the end is resolved
        but not guaranteed. ``which="max"`` waits for the largest one only (``lambda_min`` is
        then the current, possibly unconverged, smallest Ritz value). ``start``: see
        :meth:`start_vector`; ``auto`` is ``gradient`` for ``which="max"``, else ``mixed``.
        """
        if bound not in ("residual", "gap"):
            raise ConfigError(f"bound: residual or gap, got {bound!r}", field="bound")
        if start not in ("auto", "random", "gradient", "mixed"):
            raise ConfigError(f"start: auto, random, gradient or mixed, got {start!r}",
                              field="start")
        if start == "auto":
            start = "gradient" if which == "max" else "mixed"
        calls0 = self.hvp_calls
        v0 = self.start_vector(start, seed)
        res = lanczos(self.hvp, self.dim, max_iter, tol=tol, seed=seed, bound=bound, v0=v0,
                      device=self.theta.device, stop="max" if which == "max" else "extremes")
        theta = res["ritz"]
        scale = max(float(theta.abs().max()), 1e-300)
        err = ritz_error_bounds(theta, res["ritz_vectors"], res["beta_last"], bound)
        return {
            "lambda_max": float(theta[-1]),
            "lambda_min": float(theta[0]),
            "residual_max": err["residual_max"],
            "residual_min": err["residual_min"],
            "error_bound_max": err["max"],
            "error_bound_min": err["min"],
            "bound": bound,
            "start": start,
            "iterations": res["steps"],
            "hvps": self.hvp_calls - calls0,
            "converged": bool(err["max"] <= tol * scale
                              and (which == "max" or err["min"] <= tol * scale)),
            "ritz_values": theta.tolist(),
            "hvp": self.hvp_kind,
            "method": self.hvp_method,
        }

    def trace(
        self, num_samples: int = 100, seed: int = 0, rel_tol: float | None = None,
        chunk: int = 16, method: str = "xtrace", z: float = 2.0,
    ) -> dict:
        """Stochastic trace ``tr H`` with at most ``num_samples`` HVPs (see :func:`estimate_trace`).

        ``method``: ``"xtrace"`` (default; exact on the part of the spectrum its sketch
        captures, exchangeable leave-one-out error estimate), ``"hutch++"`` (low-rank part plus
        Hutchinson on the deflated rest) or ``"hutchinson"`` (``(1/n) Σ vᵀHv``, Rademacher
        ``v``). ``trace_stderr`` is the estimator's standard error; with ``rel_tol`` the run
        stops once ``z·stderr <= rel_tol·|trace|`` (an error bound at about 95% confidence for
        ``z = 2``, not the change between steps). HVPs go ``chunk`` at a time, batched.
        """
        if method not in TRACE_METHODS:
            raise ConfigError(f"trace method: one of {', '.join(TRACE_METHODS)}, got {method!r}",
                              field="trace_method")
        calls0 = self.hvp_calls
        out = estimate_trace(self.hvp_many, self.dim, num_samples, method=method, seed=seed,
                             rel_tol=rel_tol, z=z, chunk=chunk, device=self.theta.device,
                             quadform=self.quadratic_forms)
        out.update(hvps=self.hvp_calls - calls0, hvp=self.hvp_kind, method=self.hvp_method,
                   quadratic_forms=self.quadratic_kind, block_hvp=self.block_kind)
        return out

    def spectral_density(self, num_runs: int = 5, num_steps: int = 40, seed: int = 0,
                         quadrature: str = "averaged") -> dict:
        """Stochastic Lanczos quadrature: nodes and weights per run (weights sum to 1).

        Each run starts from a normalised Rademacher vector (lower-variance quadrature weights
        than a Gaussian start, as in Hutchinson's estimator) and takes ``num_steps`` HVPs.
        ``quadrature`` (:func:`slq_quadrature`): ``"averaged"`` (default; Laurie's averaged
        Gauss rule, more accurate at few steps for the same HVPs) or ``"gauss"`` (the Ritz
        values and weights, as in PyHessian). A run that finds an invariant subspace early has
        exact Ritz values and keeps the Gauss rule. ``density(grid)`` of the result (see
        :func:`slq_density`) smooths them into a density of the eigenvalue distribution
        ``(1/P) Σ_i δ(λ - λ_i)``.
        """
        _check_quadrature(quadrature)  # before any HVP is spent
        nodes, weights = [], []
        gen = torch.Generator(device="cpu").manual_seed(seed)
        steps = min(num_steps, self.dim)
        for r in range(num_runs):
            v0 = _rademacher(1, self.dim, gen, "cpu")[0]
            res = lanczos(self.hvp, self.dim, steps, seed=seed + r, v0=v0,
                          device=self.theta.device, stop="none")
            rule = quadrature if res["steps"] == steps and steps < self.dim else "gauss"
            n, w = slq_quadrature(res["alphas"], res["betas"], rule)
            nodes.append(n)
            weights.append(w)
        return {"nodes": nodes, "weights": weights, "quadrature": quadrature}


def ritz_error_bounds(ritz: torch.Tensor, s: torch.Tensor, beta: float,
                      bound: str = "residual") -> dict:
    """Error bounds of the extreme Ritz values ``θ_1 <= ... <= θ_m`` of a Lanczos run.

    The residual of Ritz pair ``i`` is ``r_i = |β_m s_{m,i}|``; some eigenvalue of ``H`` lies
    within ``r_i`` of ``θ_i`` (Weyl), a guaranteed bound. With ``bound="gap"`` the estimate
    ``min(r, r²/δ)`` is used, ``δ`` the distance to the neighbouring Ritz value (Kato–Temple
    with the Ritz gap standing in for the unknown eigenvalue gap)."""
    r = (beta * s[-1, :]).abs()
    out = {"residual_max": float(r[-1]), "residual_min": float(r[0]),
           "max": float(r[-1]), "min": float(r[0])}
    if bound == "gap" and ritz.numel() > 1:
        gmax, gmin = float(ritz[-1] - ritz[-2]), float(ritz[1] - ritz[0])
        if gmax > 0:
            out["max"] = min(out["max"], float(r[-1]) ** 2 / gmax)
        if gmin > 0:
            out["min"] = min(out["min"], float(r[0]) ** 2 / gmin)
    return out


def _tridiagonal_eigh(alphas: list[float], betas: list[float]):
    """Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal ``T`` with
    diagonal ``alphas`` and off-diagonal ``betas``."""
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        b = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        t = t + torch.diag(b, 1) + torch.diag(b, -1)
    return torch.linalg.eigh(t)


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    max_steps: int,
    tol: float = 1e-6,
    seed: int = 0,
    device: torch.device | str = "cpu",
    stop: str = "extremes",
    v0: torch.Tensor | None = None,
    bound: str = "residual",
) -> dict:
    """Lanczos tridiagonalisation with full re-orthogonalisation (in float64).

    ``q_{j+1} β_j = H q_j - α_j q_j - β_{j-1} q_{j-1}``, then ``q_{j+1}`` is orthogonalised
    against every earlier ``q`` twice (classical Gram-Schmidt, "twice is enough"). Returns the
    Ritz values (ascending), the eigenvectors ``s`` of ``T`` (columns), ``beta_last`` and the
    number of steps. ``stop="extremes"`` stops when the extreme Ritz values' error bounds
    (:func:`ritz_error_bounds`) are below ``tol·max|θ|`` (``stop="max"``: the largest only);
    ``stop="none"`` runs ``max_steps``
    (SLQ). An invariant subspace (``β ≈ 0``) ends the iteration: the Ritz values are then
    exact eigenvalues.
    """
    max_steps = max(1, min(max_steps, dim))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(dim, generator=gen, dtype=torch.float64) if v0 is None else v0.double().cpu()
    q = (q / q.norm()).to(device)
    # Lanczos vectors, grown by doubling (a full (max_steps, dim) block can be GBs)
    Q = torch.empty(min(16, max_steps + 1), dim, dtype=torch.float64, device=device)
    Q[0] = q
    alphas, betas = [], []
    beta = 0.0
    ritz = s = None
    for j in range(max_steps):
        w = matvec(Q[j]).double()  # in place from here: no new dim-sized buffers per step
        alpha = float(Q[j] @ w)
        w.sub_(Q[j], alpha=alpha)
        if j > 0:
            w.sub_(Q[j - 1], alpha=beta)
        for _ in range(2):
            w.addmv_(Q[: j + 1].T, Q[: j + 1] @ w, alpha=-1.0)
        alphas.append(alpha)
        beta = float(w.norm())
        last = j + 1 >= max_steps
        if stop == "none" and not last:  # SLQ: no eigh per step; max|α| <= max|θ| serves
            scale = max(abs(a) for a in alphas)  # to detect an invariant subspace (β ≈ 0)
            if beta <= 1e-12 * max(scale, 1e-300):
                ritz, s = _tridiagonal_eigh(alphas, betas)
                break
        else:
            ritz, s = _tridiagonal_eigh(alphas, betas)
            scale = max(float(ritz.abs().max()), 1e-300)
            if beta <= 1e-12 * scale or last:
                break
            if stop in ("extremes", "max") and j >= 1:
                e = ritz_error_bounds(ritz, s, beta, bound)
                if e["max"] <= tol * scale and (stop == "max" or e["min"] <= tol * scale):
                    break
        betas.append(beta)
        if j + 1 >= Q.shape[0]:
            grown = torch.empty(min(2 * Q.shape[0], max_steps + 1), dim, dtype=Q.dtype,
                                device=device)
            grown[: Q.shape[0]] = Q
            Q = grown
        torch.div(w, beta, out=Q[j + 1])
    return {"ritz": ritz, "ritz_vectors": s, "beta_last": beta, "steps": len(alphas),
            "alphas": alphas, "betas": betas[: len(alphas) - 1]}


def _check_quadrature(rule: str) -> None:
    if rule not in QUADRATURES:
        raise ConfigError(f"quadrature: one of {', '.join(QUADRATURES)}, got {rule!r}",
                          field="quadrature")


def slq_quadrature(alphas: Sequence[float], betas: Sequence[float],
                   rule: str = "averaged") -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of a quadrature for the spectral measure ``μ_v`` of a Lanczos run of
    ``k`` steps (``Σ_i (u_i·v)² δ(λ - λ_i)``, ``|v| = 1``), from its ``α_1..α_k, β_1..β_{k-1}``.

    ``"gauss"``: the Gauss rule ``G_k`` — nodes the eigenvalues of the Jacobi matrix ``T_k``,
    weights the squared first components of its eigenvectors; exact for polynomials of degree
    ``<= 2k - 1``.

    ``"averaged"`` (Laurie's averaged Gauss rule, the same ``k`` HVPs): ``(G_{k-1} + A_k) / 2``,
    where the anti-Gauss rule ``A_k`` is the Gauss rule of ``T_k`` with ``β_{k-1}`` replaced by
    ``√2 β_{k-1}``. ``A_k`` errs by exactly minus ``G_{k-1}``'s error on every polynomial of
    degree ``<= 2k - 1`` (``∫p dμ - A_k(p) = -(∫p dμ - G_{k-1}(p))``), so the average is exact to
    the same degree as ``G_k``, and on smooth functions such as the Gaussian kernel of
    :func:`slq_density` its leading errors cancel: on the 938-parameter conv net of
    ``benchmarks/hessian_vs_pyhessian.py`` the smoothed density's L1 error at 10 steps is 0.094
    against Gauss's 0.276, and 18 steps reach Gauss's 20-step error (docs/BENCHMARKS.md). Its
    weights are positive; its nodes may lie just outside the spectrum. With ``k < 2`` it is
    the Gauss rule."""
    _check_quadrature(rule)
    k = len(alphas)
    if rule == "gauss" or k < 2:
        theta, s = _tridiagonal_eigh(list(alphas), list(betas))
        return theta, s[0, :] ** 2
    g_nodes, g_s = _tridiagonal_eigh(list(alphas[: k - 1]), list(betas[: k - 2]))
    anti = list(betas[: k - 2]) + [math.sqrt(2.0) * betas[k - 2]]
    a_nodes, a_s = _tridiagonal_eigh(list(alphas), anti)
    return torch.cat([g_nodes, a_nodes]), 0.5 * torch.cat([g_s[0, :] ** 2, a_s[0, :] ** 2])


def parse_blocks(spec: str | Sequence[str] | dict[str, Sequence[str]]) -> dict[str, list[str]]:
    """Blocks of parameters: ``{"stage1": ["blocks.0", "blocks.1"], ...}``, a list of prefixes
    (one block each), or the CLI text ``"stage1=blocks.0,blocks.1;head"`` (``;`` between
    blocks, ``,`` between the name prefixes of one block, an optional ``name=``)."""
    if isinstance(spec, dict):
        return {str(k): list(v) for k, v in spec.items()}
    if not isinstance(spec, str):
        return {p: [p] for p in spec}
    out: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, body = part.rpartition("=")
        prefixes = [p.strip() for p in body.split(",") if p.strip()]
        if not prefixes:
            raise ConfigError(f"blocks: empty block in {spec!r}", field="blocks")
        out[name.strip() or body.strip()] = prefixes
    if not out:
        raise ConfigError(f"blocks: no block in {spec!r}", field="blocks")
    return out


def block_curvature(
    model: nn.Module, data: Batch | Iterable[Batch],
    blocks: str | Sequence[str] | dict[str, Sequence[str]], loss_fn: LossFn | str = "ce",
    hvp_mode: str = "auto", tol: float = 1e-3, max_iter: int = 100, trace_samples: int = 64,
    trace_method: str = "xtrace", trace_rel_tol: float | None = None, seed: int = 0,
    fold_batchnorm: bool = True,
) -> list[dict]:
    """Per-block curvature: for each block ``B`` of parameters, the diagonal block ``H_BB``
    of the Hessian (the Hessian of the loss in ``θ_B`` with the other parameters fixed) —
    its extreme eigenvalues (Lanczos) and its trace (``tr H = Σ_B tr H_BB``, so stage-wise
    traces add up to the whole trace). One record per block."""
    records = []
    for name, prefixes in parse_blocks(blocks).items():
        op = HessianOperator(model, data, loss_fn, params=prefixes, hvp_mode=hvp_mode,
                             fold_batchnorm=fold_batchnorm)
        ext = op.extreme_eigenvalues(tol=tol, max_iter=max_iter, seed=seed, bound="gap")
        tr = op.trace(trace_samples, seed=seed, rel_tol=trace_rel_tol, method=trace_method)
        records.append({
            "block": name, "params": ",".join(prefixes), "num_params": op.dim,
            "lambda_max": ext["lambda_max"], "lambda_min": ext["lambda_min"],
            "lanczos_converged": ext["converged"], "trace": tr["trace"],
            "trace_stderr": tr["trace_stderr"], "hvps": op.hvp_calls, "hvp": op.hvp_kind,
        })
    return records


TRACE_METHODS = ("xtrace", "hutch++", "hutchinson")


def _rademacher(k: int, dim: int, gen: torch.Generator, device) -> torch.Tensor:
    return (torch.randint(0, 2, (k, dim), generator=gen, dtype=torch.float64) * 2 - 1).to(device)


def _sphere(k: int, dim: int, gen: torch.Generator, device) -> torch.Tensor:
    """``k`` rows uniform on the sphere of radius ``√dim`` (XTrace's "improved" test vectors)."""
    g = torch.randn(k, dim, generator=gen, dtype=torch.float64)
    return (g * (math.sqrt(dim) / g.norm(dim=1, keepdim=True))).to(device)


def _mean_stderr(vals: torch.Tensor) -> tuple[float, float]:
    n = vals.numel()
    return float(vals.mean()), (float(vals.std() / math.sqrt(n)) if n > 1 else float("inf"))


def _stop(t: float, err: float, rel_tol: float | None, z: float) -> bool:
    return rel_tol is not None and z * err <= rel_tol * abs(t)


def _apply(matmat, rows: torch.Tensor, chunk: int) -> torch.Tensor:
    """``A`` applied to every row of ``rows`` (``chunk`` rows per batched call), in float64."""
    return torch.cat([matmat(rows[i:i + chunk]).double() for i in range(0, rows.shape[0], chunk)])


def xtrace_estimates(om: torch.Tensor, y: torch.Tensor, q: torch.Tensor, r: torch.Tensor,
                     z: torch.Tensor) -> torch.Tensor:
    """The ``m`` leave-one-out estimates of XTrace (Epperly, Tropp & Webber 2024, "improved").

    Columns: test vectors ``Ω`` (``n×m``, on the sphere of radius ``√n``), ``Y = AΩ = QR``
    and ``Z = AQ``. Estimate ``j`` is ``tr(Q₋ⱼᵀAQ₋ⱼ) + ωⱼᵀ(I−Q₋ⱼQ₋ⱼᵀ)A(I−Q₋ⱼQ₋ⱼᵀ)ωⱼ``
    (rescaled), with ``Q₋ⱼ`` an orthonormal basis of ``Y`` without column ``j``, evaluated in
    closed form from ``S = normalised columns of R⁻ᵀ`` (no extra products with ``A``); their
    mean is the XTrace estimate and their spread gives its standard error.
    """
    n, m = om.shape
    dp = lambda a, b: (a * b).sum(0)  # noqa: E731  diag(aᵀb)
    w = q.T @ om
    s = torch.linalg.inv(r).T
    s = s / s.norm(dim=0, keepdim=True)
    scale = (n - m + 1) / (n - w.norm(dim=0) ** 2 + (dp(s, w).abs() * s.norm(dim=0)) ** 2)
    h = q.T @ z
    hw = h @ w
    t = z.T @ om
    dsw, dshs = dp(s, w), dp(s, h @ s)
    core = (-dp(t, w) + dp(w, hw) + dsw * dp(s, r - hw) + dsw**2 * dshs
            + dp(t - h.T @ w, s) * dsw)
    return torch.trace(h) - dshs + core * scale


def _xtrace(matmat, dim: int, budget: int, gen, rel_tol, z: float, chunk: int, device) -> dict:
    """Adaptive XTrace: ``m`` test vectors cost ``2m`` products; ``m`` doubles until the
    stopping rule holds or the budget is spent. The sketch is extended, not redrawn: with
    ``[Y, Y'] = Q'R'`` the old ``Z = AQ`` is reused as ``Z U`` (``U = QᵀQ'_{:, :m}``, the
    rotation between two bases of one subspace), so only the new basis columns cost products."""
    m_max = max(2, min(budget // 2, dim - 1))
    om = y = q = zq = None
    m = min(8, m_max)
    while True:
        new = _sphere(m - (0 if om is None else om.shape[1]), dim, gen, device).T
        ynew = _apply(matmat, new.T, chunk).T
        om = new if om is None else torch.cat([om, new], 1)
        y = ynew if y is None else torch.cat([y, ynew], 1)
        qn, rn = torch.linalg.qr(y)
        k = 0 if q is None else q.shape[1]
        zold = zq @ (q.T @ qn[:, :k]) if k else torch.empty(dim, 0, dtype=y.dtype, device=device)
        zq = torch.cat([zold, _apply(matmat, qn[:, k:].T, chunk).T], 1)
        q = qn
        ests = xtrace_estimates(om, y, q, rn, zq)
        t, err = _mean_stderr(ests)
        if _stop(t, err, rel_tol, z) or m >= m_max:
            return {"trace": t, "trace_stderr": err, "samples": 2 * m,
                    "converged": _stop(t, err, rel_tol, z)}
        m = min(2 * m, m_max)


def _hutchinson(matmat, dim, budget, gen, rel_tol, z, chunk, device, basis=None,
                quadform=None) -> dict:
    """``(1/n) Σ vᵀ P A P v`` over Rademacher ``v`` with ``P = I − QQᵀ`` (``P = I`` without a
    basis), ``chunk`` probes per batched call, stopping when ``z·stderr <= rel_tol·|total|``.
    ``quadform(rows)``, when given, returns ``vᵀAv`` per row directly (else ``v·(Av)``); without
    a stopping rule all probes go to it at once."""
    if quadform is not None and rel_tol is None:
        chunk = budget
    base = 0.0 if basis is None else basis[1]
    vals: list[float] = []
    t, err = base, float("inf")
    while len(vals) < budget:
        v = _rademacher(min(chunk, budget - len(vals)), dim, gen, device)
        if basis is not None:
            v = v - (v @ basis[0]) @ basis[0].T
        vals += (quadform(v) if quadform is not None
                 else (v * matmat(v).double()).sum(1)).tolist()
        t, err = _mean_stderr(torch.tensor(vals, dtype=torch.float64))
        t += base
        if len(vals) >= 8 and _stop(t, err, rel_tol, z):
            break
    return {"trace": t, "trace_stderr": err, "samples": len(vals),
            "converged": _stop(t, err, rel_tol, z)}


def estimate_trace(
    matmat: Callable[[torch.Tensor], torch.Tensor], dim: int, budget: int,
    method: str = "xtrace", seed: int = 0, rel_tol: float | None = None, z: float = 2.0,
    chunk: int = 16, device: torch.device | str = "cpu",
    quadform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """Trace of a symmetric ``A`` given by ``matmat(rows) = rows @ A`` with at most ``budget``
    products.

    - ``hutchinson``: ``E[vᵀAv] = tr A``; variance ``2‖A‖_F²``-ish, error ``O(1/√n)``.
    - ``hutch++`` (Meyer, Musco, Musco & Woodruff 2021): ``Q = orth(A S)`` from ``budget/3``
      products, ``tr A = tr(QᵀAQ) + tr(PAP)`` with ``P = I − QQᵀ``; the first term is exact,
      the second is Hutchinson's on the deflated matrix (error ``O(1/n)`` for PSD ``A``).
    - ``xtrace`` (Epperly, Tropp & Webber 2024): every test vector serves both the low-rank
      sketch and the residual estimate, by leave-one-out (:func:`xtrace_estimates`).

    With ``budget >= dim`` the trace is exact from the basis vectors (``dim`` products).
    ``quadform(rows)``, when given, supplies Hutchinson's ``vᵀAv`` directly (e.g. by
    forward-over-forward AD, cheaper than ``v·(Av)``). Returns ``trace``, ``trace_stderr``
    (standard error of the random part), ``samples`` (the products used) and ``converged``
    (``z·stderr <= rel_tol·|trace|``).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    budget = max(2, int(budget))
    if budget >= dim:  # cheaper to be exact: Σ_j e_jᵀ A e_j
        eye = torch.eye(dim, dtype=torch.float64, device=device)
        t = float(sum(float(torch.diagonal(_apply(matmat, eye[i:i + chunk], chunk)[:, i:i + chunk]
                                           ).sum()) for i in range(0, dim, chunk)))
        return {"trace": t, "trace_stderr": 0.0, "samples": dim, "converged": True,
                "trace_method": "exact (basis vectors)", "error_bound": 0.0, "z": z}
    if method == "xtrace":
        out = _xtrace(matmat, dim, budget, gen, rel_tol, z, chunk, device)
    elif method == "hutch++":
        k = max(1, min(budget // 3, dim - 1))
        q = torch.linalg.qr(_apply(matmat, _rademacher(k, dim, gen, device), chunk).T)[0]
        top = float(torch.trace(q.T @ _apply(matmat, q.T, chunk).T))
        out = _hutchinson(matmat, dim, max(2, budget - 2 * k), gen, rel_tol, z, chunk, device,
                          basis=(q, top), quadform=quadform)
        out["samples"] += 2 * k
    else:
        out = _hutchinson(matmat, dim, budget, gen, rel_tol, z, chunk, device,
                          quadform=quadform)
    out.update(trace_method=method, error_bound=z * out["trace_stderr"], z=z)
    return out


def slq_density(
    nodes: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], grid: torch.Tensor,
    sigma: float | None = None,
) -> torch.Tensor:
    """Gaussian-smoothed SLQ density on ``grid``: ``(1/R) Σ_r Σ_j τ_rj N(grid; θ_rj, σ²)``."""
    allnodes = torch.cat([n.double() for n in nodes])
    if sigma is None:
        span = float(allnodes.max() - allnodes.min()) or 1.0
        sigma = span / 100
    dens = torch.zeros_like(grid, dtype=torch.float64)
    for n, w in zip(nodes, weights):
        z = (grid.double()[:, None] - n.double()[None, :]) / sigma
        dens += (w.double()[None, :] * torch.exp(-0.5 * z**2)).sum(1)
    return dens / (len(nodes) * sigma * math.sqrt(2 * math.pi))


def condition_numbers(eigenvalues: torch.Tensor, tol: float = 1e-8) -> dict:
    """Condition numbers of a spectrum, with the zero threshold stated.

    - ``condition_number = max|λ| / min|λ|`` over ``|λ| > tol·max|λ|`` (the non-zero spectrum;
      an indefinite Hessian, e.g. at a saddle, still has one);
    - ``condition_number_positive = λ_max / λ_min`` over the positive spectrum
      ``λ > tol·max|λ|`` (``None`` when no eigenvalue is positive).

    A zero Hessian (``max|λ| = 0``) has neither: both are ``None``.
    """
    lam = eigenvalues.double().flatten()
    amax = float(lam.abs().max()) if lam.numel() else 0.0
    out = {"zero_tol": tol, "num_zero": int(lam.numel()), "num_negative": 0, "num_positive": 0}
    if amax == 0.0:
        out.update(condition_number=None, condition_number_positive=None)
        return out
    thr = tol * amax
    nz = lam[lam.abs() > thr]
    pos = lam[lam > thr]
    out.update(
        condition_number=float(nz.abs().max() / nz.abs().min()),
        condition_number_positive=float(pos.max() / pos.min()) if pos.numel() else None,
        num_zero=int(lam.numel() - nz.numel()),
        num_negative=int((lam < -thr).sum()),
        num_positive=int(pos.numel()),
    )
    return out


@dataclass
class HessianSummary:
    lambda_max: float
    lambda_min: float
    trace: float
    trace_stderr: float
    condition_number: float | None
    condition_number_positive: float | None
    method: str
    num_params: int
    extra: dict

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d


def hessian_summary(
    op: HessianOperator,
    dense: str = "auto",
    dense_limit: int = 5000,
    tol: float = 1e-6,
    zero_tol: float = 1e-8,
    hutchinson_samples: int = 100,
    trace_method: str = "xtrace",
    slq_runs: int = 5,
    slq_steps: int = 40,
    max_iter: int = 200,
    seed: int = 0,
    slq_quadrature: str = "averaged",
) -> tuple[HessianSummary, dict]:
    """Everything ``pnnh probe hessian`` reports, exact where the model is small enough.

    ``dense="auto"`` uses the exact Hessian for ``dim <= dense_limit`` ("always"/"never"
    force it). Returns the summary and the spectrum for plotting: ``{"eigenvalues": ...}``
    (exact) or ``{"nodes": ..., "weights": ...}`` (SLQ).
    """
    use_dense = dense == "always" or (dense == "auto" and op.dim <= dense_limit)
    if use_dense:
        lam = torch.linalg.eigvalsh(op.dense().double())
        cn = condition_numbers(lam, zero_tol)
        summary = HessianSummary(
            lambda_max=float(lam[-1]), lambda_min=float(lam[0]), trace=float(lam.sum()),
            trace_stderr=0.0, condition_number=cn["condition_number"],
            condition_number_positive=cn["condition_number_positive"],
            method=(f"exact dense Hessian ({op.dim} params, eigvalsh); HVPs: {op.hvp_method}; "
                    f"zero threshold |λ| <= {zero_tol:g}·max|λ|"),
            num_params=op.dim,
            extra={"hvp": op.hvp_kind, "zero_tol": zero_tol, "num_zero": cn["num_zero"],
                   "num_negative": cn["num_negative"], "num_positive": cn["num_positive"],
                   "num_samples": op.num_samples, "batchnorm_folded": len(op.folded)},
        )
        return summary, {"eigenvalues": lam}
    ext = op.extreme_eigenvalues(tol=tol, max_iter=max_iter, seed=seed)
    tr = op.trace(hutchinson_samples, seed=seed, method=trace_method)
    lmax, lmin = ext["lambda_max"], ext["lambda_min"]
    amax = max(abs(lmax), abs(lmin))
    # From the extremes alone: the positive-spectrum ratio when the Hessian is positive
    # definite; the |λ| ratio needs the smallest |λ|, an interior eigenvalue, when indefinite.
    pd = amax > 0 and lmin > zero_tol * amax
    spec = op.spectral_density(slq_runs, slq_steps, seed=seed, quadrature=slq_quadrature)
    summary = HessianSummary(
        lambda_max=lmax, lambda_min=lmin, trace=tr["trace"], trace_stderr=tr["trace_stderr"],
        condition_number=lmax / lmin if pd else None,
        condition_number_positive=lmax / lmin if pd else None,
        method=(f"Lanczos (full re-orthogonalisation, tol {tol:g} relative Ritz residual, "
                f"{ext['iterations']} steps, converged={ext['converged']}); {trace_method} trace "
                f"({tr['samples']} HVPs); SLQ density ({slq_runs}x{slq_steps}, {slq_quadrature} "
                f"quadrature); "
                f"condition numbers only when λmin > {zero_tol:g}·max|λ| (else null: the "
                f"smallest |λ| is interior to the spectrum); HVPs: {op.hvp_method}"),
        num_params=op.dim,
        extra={"hvp": op.hvp_kind, "zero_tol": zero_tol, "lanczos_tol": tol,
               "lanczos_iterations": ext["iterations"],
               "lanczos_converged": ext["converged"], "hutchinson_samples": tr["samples"],
               "trace_method": trace_method, "slq_quadrature": slq_quadrature,
               "num_samples": op.num_samples, "batchnorm_folded": len(op.folded)},
    )
    return summary, spec


# -- plotting ---------------------------------------------------------------------------------
def plot_spectrum(spectra: dict[str, dict], path: str | Path) -> Path:
    """One curve per model: a histogram of exact eigenvalues or the SLQ density (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, spec in spectra.items():
        if "eigenvalues" in spec:
            lam = spec["eigenvalues"].double().cpu().numpy()
            ax.hist(lam, bins=80, density=True, histtype="step", label=f"{label} (exact)")
        else:
            lo = min(float(n.min()) for n in spec["nodes"])
            hi = max(float(n.max()) for n in spec["nodes"])
            pad = 0.05 * (hi - lo or 1.0)
            grid = torch.linspace(lo - pad, hi + pad, 400, dtype=torch.float64)
            dens = slq_density(spec["nodes"], spec["weights"], grid)
            ax.plot(grid.numpy(), dens.clamp_min(1e-12).numpy(), label=f"{label} (SLQ)")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue λ of the loss Hessian")
    ax.set_ylabel("spectral density")
    ax.set_title("Hessian spectrum")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


# -- CLI --------------------------------------------------------------------------------------
def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--shortcut", type=int, help="shortcut depth k for shortcut_linear/shortcut_mlp (0 = none)")
    a("--init", choices=["zero", "small", "xavier", "orthogonal"],
      help="initialisation for shortcut_linear/shortcut_mlp")
    a("--init-scale", type=float, help="scale s of the `small` init")
    a("--loss", choices=sorted(LOSSES), default="ce", help="ce (classification) or mse")
    a("--params", default="all",
      help="parameters to differentiate: all, or comma-separated name prefixes (e.g. blocks)")
    a("--dense", choices=["auto", "always", "never"], default="auto",
      help="exact dense Hessian: auto = when the parameter count is <= --dense-limit")
    a("--dense-limit", type=int, default=5000)
    a("--tol", type=float, default=1e-6, help="Lanczos relative Ritz-residual tolerance")
    a("--zero-tol", type=float, default=1e-8,
      help="eigenvalues with |λ| <= zero_tol·max|λ| count as zero in condition numbers")
    a("--max-iter", type=int, default=200, help="Lanczos steps at most")
    a("--hutchinson-samples", type=int, default=100,
      help="HVPs for the trace estimate (any --trace-method)")
    a("--trace-method", choices=list(TRACE_METHODS), default="xtrace",
      help="stochastic trace estimator (xtrace: exact on the sketched spectrum, stated error)")
    a("--hvp", choices=list(HVP_MODES), default="auto",
      help="HVP kind: auto = double backward over a kept graph, falling back where a "
           "derivative is missing; fwd-rev keeps no graph between HVPs (less memory)")
    a("--no-fold-batchnorm", dest="fold_batchnorm", action="store_false",
      help="keep eval-mode BatchNorms as they are (by default each is folded into the layer "
           "before it inside the loss: the same Hessian, a cheaper graph)")
    a("--blocks", default=None,
      help="per-block curvature, e.g. 'stage1=blocks.0,blocks.1,blocks.2;head': λmax, λmin, "
           "trace of each diagonal Hessian block, in hessian_blocks.csv/json")
    a("--slq-runs", type=int, default=5)
    a("--slq-steps", type=int, default=40)
    a("--slq-quadrature", choices=list(QUADRATURES), default="averaged",
      help="the density's quadrature per Lanczos run: averaged (Laurie's averaged Gauss rule, "
           "more accurate at few steps for the same HVPs) or gauss (Ritz values, as PyHessian)")


def _loss_targets(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                  loss: str) -> torch.Tensor:
    """``--loss mse`` on class labels regresses the one-hot vectors ``e_y`` (the squared loss
    of the linear-network analyses); float targets are used as they are."""
    if loss != "mse" or targets.is_floating_point():
        return targets
    with torch.no_grad():
        width = model(inputs[:1]).shape[-1]
    if int(targets.max()) >= width:
        raise ConfigError(f"--loss mse: labels go up to {int(targets.max())} but the model has "
                          f"{width} outputs", field="loss")
    return F.one_hot(targets.long(), width).to(inputs.dtype if inputs.is_floating_point()
                                               else torch.float32)


def prepare(args: argparse.Namespace) -> None:
    """``--shortcut/--init/--init-scale`` become model options of the ``--model`` built here."""
    model_args = dict(getattr(args, "model_args", {}) or {})
    for flag, key in (("shortcut", "shortcut"), ("init", "init"), ("init_scale", "scale")):
        if getattr(args, flag, None) is not None:
            if not args.model:
                raise ConfigError(f"--{flag.replace('_', '-')}: applies to a --model built "
                                  "here, not to --checkpoint/--model-file", field=flag)
            model_args[key] = getattr(args, flag)
    args.model_args = model_args


def _summarize_target(t: ProbeTarget, args: argparse.Namespace) -> tuple[dict, dict]:
    """One model's ``hessian.json`` record and its spectral density (for the plot)."""
    targets = _loss_targets(t.model, t.inputs, t.targets, args.loss)
    op = HessianOperator(t.model, (t.inputs, targets), args.loss, args.params,
                         hvp_mode=getattr(args, "hvp", "auto"),
                         fold_batchnorm=getattr(args, "fold_batchnorm", True))
    summary, spec = hessian_summary(
        op, dense=args.dense, dense_limit=args.dense_limit, tol=args.tol,
        zero_tol=args.zero_tol, hutchinson_samples=args.hutchinson_samples,
        slq_runs=args.slq_runs, slq_steps=args.slq_steps, max_iter=args.max_iter,
        seed=args.seed, trace_method=getattr(args, "trace_method", "xtrace"),
        slq_quadrature=getattr(args, "slq_quadrature", "averaged"),
    )
    return {"model": t.label, **summary.to_dict()}, spec


def _block_records(t: ProbeTarget, args: argparse.Namespace) -> list[dict]:
    """``--blocks``: the curvature of each named diagonal block of one model's Hessian."""
    blocks = block_curvature(t.model, (t.inputs, t.targets), args.blocks, args.loss,
                             hvp_mode=getattr(args, "hvp", "auto"), tol=args.tol,
                             max_iter=args.max_iter, seed=args.seed,
                             trace_samples=args.hutchinson_samples,
                             trace_method=getattr(args, "trace_method", "xtrace"),
                             fold_batchnorm=getattr(args, "fold_batchnorm", True))
    return [{"model": t.label, **b} for b in blocks]


def run(targets: Sequence[ProbeTarget], args: argparse.Namespace, out: Path) -> ProbeResult:
    """One record per model (``hessian.json`` is a list whatever the number of models),
    ``hessian_spectrum.png`` and, with ``--blocks``, ``hessian_blocks.csv``/``.json``."""
    records, spectra, block_records, notes = [], {}, [], []
    for t in targets:
        rec, spectra[t.label] = _summarize_target(t, args)
        if getattr(args, "blocks", None):
            block_records += _block_records(t, args)
        records.append(rec)
        cn = rec["condition_number"]
        notes.append(f"{t.label}: lambda_max={rec['lambda_max']:.6g} "
                     f"lambda_min={rec['lambda_min']:.6g} trace={rec['trace']:.6g} "
                     f"condition_number={'n/a' if cn is None else f'{cn:.6g}'} "
                     f"({rec['num_params']} params)")
    files = [plot_spectrum(spectra, out / "hessian_spectrum.png")]
    if block_records:
        files += write_records(block_records, out, "hessian_blocks")
        notes += [f"{b['model']} block {b['block']}: lambda_max={b['lambda_max']:.6g} "
                  f"lambda_min={b['lambda_min']:.6g} trace={b['trace']:.6g} "
                  f"({b['num_params']} params)" for b in block_records]
    notes.append(f"hessian: {out / 'hessian.json'}")
    return ProbeResult(records, None, notes, files)
