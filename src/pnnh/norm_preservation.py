"""Procrustes ResNets (paper 2: "Norm-Preservation", Zaeemzadeh, Rahnavard, Shah).

Identity skips keep the gradient norm through a block; the blocks that break it are the few
*transition* blocks that change dimensions (stride / width). Paper 2 makes them norm-preserving
by constraining their weights to have **equal singular values**, and whitens the input of the
final fully-connected layer with **zero-phase (ZCA) whitening**.

Projection onto equal singular values (orthogonal Procrustes). For ``W = U diag(s) Vᵀ``::

    P(W) = argmin_{Q: σ_1(Q) = ... = σ_k(Q)} ‖W − Q‖_F = mean(s) · U Vᵀ,

(the nearest ``c · (semi-)orthogonal`` matrix is ``c U Vᵀ`` for every ``c``, and
``Σ (s_i − c)²`` is smallest at ``c = mean(s)``). A matrix with equal singular values ``c``
maps every vector of its row space to ``c`` times its norm, and so does its transpose on the
gradient: ``‖Wᵀ g‖ = c ‖g‖`` for ``g`` in its column space.

**Which matrix, for a convolution.** We project the unfolded kernel
``W ∈ R^{C_out × (C_in·k_h·k_w)}`` (``weight.reshape(C_out, -1)``), the matrix that maps one
receptive-field patch to one output pixel. For a 1×1 convolution (a projection shortcut, and
the transition layers of the original Procrustes ResNet) this is exactly the convolution
operator's matrix at every pixel, so the operator itself has equal singular values (up to the
stride's subsampling). For a k×k kernel it constrains the patch map; the operator's singular
values (paper 2's FFT construction, after Sedghi et al.) are not computed here.

**Which blocks.** Every ``nn.Linear`` / ``nn.Conv*`` weight inside a block with the attribute
``transition = True`` (in the CIFAR ResNets: the strided ``conv1``, ``conv2`` and the projection
``shortcut``). They are projected once when the model is built and again after every optimizer
step (the trainer calls ``after_optimizer_step()`` on every submodule that defines it).

**ZCA whitening** of the classifier input: ``y = Σ^{-1/2} (x − μ)`` with ``Σ^{-1/2} =
U diag((λ + ε)^{-1/2}) Uᵀ`` from the eigendecomposition ``Σ = U diag(λ) Uᵀ``; ZCA is the
whitening closest to the identity (it rotates back to the original axes). ``μ`` and ``Σ`` are
running statistics updated from each training batch (momentum, as in BatchNorm); the whitening
matrix always uses the running estimates (a 64- or 128-dimensional covariance from one batch of
128 samples is too noisy to invert), so training and eval apply the same map; no gradient flows
through the statistics. ``ε = eps · tr(Σ)/d`` is relative, so the map is scale-invariant.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from pnnh import orthogonal
from pnnh.errors import ConfigError

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The matrix we constrain: ``weight`` itself (Linear) or ``weight.reshape(C_out, -1)`` (conv)."""
    return weight.reshape(weight.shape[0], -1)


def project_equal_singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Nearest tensor (Frobenius) whose :func:`weight_matrix` has all singular values equal."""
    return orthogonal.procrustes(weight_matrix(weight), scale="mean").reshape(weight.shape)


def transition_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every Linear/Conv inside a module marked ``transition = True``."""
    out, seen = [], set()
    for name, m in model.named_modules():
        if getattr(m, "transition", False) is True:
            for sub, layer in m.named_modules():
                if isinstance(layer, WEIGHT_LAYERS) and id(layer) not in seen:
                    seen.add(id(layer))
                    out.append((f"{name}.{sub}" if sub else name, layer))
    return out


class ProcrustesProjection(nn.Module):
    """Projects its target layers' weights onto equal singular values, in place.

    Holds no parameters; the targets are kept in a plain list (not registered as children), so
    the model's ``state_dict`` is unchanged. Weights of equal shape are projected in one
    batched SVD. ``after_optimizer_step`` is the trainer's hook.
    """

    def __init__(self, layers: list[tuple[str, nn.Module]]):
        super().__init__()
        self.names = [n for n, _ in layers]
        self.targets = [m for _, m in layers]  # plain list: no double registration

    @torch.no_grad()
    def project(self) -> None:
        groups: dict[tuple, list[torch.Tensor]] = {}
        for m in self.targets:
            groups.setdefault((tuple(m.weight.shape), m.weight.device), []).append(m.weight)
        for ws in groups.values():
            mats = torch.stack([weight_matrix(w.detach()) for w in ws])
            projected = orthogonal.procrustes(mats, scale="mean")  # one batched SVD
            for w, p in zip(ws, projected):
                w.copy_(p.reshape(w.shape))

    def after_optimizer_step(self) -> None:
        self.project()

    def extra_repr(self) -> str:
        return f"targets={self.names}"


