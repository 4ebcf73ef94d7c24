"""Dissipating inputs: how much of the input survives each layer of a network.

``dissipation(model, inputs)`` runs ``inputs`` through ``model`` (eval mode, no gradients,
in batches) with forward hooks on named modules, and returns one record per probed layer,
in execution order. For a layer's features ``H`` (``N`` samples, flattened to ``d`` units
each) and the inputs ``X`` (flattened to ``p`` values each):

``surviving_fraction``
    Share of (sample, unit) pairs in which the unit is *active* and *carries input signal*::

        s = 1/(N d) * sum_{n,j} [ |h_nj| > tau_b ] * [ sd_n(h_.j) > tau ]

    ``tau = tol * rms(H)`` (``tau_b``: the same over the sample's batch). A unit zeroed by a
    ReLU for sample ``n`` is not active for it; a unit whose value does not change from one
    input to another (dead, or a constant bias) carries no input signal for any sample.
    A ReLU layer at He initialisation gives ``s ~ 1/2``, an identity layer on dense inputs 1,
    a layer that outputs zeros 0.

``input_r2``
    How well the input can be read back *linearly* from the layer. The samples are split at
    random (``seed``) into fit (1/2), validation (1/4) and test (1/4) parts; the ridge
    regression ``xhat = mean_fit x + W^T (h - mean_fit h)`` is fitted on the fit part,

        W = (C_hh + lam I)^-1 C_hx,    lam = ridge * tr(C_hh) / d

    (``C``: the fit part's centred (co)variances; ``ridge`` relative, so the score does not
    depend on the features' scale), ``ridge`` is picked from a grid (default 1e-4 ... 10) by
    the validation error, and the score is the test part's::

        R^2 = 1 - sum_test ||x_n - xhat_n||^2 / sum_test ||x_n - mean_fit x||^2

    1: the input is all there; 0: no better than the mean input (a constant layer scores
    exactly 0); slightly below 0: the small-sample noise of a layer that holds nothing.

``cosine_collapse``
    Mean cosine similarity between the (uncentred) representations of distinct inputs::

        c = 1/(N(N-1)) * sum_{n != m} <h_n, h_m> / (||h_n|| ||h_m||)

    Two all-zero representations count as identical (1), zero against non-zero as 0. It
    tends to 1 when every input is mapped to the same direction, i.e. the representation no
    longer depends on the input. Computed in one pass: ``sum_{n!=m} = ||sum_n u_n||^2 - N``
    for unit vectors ``u_n``.

``effective_rank``
    Roy & Vetterli's effective rank of the centred features: with the singular values
    ``sigma_i`` of ``H - mean(H)`` and ``p_i = sigma_i / sum_k sigma_k``,
    ``exp(-sum_i p_i log p_i)``; from 1 (one direction) to ``min(N, d)``; 0 for constant
    features.

``depth`` is the number of weight layers (leaf modules owning a parameter of two or more
dimensions: Linear, Conv, ...) that have run when the layer's output is produced, so nets of
different kinds line up on one axis. A module may declare ``num_weight_layers`` (e.g. 2 for a
block that holds its weights itself), or has a plain form ``to_plain_layers()`` (PNNH blocks:
its Linear/Conv layers are counted); its submodules are then not counted. A model without
any weight layer gets the layer's position (1, 2, ...) instead.

Memory and time: features are never stored. Each hook adds the batch's sufficient
statistics (``sum h``, ``sum h h^T``, ``sum h x^T`` for each split, per-unit counts and
moments) into float64 accumulators, so a 1000-layer MLP on 1000 samples takes one pass and a
few hundred MB. Layers wider than ``max_features`` are reduced by a seeded count sketch (each
unit is added, with a random sign, into one of ``max_features`` buckets; inner products are
preserved in expectation) before the ridge fit and the rank; the surviving fraction and the
cosine always use the full features.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from pnnh.errors import PnnhError
from pnnh.probes.common import ProbeResult, ProbeTarget, find_blocks, first_tensor, require_embedding

BN_FIXED = True  # layer statistics gathered in chunks: BatchNorm batch statistics held fixed

NAME = "dissipation"
DESCRIPTION = "surviving units, input reconstructability, similarity collapse, rank"

METRICS = ("surviving_fraction", "input_r2", "cosine_collapse", "effective_rank")
COLUMNS = ("layer", "depth") + METRICS
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
)
_WEIGHT_LEAVES = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)


# ----------------------------------------------------------------------------- layers
def default_layers(model: nn.Module) -> list[str]:
    """The blocks :func:`pnnh.plainness.find_blocks` finds (``blocks.*``, ``layer1.*``,
    ``encoder.layer.*``, ...) if any, else every leaf activation / Linear / Conv module
    (registration order; records come out in execution order)."""
    try:
        return [name for name, _ in find_blocks(model)]
    except PnnhError:
        pass
    names = [
        name for name, m in model.named_modules()
        if name and not list(m.children()) and isinstance(m, _ACTIVATIONS + _WEIGHT_LEAVES)
    ]
    if not names:
        raise PnnhError(
            "dissipation: the model has no blocks and no activation/Linear/Conv leaf "
            "modules; pass layers=[...] (names from model.named_modules())", field="layers"
        )
    return names


def resolve_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    """Check ``layers`` (names or globs such as ``blocks.*``) against ``model.named_modules()``."""
    if layers is None:
        return default_layers(model)
    if isinstance(layers, str):
        layers = [layers]
    valid = [name for name, _ in model.named_modules() if name]
    out: list[str] = []
    for pat in layers:
        matches = [pat] if pat in valid else (
            fnmatch.filter(valid, pat) if any(c in pat for c in "*?[") else []
        )
        if not matches:
            shown = ", ".join(valid[:60]) + (f", ... ({len(valid) - 60} more)" if len(valid) > 60
                                             else "")
            raise PnnhError(
                f"dissipation: no layer named {pat!r} in {type(model).__name__}; "
                f"valid names: {shown}", field="layers"
            )
        out += [m for m in matches if m not in out]
    return out


def _declared_weight_layers(m: nn.Module) -> int | None:
    """``m.num_weight_layers`` if set, else the weight layers of ``m.to_plain_layers()`` (the
    PNNH blocks' plain form) if it has one, else None."""
    declared = getattr(m, "num_weight_layers", None)
    if declared is not None:
        return int(declared)
    to_plain = getattr(m, "to_plain_layers", None)
    if callable(to_plain):
        try:
            return sum(isinstance(layer, _WEIGHT_LEAVES) for layer in to_plain())
        except Exception:  # a module whose plain form needs more than itself: not declared
            return None
    return None


def _num_weight_layers(m: nn.Module) -> int:
    declared = _declared_weight_layers(m)
    if declared is not None:
        return declared
    if list(m.children()):
        return 0
    return int(any(p.ndim >= 2 for p in m.parameters(recurse=False)))


def _weight_layer_modules(model: nn.Module) -> dict[nn.Module, int]:
    """Modules counted by ``depth`` and their weight layers: those declaring a count (their
    submodules are then not counted again) and leaves owning a parameter of 2+ dimensions."""
    out: dict[nn.Module, int] = {}
    declared: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(prefix) for prefix in declared):
            continue
        count = _declared_weight_layers(m)
        if count is not None:
            declared.append(name + "." if name else "")
        else:
            count = _num_weight_layers(m)
        if count:
            out[m] = count
    return out


