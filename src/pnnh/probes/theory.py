"""What survives of the input at initialisation, in the infinite-width (mean-field) limit.

Assumptions, throughout:

- fully-connected layers of width ``n -> infinity``, weights i.i.d. ``N(0, 2 / fan_in)``
  (He), biases zero, ReLU; each layer's weights drawn independently of the others;
- the quantities are those of two inputs ``x, x'`` whose cosine is ``rho0``. Every net below
  is positively homogeneous (zero biases), so input norms do not matter.

In that limit the units of a layer are i.i.d. across ``i`` and a layer is described by the law
of one unit's pair ``(h_i, h'_i)``; a pre-activation ``u = W h`` is exactly Gaussian with
covariance ``2 * [[q, c], [c, q']]`` where ``q = E h_i^2``, ``c = E h_i h'_i`` (Poole et al.
2016; Schoenholz et al. 2017; Yang & Schoenholz 2017 for residual nets). Two quantities:

``correlation``  ``rho = c / sqrt(q q')``, the cosine between the two representations, i.e.
    what the probe's ``cosine_collapse`` measures. ``1 - rho`` is the share of the
    representation's energy that still tells the two inputs apart; ``rho -> 1`` means the
    representation no longer depends on the input: what is left is a fixed random direction
    set by the weights -- the input has *degenerated into noise*.
``surviving_fraction``  ``P(h_i > 0)``, the share of units left active by the ReLU (what the
    probe's ``surviving_fraction`` measures on a ReLU output).

**Plain ReLU net** (:func:`plain_curves`). One layer maps the correlation by the degree-1
arc-cosine kernel (Cho & Saul 2009), normalised so that ``f(1) = 1``::

    f(rho) = (sqrt(1 - rho^2) + (pi - arccos rho) * rho) / pi

``f(rho) > rho`` on ``[-1, 1)`` and ``f(1) = 1``, so ``rho_l = f^l(rho0) -> 1`` for every pair
of inputs: the plain net degenerates the input. Near 1, ``f(rho) = rho + (2 sqrt2 / 3pi)
(1 - rho)^{3/2} + ...``, hence (:func:`plain_gap_asymptote`)::

    1 - rho_l  ~  9 pi^2 / (2 l^2)          (l >> 1)

with no lower bound. Each layer keeps exactly half of its units active: ``P(u > 0) = 1/2``.

**Residual net, pre-activation form** ``h + alpha W2 relu(W1 h)`` (closed form,
:func:`preact_residual_curves`). The branch is independent of ``h`` and has second moments
``2 alpha^2 q`` and ``2 alpha^2 q f(rho)``, so per block::

    rho' = (rho + 2 alpha^2 f(rho)) / (1 + 2 alpha^2)
    1 - rho' >= (1 - rho) / (1 + 2 alpha^2)     =>   1 - rho_L >= (1 - rho_0) / (1 + 2 alpha^2)^L

The identity path keeps a lower bound on the input-dependent energy (:func:`residual_gap_bound`):
constant in depth when ``alpha^2 ~ 1/L`` and exact preservation when ``alpha = 0``, where a
plain net has none.

**Residual net, post-activation form** ``relu(h + alpha W2 relu(W1 h))`` (the ``resnet_mlp``
block) and **PNNH** (:func:`residual_curves`, :func:`pnnh_curves`). With an orthogonal coder
(``r = 1``) the PNNH block ``relu([A^T, -A^T, D] relu([A; -A; E] h))`` is exactly
``relu(A^T A h + D relu(E h)) = relu(h + D relu(E h))`` on ``h >= 0``: the same map, with the
learner decoder ``D`` in place of ``W2`` (``alpha = 0`` for a zero-initialised decoder, which
makes the block the identity at initialisation). Because ``h >= 0`` the unit law is not
Gaussian; it is evolved by population dynamics: ``particles`` samples of ``(h_i, h'_i)``, each
block drawing the branch ``(v, v')`` from its exact Gaussian law and applying
``relu(h + v)``. The error is ``O(particles^-1/2)`` (about 0.002 at the default). Surviving
fraction: ``P(h + v > 0) = E Phi(h / sd(v)) >= 1/2`` since ``h >= 0`` -- the better lower
bound of surviving neurons that a residual / internal path keeps, against exactly 1/2 for a
plain layer.

The ``depth`` of a point counts weight layers as the probe does: the stem (first layer) is 1,
every block adds 2, so curves of different kinds line up with probe records.
"""