class ZCAWhitening(nn.Module):
    """Zero-phase whitening ``y = Σ^{-1/2}(x − μ)`` with running statistics (see module doc).

    ``fit(x)`` sets the statistics from one batch exactly (then ``cov(y) = I`` on that batch,
    up to ``eps``). In training mode every batch updates ``μ``, ``Σ`` with ``momentum``
    (the first batch sets them) before whitening.
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-3):
        super().__init__()
        self.num_features = num_features
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_cov", torch.eye(num_features))
        self.register_buffer("whitening", torch.eye(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @staticmethod
    def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().double()
        mean = x.mean(dim=0)
        xc = x - mean
        return mean, xc.T @ xc / max(x.shape[0] - 1, 1)

    @torch.no_grad()
    def _update_whitening(self) -> None:
        cov = self.running_cov.double()
        lam, u = torch.linalg.eigh(cov)
        lam = lam.clamp_min(0)
        eps = self.eps * lam.mean().clamp_min(1e-12)
        self.whitening.copy_((u * (lam + eps).rsqrt()) @ u.T)

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> ZCAWhitening:
        mean, cov = self._stats(x.reshape(x.shape[0], -1))
        self.running_mean.copy_(mean)
        self.running_cov.copy_(cov)
        self.num_batches_tracked.fill_(1)
        self._update_whitening()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"ZCAWhitening expects (N, {self.num_features}), got {tuple(x.shape)}")
        if self.training and x.shape[0] > 1:
            with torch.no_grad():
                mean, cov = self._stats(x)
                m = 1.0 if int(self.num_batches_tracked) == 0 else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_cov.lerp_(cov.to(self.running_cov.dtype), m)
                self.num_batches_tracked += 1
                self._update_whitening()
        w = self.whitening.to(x.dtype)
        return (x - self.running_mean.to(x.dtype)) @ w  # Σ^{-1/2} is symmetric

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}, eps={self.eps}"


def add_zca(model: nn.Module, momentum: float = 0.1, eps: float = 1e-3) -> ZCAWhitening:
    """Put :class:`ZCAWhitening` in front of the classifier ``nn.Linear`` of ``model.head``.

    ``model.head`` is that Linear, or a Sequential ending with it (e.g. pool, flatten, Linear);
    the Linear is replaced by ``Sequential(zca=ZCAWhitening, fc=<the Linear>)``.
    """
    parent, key = model, "head"
    layer = getattr(model, "head", None)
    while isinstance(layer, nn.Sequential) and len(layer) > 0:
        parent, key = layer, str(len(layer) - 1)
        layer = layer[-1]
    if not isinstance(layer, nn.Linear):
        raise ConfigError(
            f"zca: needs `model.head` to be (or end with) an nn.Linear classifier; "
            f"{type(model).__name__}.head is {type(getattr(model, 'head', None)).__name__}",
            field="zca",
        )
    zca = ZCAWhitening(layer.in_features, momentum=momentum, eps=eps).to(layer.weight.device)
    setattr(parent, key, nn.Sequential(OrderedDict(zca=zca, fc=layer)))
    return zca


def make_norm_preserving(model: nn.Module, procrustes: bool = True, zca: bool = True) -> nn.Module:
    """Turn a model following the conventions into its Procrustes variant (in place; returned).

    ``procrustes``: weights of blocks marked ``transition = True`` are projected onto equal
    singular values now and after every optimizer step (a :class:`ProcrustesProjection`
    attached as ``model.procrustes``). ``zca``: ZCA whitening in front of the classifier
    Linear of ``model.head`` (:func:`add_zca`).
    Asking for a mechanism the model has no place for is a :class:`ConfigError`.
    """
    if procrustes:
        layers = transition_layers(model)
        if not layers:
            raise ConfigError(
                f"procrustes: {type(model).__name__} has no block marked `transition = True` "
                "with Linear/Conv weights to project",
                field="procrustes",
            )
        proj = ProcrustesProjection(layers)
        proj.project()
        model.procrustes = proj
    if zca:
        add_zca(model)
    return model


def singular_value_spreads(model: nn.Module) -> dict[str, float]:
    """``σ_max/σ_min − 1`` of every transition layer's weight matrix (0 when projected)."""
    return {n: orthogonal.singular_value_spread(m.weight) for n, m in transition_layers(model)}