# ----------------------------------------------------------------------------- statistics
class _LayerStats:
    """Float64 sufficient statistics of one layer's features over all batches."""

    def __init__(self, name: str, max_features: int, seed: int):
        self.name = name
        self.max_features = max_features
        self.seed = seed
        self.order: int | None = None  # position in execution order
        self.depth = 0
        self.sketch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.n = 0
        self.d = 0
        self.split: dict[int, dict] = {}  # split id (0 fit, 1 validation, 2 test) -> sums

    def _reduce(self, h: torch.Tensor) -> torch.Tensor:
        """Count sketch to ``max_features`` columns when the layer is wider than that."""
        d = h.shape[1]
        if d <= self.max_features:
            return h
        if self.sketch is None:
            g = torch.Generator().manual_seed(self.seed + 7919)
            bucket = torch.randint(0, self.max_features, (d,), generator=g)
            sign = torch.randint(0, 2, (d,), generator=g) * 2 - 1
            self.sketch = (bucket.to(h.device), sign.to(device=h.device, dtype=h.dtype))
        bucket, sign = self.sketch
        out = torch.zeros(h.shape[0], self.max_features, dtype=h.dtype, device=h.device)
        return out.index_add_(1, bucket, h * sign)

    def add(self, h: torch.Tensor, x: torch.Tensor, part: torch.Tensor, tol: float) -> None:
        """Add one batch: ``h`` the layer's output, ``x`` the flattened inputs, ``part`` the
        samples' split (0 fit, 1 validation, 2 test)."""
        h = h.detach().reshape(h.shape[0], -1)
        h = h.float() if h.dtype in (torch.float16, torch.bfloat16) or not h.is_floating_point() else h
        x = x.to(dtype=h.dtype)
        if self.n == 0:
            self.d = h.shape[1]
            # Every metric is scale-invariant; dividing by the first batch's largest value
            # keeps squares finite in float32 (an unscaled deep ResNet grows like 3^blocks).
            top = float(h.abs().amax()) if h.numel() else 0.0
            self.scale = 1.0 / top if 0 < top < math.inf else 1.0
            h = h * self.scale
            # Shift by the first batch's means: sums of squares of shifted data do not cancel
            # catastrophically when a feature's mean dwarfs its spread (collapsed layers).
            self.shift_h, self.shift_x = h.mean(0), x.mean(0)
            z = torch.zeros(self.d, dtype=torch.float64, device=h.device)
            self.unit_sum, self.unit_sq, self.active, self.cos_sum = z, z.clone(), z.clone(), z.clone()
            self.sq_total = 0.0
            self.zero_rows = 0
            self.nonfinite = False
            self.rows: list | None = []
        elif h.shape[1] != self.d:
            raise PnnhError(
                f"dissipation: layer {self.name!r} changed its feature size between batches "
                f"({self.d} -> {h.shape[1]})", field="layers"
            )
        else:
            h = h * self.scale
        self.n += h.shape[0]
        if not bool(torch.isfinite(h).all()):
            self.nonfinite = True
            return
        sq_rows = (h * h).sum(1)
        self.sq_total += float(sq_rows.sum(dtype=torch.float64))
        # surviving fraction: per-unit activity counts and (shifted) moments
        tau = tol * math.sqrt(float(sq_rows.mean()) / max(self.d, 1))
        self.active += (h.abs() > tau).sum(0)
        hc = h - self.shift_h
        self.unit_sum += hc.sum(0, dtype=torch.float64)
        self.unit_sq += (hc * hc).sum(0, dtype=torch.float64)
        # cosine: sum of unit-normalised rows
        norms = sq_rows.sqrt()
        nz = norms > 0
        self.zero_rows += int((~nz).sum())
        self.cos_sum += (h[nz] / norms[nz, None]).sum(0, dtype=torch.float64)
        # ridge / rank on (possibly sketched) features: while there are no more samples than
        # features the rows themselves are the cheaper record (n x k instead of k x k, and
        # an n x n solve at the end); past that, per-split sums of products.
        r = self._reduce(hc)
        xc = x - self.shift_x
        if self.rows is not None:
            self.rows.append((r, xc, part))
            if sum(b[0].shape[0] for b in self.rows) > r.shape[1]:
                rows, self.rows = self.rows, None
                for b in rows:
                    self._accumulate(*b)
        else:
            self._accumulate(r, xc, part)

    def _accumulate(self, r: torch.Tensor, xc: torch.Tensor, part: torch.Tensor) -> None:
        for pid in range(3):
            sel = part == pid
            if not bool(sel.any()):
                continue
            hr, xr = r[sel], xc[sel]
            s = self.split.get(pid)
            if s is None:
                k, p = r.shape[1], xc.shape[1]
                z = dict(dtype=torch.float64, device=r.device)
                s = self.split[pid] = {
                    "n": 0.0,
                    "h": torch.zeros(k, **z), "x": torch.zeros(p, **z),
                    "hh": torch.zeros(k, k, **z), "hx": torch.zeros(k, p, **z),
                    "xx": torch.zeros((), **z),
                }
            s["n"] += hr.shape[0]
            s["h"] += hr.sum(0, dtype=torch.float64)
            s["x"] += xr.sum(0, dtype=torch.float64)
            s["hh"] += (hr.T @ hr).double()
            s["hx"] += (hr.T @ xr).double()
            s["xx"] += (xr * xr).sum(dtype=torch.float64)

    # ------------------------------------------------------------------ metrics
    def finish(self, tol: float, ridge: Sequence[float]) -> dict:
        n, d = self.n, self.d
        if self.nonfinite:  # the model itself overflowed: nothing to measure
            nan = float("nan")
            return {"layer": self.name, "depth": self.depth, **{m: nan for m in METRICS}}
        rms = math.sqrt(self.sq_total / max(n * d, 1))
        mean = self.unit_sum / n  # of the shifted features
        sd = (self.unit_sq / n - mean * mean).clamp_min(0).sqrt()
        live = sd > tol * rms
        surviving = float(self.active[live].sum()) / (n * d) if n * d else 0.0
        z = self.zero_rows
        pair_sum = float(self.cos_sum @ self.cos_sum) - (n - z) + z * (z - 1)
        cosine = pair_sum / (n * (n - 1))
        if not bool(live.any()):  # constant features: the mean input is all one can predict
            r2, rank = 0.0, 0.0
        elif self.rows is not None:
            r2, rank = self._from_rows(ridge)
        else:
            r2, rank = self._ridge_r2(ridge), self._effective_rank()
        if r2 is None:  # an empty split (too few samples)
            r2 = float("nan")
        return {
            "layer": self.name,
            "depth": self.depth,
            "surviving_fraction": surviving,
            "input_r2": r2,
            "cosine_collapse": cosine,
            "effective_rank": rank,
        }

    def _from_rows(self, ridge: Sequence[float]) -> tuple[float | None, float]:
        """Both metrics from the stored rows (few samples): dual ridge, SVD of the rows."""
        h = torch.cat([b[0] for b in self.rows]).double()
        x = torch.cat([b[1] for b in self.rows]).double()
        part = torch.cat([b[2] for b in self.rows])
        rank = _entropy_rank(torch.linalg.svdvals(h - h.mean(0)))
        if any(not bool((part == pid).any()) for pid in range(3)):
            return None, rank
        fit = part == 0
        mu_h, mu_x = h[fit].mean(0), x[fit].mean(0)
        hc, xc = h - mu_h, x - mu_x
        hf, xf = hc[fit], xc[fit]
        # W(lam) = Hf^T (Hf Hf^T + lam I)^-1 Xf; with Hf Hf^T = U diag(e) U^T the prediction
        # for samples H is (H Hf^T U) diag(1 / (e + lam)) (U^T Xf).
        e, u = torch.linalg.eigh(hf @ hf.T)
        e = e.clamp_min(0)
        b = u.T @ xf

        def sse(pid: int, lam: float) -> float:
            sel = part == pid
            pred = ((hc[sel] @ hf.T) @ u) / (e + lam) @ b
            return float(((xc[sel] - pred) ** 2).sum())

        sst = {pid: float((xc[part == pid] ** 2).sum()) for pid in (1, 2)}
        return _select(sse, sst, float(e.sum()) / h.shape[1], ridge), rank

    def _ridge_r2(self, ridge: Sequence[float]) -> float | None:
        if any(pid not in self.split for pid in range(3)):
            return None
        fit = self.split[0]
        mu_h, mu_x = fit["h"] / fit["n"], fit["x"] / fit["n"]
        c_hh, c_hx, _ = self._centred(fit, mu_h, mu_x)
        if not bool(torch.isfinite(c_hh).all() & torch.isfinite(c_hx).all()):
            return float("nan")
        # W(lam) = V diag(1 / (e + lam)) V^T C_hx with C_hh = V diag(e) V^T; each split's
        # squared error follows from its centred sums, rotated into the same basis.
        e, v = torch.linalg.eigh(c_hh)
        e = e.clamp_min(0)
        b = v.T @ c_hx
        rotated = {}
        for pid in (1, 2):
            hh, hx, xx = self._centred(self.split[pid], mu_h, mu_x)
            rotated[pid] = (v.T @ hh @ v, v.T @ hx, float(xx))

        def sse(pid: int, lam: float) -> float:
            hh, hx, xx = rotated[pid]
            w = b / (e + lam)[:, None]
            return xx - 2 * float((w * hx).sum()) + float((w * (hh @ w)).sum())

        sst = {pid: rotated[pid][2] for pid in (1, 2)}
        return _select(sse, sst, float(e.sum()) / c_hh.shape[0], ridge)

    def _centred(self, s: dict, mu_h: torch.Tensor, mu_x: torch.Tensor):
        """Σ (h-μh)(h-μh)ᵀ, Σ (h-μh)(x-μx)ᵀ, Σ ||x-μx||² of a split, about given means."""
        n = s["n"]
        hh = s["hh"] - torch.outer(s["h"], mu_h) - torch.outer(mu_h, s["h"]) + n * torch.outer(mu_h, mu_h)
        hx = s["hx"] - torch.outer(s["h"], mu_x) - torch.outer(mu_h, s["x"]) + n * torch.outer(mu_h, mu_x)
        xx = s["xx"] - 2 * (s["x"] @ mu_x) + n * (mu_x @ mu_x)
        return hh, hx, xx

    def _effective_rank(self) -> float:
        parts = [s for s in self.split.values()]
        n = sum(s["n"] for s in parts)
        mu = sum(s["h"] for s in parts) / n
        hh = sum(s["hh"] for s in parts) - n * torch.outer(mu, mu)
        if not bool(torch.isfinite(hh).all()):
            return float("nan")
        return _entropy_rank(torch.linalg.eigvalsh(hh).clamp_min(0).sqrt())