from __future__ import annotations

import math

import numpy as np

KINDS = ("plain", "resnet", "resnet_preact", "pnnh")


def relu_kernel(rho):
    """Normalised arc-cosine kernel ``f(rho) = E[relu(u) relu(u')] / E[relu(u)^2]`` for a
    standard bivariate normal ``(u, u')`` with correlation ``rho`` (works on arrays)."""
    rho = np.clip(np.asarray(rho, dtype=np.float64), -1.0, 1.0)
    return (np.sqrt(1.0 - rho * rho) + (math.pi - np.arccos(rho)) * rho) / math.pi


def plain_gap_asymptote(layers) -> np.ndarray:
    """Large-depth form of ``1 - rho_l`` for a plain ReLU net: ``9 pi^2 / (2 l^2)``."""
    layers = np.asarray(layers, dtype=np.float64)
    return 9 * math.pi**2 / (2 * layers**2)


def residual_gap_bound(gap0: float, alpha: float, blocks) -> np.ndarray:
    """Lower bound ``(1 - rho_0) / (1 + 2 alpha^2)^L`` on ``1 - rho_L`` for pre-activation
    residual blocks ``h + alpha W2 relu(W1 h)`` (exact when the branch has fully collapsed)."""
    blocks = np.asarray(blocks, dtype=np.float64)
    return gap0 / (1 + 2 * alpha**2) ** blocks


def plain_curves(depth: int, rho0=0.0) -> list[dict]:
    """Plain ReLU net: ``correlation`` and ``surviving_fraction`` after each of the ``depth``
    ReLU layers (``depth`` 1..depth). ``rho0`` may be an array of input cosines; the
    correlation is then the mean over them of ``f^l(rho0)``."""
    rho = np.asarray(rho0, dtype=np.float64)
    out = []
    for layer in range(1, depth + 1):
        rho = relu_kernel(rho)
        out.append({"depth": layer, "correlation": float(rho.mean()), "surviving_fraction": 0.5})
    return out


def preact_residual_curves(blocks: int, rho0=0.0, alpha: float = 1.0) -> list[dict]:
    """Plain ReLU stem, then ``blocks`` pre-activation residual blocks ``h + alpha W2 relu(W1 h)``
    (closed form). ``surviving_fraction`` is that of the branch's hidden ReLU (1/2)."""
    rho = relu_kernel(np.asarray(rho0, dtype=np.float64))
    out = [{"depth": 1, "correlation": float(rho.mean()), "surviving_fraction": 0.5}]
    a2 = 2 * alpha**2
    for b in range(1, blocks + 1):
        rho = (rho + a2 * relu_kernel(rho)) / (1 + a2)
        out.append({"depth": 1 + 2 * b, "correlation": float(rho.mean()),
                    "surviving_fraction": 0.5})
    return out


def _relu_cross_moment(q1, q2, c):
    """``E[relu(u) relu(u')]`` for a centred Gaussian pair with variances ``q1, q2`` and
    covariance ``c``."""
    s = np.sqrt(q1 * q2)
    rho = np.clip(c / s, -1.0, 1.0) if s > 0 else 0.0
    return s / 2 * relu_kernel(rho)


