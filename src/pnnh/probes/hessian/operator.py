"""The Hessian of a loss as an operator: Hessian-vector products (HVPs) of a model's loss.

The loss ``L(θ) = (1/N) Σ_i ℓ(f(x_i; θ), y_i)`` over a flat parameter vector ``θ`` (all the
trainable parameters or a subset, :func:`select_parameters`) has one primitive, the HVP, in
one of two kinds::

    Hv = ∂(∇L(θ)·v)/∂θ                   (rev-rev: double backward over a gradient graph
                                          built once per batch and kept across HVPs; Pearlmutter
                                          1994, the scheme of PyHessian, Yao et al. 2020)
    Hv = ∂/∂ε ∇L(θ + ε v) |_{ε=0}         (fwd-rev: ``jvp(grad(L), θ, v)``, no graph kept)

Both are exact up to float rounding (no error bound to state beyond it; the tests compare them
with ``torch.autograd.functional.hessian`` and with finite differences). ``hvp_mode="auto"``
runs rev-rev (the faster on CPU) and falls back to the other kind, then to attention on the math
SDPA backend, where a derivative is missing (:meth:`HessianOperator._resolve`); the result's
``method`` says which ran. Eval-mode BatchNorms are folded into the layer before them inside
the loss (:mod:`pnnh.probes.bnfold`: the same Hessian, a cheaper graph). On CUDA the products
run in IEEE float32, not TF32 (:func:`full_float32`).

The loss may be averaged over one batch or, exactly, over a whole data loader: the HVP of the
mean loss over ``N`` samples is ``Σ_b (n_b/N) H_b v`` for batch means ``L_b``, one batch's
graph alive at a time (so each HVP recomputes every batch's forward and gradient).

The estimators are methods of the operator (the curvlinops / PyHessian shape) and live in their
own modules: :mod:`.lanczos` (extreme eigenvalues), :mod:`.trace` (trace), :mod:`.density`
(spectral density).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from pnnh.errors import ConfigError
from pnnh.probes.bnfold import foldable_pairs, folded
from pnnh.probes.common import cross_entropy, math_attention, select_output
from pnnh.probes.hessian.density import _check_quadrature, slq_quadrature
from pnnh.probes.hessian.hutchinson import _rademacher
from pnnh.probes.hessian.lanczos import _dot, _norm, lanczos, ritz_error_bounds
from pnnh.probes.hessian.memory import activation_bytes, columns, hvp_bytes, parse_memory
from pnnh.probes.hessian.progress import enabled, stage_bar
from pnnh.probes.hessian.substitutes import exact_substitutes
from pnnh.probes.hessian.trace import TRACE_METHODS, estimate_trace

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]

HVP_MODES = ("auto", "fwd-rev", "rev-rev")
BATCHED_CPU_DIM = 50_000  # hvp_many batches vectors on a CPU up to this many parameters
BLOCK_FWD_REV = 8  # hvp_many: CPU blocks of this many rows or more go forward-over-reverse
HVP_KINDS = {
    "fwd-rev": "fwd-rev (torch.func forward-over-reverse, jvp of grad: no graph kept)",
    "rev-rev": "rev-rev (double backward over a gradient graph built once per batch)",
}


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


LOSSES: dict[str, LossFn] = {"ce": cross_entropy, "mse": mse_loss}


def _world_size() -> int:
    """Ranks of the initialised default process group (``torchrun``), else 1."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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


