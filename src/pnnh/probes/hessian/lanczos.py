"""The Lanczos iteration with full re-orthogonalisation, and the error bounds of its Ritz values.

Lanczos (1950); the analysis used here is Parlett, *The Symmetric Eigenvalue Problem* (1998),
ch. 11-13, and Golub & Van Loan, *Matrix Computations* (2013), §10.1. After ``m`` steps from a
unit ``q_1`` the orthonormal ``Q_m = [q_1..q_m]`` and the tridiagonal ``T_m`` satisfy::

    H Q_m = Q_m T_m + β_m q_{m+1} e_mᵀ

so for each eigenpair ``(θ_i, s_i)`` of ``T_m`` (a Ritz pair, with Ritz vector ``u = Q_m s_i``)
the residual is ``‖Hu − θ_i u‖ = |β_m s_{m,i}|``. Error bounds (:func:`ritz_error_bounds`):

- residual: some eigenvalue of ``H`` lies within ``r_i = |β_m s_{m,i}|`` of ``θ_i`` (guaranteed);
- gap: ``min(r_i, r_i²/δ_i)`` with ``δ_i`` the distance to the neighbouring Ritz value
  (Kato–Temple with the Ritz gap standing in for the unknown eigenvalue gap; an estimate).

The extreme Ritz values converge first (Kaniel–Paige–Saad), so a handful of HVPs gives
``λmax``/``λmin`` to ``tol`` where power iteration (PyHessian) needs many more. The same runs,
with ``stop="none"``, feed stochastic Lanczos quadrature (:mod:`.density`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

_CHUNK = 2**16  # sets the slices of a dot product widened to float64 (see _dots)
_DGKS = 0.7071  # a second Gram-Schmidt pass when it removed more than this much of w's norm


def ritz_error_bounds(ritz: torch.Tensor, s: torch.Tensor, beta: float,
                      bound: str = "residual", residuals: torch.Tensor | None = None) -> dict:
    """Error bounds of the extreme Ritz values ``θ_1 <= ... <= θ_m`` of a Lanczos run.

    The residual of Ritz pair ``i`` is ``r_i = |β_m s_{m,i}|``; some eigenvalue of ``H`` lies
    within ``r_i`` of ``θ_i`` (Weyl), a guaranteed bound. With ``bound="gap"`` the estimate
    ``min(r, r²/δ)`` is used, ``δ`` the distance to the neighbouring Ritz value (Kato–Temple
    with the Ritz gap standing in for the unknown eigenvalue gap). ``residuals``: the ``r_i``
    as a run measured them (``lanczos(...)["residuals"]``: with partial re-orthogonalisation,
    :func:`_measured_residuals`), in place of ``|β_m s_{m,i}|``."""
    r = (beta * s[-1, :]).abs() if residuals is None else residuals
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


def _dots(held: torch.Tensor, w: torch.Tensor, norm: bool = False) -> torch.Tensor:
    """``held @ w`` (one dot per row of ``held``) in float64, in slices of a few thousand
    columns: each slice of the rows and of ``w`` is widened to float64 in one scratch block
    (:func:`_scratch`, cache-sized) and multiplied there by a float64 matrix-vector product, so
    no reduction over a model-sized vector runs in float32. ``norm``: ``‖w‖²`` too, as one more
    entry after the dots, from the same block (``w``'s slice is one of its rows).

    Error analysis (float32 vectors): the product of two float32 numbers (24-bit significands)
    has at most 48 significant bits, so each product is exact in float64; only the ``n``
    float64 additions round, in whatever order the BLAS takes, so
    ``|fl(a·b) − a·b| <= n·2⁻⁵³·Σ|a_i b_i| <= n·2⁻⁵³·‖a‖‖b‖``: 9.3e-10 at 8M entries, on
    any CPU, any thread count (the bound :func:`rounding_floor` counts, with the float32 unit
    roundoff ``u`` on top). A float32 BLAS dot (``held @ w``, MKL's sgemv) has no such bound:
    its error grows with the length of each of its accumulators' runs, which depends on the
    CPU's vector width and MKL's dispatch (2.6e-4·‖a‖‖b‖ measured at 8M entries with a large
    component in common), and that loss of orthogonality put float32 Lanczos's λmax 2e-5 low
    at 1M entries. 2.4x the time of the sgemv, 0.6x that of forming the products in float32
    and storing them in float64 (``torch.mul(..., out=float64)``, PyTorch's slow casting
    loop), which also rounded each product (``benchmarks/lanczos_dots.py``)."""
    lead = held.shape[:-1]
    if held.dtype == torch.float64 and w.dtype == torch.float64:
        c = held @ w  # float64 throughout: BLAS's order moves the result by ~n·2⁻⁵³ only
        return torch.cat([c.reshape(-1), (w @ w).reshape(1)]) if norm else c
    rows = max(1, held[..., :1].numel())
    mat = held.reshape(rows, -1)
    step = max(_CHUNK // 8, _CHUNK * 8 // (rows + 1))  # ~2^19 float64 (4 MB) at a time
    scratch = _scratch((rows + 1) * step, torch.float64, w.device)
    out = torch.zeros(rows + 1, dtype=torch.float64, device=w.device)
    for i in range(0, w.shape[-1], step):
        m = min(step, w.shape[-1] - i)
        block = scratch[: (rows + 1) * m].view(rows + 1, m)
        block[:rows].copy_(mat[:, i:i + m])  # widened: exact
        block[rows].copy_(w[i:i + m])
        out.addmv_(block, block[rows])  # the dots and w·w, summed in float64
    return out if norm else out[:rows].view(lead)  # out is already the dots, then w·w


_SCRATCH: dict = {}


def _scratch(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer of ``size`` elements kept between calls (4 MB of float64 for the dots): new
    megabytes per dot, freed and taken again hundreds of times a Lanczos run, grew the heap by
    ~6 MB over 60 steps under one thread (glibc serves them from the heap after the first
    free)."""
    key = (dtype, str(device))
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < size:
        buf = _SCRATCH[key] = torch.empty(max(size, 4 * _CHUNK), dtype=dtype, device=device)
    return buf[:size]


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """``a·b`` accumulated in float64 (see :func:`_dots` for the error bound)."""
    return float(_dots(a, b))


def _norm(w: torch.Tensor) -> float:
    """``‖w‖`` with float64 accumulation. ``torch.linalg.vector_norm`` of a float32 vector on
    the CPU accumulates in float32: 4.3e-4 relative error at 11M Gaussian entries (9e-6 at
    1M), enough to scale a Lanczos start vector, and with it every Ritz value, by ``1 + 9e-4``
    (measured on torchvision's ResNet-18, whose λmax came out 2.6e-4 too large)."""
    return float(w.norm()) if w.dtype == torch.float64 else math.sqrt(_dot(w, w))


def rounding_floor(steps: int, dim: int, dtype: torch.dtype = torch.float32) -> float:
    """The relative error below which a Lanczos run in ``dtype`` cannot vouch for a Ritz value.

    With vectors of unit roundoff ``u`` (``2⁻²⁴`` in float32) each step's recurrence
    ``w = Hq_j − α_j q_j − β_{j−1} q_{j−1} − Σ c_i q_i`` is formed and stored with an error
    ``‖f_j‖ <= 5u‖H‖`` (the product's rounding, three scaled subtractions, the store), the
    dots add at most ``dim·2⁻⁵³`` each (:func:`_dots`: exact products, float64 sums; counted
    below as ``u' = u + dim·2⁻⁵³``, with the store), and re-orthogonalisation keeps
    ``‖I − Q_mᵀQ_m‖ <= (2m + 4)·u`` (``m·u`` off the diagonal, and each vector's norm within
    ``(2m + 4)u`` of 1: :func:`_orthogonalise` takes it from ``‖w‖² − ‖c‖²``). So
    ``H Q_m = Q_m T_m + β_m q_{m+1}e_mᵀ + F_m`` with ``‖F_m‖ <= 5√m·u‖H‖``, and a Ritz value
    is within ``|β_m s_{m,i}| + (5√m + 2m + 5)·u‖H‖ + dim·2⁻⁵³‖H‖`` of an eigenvalue (Paige
    1976; Parlett 1998, §13-4). This returns the last two terms over ``‖H‖``: in float32
    2.4e-6 at 10 steps, 7.0e-6 at 40; in float64 ~1e-14. The HVP's own rounding (the model's
    arithmetic, not Lanczos's) comes on top. With partial re-orthogonalisation the residual is
    measured on the basis as stored (:func:`_measured_residuals`), orthogonal or not; only
    ``‖F_m‖`` is then needed, and the floor, which keeps the orthogonality terms, bounds it
    all the same."""
    u = torch.finfo(dtype).eps / 2
    m = max(int(steps), 1)
    return (5.0 * math.sqrt(m) + 2.0 * m + 5.0) * u + dim * 2.0**-53


def _orthogonalise(w: torch.Tensor, held: torch.Tensor,
                   coeffs: torch.Tensor | None = None) -> float:
    """Classical Gram-Schmidt of ``w`` (in place) against the rows of ``held``, a second pass
    where the first cancelled more than ``1 − 1/√2`` of its norm (Daniel, Gragg, Kaufman &
    Stewart 1976); returns ``‖w‖`` after. The coefficients ``c = held @ w`` and ``‖w‖²``
    accumulate in float64 in one sweep (:func:`_dots`); the update ``w −= heldᵀc`` sums
    ``len(held)`` terms per entry, no long reduction.

    The norm after is ``‖w − Qc‖² = ‖w‖² − ‖c‖²``, not measured by another sweep, where the
    pass cancelled little (``‖c‖² <= ½‖w‖²``, the DGKS test itself). Its error: with
    ``c = Qᵀw + δ`` (``‖δ‖ <= √m·n·2⁻⁵³‖w‖ <= √m·u'‖w‖``, ``u' = u + n·2⁻⁵³``, :func:`_dots`),
    ``‖w − Qc‖² = ‖w‖² − ‖c‖² + 2cᵀδ + cᵀ(QᵀQ − I)c``; the last two terms are at most
    ``(√(2m) + m/2)·u'‖w‖²``, the two float64-accumulated norms ``2u'‖w‖²``, and the store of
    ``w`` (``m + 1`` terms a entry) ``(m + 1)·u‖w‖²``; with ``‖w‖² <= 2‖w − Qc‖²`` the
    returned norm is within ``(2m + 4)·u'`` of the stored vector's, relative (so a new Lanczos
    vector has norm ``1 ± (2m + 4)u'``; :func:`rounding_floor` counts it). Where the pass did
    cancel, the second pass runs and, if it cancels too (``w`` numerically in the span: an
    invariant subspace), the norm is measured. ``coeffs`` (float64, one per row): the
    coefficients removed are added to it (both passes), for :func:`_measured_residuals`."""
    for _ in range(2):
        cn = _dots(held, w, norm=True)
        c, before2 = cn[:-1], float(cn[-1])
        w.addmv_(held.T, c.to(w.dtype), alpha=-1.0)
        if coeffs is not None:
            coeffs += c
        after2 = before2 - float(c @ c)
        if after2 >= _DGKS**2 * before2:
            return math.sqrt(after2)
    return _norm(w)


class _Partial:
    """Partial re-orthogonalisation (Simon 1984): re-orthogonalise only where the basis has
    lost more than semi-orthogonality, and book what each pass removed.

    Simon's recurrence estimates ``ω_{j+1,k} ≈ q_{j+1}ᵀq_k`` from the coefficients alone:
    with ``H q_k = β_k q_{k+1} + α_k q_k + β_{k−1} q_{k−1}`` (up to rounding),
    ``β_j ω_{j+1,k} = β_k ω_{j,k+1} + (α_k − α_j) ω_{j,k} + β_{k−1} ω_{j,k−1} − β_{j−1} ω_{j−1,k}
    ± ψ``, where ``ψ = (3u + n·2⁻⁵³)·‖T‖`` bounds the step's rounding seen along ``q_k``
    (three float32 operations per entry, Cauchy–Schwarz; the float64 dots, :func:`_dots`), and
    ``ω_{j+1,j} = ψ/β_j``. Where ``max_k |ω_{j+1,k}| > √u`` the new vector is re-orthogonalised
    against the whole basis (:func:`_orthogonalise`), and again at the next step (its
    predecessor was not); both reset to ``ψ/β``. Semi-orthogonality (``|ω| <= √u``) is enough
    for ``T_m`` to be the projection of ``H`` on the Krylov space to working precision (Simon
    1984, Thm 4), so the Ritz values are as accurate as with full re-orthogonalisation; the
    passes over the basis drop from one or two per step to a few per run.

    The estimate decides the cost only, never the reported bound: each pass's coefficients
    ``c`` are kept (``H Q_m = Q_m(T_m + C) + β_m q_{m+1}e_mᵀ + F_m``, ``C`` strictly upper
    triangular from them), and the residual of a Ritz pair is measured at the stop
    (:func:`_measured_residuals`)."""

    def __init__(self, dim: int, dtype: torch.dtype):
        self.u = torch.finfo(dtype).eps / 2
        self.rel = 3 * self.u + dim * 2.0**-53
        self.omega, self.before = [1.0], []  # ω_{j,·} and ω_{j−1,·}
        self.force = False
        self.removed: dict[int, torch.Tensor] = {}  # step j -> coefficients on q_0..q_j

    def step(self, w: torch.Tensor, held: torch.Tensor, alphas: list, betas: list,
             beta: float, cap: int) -> float:
        """Step ``j = len(alphas) − 1``: ``w = β q_{j+1}`` after the three-term update, ``held``
        the basis rows (``q_k`` in row ``k % cap``: all of ``q_0..q_j``, or the latest ``cap``
        where a memory budget holds no more); returns ``β_j`` (after a pass, where one was
        needed). Past the window only the vectors held are watched and re-orthogonalised
        against (orthogonality to older ones is lost, as with local re-orthogonalisation)."""
        j = len(alphas) - 1
        lo = max(0, j + 1 - cap)  # the oldest vector still held
        norm_t = max(abs(a) + (betas[i - 1] if i else 0.0) + (betas[i] if i < j else beta)
                     for i, a in enumerate(alphas))  # Gershgorin: >= ‖T‖
        psi = self.rel * norm_t
        om, new = self.omega, []
        for k in range(j):
            raw = betas[k] * om[k + 1] + (alphas[k] - alphas[j]) * om[k] - betas[j - 1] * self.before[k]
            raw += betas[k - 1] * om[k - 1] if k else 0.0
            new.append((raw + math.copysign(psi, raw)) / max(beta, 1e-300))
        if self.force or any(abs(x) > math.sqrt(self.u) for x in new[lo:]):
            c = torch.zeros(held.shape[0], dtype=torch.float64, device=w.device)
            beta = _orthogonalise(w, held, c)
            rows = torch.arange(held.shape[0])
            steps = rows + cap * torch.div(j - rows, cap, rounding_mode="floor")  # row -> k
            self.removed[j] = torch.zeros(j + 1, dtype=torch.float64,
                                          device=w.device).index_copy_(0, steps.to(w.device), c)
            self.force = not self.force  # this step and the next
            new = [*new[:lo], *[psi / max(beta, 1e-300)] * (j - lo)]
        self.before, self.omega = om, [*new, psi / max(beta, 1e-300), 1.0]
        return beta

    def estimates(self, s: torch.Tensor, beta: float) -> torch.Tensor:
        """Each Ritz pair's residual estimate ``|β_m s_{m,i}| + ‖C s_i‖`` (the basis taken as
        orthonormal; the stop measures it, :func:`_measured_residuals`)."""
        return (beta * s[-1, :]).abs() + self.correction(s).norm(dim=0)

    def correction(self, s: torch.Tensor) -> torch.Tensor:
        """``C s`` (rows: basis vectors, columns: Ritz pairs)."""
        out = torch.zeros_like(s)
        for j, c in self.removed.items():
            if j < s.shape[0]:
                out[: c.numel()] += c[:, None] * s[j]
        return out


def _measured_residuals(rows: torch.Tensor, s: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """``‖Q_{m+1} g_i‖ / ‖Q_m s_i‖`` for the Ritz pairs ``s_i`` (columns of ``s``), ``g_i =
    [C s_i; s_{m,i}]``: ``rows`` are ``q_0..q_{m−1}`` and the unnormalised ``w = β_m q_{m+1}``,
    ``cs`` is ``C s`` (:meth:`_Partial.correction`).

    With ``y = Q_m s_i`` and ``H q_j = Σ_k (T + C)_{kj} q_k + β_m q_{m+1}[j = m] + f_j`` as
    computed, ``Hy − θy = Q_{m+1} g_i + F s_i`` exactly (``T s_i = θ s_i``), whatever the
    orthogonality of the stored basis; so some eigenvalue of ``H`` lies within
    ``(‖Q_{m+1} g_i‖ + ‖F s_i‖)/‖y‖`` of ``θ`` (Weyl), ``‖F s_i‖ <= 5√m·u‖H‖`` being in
    :func:`rounding_floor`. One sweep over the rows, each slice widened to float64 (every
    product with a float64 coefficient summed in float64: ``m·2⁻⁵³`` relative per entry)."""
    m, e = s.shape[0], s.shape[1]
    coef = torch.zeros(m + 1, 2 * e, dtype=torch.float64, device=rows.device)
    coef[:m, :e] = s
    coef[:m, e:] = cs
    coef[m, e:] = s[-1]
    step = max(_CHUNK // 8, _CHUNK * 8 // (m + 2 * e + 1))
    scratch = _scratch((m + 1 + 2 * e) * step, torch.float64, rows.device)
    acc = torch.zeros(2 * e, dtype=torch.float64, device=rows.device)
    for i in range(0, rows.shape[-1], step):
        n = min(step, rows.shape[-1] - i)
        block = scratch[: (m + 1) * n].view(m + 1, n)
        block.copy_(rows[:, i:i + n])  # widened: exact
        out = scratch[(m + 1) * n: (m + 1 + 2 * e) * n].view(2 * e, n)
        torch.mm(coef.T, block, out=out)
        acc += (out * out).sum(dim=1)
    return acc[e:].sqrt() / acc[:e].sqrt().clamp_min(1e-300)


def _within(ritz: torch.Tensor, r: torch.Tensor, stop: str, tol: float) -> bool:
    """For ``stop="extremes"`` / ``"max"``: the extreme Ritz values' residual bounds ``r`` (one
    per Ritz value) within ``tol·max|θ|`` at this step. The gap estimate ``r²/δ`` is not a
    stopping rule: on a start that barely overlaps the top eigenvector it vouched for λmax 12%
    low at ``tol 1e-2`` (EfficientNet-B0 from its gradient), however long it was held."""
    if stop not in ("extremes", "max"):
        return False
    scale = max(float(ritz.abs().max()), 1e-300)
    return float(r[-1]) <= tol * scale and (stop == "max" or float(r[0]) <= tol * scale)


def _settled(ritz: torch.Tensor, r: torch.Tensor, prev: tuple | None, stop: str,
             tol: float, floor: float = 0.0) -> bool:
    """The extreme Ritz values moved by at most ``tol·max|θ|`` since the last step, and their
    residuals ``r`` did not grow (beyond the rounding ``floor·max|θ|``, where a converged
    residual is noise). ``prev``: the last step's ``(ritz, r)``.

    The bounds speak of the Krylov space seen so far: the residual one of *some* eigenvalue
    near ``θ``, the gap one of the next Ritz value's distance. When the start barely overlaps
    the top eigenvector (a gradient start on EfficientNet-B0), the top Ritz value can sit on
    the second eigenvalue with a small residual and a wide gap for a step or two, then move on
    as the top one surfaces (measured there: 12% low at ``tol 1e-2`` with a one-step rule).
    Its signs, visible to the iteration itself: ``θ_max`` moves (by interlacing it only grows,
    ``θ_min`` only falls), and the residual of the pair it sits on grows again as the next
    direction enters. A heuristic, not a guarantee: no Krylov rule sees an eigenvector the
    start misses entirely."""
    if prev is None:
        return False
    scale = max(float(ritz.abs().max()), 1e-300)
    old, r_old = prev
    ends = (-1,) if stop == "max" else (-1, 0)
    return all(abs(float(ritz[i]) - float(old[i])) <= tol * scale
               and float(r[i]) <= max(float(r_old[i]), floor * scale) for i in ends)


def _stop(ritz: torch.Tensor, r: torch.Tensor, beta: float, prev: tuple | None, held: bool,
          j: int, stop: str, tol: float, dim: int, dtype: torch.dtype) -> tuple[bool, bool]:
    """``(stop now, the bound held at step j)``: an invariant subspace (``β ≈ 0``: the Ritz
    values are exact), or the residual bound within ``max(tol, rounding floor)`` at this step
    and the last with the extremes settled (:func:`_within`, :func:`_settled`)."""
    if beta <= 1e-12 * max(float(ritz.abs().max()), 1e-300):
        return True, held
    floor = rounding_floor(j + 1, dim, dtype)
    eff = max(tol, floor)  # no bound below the rounding
    ok = j >= 1 and _within(ritz, r, stop, eff)
    return ok and held and _settled(ritz, r, prev, stop, eff, floor), ok


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    max_steps: int,
    tol: float = 1e-6,
    seed: int = 0,
    device: torch.device | str = "cpu",
    stop: str = "extremes",
    v0: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    max_vectors: int | None = None,
    on_step: Callable[[torch.Tensor, torch.Tensor, float], None] | None = None,
    out_arg: bool = False,
    reorth: str = "full",
) -> dict:
    """Lanczos tridiagonalisation with full or partial re-orthogonalisation.

    ``q_{j+1} β_j = H q_j - α_j q_j - β_{j-1} q_{j-1}``, then (``reorth="full"``) ``q_{j+1}``
    is orthogonalised against every earlier ``q`` (:func:`_orthogonalise`: classical
    Gram-Schmidt, twice where the first pass cancelled, DGKS 1976); ``"partial"`` does that
    where Simon's estimate says (:class:`_Partial`) and measures the extreme pairs' residuals
    at the stop (:func:`_measured_residuals`; past ``max_vectors``, estimates); SLQ is full.
    Returns the Ritz values (ascending), the eigenvectors ``s`` of ``T`` (columns),
    ``beta_last``, ``residuals`` (``|β_m s_{m,i}|``, or measured), the number of steps.
    ``stop="extremes"`` (``"max"``: the largest only) stops by :func:`_stop`:
    residual bounds below ``max(tol, rounding_floor)·max|θ|`` at two steps, extremes settled;
    ``stop="none"`` runs ``max_steps`` (SLQ). An invariant subspace (``β ≈ 0``) ends it, exact.

    Memory: vectors in ``dtype`` (``α``, ``β`` in float64), at most ``max_vectors`` (past
    them orthogonality to older ones is lost as Ritz values converge, Paige 1976: the extreme
    ones still converge, but may reappear as copies; ``window`` says so). ``out_arg``:
    ``matvec(v, out=row)`` writes ``Hv`` into the next vector's row (past the window, whose
    rows are all watched, into one spare buffer): no new ``dim``-sized buffer per step."""
    if reorth not in ("full", "partial"):
        raise ValueError(f"reorth: full or partial, got {reorth!r}")
    max_steps = max(1, min(max_steps, dim))
    cap = max_steps + 1 if max_vectors is None else max(3, min(int(max_vectors), max_steps + 1))
    part = _Partial(dim, dtype) if reorth == "partial" and stop != "none" else None
    # q_k in row k % cap; grown by doubling without max_vectors, else cap rows at once
    Q = torch.empty(min(16, cap) if max_vectors is None else cap, dim, dtype=dtype, device=device)
    _start(Q[0], v0, seed)
    alphas, betas = [], []
    ritz = s = prev = r = spare = None
    held = False  # the bound held at the previous step
    for j in range(max_steps):
        nxt = (j + 1) % cap
        if nxt >= Q.shape[0]:  # grown by doubling (no max_vectors)
            Q = torch.cat([Q, torch.empty_like(Q[: min(Q.shape[0], cap - Q.shape[0])])])
        cur = Q[j % cap]
        if out_arg and j + 1 >= cap and spare is None:  # past the window: one spare buffer
            spare = torch.empty(dim, dtype=dtype, device=device)
        w = matvec(cur, out=Q[nxt] if j + 1 < cap else spare) if out_arg else matvec(cur)
        w = w.to(dtype)
        beta = _three_term(w, Q, j, cap, alphas, betas, part)
        last = j + 1 >= max_steps
        if stop == "none" and not last:  # SLQ: no eigh per step; max|α| <= max|θ| serves
            scale = max(abs(a) for a in alphas)  # to detect an invariant subspace (β ≈ 0)
            if beta <= 1e-12 * max(scale, 1e-300):
                ritz, s = _tridiagonal_eigh(alphas, betas)
                break
        else:
            ritz, s = _tridiagonal_eigh(alphas, betas)
            r = (beta * s[-1, :]).abs() if part is None else part.estimates(s, beta)
            if on_step is not None:  # progress: (Ritz values, their vectors in T, β)
                on_step(ritz, s, beta)
            done, held = _stop(ritz, r, beta, prev, held, j, stop, tol, dim, dtype)
            if part is not None and (done or last) and beta > 0 and j + 1 < cap:
                r = _measure(part, r, w, Q, j, nxt, s, stop)
                done = done and _within(ritz, r, stop, max(tol, rounding_floor(j + 1, dim, dtype)))
            if last or done:
                break
            prev = (ritz, r)
        betas.append(beta)
        torch.div(w, beta, out=Q[nxt])  # in place where w is that row already
    return {"ritz": ritz, "ritz_vectors": s, "beta_last": beta,
            "residuals": (beta * s[-1, :]).abs() if r is None else r,
            "steps": len(alphas), "rounding_floor": rounding_floor(len(alphas), dim, dtype),
            "alphas": alphas, "betas": betas[: len(alphas) - 1], "vectors_kept": cap,
            "window": len(alphas) > cap, "reorth": "full" if part is None else "partial",
            "reorth_steps": len(alphas) if part is None else len(part.removed)}


def _start(row: torch.Tensor, v0: torch.Tensor | None, seed: int) -> None:
    """``row = v0/‖v0‖`` (a seeded Gaussian where ``v0`` is ``None``), the norm summed in
    float64: not ``v0.norm()``, which in float32 on a CPU is off by 4e-4 at 11M entries. A
    float32 start is not copied to float64."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = (torch.randn(row.shape[-1], generator=gen, dtype=torch.float64) if v0 is None
         else v0.detach().to(dtype=row.dtype))
    torch.div(q.to(row.device), _norm(q), out=row)


def _three_term(w: torch.Tensor, Q: torch.Tensor, j: int, cap: int, alphas: list, betas: list,
                part: _Partial | None) -> float:
    """``w = Hq_j − α_j q_j − β_{j−1} q_{j−1}`` in place (``α_j`` appended to ``alphas``), then
    re-orthogonalised (against the basis, or the window; :class:`_Partial` where it decides);
    returns ``β_j = ‖w‖``."""
    cur = Q[j % cap]
    alphas.append(_dot(cur, w))
    k = j % cap
    pair = Q[k - 1: k + 1] if k > 0 else Q[k: k + 1]  # q_{j−1}, q_j where adjacent rows
    coef = [betas[-1], alphas[-1]] if k > 0 else [alphas[-1]]
    if k == 0 and j > 0:
        w.sub_(Q[(j - 1) % cap], alpha=betas[-1])  # the window wrapped: q_{j−1} elsewhere
    if part is None:
        w.addmv_(pair.T, torch.tensor(coef, dtype=w.dtype, device=w.device), alpha=-1.0)
        return _orthogonalise(w, Q[: min(j + 1, cap)])
    return part.step(w, Q[: min(j + 1, cap)], alphas, betas, _update_and_norm(w, pair, coef),
                     cap)


def _update_and_norm(w: torch.Tensor, rows: torch.Tensor, coef: list[float]) -> float:
    """``w −= rowsᵀ coef``, then ``‖w‖`` with float64 accumulation (:func:`_dots`' bound),
    slice by slice, so each slice of ``w`` is summed while it is still in cache: one pass over
    ``w`` where the update and :func:`_norm` took two."""
    c = torch.tensor(coef, dtype=w.dtype, device=w.device)
    step = _CHUNK * 4
    scratch = _scratch(step, torch.float64, w.device)
    acc = torch.zeros((), dtype=torch.float64, device=w.device)
    for i in range(0, w.shape[-1], step):
        ws = w[i:i + step]
        ws.addmv_(rows[:, i:i + step].T, c, alpha=-1.0)
        block = scratch[: ws.shape[-1]]
        block.copy_(ws)  # widened: exact
        acc += block @ block
    return math.sqrt(float(acc))


def _measure(part: _Partial, r: torch.Tensor, w: torch.Tensor, Q: torch.Tensor, j: int,
             nxt: int, s: torch.Tensor, stop: str) -> torch.Tensor:
    """``r`` with the extreme pairs' residuals measured (:func:`_measured_residuals`) over
    ``q_0..q_j`` and ``w`` (copied into row ``j + 1`` unless it is that row already)."""
    if w.data_ptr() != Q[nxt].data_ptr():
        Q[nxt].copy_(w)
    ends = [len(r) - 1] if stop == "max" else sorted({0, len(r) - 1})
    r = r.clone()
    r[ends] = _measured_residuals(Q[: j + 2], s[:, ends], part.correction(s[:, ends]))
    return r