def residual_curves(
    blocks: int,
    rho0: float = 0.0,
    alpha: float = 1.0,
    particles: int = 200_000,
    seed: int = 0,
) -> list[dict]:
    """Plain ReLU stem, then ``blocks`` post-activation residual blocks
    ``relu(h + alpha W2 relu(W1 h))`` (population dynamics, see the module docstring).

    ``alpha`` scales the branch's last layer against He initialisation (``alpha = 0``: the
    block is the identity on ``h >= 0``). Returns one record per block output (and the stem)."""
    rng = np.random.default_rng(seed)
    rho0 = float(np.mean(rho0))
    z = rng.standard_normal((2, particles))
    u = np.stack([z[0], rho0 * z[0] + math.sqrt(max(1 - rho0 * rho0, 0.0)) * z[1]])
    h = np.maximum(u, 0.0)  # the stem: a plain ReLU layer on the inputs

    def record(d: int, surviving: float) -> dict:
        q1, q2, c = (h[0] ** 2).mean(), (h[1] ** 2).mean(), (h[0] * h[1]).mean()
        corr = c / math.sqrt(q1 * q2) if q1 > 0 and q2 > 0 else float("nan")
        return {"depth": d, "correlation": float(corr), "surviving_fraction": float(surviving)}

    out = [record(1, float((h > 0).mean()))]
    for b in range(1, blocks + 1):
        q1, q2, c = (h[0] ** 2).mean(), (h[1] ** 2).mean(), (h[0] * h[1]).mean()
        # branch hidden layer: u ~ N(0, 2[[q1, c], [c, q2]]); relu(u) moments; then W2 (He)
        m11, m22 = q1, q2
        m12 = _relu_cross_moment(2 * q1, 2 * q2, 2 * c)
        cov = 2 * alpha**2 * np.array([[m11, m12], [m12, m22]])
        if alpha != 0:
            chol = np.linalg.cholesky(cov + 1e-12 * np.trace(cov) * np.eye(2))
            v = chol @ rng.standard_normal((2, particles))
            pre = h + v
        else:
            pre = h
        h = np.maximum(pre, 0.0)
        out.append(record(1 + 2 * b, float((pre > 0).mean())))
    return out


def pnnh_curves(
    blocks: int,
    rho0: float = 0.0,
    learner_scale: float = 0.0,
    particles: int = 200_000,
    seed: int = 0,
) -> list[dict]:
    """PNNH MLP with an orthogonal coder (``r = 1``): the block is ``relu(h + D relu(E h))`` at
    initialisation, i.e. :func:`residual_curves` with ``alpha = learner_scale`` (the learner
    decoder's init scale against He; 0 for a zero-initialised decoder: exact preservation)."""
    return residual_curves(blocks, rho0, alpha=learner_scale, particles=particles, seed=seed)


def curves(kind: str, depth: int, rho0=0.0, **options) -> list[dict]:
    """Theory curve for ``kind`` in :data:`KINDS` at ``depth`` weight layers (MLP convention:
    stem + blocks of 2 + head, so ``(depth - 2) // 2`` blocks; the head is not included)."""
    if kind == "plain":
        return plain_curves(max(depth - 1, 1), rho0)
    blocks = max((depth - 2) // 2, 0)
    if kind == "resnet":
        return residual_curves(blocks, rho0, **options)
    if kind == "resnet_preact":
        return preact_residual_curves(blocks, rho0, **options)
    if kind == "pnnh":
        return pnnh_curves(blocks, rho0, **options)
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def main(argv: list[str] | None = None) -> None:
    """``python -m pnnh.probes.theory``: the correlation / surviving fraction at a few depths."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m pnnh.probes.theory", description=main.__doc__)
    p.add_argument("--depths", type=int, nargs="+", default=[8, 34, 102, 202, 402])
    p.add_argument("--rho0", type=float, default=0.0, help="cosine between the two inputs")
    p.add_argument("--particles", type=int, default=200_000)
    args = p.parse_args(argv)
    deepest = max(args.depths)
    rows = {
        "plain": curves("plain", deepest, args.rho0),
        "resnet (post-act, He)": curves("resnet", deepest, args.rho0, particles=args.particles),
        "resnet_preact (alpha=1)": curves("resnet_preact", deepest, args.rho0),
        "pnnh (zero-init learner)": curves("pnnh", deepest, args.rho0, particles=args.particles),
        "pnnh (He learner decoder)": curves("pnnh", deepest, args.rho0, learner_scale=1.0,
                                            particles=args.particles),
    }
    print(f"mean-field theory at init, input cosine rho0 = {args.rho0}: "
          "correlation (surviving fraction) after the last block")
    print(f"{'kind':<27}" + "".join(f"{'depth ' + str(d):>18}" for d in args.depths))
    for label, curve in rows.items():
        by_depth = {c["depth"]: c for c in curve}
        cells = []
        for d in args.depths:
            c = by_depth.get(d - 1)  # the last hidden layer of a depth-d net (head excluded)
            cells.append(f"{c['correlation']:.5f} ({c['surviving_fraction']:.3f})" if c else "-")
        print(f"{label:<27}" + "".join(f"{c:>18}" for c in cells))
    print("plain asymptote 1 - rho_l ~ 9 pi^2 / (2 l^2): "
          + ", ".join(f"l={d - 1}: {plain_gap_asymptote(d - 1):.5f}" for d in args.depths))


if __name__ == "__main__":
    main()