def copy_product(dst: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(h)`` for one parameter's product (``dst`` contiguous, ``h``'s shape), moved
    as a 2-D transpose where ``h`` is one.

    Autograd's double backward returns a convolution weight's product ``(out, in, kh, kw)``
    laid out ``(in, out, kh, kw)`` in memory; for a 1x1 kernel (ResNet-50's bottlenecks) that
    is a transposed ``out × in`` matrix. ``copy_`` moves a 2-D transpose in cache-sized tiles
    but a 4-D one element by element: ResNet-50's whole product goes into a row in memory
    about 40% faster (one thread, ``benchmarks/hvp_copy.py``). Below ``2¹⁸`` entries (most of
    EfficientNet-B0's kernels) the tiles save nothing. The same bits either way: a copy."""
    if h.dim() > 2 and h.numel() >= 2**18 and not h.is_contiguous():
        m = h.squeeze()
        if m.dim() == 2 and m.stride(0) == 1 and m.stride(1) == m.shape[0]:
            return dst.view(m.shape).copy_(m)
    return dst.copy_(h)


def _reorth_note(res: dict) -> str:
    """How a Lanczos run kept its basis orthogonal, for ``reorthogonalisation`` in results."""
    if res["window"]:
        how = (f", partial: {res['reorth_steps']} of {res['steps']} steps"
               if res["reorth"] == "partial" else "")
        return f"local: against the latest {res['vectors_kept']} vectors (max_memory){how}"
    if res["reorth"] == "partial":
        return f"partial: {res['reorth_steps']} of {res['steps']} steps (residuals measured)"
    return "full"


def precision_note(tol: float, floor: float, dtype: torch.dtype) -> str | None:
    """One line when ``tol`` asks for less than the Lanczos vectors' precision allows
    (:func:`~.lanczos.rounding_floor`), else ``None``."""
    if tol >= floor:
        return None
    name = str(dtype).replace("torch.", "")
    return (f"tol {tol:g} is below what {name} vectors allow here ({floor:.1g} relative); "
            f"the error bounds reported include that floor"
            + ("; --float64 (the model and batch in float64) goes below it"
               if dtype != torch.float64 else ""))


class HessianOperator:
    """The Hessian of ``loss_fn(model(x), y)`` w.r.t. (a subset of) the model's parameters.

    ``data`` is one ``(inputs, targets)`` batch or an iterable of batches (a DataLoader); with
    several batches the loss is the exact mean over all samples. Vectors are flat tensors of
    length :attr:`dim` in the order of :attr:`names`. The model is used as it is (call
    ``model.eval()`` first for BatchNorm running statistics).

    ``fold_batchnorm=True``: eval-mode BatchNorms are folded into the convolution or linear
    layer before them inside the loss (:mod:`pnnh.probes.bnfold`: the same function of every
    parameter, so the same Hessian, with a cheaper graph) where that pays, i.e. where the
    layer's output over the largest batch is at least as large as its weight
    (``fold_batchnorm="all"``: every pair that can be folded); :attr:`folded` lists the pairs.

    ``allow_tf32=False``: gradients and HVPs run in full float32 precision on CUDA, even where
    TF32 is on (cuDNN's default for convolutions; see :func:`full_float32`). ``True`` keeps
    the global settings: faster on large convolutions, with ~1e-3 relative rounding per HVP.

    ``max_memory`` (bytes, or text such as ``"2G"``; default :data:`~.memory.MAX_MEMORY`,
    1 GiB) bounds what the estimators hold beyond the model and one HVP's graph: the Lanczos
    vectors (:meth:`lanczos_vectors`), the trace sketches (:func:`~.trace.plan_trace`) and the
    vectors of one batched HVP pass (:meth:`hvp_chunk`), whatever the number of HVPs.

    ``progress``: a bar per stage on stderr (:mod:`~.progress`: HVPs done out of the budget,
    the current estimate and error bound); ``None`` shows them where stderr is a terminal.

    Data parallel: where a process group is initialised (``torchrun``; :func:`_world_size`)
    each rank passes its own shard of the data, and every gradient and HVP is all-reduced
    (:meth:`_all_sum`, weighted by the shards' sample counts), so every rank holds one shard's
    graph and gets the single-process result.

    Models as users bring them: a forward that returns a ``ModelOutput``, dict or tuple is
    measured on ``select_output(out, output)`` (``logits`` by default); inputs may be token ids
    (only parameters are differentiated); ``"ce"`` is per token for ``(batch, tokens, vocab)``
    logits; activations with no double backward in PyTorch (``hardsigmoid``) are computed by
    exact substitutes inside the loss (:mod:`.substitutes`), which :attr:`hvp_method` names.
    """

    _hvps, _bar = 0, None  # hvp_calls' count; the running stage's bar, if any

    def __init__(
        self,
        model: nn.Module,
        data: Batch | Iterable[Batch],
        loss_fn: LossFn | str = "ce",
        params: str | Sequence[str] | None = None,
        hvp_mode: str = "auto",
        fold_batchnorm: bool | str = True,
        allow_tf32: bool = False,
        max_memory: int | float | str | None = None,
        progress: bool | None = None,
        output: str | int | None = None,
    ):
        if hvp_mode not in HVP_MODES:
            raise ConfigError(f"hvp_mode: one of {', '.join(HVP_MODES)}, got {hvp_mode!r}",
                              field="hvp_mode")
        self.hvp_mode = hvp_mode
        self.allow_tf32 = allow_tf32
        self.output = output
        self.substituted: dict[str, int] = {}  # activations computed by exact substitutes
        self.hvp_kind: str | None = None  # resolved on the first HVP (see hvp_method)
        self.math_attention = False
        self.hvp_fallbacks: list[str] = []
        self._graph: tuple[tuple[torch.Tensor, ...], torch.Tensor] | None = None
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
        self.num_samples, self._max_batch, first = 0, 0, None  # _max_batch: the largest batch
        for x, _ in self._iter():  # one pass over the data: its size, and a sample to fold on
            self.num_samples += int(x.shape[0])
            self._max_batch = max(self._max_batch, int(x.shape[0]))
            if first is None and x.shape[0]:
                first = x[:1].clone()
        if self.num_samples == 0:
            raise ConfigError("hessian: the data has no samples", field="data")
        self.folded: list[tuple[str, str]] = []
        self.fold_error: str | None = None  # why folding was given up, if it was
        if fold_batchnorm:
            try:  # one sample shows the graph; a model that cannot run on it is not folded
                self.folded = foldable_pairs(
                    model, first, None if fold_batchnorm == "all" else self._max_batch)
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                self.fold_error = f"{type(e).__name__}: {str(e).strip()[:120]}"
        self.hvp_calls = 0
        self.batched: bool | None = None  # hvp_many: batched passes (None: on accelerators)
        self.quadratic_kind: str | None = None  # quadratic_forms: "fwd-fwd" or "hvp" once run
        self.block_kind: str | None = None  # hvp_many's CPU blocks: "fwd-rev" once it ran
        self.max_memory = parse_memory(max_memory)  # bytes: see hvp_chunk, lanczos_vectors
        self._sample, self._per_hvp = first, None
        self.progress = progress  # a bar per stage: None = where stderr is a terminal
        self.world_size = _world_size()  # > 1 under torchrun: data-parallel, see _all_sum
        if self.world_size > 1:
            self.local_samples = self.num_samples
            self.num_samples = int(self._all_sum(torch.tensor([float(self.num_samples)]))[0])

    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Data parallel (``world_size > 1``): the sum over the ranks of ``t`` (in place), so
        each rank's ``Σ_b (n_b/N) ·`` over its own shard adds up to the mean over all ``N``
        samples; the same result, bit for bit, on every rank, which then all run the same
        Lanczos / trace / SLQ iteration. A single process: ``t`` itself."""
        if self.world_size > 1:
            torch.distributed.all_reduce(t)
        return t

    @property
    def hvp_calls(self) -> int:
        """HVPs run so far (a running stage's progress bar advances with it)."""
        return self._hvps

    @hvp_calls.setter
    def hvp_calls(self, value: int) -> None:
        if self._bar is not None and value > self._hvps:
            self._bar.update(value - self._hvps)
        self._hvps = value

    @contextlib.contextmanager
    def _stage(self, desc: str, total: int):
        """The bar of one stage (``None`` when progress is off), current while it runs."""
        with stage_bar(enabled(self.progress), desc, total) as bar:
            outer, self._bar = self._bar, bar
            try:
                yield bar
            finally:
                self._bar = outer

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
        if self.substituted:
            text += ("; " + ", ".join(sorted(self.substituted)) + " computed by an exact "
                     "substitute with a second derivative (PyTorch's has none)")
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
        return self._loss_of(self._unflatten(flat), x, y)

    def _loss_of(self, params: dict[str, torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
        with folded(self.model, self.folded), exact_substitutes(self.substituted):
            out = functional_call(self.model, {**self._fixed, **params}, (x,))
        return self.loss_fn(select_output(out, self.output), y)

    def _attention(self):
        return math_attention() if self.math_attention else contextlib.nullcontext()

    def _precision(self):
        return contextlib.nullcontext() if self.allow_tf32 else full_float32()

    def _hvp_batch(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward-over-reverse ``jvp(grad L, θ, v)``: one forward and one backward pass."""
        g = grad(lambda t: self._loss(t, x, y))
        return jvp(g, (self.theta,), (v,))[1]

    def _gradient_graph(self, x: torch.Tensor, y: torch.Tensor):
        """``(per-parameter views of the θ leaf, ∇L(θ) with its graph)``; kept across HVPs when
        there is one batch."""
        if self._graph is not None:
            return self._graph
        leaf = self.theta.detach().requires_grad_(True)
        parts = self._unflatten(leaf)
        with torch.enable_grad():
            g = torch.autograd.grad(self._loss_of(parts, x, y), leaf, create_graph=True)[0]
        graph = (tuple(parts.values()), g)
        if self._one_batch():
            self._graph = graph
            self._graph_tag = ("rev-rev", self.math_attention)
        return graph

    def _one_batch(self) -> bool:
        return isinstance(self._batches, list) and len(self._batches) == 1

    def _hvp_rev_rev(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """Double backward ``∂(∇L·v)/∂θ``; with one batch the gradient graph is built once and
        kept, so each HVP is a single backward pass (PyHessian's scheme). ``v`` may be a
        ``(k, dim)`` block: then the k HVPs share one batched backward pass.

        The products are taken per parameter (at the views of the flat leaf, not the leaf:
        no concatenation inside autograd) and each is copied once into its slice of ``out``
        where one is given (a Lanczos vector's own row: no fresh ``dim``-sized allocation per
        HVP), whatever its memory layout (a channels-last gradient is not first made
        contiguous by a ``reshape``: on ConvNeXt-Tiny that was a second copy of most of ``Hv``)."""
        parts, g = self._gradient_graph(x, y)
        batched = v.dim() == 2
        hv = torch.autograd.grad(g, parts, grad_outputs=v, retain_graph=True,
                                 is_grads_batched=batched, allow_unused=True)
        if out is None or out.dtype != v.dtype or out.shape != v.shape:
            out = torch.empty_like(v)
        lead, start = tuple(v.shape[:-1]), 0
        for h, p in zip(hv, parts):
            dst = out[..., start:start + p.numel()]
            start += p.numel()
            if h is None:  # a parameter the loss does not use: its block of H is zero
                dst.zero_()
            else:
                copy_product(dst.view(lead + tuple(p.shape)), h.detach())
        return out

    def _hvp_kind_batch(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        with self._attention():
            if self.hvp_kind == "rev-rev":
                return self._hvp_rev_rev(v, x, y, out)
            if v.dim() == 2:
                return vmap(self._hvp_batch, in_dims=(0, None, None))(v, x, y)
            return self._hvp_batch(v, x, y)

    def _resolve(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
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
                result = self._hvp_kind_batch(v, x, y, out)
            except (NotImplementedError, RuntimeError) as e:  # a missing derivative, or OOM
                self._graph = None
                errors.append(e)
                why = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
                self.hvp_fallbacks.append(f"{kind}{' (math attention)' if math_attn else ''}"
                                          f" failed: {type(e).__name__}: {why}")
                continue
            return result
        self.hvp_kind = None
        raise errors[0]

    def _batch_mean(self, fn) -> torch.Tensor:
        """``Σ_b (n_b/N) fn(x_b, y_b)``: a per-batch quantity averaged exactly over all the data,
        one batch's graph alive at a time."""
        out = None
        with self._precision():
            for x, y in self._iter():
                w = x.shape[0] / self.num_samples
                term = fn(x, y) if w == 1.0 else w * fn(x, y)  # one batch: no scaled copy
                out = term if out is None else out + term
        return self._all_sum(out)

    def _hvp_data(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``Σ_b (n_b/N) H_b v`` over the batches (into ``out`` where the kind can write
        there: double backward over one batch)."""
        out = out if self._one_batch() else None
        return self._batch_mean(lambda x, y: self._resolve(v, x, y, out) if self.hvp_kind is None
                                else self._hvp_kind_batch(v, x, y, out))

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
        if self.world_size > 1:
            total = float(self._all_sum(torch.tensor([total], dtype=torch.float64))[0])
        return total, self._all_sum(g)

    def gradient(self) -> torch.Tensor:
        """``∇L(θ)``: taken from the kept gradient graph where double backward will run (so the
        graph serves the HVPs that follow), else by :meth:`loss_and_grad`."""
        if self._one_batch() and self.hvp_mode != "fwd-rev" and self.hvp_kind in (None, "rev-rev"):
            try:  # _resolve keeps this graph if rev-rev (as tagged) then works
                with self._attention(), self._precision():
                    g = self._gradient_graph(*next(self._iter()))[1].detach()
                if self.world_size > 1:  # this shard's mean, weighted and summed over ranks
                    g = self._all_sum(g * (self.local_samples / self.num_samples))
                return g
            except (NotImplementedError, RuntimeError):
                self._graph = None
        return self.loss_and_grad()[1]

    def start_vector(self, start: str, seed: int) -> torch.Tensor | None:
        """Lanczos start direction (:func:`~.lanczos.lanczos` normalises it): ``random`` (None:
        Gaussian), ``gradient`` (``∇L`` itself, no copy: it lies mostly in the top eigenspace of
        the loss Hessian, free where the gradient graph is kept) or ``mixed`` (``g/‖g‖ + r/‖r‖``,
        overlapping both ends of the spectrum)."""
        if start == "random":
            return None
        g = self.gradient().to(self.vector_dtype)  # in the vectors' dtype: no float64 copies
        norm = _norm(g)  # float64-accumulated; not finite where any entry is not
        if not math.isfinite(norm) or norm == 0.0:
            return None
        if start == "gradient":
            return g
        g = g / norm  # not in place: g may be the kept graph's own gradient
        r = torch.randn(self.dim, generator=torch.Generator().manual_seed(seed),
                        dtype=self.vector_dtype).to(g.device)
        return r.div_(_norm(r)).add_(g)

    def hvp(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``H v`` for a flat vector ``v`` (averaged exactly over all batches); written into
        ``out`` (a ``dim``-sized tensor, returned) where one is given."""
        self.hvp_calls += 1
        hv = self._hvp_data(v.to(self.theta), out)
        if out is None or hv is out:
            return hv
        return out.copy_(hv)

    def hvp_many(self, vs: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """``H v`` for every row ``v`` of ``vs``: the rows go through in blocks of
        ``chunk_size`` (all at once by default; at most :meth:`hvp_chunk`, the memory cap) as
        one batched pass (``vmap`` for fwd-rev, ``is_grads_batched`` for rev-rev); one at a time
        where an op has no batching rule, and on a CPU for more than ``BATCHED_CPU_DIM``
        parameters unless :attr:`batched` is set (on the development CPU the batched backward
        was slower per vector than single HVPs on ResNet-20, 272k parameters, and faster on a
        938-parameter conv net)."""
        vs = vs.to(self.theta)
        batched = self._use_batched()
        if not batched:
            self.hvp_calls += vs.shape[0]
            return torch.stack([self._hvp_data(v) for v in vs]) if len(vs) else vs.clone()
        step = min(chunk_size or max(1, vs.shape[0]), self.hvp_chunk())
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
            chunk_size = min(chunk_size, self.hvp_chunk())
            try:
                out = torch.cat([self._quadratic_fwd_fwd(vs[i:i + chunk_size])
                                 for i in range(0, vs.shape[0], chunk_size)])
                self.quadratic_kind = "fwd-fwd"
                self.hvp_calls += vs.shape[0]
                return out.double()
            except (NotImplementedError, RuntimeError):
                pass
        self.quadratic_kind = "hvp"
        # row by row, accumulated in float64 slices: no float64 copy of the (k, dim) products
        return torch.tensor([_dot(v, h) for v, h in zip(vs, self.hvp_many(vs))],
                            dtype=torch.float64)

    # -- memory ---------------------------------------------------------------------------
    @property
    def vector_dtype(self) -> torch.dtype:
        """The dtype Lanczos stores its vectors in: the model's (float32 or float64)."""
        return self.theta.dtype if self.theta.dtype == torch.float64 else torch.float32

    def lanczos_vectors(self) -> int:
        """Lanczos vectors kept within :attr:`max_memory`, less four for the ``dim``-sized
        buffers of each step (the start, the product, its scaled copy, the new vector); 3 at
        least."""
        size = torch.empty((), dtype=self.vector_dtype).element_size()
        return max(3, columns(self.max_memory, self.dim, size) - 4)

    def hvp_chunk(self) -> int:
        """Vectors per batched HVP pass within :attr:`max_memory`: the budget over the
        estimated cost of one more vector (:func:`~.memory.hvp_bytes`: the activations of one
        sample, measured once by a forward pass with hooks, times the largest batch, plus four
        vectors of ``dim``)."""
        if self._per_hvp is None:
            self._per_hvp = hvp_bytes(self.dim, self.theta.element_size(),
                                      self._max_batch, self._sample_activations())
        return max(1, int(self.max_memory // self._per_hvp))

    def _sample_activations(self) -> int:
        """Bytes of the activations of one sample (0 where the model cannot run on one); the
        buffers are copies, so train-mode BatchNorm statistics do not move."""
        state = {n: b.clone() for n, b in self.model.named_buffers()}
        state.update({n: p.detach() for n, p in self.model.named_parameters()})
        try:
            with self._attention(), self._precision():
                return activation_bytes(
                    lambda x: functional_call(self.model, state, (x,)), self.model,
                    self._sample)
        except (RuntimeError, ValueError, TypeError, IndexError):
            return 0

    def dense(self, chunk_size: int = 256) -> torch.Tensor:
        """The exact ``dim × dim`` Hessian: ``H e_j`` for every basis vector (vmapped HVPs)."""
        eye = torch.eye(self.dim, dtype=self.theta.dtype, device=self.theta.device)
        with self._stage("dense Hessian", self.dim):
            h = self.hvp_many(eye, chunk_size)
        return 0.5 * (h + h.T)

    def extreme_eigenvalues(
        self, tol: float = 1e-6, max_iter: int = 200, seed: int = 0, which: str = "both",
        bound: str = "residual", start: str = "auto", reorth: str = "partial",
    ) -> dict:
        """Largest and smallest (algebraic) eigenvalues by Lanczos.

        ``reorth="partial"`` (default) re-orthogonalises the basis only where Simon's estimate
        of its loss of orthogonality passes ``√u`` and measures the residuals at the stop
        (:class:`~.lanczos._Partial`: the Ritz values as accurate, a few passes over the basis
        a run instead of one or two a step); ``"full"`` every step. Stops when the Ritz
        residual ``r = ||Hu − θu||`` (``|β_m s_{m,i}|`` with full re-orthogonalisation,
        measured with partial) of both extreme Ritz
        values (a guaranteed bound: some eigenvalue lies within ``r`` of ``θ``) is
        ``<= tol·max|θ|`` at two consecutive steps with the values settled (see
        :func:`~.lanczos.lanczos`), or after ``max_iter`` steps (``converged`` says which).
        ``tol`` below the vectors' rounding floor (:func:`~.lanczos.rounding_floor`) is raised
        to it, and ``precision_note`` says so. ``error_bound_*`` is the residual
        (``bound="residual"``) or the Kato–Temple estimate ``min(r, r²/gap)``
        (``bound="gap"``: much tighter once the end is resolved, not guaranteed, no longer a
        stopping rule), plus the rounding floor. ``which="max"`` waits for the largest one only
        (``lambda_min`` is then the current, possibly unconverged, smallest Ritz value).
        ``start``: see :meth:`start_vector`; ``auto`` is ``gradient`` for ``which="max"``, else
        ``mixed``.
        """
        if bound not in ("residual", "gap"):
            raise ConfigError(f"bound: residual or gap, got {bound!r}", field="bound")
        if reorth not in ("partial", "full"):
            raise ConfigError(f"reorth: partial or full, got {reorth!r}", field="reorth")
        if start not in ("auto", "random", "gradient", "mixed"):
            raise ConfigError(f"start: auto, random, gradient or mixed, got {start!r}",
                              field="start")
        if start == "auto":
            start = "gradient" if which == "max" else "mixed"
        calls0 = self.hvp_calls
        v0 = self.start_vector(start, seed)
        with self._stage("Lanczos", min(max_iter, self.dim)) as bar:
            show = None if bar is None else (lambda t, s, b: bar.set_postfix_str(
                "λmax {:.6g} ± {:.2g}, λmin {:.6g} ± {:.2g}".format(
                    float(t[-1]), (e := ritz_error_bounds(t, s, b, bound))["max"],
                    float(t[0]), e["min"]), refresh=False))
            res = lanczos(self.hvp, self.dim, max_iter, tol=tol, seed=seed, v0=v0,
                          device=self.theta.device, stop="max" if which == "max" else "extremes",
                          dtype=self.vector_dtype, max_vectors=self.lanczos_vectors(),
                          on_step=show, out_arg=True, reorth=reorth)
        del v0
        theta = res["ritz"]
        scale = max(float(theta.abs().max()), 1e-300)
        err = ritz_error_bounds(theta, res["ritz_vectors"], res["beta_last"], bound,
                                residuals=res["residuals"])
        floor = res["rounding_floor"]  # what the vectors' precision allows (relative)
        bound_max, bound_min = err["max"] + floor * scale, err["min"] + floor * scale
        return {
            "lambda_max": float(theta[-1]),
            "lambda_min": float(theta[0]),
            "residual_max": err["residual_max"],
            "residual_min": err["residual_min"],
            "error_bound_max": bound_max,
            "error_bound_min": bound_min,
            "rounding_floor": floor,
            "precision_note": precision_note(tol, floor, self.vector_dtype),
            "bound": bound,
            "start": start,
            "iterations": res["steps"],
            "hvps": self.hvp_calls - calls0,
            "converged": bool(err["residual_max"] <= max(tol, floor) * scale
                              and (which == "max"
                                   or err["residual_min"] <= max(tol, floor) * scale)),
            "ritz_values": theta.tolist(),
            "lanczos_vectors": res["vectors_kept"],
            "reorthogonalisation": _reorth_note(res),
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
        with self._stage(f"trace ({method})", min(num_samples, self.dim)) as bar:
            show = None if bar is None else (lambda t, err: bar.set_postfix_str(
                f"trace {t:.6g} ± {z * err:.2g}", refresh=False))
            out = estimate_trace(self.hvp_many, self.dim, num_samples, method=method,
                                 seed=seed, rel_tol=rel_tol, z=z, chunk=chunk,
                                 device=self.theta.device, quadform=self.quadratic_forms,
                                 max_memory=self.max_memory, on_estimate=show)
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
            v0 = _rademacher(1, self.dim, gen, "cpu")[0].to(self.vector_dtype)  # ±1: exact
            with self._stage(f"SLQ run {r + 1}/{num_runs}", steps):
                res = lanczos(self.hvp, self.dim, steps, seed=seed + r, v0=v0,
                              device=self.theta.device, stop="none", dtype=self.vector_dtype,
                              max_vectors=self.lanczos_vectors(), out_arg=True)
            rule = quadrature if res["steps"] == steps and steps < self.dim else "gauss"
            n, w = slq_quadrature(res["alphas"], res["betas"], rule)
            nodes.append(n)
            weights.append(w)
        return {"nodes": nodes, "weights": weights, "quadrature": quadrature}