def _select(sse, sst: dict, mean_var: float, ridge: Sequence[float]) -> float:
    """Test-split R^2 of the ridge whose relative penalty scores best on the validation split."""
    if not sst[2] > 0:
        return 0.0
    if not mean_var > 0:
        return 1 - sse(2, 1.0) / sst[2]
    best = min(ridge, key=lambda r: sse(1, r * mean_var))
    return 1 - sse(2, best * mean_var) / sst[2]


def _entropy_rank(sv: torch.Tensor) -> float:
    """``exp(entropy)`` of the normalised singular values (Roy & Vetterli 2007)."""
    total = float(sv.sum())
    if not total > 0:
        return 0.0
    p = sv / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


# ----------------------------------------------------------------------------- the probe
def split_parts(n: int, seed: int = 0) -> torch.Tensor:
    """Each sample's split for the input read-back, drawn with ``seed``: 0 (fit, half of the
    samples), 1 (validation, a quarter: picks the ridge penalty), 2 (test, a quarter)."""
    part = torch.full((n,), 2, dtype=torch.long)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    part[perm[: n // 2]] = 0
    part[perm[n // 2: n // 2 + n // 4]] = 1
    return part


def _check_arguments(inputs, batch_size: int, ridge) -> list[float]:
    if not isinstance(inputs, torch.Tensor):
        raise PnnhError("dissipation: inputs must be a tensor (N, ...)", field="inputs")
    if inputs.shape[0] < 4:
        raise PnnhError(f"dissipation: need at least 4 inputs, got {inputs.shape[0]}",
                        field="inputs")
    if batch_size < 1:
        raise PnnhError(f"dissipation: batch_size must be >= 1, got {batch_size}",
                        field="batch_size")
    ridges = [float(r) for r in (ridge if isinstance(ridge, Sequence) else [ridge])]
    if not ridges or not all(r > 0 for r in ridges):
        raise PnnhError(f"dissipation: ridge penalties must be positive, got {ridge}",
                        field="ridge")
    return ridges


class _Hooks:
    """Forward hooks feeding one :class:`_LayerStats` per (layer, call): a module that runs
    ``k`` times in one forward pass (a shared ``nn.ReLU``) gives records ``name``,
    ``name@1``, ..., ``name@{k-1}``. Outputs that are not ``(batch, ...)`` tensors are an error
    for named layers and skipped (``self.skipped``) for default ones."""

    def __init__(self, model, names, named_by_user: bool, max_features, seed, tol,
                 embedding: nn.Module | None = None):
        self.stats: dict[str, _LayerStats] = {}
        self.skipped: dict[str, str] = {}
        self.named_by_user, self.max_features, self.seed, self.tol = (
            named_by_user, max_features, seed, tol)
        self.counted = _weight_layer_modules(model)
        modules = dict(model.named_modules())
        self.handles = [m.register_forward_hook(self._count) for m in self.counted]
        self.handles += [modules[n].register_forward_hook(self._probe(n)) for n in names]
        if embedding is not None:  # token ids: the input is what the embedding makes of them
            self.handles.append(embedding.register_forward_hook(self._embedded))

    def start_batch(self, xb: torch.Tensor, part: torch.Tensor) -> None:
        self.weight_layers, self.order, self.calls = 0, 0, {}
        self.x, self.part = xb.reshape(xb.shape[0], -1), part

    def _embedded(self, _mod, _inp, out):
        t = first_tensor(out)
        if t is not None and t.shape[0] == self.x.shape[0]:
            self.x = t.reshape(t.shape[0], -1).float()

    def _count(self, mod, _inp, _out):
        self.weight_layers += self.counted[mod]

    def _probe(self, name: str):
        def hook(_mod, _inp, out):
            call = self.calls.get(name, 0)
            self.calls[name] = call + 1
            label = name if call == 0 else f"{name}@{call}"
            t = first_tensor(out)
            if t is None or t.ndim == 0 or t.shape[0] != self.x.shape[0]:
                why = (f"does not output a (batch, ...) tensor (got {type(out).__name__}"
                       f"{tuple(t.shape) if t is not None else ''})")
                if self.named_by_user:
                    raise PnnhError(f"dissipation: layer {label!r} {why}", field="layers")
                self.skipped[label] = why
                return
            st = self.stats.get(label)
            if st is None:
                st = self.stats[label] = _LayerStats(label, self.max_features, self.seed)
            if st.order is None:
                st.order, st.depth = self.order, self.weight_layers
            self.order += 1
            st.add(t, self.x, self.part, self.tol)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def dissipation(
    model: nn.Module,
    inputs: torch.Tensor,
    layers: Sequence[str] | None = None,
    *,
    batch_size: int = 1000,
    ridge: float | Sequence[float] = RIDGES,
    tol: float = 1e-4,
    max_features: int = 1024,
    seed: int = 0,
) -> list[dict]:
    """Per-layer dissipation records (see the module docstring for the four metrics).

    ``inputs``: a tensor ``(N, ...)`` the model accepts, ``N >= 4``. ``layers``: module names
    (or globs) from ``model.named_modules()``; default :func:`default_layers`. Token ids
    (integer inputs) are read back as the vectors the model's input embedding makes of them
    (:func:`~pnnh.probes.common.input_embedding`): ``x`` above is the embedding output. The model runs
    in eval mode under ``torch.no_grad()`` in batches of ``batch_size``; its training flag is
    restored afterwards. Returns dicts with keys ``layer, depth, surviving_fraction, input_r2,
    cosine_collapse, effective_rank``, in execution order. A module that runs several times
    per forward pass gives one record per call (``name``, ``name@1``, ...). A default layer
    that never runs (``MultiheadAttention.out_proj``, whose weights attention uses directly)
    or whose output is not ``(batch, ...)`` is skipped with a :class:`UserWarning`; a layer
    the user named is an error.
    """
    ridges = _check_arguments(inputs, batch_size, ridge)
    n = inputs.shape[0]
    names = resolve_layers(model, layers)
    parts = split_parts(n, seed)
    embedding = None if inputs.is_floating_point() else require_embedding(model, "dissipation")
    hooks = _Hooks(model, names, layers is not None, max_features, seed, tol, embedding)
    was_training = model.training
    try:
        model.eval()
        device = next((p.device for p in model.parameters()), inputs.device)
        with torch.no_grad():
            for start in range(0, n, batch_size):
                xb = inputs[start:start + batch_size].to(device)
                hooks.start_batch(xb, parts[start:start + batch_size].to(device))
                model(xb)
    finally:
        hooks.remove()
        model.train(was_training)
    missing = [name for name in names if name not in hooks.stats and name not in hooks.skipped]
    if missing and layers is not None:
        raise PnnhError(
            f"dissipation: layer(s) {', '.join(missing)} never ran in the forward pass",
            field="layers",
        )
    notes = [f"{m} never ran in the forward pass" for m in missing]
    notes += [f"{m} {why}" for m, why in hooks.skipped.items()]
    if notes:
        warnings.warn("dissipation: skipped default layer(s): " + "; ".join(notes), stacklevel=2)
    if not hooks.stats:
        raise PnnhError("dissipation: no probed layer produced a (batch, ...) output; name "
                        "the layers to probe (--layers)", field="layers")
    ordered = sorted(hooks.stats.values(), key=lambda s: s.order)
    records = [s.finish(tol, ridges) for s in ordered]
    if not hooks.counted:  # no weight layers to count: the layer's position
        for i, r in enumerate(records, 1):
            r["depth"] = i
    return records


# ----------------------------------------------------------------------------- command line
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """``pnnh probe dissipation`` flags (the common ones come from :mod:`pnnh.cli`)."""
    parser.add_argument("--layers", nargs="+", metavar="NAME",
                        help="module names or globs to probe (default: the children of "
                             "`blocks`, else every activation/Linear/Conv leaf)")
    parser.add_argument("--ridge", type=float, nargs="+", default=list(RIDGES),
                        help="relative ridge penalties tried for the input read-back (the "
                             "validation split picks one; default 1e-4 ... 10)")
    parser.add_argument("--batch-size", type=int, default=1000,
                        help="samples per forward pass (default 1000)")
    parser.add_argument("--max-features", type=int, default=1024,
                        help="count-sketch wider layers to this many features (default 1024)")


def prepare(args: argparse.Namespace) -> None:
    if args.max_features < 1:
        raise PnnhError(f"--max-features: must be >= 1, got {args.max_features}",
                        field="max_features")


def run(targets: Sequence[ProbeTarget], args: argparse.Namespace, out: Path) -> ProbeResult:
    """:func:`dissipation` of every target: records (with a ``model`` column when several),
    ``dissipation.png`` (each metric against depth) and the last layer's metrics per model."""
    from pnnh.probes.plots import plot_metric_vs_layer

    several = len(targets) > 1
    records: list[dict] = []
    notes: list[str] = []
    for t in targets:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            recs = dissipation(t.model, t.inputs, args.layers, batch_size=args.batch_size,
                               ridge=args.ridge, max_features=args.max_features, seed=args.seed)
        notes += [f"{t.label}: note: {w.message}" for w in caught]
        records += [{"model": t.label, **r} if several else r for r in recs]
    figure = plot_metric_vs_layer(
        [{"model": r.get("model", targets[0].label), **r} for r in records], METRICS,
        out / "dissipation.png",
        title=f"dissipation ({args.dataset or ('synthetic' if args.input_shape else 'mnist1d')}, "
              f"{len(targets[0].inputs)} samples)",
    )
    last = {r.get("model", targets[0].label): r for r in records}
    notes += [f"{label}: last probed layer {r['layer']} (depth {r['depth']}): "
              f"surviving {r['surviving_fraction']:.3f}  input R2 {r['input_r2']:.3f}  "
              f"cosine {r['cosine_collapse']:.4f}  eff. rank {r['effective_rank']:.1f}"
              for label, r in last.items()]
    notes.append(f"wrote {out / 'dissipation.csv'}, dissipation.json, dissipation.png")
    columns = (["model"] if several else []) + list(COLUMNS)
    return ProbeResult(records, columns, notes, [figure])
