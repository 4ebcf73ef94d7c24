"""The weight-shared coder and the PNNH block (coder + learner), for Linear, Conv1d and Conv2d.

**Coder.** One parameter ``A`` (``m x n``, ``m = r n`` for coder ratio ``r``) serves two plain
layers: the encoder rows ``[A; -A]`` and the decoder columns ``[Aᵀ, -Aᵀ]``. Since
``relu(z) - relu(-z) = z``, the pair carries

    Aᵀ relu(A x) - Aᵀ relu(-A x) = AᵀA x

across the ReLU *exactly*. With ``A`` orthogonal (``r = 1``) that is ``x`` itself: an internal
path through the non-linearity, not a skip — nothing adds the block input to its output.
For convolutions ``A`` is a kernel ``C -> rC`` and the decoder is its adjoint
(``conv_transpose`` with the same weight, i.e. a conv with the transposed, flipped kernel).

**Block.** Two plain layers with structured weights (``E``, ``D``: the learner)::

    y = relu( [Aᵀ, -Aᵀ, D] · relu([A; -A; E] x + [0; 0; b1]) + b2 )
      = relu( AᵀA x + D relu(E x + b1) + b2 )                        (fused form)

Training uses the fused form (half the coder's hidden width); :meth:`PNNHBlock.to_plain_layers`
materializes the ``[A; -A]`` form. Outputs and gradients agree (``tests/test_coder.py``).
With ``r = 1``, ``A`` orthogonal and ``D = 0`` the block is the identity on ``x >= 0``.

**The coder is inert at r = 1.** ``AᵀA = I`` makes the coder path ``x`` for *every*
orthogonal ``A``: the block computes ``relu(x + D relu(E x + b1) + b2)`` whatever ``A`` is, so
training ``A`` cannot change the network's function (``docs/PNNH.md``, "The equivalence").
The default ``coder_constraint="fixed"`` therefore keeps ``A`` as a non-trainable buffer
(identity unless ``coder_init`` says otherwise) and the fused form uses ``AᵀA x = x`` without
computing it: a block then costs what a post-activation ResNet block with branch width =
learner width costs. The plain form (``fused=False``, export) still materializes ``[A; -A]``.

**Trainable coders** (function-invariant at ``r = 1``, but they cost ``n²`` parameters and the
Gram / projection work per step) or function-changing ones: :class:`CoderConstraint` (one per
model, so the projections can be batched over coders of equal shape) applies
``coder_constraint``:

- ``"none"``: ``A`` trains freely and ``AᵀA`` drifts from ``I`` (changes the function);
- ``"procrustes"``: ``A <- U Vᵀ`` (SVD, float64) after every ``project_every`` optimizer steps;
- ``"newton_schulz"``: the same projection by Newton–Schulz iterations (matmuls only,
  batched; the default before ``"fixed"``);
- ``"penalty"``: adds ``penalty_weight · Σ ‖AᵀA - I‖²`` (Gram of the smaller side when
  ``r != 1``; for a ``k x k`` conv coder the Gram of the *operator*, all kernel shifts;
  ``AᵀA`` is only near ``I``, so the function changes);
- ``"orthogonal"``: ``torch.nn.utils.parametrizations.orthogonal`` (always exact).

**Normalization.** The coder channels are never normalized: where a model has BatchNorm it
acts on the learner's units only (after ``E`` and after ``D``), so the coder path stays
``AᵀA x`` exactly and BatchNorm folds into ``E`` / ``D`` at export.

**Transitions** (stride 2, ``C -> C'``): :class:`DownsampleCoder` encodes with a 2x2 stride-2
kernel ``P`` whose ``C' x 4C`` matrix has orthonormal rows (``P Pᵀ = I``: a co-isometry,
initialised from Haar wavelet bands) and decodes with ``[I, -I]``; the coder path is
``P x``, whose input gradient ``Pᵀ g`` keeps ``‖g‖`` exactly. ``P`` is *not* inert: it is a
projection shortcut. With ``"fixed"`` it is a buffer holding :func:`pair_rows` (norm-preserving
sums of pixel pairs, non-negative: like ResNet option A, but ``P Pᵀ = I``). See
``docs/PNNH.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from pnnh.errors import ConfigError
from pnnh.orthogonal import newton_schulz

CONSTRAINTS = ("fixed", "none", "procrustes", "newton_schulz", "penalty", "orthogonal")
DEFAULT_CONSTRAINT = "fixed"
INITS = ("orthogonal", "identity")
TRANSITION_CODERS = ("orthogonal", "projection")


@dataclass(frozen=True)
class CoderOptions:
    """The coder's options, one object for every PNNH family (``--model-arg NAME=VALUE``).

    - ``coder_ratio`` ``r``: the coder has ``round(r·C)`` units per sign (``A: C -> rC``);
    - ``coder_kernel``: the coder's kernel (convolutions only; 1 = pointwise, ``AᵀA = I`` a matrix);
    - ``coder_init``: ``"orthogonal"`` (semi-orthogonal ``A``) or ``"identity"``;
    - ``coder_constraint``: how ``AᵀA = I`` is kept while training (:data:`CONSTRAINTS`);
      ``"fixed"`` makes the coder a buffer; ``project_every`` steps between projections;
      ``penalty_weight`` the weight of ``‖AᵀA - I‖²`` for ``"penalty"``;
    - ``zero_init_decoder``: the learner's decoder ``D`` starts at zero (the block starts as
      ``x``); ``None`` (the default): zero where the learner has no BatchNorm (MLP, 1-D CNN:
      what lets depth 100+ train there), and the He-init ResNet's BatchNorm scale 1 on BatchNorm
      CNNs, where zero made PNNH-56 the zero-init ResNet-56, 9 points below the standard one on
      Fashion-MNIST (docs/PNNH.md, "Initialisation on BatchNorm CNNs");
    - ``transition_norm``: a BatchNorm on a transition's carried signal, ``bn_c(P x)``, as a
      ResNet's projection shortcut has (``None``, the default: where the learner has BatchNorm).
      Without it the carried signal keeps the scale every block of the stage added to it, while
      the ResNet's shortcut BatchNorm resets it: PNNH-56 with He-init learners and a bare ``P``
      started with logits 2.6x the ResNet's and trained like the plain net (docs/PNNH.md). In
      eval mode it is a per-channel affine map of ``P x``: the plain form folds it into the
      coder's decoder columns and bias, exactly;
    - ``transition_coder``: what carries the signal across a transition (:data:`TRANSITION_CODERS`):
      ``"orthogonal"``, the co-isometry ``P`` of :class:`DownsampleCoder` (fixed pair sums, or a
      constrained Haar-initialised ``P``), or ``"projection"``, a learned 1x1 stride-2 ``S``
      (:class:`ProjectionCoder`: the ResNet's option-B shortcut conv). ``None`` (the default):
      ``"projection"`` where the learner has BatchNorm, so that a BatchNorm PNNH CNN has the
      He-init ResNet's parameters one for one — the fixed ``P`` left PNNH-56 0.9 points below
      ResNet-56 on Fashion-MNIST (docs/PNNH.md, "Initialisation on BatchNorm CNNs");
    - ``fused``: run coder and learner as the two plain layers ``[A; -A; E]``, ``[Aᵀ, -Aᵀ, D]``;
    - ``procrustes``: shorthand for ``coder_constraint="procrustes"`` (the ``--procrustes`` flag).

    A factory takes it as ``coder: CoderOptions = DEFAULT_CODER`` and registers with
    ``options=CoderOptions``; the registry then accepts and lists each field by name.
    """

    coder_ratio: float = 1.0
    coder_kernel: int = 1
    coder_init: str = "orthogonal"
    coder_constraint: str = DEFAULT_CONSTRAINT
    project_every: int = 1
    penalty_weight: float = 0.01
    zero_init_decoder: bool | None = None
    transition_norm: bool | None = None
    transition_coder: str | None = None
    fused: bool = True
    procrustes: bool = False

    def block_kwargs(self) -> dict:
        """The options :class:`PNNHBlock` takes (the rest go to :func:`attach_constraint`)."""
        return {"coder_ratio": self.coder_ratio, "coder_kernel": self.coder_kernel,
                "coder_init": self.coder_init, "zero_init_decoder": self.zero_init_decoder,
                "transition_norm": self.transition_norm,
                "transition_coder": self.transition_coder, "fused": self.fused}


DEFAULT_CODER = CoderOptions()

_CONV = {1: F.conv1d, 2: F.conv2d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d}


def coder_width(dim: int, ratio: float) -> int:
    """``m = round(r n)`` coder units for ``n`` inputs (at least 1)."""
    if not ratio > 0:
        raise ConfigError(f"coder_ratio: must be positive, got {ratio!r}", field="coder_ratio")
    return max(1, int(round(ratio * dim)))


def semi_orthogonal_(w: torch.Tensor, identity: bool = False) -> torch.Tensor:
    """Fill a 2-D ``w`` with orthonormal rows or columns (whichever side is smaller).

    ``identity=True`` gives the truncated identity (Dirac) instead of a random one.
    """
    with torch.no_grad():
        if identity:
            w.zero_()
            k = min(w.shape)
            w[:k, :k] = torch.eye(k, dtype=w.dtype)
        else:
            nn.init.orthogonal_(w)
    return w


class Coder(nn.Module):
    """Weight-shared coder ``A`` (``m x n``): encoder ``[A; -A]``, decoder ``[Aᵀ, -Aᵀ]``.

    ``dims`` is 0 (Linear), 1 (Conv1d) or 2 (Conv2d). For convolutions ``kernel_size`` is the
    coder's kernel (default 1: a pointwise coder, so ``AᵀA = I`` is an ordinary matrix
    condition the projections enforce exactly); the weight of a 1x1 coder is stored as a
    matrix ``(m, n)`` so that projections and parametrizations see the matrix.
    """

    fixed = False  #: ``A`` is a buffer (``coder_constraint="fixed"``), see :func:`freeze_coder_`
    passes_input = False  #: fixed, square and pointwise: the fused path is ``AᵀA x = x``

    def __init__(
        self, dim: int, ratio: float = 1.0, dims: int = 0, kernel_size: int = 1,
        init: str = "orthogonal",
    ):
        super().__init__()
        if init not in INITS:
            raise ConfigError(f"coder_init: must be one of {', '.join(INITS)}, got {init!r}",
                              field="coder_init")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"coder_kernel: must be odd and >= 1, got {kernel_size}",
                              field="coder_kernel")
        if dims == 0 and kernel_size != 1:
            raise ConfigError("coder_kernel: only convolutions take a kernel", field="coder_kernel")
        self.dim, self.dims, self.kernel_size = dim, dims, kernel_size
        self.in_dim = self.out_dim = dim
        self.width = coder_width(dim, ratio)
        if kernel_size == 1:
            self.weight = nn.Parameter(semi_orthogonal_(torch.empty(self.width, dim), init == "identity"))
        else:  # k x k coder: identity (Dirac) or orthogonal centre tap, zeros elsewhere
            w = torch.zeros((self.width, dim) + (kernel_size,) * dims)
            centre = (slice(None), slice(None)) + (kernel_size // 2,) * dims
            w[centre] = semi_orthogonal_(torch.empty(self.width, dim), init == "identity")
            self.weight = nn.Parameter(w)

    @property
    def matrix(self) -> torch.Tensor:
        """``A`` as a matrix ``(m, n·k^dims)``."""
        return self.weight.reshape(self.width, -1)

    def kernel(self) -> torch.Tensor:
        """``A`` in layer layout: ``(m, n)`` or ``(m, n, k, ...)``."""
        w = self.weight
        if self.dims and w.dim() == 2:
            w = w.reshape(w.shape + (1,) * self.dims)
        return w

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` (pre-activation of the coder units; the encoder applies ``[A; -A]``)."""
        if self.dims == 0:
            return F.linear(x, self.weight)
        return _CONV[self.dims](x, self.kernel(), padding=self.kernel_size // 2)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``Aᵀ z`` (the adjoint of :meth:`encode`)."""
        if self.dims == 0:
            return F.linear(z, self.weight.t())
        return _CONV_T[self.dims](z, self.kernel(), padding=self.kernel_size // 2)

    def carry(self, x: torch.Tensor, fused: bool = True) -> torch.Tensor:
        """The coder path: ``AᵀA x`` (fused) or ``Aᵀ relu(Ax) - Aᵀ relu(-Ax)`` (plain form).

        Fused, a pointwise coder applied to ``R`` rows (batch x positions) computes ``G = AᵀA``
        once (``n²m`` multiply-adds) and then ``G x`` (``Rn²``) when that is cheaper than
        ``Aᵀ(Ax)`` (``2Rnm``) — always for convolutions, where ``R`` counts every position.
        """
        if fused and self.passes_input:
            return x
        if fused and self.kernel_size == 1:
            n, m = self.dim, self.width
            rows = x.numel() // n
            if n * n * m + rows * n * n < 2 * rows * n * m:
                g = self.weight.t() @ self.weight  # (n, n), symmetric
                if self.dims == 0:
                    return F.linear(x, g)
                return _CONV[self.dims](x, g.reshape(g.shape + (1,) * self.dims))
        z = self.encode(x)
        if fused:
            return self.decode(z)
        return self.decode(torch.relu(z)) - self.decode(torch.relu(-z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.carry(x)

    def encoder_weight(self, kernel_size: int = 1) -> torch.Tensor:
        """``[A; -A]`` as a layer weight, embedded (centred) in a ``kernel_size`` kernel."""
        a = _embed(self.kernel(), kernel_size, self.dims)
        return torch.cat([a, -a], dim=0)

    def decoder_weight(self, kernel_size: int = 1) -> torch.Tensor:
        """``[Aᵀ, -Aᵀ]`` as a layer weight (conv: transposed, flipped kernel), embedded."""
        a = self.kernel()
        if self.dims == 0:
            at = a.t()
        else:
            at = a.transpose(0, 1).flip(tuple(range(2, 2 + self.dims)))
        at = _embed(at, kernel_size, self.dims)
        return torch.cat([at, -at], dim=1)

    def gram_penalty(self) -> torch.Tensor:
        """``‖AᵀA - I‖²_F`` of the coder as an operator (Gram of the smaller side)."""
        if self.weight.dim() == 2:
            a = self.weight
            g = a @ a.t() if a.shape[0] <= a.shape[1] else a.t() @ a
            return (g - torch.eye(g.shape[0], device=a.device, dtype=a.dtype)).pow(2).sum()
        # k x k conv: the operator's Gram is the kernel's autocorrelation over all shifts,
        # which must be I at shift 0 and 0 elsewhere (orthogonal convolution).
        a, k = self.weight, self.kernel_size
        if a.shape[0] <= a.shape[1]:  # rows: A Aᵀ — correlate over input channels
            g = _CONV[self.dims](a, a, padding=k - 1)  # (m, m, 2k-1, ...)
        else:
            at = a.transpose(0, 1)
            g = _CONV[self.dims](at, at, padding=k - 1)
        target = torch.zeros_like(g)
        centre = (slice(None), slice(None)) + (k - 1,) * self.dims
        target[centre] = torch.eye(g.shape[0], device=a.device, dtype=a.dtype)
        return (g - target).pow(2).sum()

    def extra_repr(self) -> str:
        return f"{self.dim} -> {self.width} (x2 shared), dims={self.dims}, k={self.kernel_size}"


class DownsampleCoder(nn.Module):
    """Transition coder ``C -> C'`` at stride 2: encoder ``[P; -P]``, decoder ``[I, -I]``.

    ``P`` is a 2x2 stride-2 kernel whose ``(m, 4C)`` matrix has orthonormal rows, so the
    path ``P x`` is a co-isometry (``P Pᵀ = I``): it keeps the norm of everything in its row
    space and its input gradient ``Pᵀ g`` has exactly the norm of ``g``. Initialised from
    the orthonormal Haar bands of each 2x2 patch (first the scaled average — norm-preserving
    average pooling — then the detail bands), or randomly with ``init="orthogonal"``.
    Input positions ``2i, 2i+1`` feed output ``i``: the same geometry as the taps ``[1:3]``
    of a 3x3, stride-2, padding-1 conv, which is how the plain form embeds it.
    """

    fixed = False
    passes_input = False

    def __init__(self, in_channels: int, out_channels: int, ratio: float = 1.0,
                 init: str = "haar"):
        super().__init__()
        self.dims, self.kernel_size = 2, 2
        self.in_channels, self.out_channels = in_channels, out_channels
        self.in_dim, self.out_dim = in_channels, out_channels
        self.width = min(coder_width(out_channels, ratio), out_channels, 4 * in_channels)
        w = torch.empty(self.width, 4 * in_channels)
        if init == "pairs" and self.width <= 2 * in_channels:
            w.copy_(pair_rows(in_channels)[: self.width])
        elif init in ("haar", "pairs"):
            w.copy_(haar_rows(in_channels)[: self.width])
        else:
            semi_orthogonal_(w)
        self.weight = nn.Parameter(w)

    @property
    def matrix(self) -> torch.Tensor:
        return self.weight

    def kernel(self) -> torch.Tensor:
        return self.weight.reshape(self.width, self.in_channels, 2, 2)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(pad_odd(x), self.kernel(), stride=2)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.width < self.out_channels:
            z = F.pad(z, (0, 0, 0, 0, 0, self.out_channels - self.width))
        return z

    def carry(self, x: torch.Tensor, fused: bool = True) -> torch.Tensor:
        z = self.encode(x)
        if fused:
            return self.decode(z)
        return self.decode(torch.relu(z)) - self.decode(torch.relu(-z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.carry(x)

    def encoder_weight(self, kernel_size: int = 3) -> torch.Tensor:
        """``[P; -P]`` placed at taps ``[1:3, 1:3]`` of a 3x3 stride-2 padding-1 kernel."""
        if kernel_size != 3:
            raise ValueError("a transition coder embeds into a 3x3 stride-2 kernel")
        p = self.kernel()
        w = p.new_zeros(self.width, self.in_channels, 3, 3)
        w[:, :, 1:, 1:] = p
        return torch.cat([w, -w], dim=0)

    def decoder_weight(self, kernel_size: int = 3) -> torch.Tensor:
        return _signed_identity(self.out_channels, self.width, kernel_size, self.weight, dim=1)

    def gram_penalty(self) -> torch.Tensor:
        a = self.weight
        g = a @ a.t()
        return (g - torch.eye(g.shape[0], device=a.device, dtype=a.dtype)).pow(2).sum()

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.width} (stride 2, x2 shared) -> {self.out_channels}"


class ProjectionCoder(nn.Module):
    """Transition coder ``C -> C'`` at stride 2 with a *learned* projection ``S``: encoder
    ``[S; -S]``, decoder ``[I, -I]``, ``S`` a 1x1 stride-2 kernel — the ResNet's option-B
    shortcut conv, He-initialised (``fan_out``) as the ResNet's is.

    ``relu(z) - relu(-z) = z`` holds for every ``S``, so the pair carries ``S x`` across the
    ReLU exactly whatever ``S`` becomes: ``S`` trains freely (weight decay included), with no
    constraint and no orthogonality to keep. Input pixel ``2i`` feeds output ``i``: the centre
    tap of the block's 3x3, stride-2, padding-1 kernel. Since ``S`` is linear the plain form
    applies it *after* the ReLU, which is narrower when ``C < C'``: layer 1 carries the sampled
    input with ``[I; -I]`` (``2C`` units, of which the lean export keeps ``C`` on a
    non-negative input) and layer 2 reads them with ``[S, -S]``:
    ``S relu(x) - S relu(-x) = S x``.
    With the transition's ``carry_bn`` the block then has the ResNet's transition parameters,
    one for one (:func:`pnnh.convert.pnnh_block_to_residual` gives back its
    ``Sequential(Conv2d(1x1, stride 2), BatchNorm2d)`` shortcut).
    """

    fixed = False
    passes_input = False

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.dims, self.kernel_size = 2, 1
        self.in_channels, self.out_channels = in_channels, out_channels
        self.in_dim, self.out_dim, self.width = in_channels, out_channels, out_channels
        w = torch.empty(out_channels, in_channels, 1, 1)  # stored as the ResNet's conv weight
        nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
        self.weight = nn.Parameter(w)

    @property
    def matrix(self) -> torch.Tensor:
        return self.weight.reshape(self.width, self.in_channels)

    def kernel(self) -> torch.Tensor:
        return self.weight

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel(), stride=2)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def carry(self, x: torch.Tensor, fused: bool = True) -> torch.Tensor:
        z = self.encode(x)
        return z if fused else torch.relu(z) - torch.relu(-z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.carry(x)

    def encoder_weight(self, kernel_size: int = 3) -> torch.Tensor:
        """``[I; -I]`` (``C`` channels) at the centre tap of a 3x3 stride-2 padding-1 kernel:
        the input at pixel ``2i``, both signs."""
        if kernel_size != 3:
            raise ValueError("a transition coder embeds into a 3x3 stride-2 kernel")
        return _signed_identity(self.in_channels, self.in_channels, 3, self.weight, dim=0)

    def decoder_weight(self, kernel_size: int = 3) -> torch.Tensor:
        """``[S, -S]`` at the centre tap of a ``kernel_size`` kernel."""
        w = _embed(self.kernel(), kernel_size, 2)
        return torch.cat([w, -w], dim=1)

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels} (1x1 stride 2, learned, x2 shared)"


def _signed_identity(rows: int, cols: int, kernel_size: int, like: torch.Tensor,
                     dim: int) -> torch.Tensor:
    """``[I; -I]`` (``dim=0``) or ``[I, -I]`` (``dim=1``): the truncated ``rows x cols``
    identity at the centre tap of a ``kernel_size`` 2-D kernel, in ``like``'s dtype/device."""
    eye = torch.eye(rows, cols, dtype=like.dtype, device=like.device).reshape(rows, cols, 1, 1)
    eye = _embed(eye, kernel_size, 2)
    return torch.cat([eye, -eye], dim=dim)


@torch.fx.wrap
def pad_odd(x: torch.Tensor) -> torch.Tensor:
    """Pad the bottom row and right column of an image whose size is odd (a 2x2 stride-2 coder
    reads the pad only there); even sizes pass untouched. A leaf for ``torch.fx``, so the
    data-dependent test on the shape does not stop a trace."""
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        return F.pad(x, (0, 1, 0, 1))
    return x


def haar_rows(channels: int) -> torch.Tensor:
    """``4C`` orthonormal rows over 2x2 patches of ``C`` channels, band-major.

    Bands (taps in order (0,0), (0,1), (1,0), (1,1)): average ``[1,1,1,1]/2``, then
    ``[3,-1,-1,-1]/(2√3)``, ``[0,2,-1,-1]/√6``, ``[0,0,1,-1]/√2`` — an orthonormal basis of R⁴.
    """
    bands = torch.tensor([
        [0.5, 0.5, 0.5, 0.5],
        [3 / (2 * math.sqrt(3)), -1 / (2 * math.sqrt(3)), -1 / (2 * math.sqrt(3)),
         -1 / (2 * math.sqrt(3))],
        [0.0, 2 / math.sqrt(6), -1 / math.sqrt(6), -1 / math.sqrt(6)],
        [0.0, 0.0, 1 / math.sqrt(2), -1 / math.sqrt(2)],
    ])
    rows = torch.zeros(4 * channels, channels, 4)
    for b in range(4):
        for c in range(channels):
            rows[b * channels + c, c] = bands[b]
    return rows.reshape(4 * channels, 4 * channels)


def pair_rows(channels: int) -> torch.Tensor:
    """``2C`` orthonormal, non-negative rows over 2x2 patches of ``C`` channels, row-pair-major.

    Row ``c`` sums the top pixel pair of channel ``c`` (taps (0,0), (0,1)), row ``C + c`` its
    bottom pair (taps (1,0), (1,1)), each divided by ``√2``: disjoint supports, so ``P Pᵀ = I``,
    and non-negative inputs give non-negative ``P x`` (the plain form's ``-P`` half is dead).
    """
    rows = torch.zeros(2, channels, channels, 4)
    s = 1 / math.sqrt(2)
    for c in range(channels):
        rows[0, c, c, :2] = s
        rows[1, c, c, 2:] = s
    return rows.reshape(2 * channels, 4 * channels)


def freeze_coder_(coder: nn.Module) -> nn.Module:
    """Make ``coder.weight`` a buffer (same state-dict key): ``coder_constraint="fixed"``.

    A square pointwise coder is then set to ``A = I`` (any orthogonal ``A`` computes the same
    function, ``AᵀA x = x``; the identity makes the plain form lean) and its fused path skips
    the arithmetic. A transition coder gets the non-negative :func:`pair_rows` ``P`` when its
    shape allows, else keeps its Haar ``P``. Loading a state dict checks ``AᵀA = I`` /
    ``P Pᵀ = I`` for fixed coders (``‖G - I‖_F < 1e-3 √m`` for the ``m x m`` Gram ``G``), whose
    fused path relies on it.
    """
    w = coder.weight.detach().clone()
    if isinstance(coder, DownsampleCoder) and coder.width <= 2 * coder.in_channels:
        w = pair_rows(coder.in_channels)[: coder.width].to(w)
    square = isinstance(coder, Coder) and coder.kernel_size == 1 and coder.width == coder.dim
    if square:
        w = torch.eye(coder.dim, dtype=w.dtype, device=w.device)
    del coder.weight
    coder.register_buffer("weight", w)
    coder.fixed, coder.passes_input = True, square
    coder.register_load_state_dict_post_hook(_check_fixed_coder)
    return coder


def _check_fixed_coder(module: nn.Module, incompatible_keys) -> None:
    if not module.fixed or module.weight.dim() != 2:
        return
    err = float(module.gram_penalty().sqrt())
    if not err < 1e-3 * max(1, module.weight.shape[0]) ** 0.5:
        raise ConfigError(f"coder_constraint='fixed': loaded coder weight is not orthogonal "
                          f"(‖AᵀA - I‖ = {err:.3g}); load it with a trainable coder_constraint",
                          field="coder_constraint")


def _embed(w: torch.Tensor, kernel_size: int, dims: int) -> torch.Tensor:
    """Zero-pad a centred kernel ``(o, i, k, ...)`` to ``kernel_size`` (no-op for matrices)."""
    if dims == 0:
        return w
    k = w.shape[-1]
    if k == kernel_size:
        return w
    if k > kernel_size or (kernel_size - k) % 2:
        raise ValueError(f"cannot embed a {k}-kernel in a {kernel_size}-kernel")
    p = (kernel_size - k) // 2
    return F.pad(w, (p, p) * dims)


# --------------------------------------------------------------------------- the block


def _layer(dims: int, cin: int, cout: int, k: int, stride: int = 1, bias: bool = True) -> nn.Module:
    if dims == 0:
        return nn.Linear(cin, cout, bias=bias)
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    return conv(cin, cout, k, stride=stride, padding=k // 2, bias=bias)


def _bn(dims: int, c: int) -> nn.Module:
    return nn.BatchNorm1d(c) if dims <= 1 else nn.BatchNorm2d(c)


def drop_path(t: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al., 2016), per sample: ``t · m / (1 - p)`` with
    ``m ~ Bernoulli(1 - p)`` drawn once per sample, so ``E[output] = t``; in eval mode (or at
    ``p = 0``) ``t`` itself. Applied to a residual branch (or a PNNH learner term), it drops
    that block's learner for the sample: the block computes ``relu(x)``, i.e. ``x`` for the
    non-negative input that follows a ReLU."""
    if not training or p <= 0.0:
        return t
    keep = 1.0 - p
    mask = torch.empty((t.shape[0],) + (1,) * (t.dim() - 1), dtype=t.dtype, device=t.device)
    return t * mask.bernoulli_(keep).div_(keep)


class PNNHBlock(nn.Module):
    """Two plain layers: a weight-shared coder (the internal path) beside a learner.

    ``y = relu( C(x) + bn2(D relu(bn1(E x + b1))) + b2 )`` where ``C(x) = AᵀA x`` (or ``P x`` in a
    transition). ``dims``: 0 Linear, 1 Conv1d, 2 Conv2d. ``stride=2`` / ``out_dim != dim``
    make a transition block (conv2d only). ``batchnorm`` puts BatchNorm on the learner units.
    ``zero_init_decoder`` zeroes ``D`` (or, with BatchNorm, the last BatchNorm's scale);
    ``None``: zero without BatchNorm, not with it (see :class:`CoderOptions`).
    ``transition_norm``: a transition carries ``carry_bn(P x)`` (``None``: with ``batchnorm``).
    """

    def __init__(
        self,
        dim: int,
        learner_width: int,
        *,
        dims: int = 0,
        out_dim: int | None = None,
        stride: int = 1,
        kernel_size: int = 3,
        coder_ratio: float = 1.0,
        coder_kernel: int = 1,
        coder_init: str = "orthogonal",
        batchnorm: bool = False,
        zero_init_decoder: bool | None = None,
        transition_norm: bool | None = None,
        transition_coder: str | None = None,
        fused: bool = True,
    ):
        super().__init__()
        if zero_init_decoder is None:
            zero_init_decoder = not batchnorm
        if transition_norm is None:
            transition_norm = batchnorm
        if transition_coder is None:
            transition_coder = "projection" if batchnorm else "orthogonal"
        if transition_coder not in TRANSITION_CODERS:
            raise ConfigError(f"transition_coder: must be one of {', '.join(TRANSITION_CODERS)}, "
                              f"got {transition_coder!r}", field="transition_coder")
        out_dim = dim if out_dim is None else out_dim
        self.dims, self.fused = dims, fused
        self.kernel_size = 1 if dims == 0 else kernel_size
        self.stride = stride
        self.transition = stride != 1 or out_dim != dim
        self.carry_bn = None
        if self.transition:
            if dims != 2 or stride != 2 or kernel_size != 3:
                raise ConfigError("transition blocks are 3x3 stride-2 Conv2d blocks", field="model")
            self.coder = (ProjectionCoder(dim, out_dim) if transition_coder == "projection"
                          else DownsampleCoder(dim, out_dim, coder_ratio))
            if transition_norm:
                self.carry_bn = _bn(dims, out_dim)
        else:
            self.coder = Coder(dim, coder_ratio, dims, coder_kernel, coder_init)
            if coder_kernel > self.kernel_size and dims:
                raise ConfigError("coder_kernel: must not exceed the block's kernel_size",
                                  field="coder_kernel")
        k = self.kernel_size
        self.learner_width = learner_width
        if learner_width > 0:
            self.enc = _layer(dims, dim, learner_width, k, stride, bias=not batchnorm)
            self.bn1 = _bn(dims, learner_width) if batchnorm else nn.Identity()
            self.dec = _layer(dims, learner_width, out_dim, k, 1, bias=False)  # b2: self.bias
            self.bn2 = _bn(dims, out_dim) if batchnorm else nn.Identity()
            mode = "fan_out" if batchnorm else "fan_in"  # with BatchNorm: the ResNet's He init
            nn.init.kaiming_normal_(self.enc.weight, mode=mode, nonlinearity="relu")
            nn.init.kaiming_normal_(self.dec.weight, mode=mode, nonlinearity="relu")
            if self.enc.bias is not None:
                nn.init.zeros_(self.enc.bias)
            if zero_init_decoder:
                if batchnorm:
                    nn.init.zeros_(self.bn2.weight)
                else:
                    nn.init.zeros_(self.dec.weight)
        self.bias = None if batchnorm and learner_width > 0 else nn.Parameter(torch.zeros(out_dim))
        self.drop_path = 0.0  # stochastic depth of the learner term (training only)

    def _bias(self, y: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return y
        return y + self.bias.reshape((-1,) + (1,) * self.dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.fused and self.coder.passes_input else self.coder.carry(x, self.fused)
        if self.carry_bn is not None:
            y = self.carry_bn(y)
        if self.learner_width == 0:
            return torch.relu(self._bias(y))
        h = torch.relu(self.bn1(self.enc(x)))
        if self.bias is None:
            t = self.bn2(self.dec(h))
        elif self.dims == 0:  # no BatchNorm: b2 rides in the decoder's own bias add
            t = F.linear(h, self.dec.weight, self.bias)
        else:
            t = self.dec._conv_forward(h, self.dec.weight, self.bias)
        return torch.relu(y + drop_path(t, self.drop_path, self.training))

    # -- the plain form -------------------------------------------------------------

    @torch.no_grad()
    def to_plain_layers(self) -> list[nn.Module]:
        """``[layer1, ReLU, layer2, ReLU]`` with ``[A; -A; E]`` / ``[Aᵀ, -Aᵀ, D]`` materialized.

        BatchNorm (eval statistics) is folded into ``E`` and ``D`` (and a transition's
        ``carry_bn`` into the coder's decoder ``[I, -I]`` and the output bias).
        """
        k = self.kernel_size
        dim, out_dim = self.coder.in_dim, self.coder.out_dim
        w1 = [self.coder.encoder_weight(k)]
        b1 = [w1[0].new_zeros(w1[0].shape[0])]
        w2 = [self.coder.decoder_weight(k)]
        b2 = self.bias.detach().clone() if self.bias is not None else w2[0].new_zeros(out_dim)
        if self.carry_bn is not None:  # bn_c(P x): its scale on the decoder's columns, its shift
            w2[0], bc = fold_bn(w2[0], None, self.carry_bn)  # on the output bias
            b2 = b2 + bc
        if self.learner_width > 0:
            we, be = fold_bn(self.enc.weight, self.enc.bias, self.bn1)
            wd, bd = fold_bn(self.dec.weight, self.dec.bias, self.bn2)
            w1.append(we)
            b1.append(be)
            w2.append(wd)
            b2 = b2 + bd
        w1, b1, w2 = torch.cat(w1, 0), torch.cat(b1, 0), torch.cat(w2, 1)
        hidden = w1.shape[0]
        l1 = _layer(self.dims, dim, hidden, k, self.stride).to(w1)
        l2 = _layer(self.dims, hidden, out_dim, k, 1).to(w2)
        l1.weight.copy_(w1)
        l1.bias.copy_(b1)
        l2.weight.copy_(w2)
        l2.bias.copy_(b2)
        return [l1, nn.ReLU(), l2, nn.ReLU()]


def folded_weight_bias(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module,
                       dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')`` with ``bn(layer(x; W, b)) = layer(x; W', b')`` for an eval-mode BatchNorm:
    ``W' = s·W`` (``s = γ/√(σ² + ε)`` scaling output channel ``c``), ``b' = (b − μ)·s + β``.
    Differentiable in every argument; computed in ``dtype`` (default: the weight's) and
    returned in the weight's dtype."""
    dt = weight.dtype if dtype is None else dtype
    b = bias.to(dt) if bias is not None else weight.new_zeros(weight.shape[0], dtype=dt)
    gamma = bn.weight.to(dt) if bn.weight is not None else 1.0
    scale = gamma / torch.sqrt(bn.running_var.to(dt) + bn.eps)
    w = weight.to(dt) * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    b = (b - bn.running_mean.to(dt)) * scale
    if bn.bias is not None:
        b = b + bn.bias.to(dt)
    return w.to(weight.dtype), b.to(weight.dtype)


def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module):
    """``bn(layer(x))`` as one layer (eval statistics): returns ``(weight, bias)`` copies."""
    weight = weight.detach().clone()
    bias = bias.detach().clone() if bias is not None else weight.new_zeros(weight.shape[0])
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        with torch.no_grad():
            weight, bias = folded_weight_bias(weight, bias, bn)
    return weight, bias


# --------------------------------------------------------------------------- constraints


def polar_svd(w: torch.Tensor) -> torch.Tensor:
    """``U Vᵀ`` by SVD (orthogonal Procrustes), batched, in float64.

    A coder right after a step is orthogonal up to ``O(lr)``: all its singular values are
    nearly equal, and float32 LAPACK SVD can then fail to converge ("too many repeated singular
    values"; seen on a 100-layer MLP). Float64 avoids it; should it still fail, the polar factor
    comes from Newton–Schulz, which converges to the same matrix.
    """
    try:
        u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
        return (u @ vh).to(w.dtype)
    except torch.linalg.LinAlgError:
        return ns_project(newton_schulz(w, 10), 3, tol=float("inf"))


def ns_project(w: torch.Tensor, steps: int = 1, tol: float = 0.25) -> torch.Tensor:
    """Polar factor ``U Vᵀ`` of a batch of *near-orthogonal* matrices, by warm Newton–Schulz.

    A coder is orthogonal before the optimizer step and moves by ``O(lr)``; its singular values
    ``1 + ε`` are then inside the iteration's basin and one step
    ``X <- X (3I - XᵀX) / 2`` already gives ``1 - 1.5 ε² + O(ε³)``: no normalization needed,
    two matmuls per coder (batched over coders of equal shape). When some coder is far from
    orthogonal (``max |XᵀX - I| > tol``: after loading foreign weights, or a huge step) the
    batch goes through :func:`pnnh.orthogonal.newton_schulz` (normalized, 8 steps) first.
    """
    x = w.float()
    wide = x.shape[-2] <= x.shape[-1]
    for i in range(steps):
        g = x @ x.transpose(-2, -1) if wide else x.transpose(-2, -1) @ x
        eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
        if i == 0 and float((g - eye).abs().amax()) > tol:
            return ns_project(newton_schulz(w, 8), steps, tol=float("inf"))
        m = 1.5 * eye - 0.5 * g
        x = m @ x if wide else x @ m
    return x.to(w.dtype)



class CoderConstraint(nn.Module):
    """Keeps every coder of a model near orthogonal; one per model (no parameters).

    The trainer calls :meth:`after_optimizer_step` after each optimizer step and adds
    :meth:`extra_loss` to the loss. Projections are batched over coders of equal shape.
    """

    def __init__(self, coders: list[nn.Module], mode: str = "newton_schulz",
                 project_every: int = 1, penalty_weight: float = 0.01, ns_steps: int = 1):
        super().__init__()
        if mode not in CONSTRAINTS:
            raise ConfigError(
                f"coder_constraint: must be one of {', '.join(CONSTRAINTS)}, got {mode!r}",
                field="coder_constraint")
        if int(project_every) < 1:
            raise ConfigError(f"project_every: must be >= 1, got {project_every}",
                              field="project_every")
        self.mode, self.project_every = mode, int(project_every)
        self.penalty_weight, self.ns_steps = float(penalty_weight), int(ns_steps)
        self._coders = list(coders)  # not registered: the blocks own them
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        if mode in ("procrustes", "newton_schulz", "orthogonal"):
            for c in self._coders:
                if c.weight.dim() != 2:
                    raise ConfigError(
                        f"coder_constraint={mode!r} needs a pointwise coder (coder_kernel=1); "
                        "use 'penalty' or 'none' for k x k coders", field="coder_constraint")
        if mode == "orthogonal":
            for c in self._coders:
                if not parametrize.is_parametrized(c, "weight"):
                    w = c.weight.detach().clone()
                    torch.nn.utils.parametrizations.orthogonal(c, "weight")
                    with torch.no_grad():
                        c.weight = w  # start from the same (orthogonal) init

    @torch.no_grad()
    def project(self) -> None:
        """Project every coder onto the (semi-)orthogonal matrices now."""
        groups: dict[tuple, list[nn.Module]] = {}
        for c in self._coders:
            groups.setdefault(tuple(c.weight.shape), []).append(c)
        for cs in groups.values():
            w = torch.stack([c.weight for c in cs])
            q = polar_svd(w) if self.mode == "procrustes" else ns_project(w, self.ns_steps)
            for c, qi in zip(cs, q):
                c.weight.copy_(qi)

    def after_optimizer_step(self) -> None:
        if self.mode not in ("procrustes", "newton_schulz"):
            return
        self.steps += 1
        if int(self.steps) % self.project_every == 0:
            self.project()

    def extra_loss(self) -> torch.Tensor:
        """``penalty_weight · Σ ‖AᵀA - I‖²`` in ``"penalty"`` mode, else 0."""
        if self.mode != "penalty" or not self._coders:
            return torch.zeros((), device=self.steps.device)
        return self.penalty_weight * sum(c.gram_penalty() for c in self._coders)

    def orthogonality_error(self) -> float:
        """Largest ``‖AᵀA - I‖_F`` over the coders (Gram of the smaller side)."""
        with torch.no_grad():
            return max((float(c.gram_penalty().sqrt()) for c in self._coders), default=0.0)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, project_every={self.project_every}, coders={len(self._coders)}"


def attach_constraint(model: nn.Module, coder_constraint: str | CoderOptions = DEFAULT_CONSTRAINT,
                      project_every: int = 1, penalty_weight: float = 0.01,
                      procrustes: bool = False) -> nn.Module:
    """Give ``model`` a :class:`CoderConstraint` over all of its coders (``model.coder_constraint``).

    ``coder_constraint`` is a constraint name or a :class:`CoderOptions` (whose
    ``coder_constraint``, ``project_every``, ``penalty_weight`` and ``procrustes`` are then used).
    ``"fixed"`` instead turns every coder weight into a buffer (:func:`freeze_coder_`) and
    attaches nothing: no per-step hook, no extra loss. ``procrustes=True`` (the
    ``--procrustes`` training flag) selects the exact SVD projection.
    """
    if isinstance(coder_constraint, CoderOptions):
        o = coder_constraint
        coder_constraint, project_every, penalty_weight, procrustes = (
            o.coder_constraint, o.project_every, o.penalty_weight, o.procrustes)
    if procrustes:
        coder_constraint = "procrustes"
    coders = [m for m in model.modules() if isinstance(m, (Coder, DownsampleCoder))]
    if coder_constraint == "fixed":
        for c in coders:
            freeze_coder_(c)
        return model
    model.coder_constraint = CoderConstraint(coders, coder_constraint, project_every,
                                             penalty_weight)
    return model
