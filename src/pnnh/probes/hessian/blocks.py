"""Per-block curvature: the diagonal blocks ``H_BB`` of the loss Hessian (per module or stage).

``H_BB`` is the Hessian of the loss in ``θ_B`` with every other parameter fixed, so it is a
:class:`~pnnh.probes.hessian.operator.HessianOperator` over the block's parameters; its extreme
eigenvalues come from Lanczos with the gap bound (:mod:`.lanczos`) and its trace from the
chosen estimator (:mod:`.trace`), with their stated error bounds. Since ``tr H = Σ_B tr H_BB``,
stage-wise traces add up to the whole trace; by Cauchy interlacing
``λmin(H) <= λmin(H_BB) <= λmax(H_BB) <= λmax(H)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from pnnh.errors import ConfigError
from pnnh.probes.hessian.operator import Batch, HessianOperator, LossFn


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
    fold_batchnorm: bool | str = True, max_memory: int | float | str | None = None,
    progress: bool | None = None, output: str | int | None = None,
) -> list[dict]:
    """Per-block curvature: for each block ``B`` of parameters, the diagonal block ``H_BB``
    of the Hessian (the Hessian of the loss in ``θ_B`` with the other parameters fixed) —
    its extreme eigenvalues (Lanczos) and its trace (``tr H = Σ_B tr H_BB``, so stage-wise
    traces add up to the whole trace). One record per block. ``max_memory``, ``progress``:
    see :class:`HessianOperator`."""
    records = []
    for name, prefixes in parse_blocks(blocks).items():
        op = HessianOperator(model, data, loss_fn, params=prefixes, hvp_mode=hvp_mode,
                             fold_batchnorm=fold_batchnorm, max_memory=max_memory,
                             progress=progress, output=output)
        ext = op.extreme_eigenvalues(tol=tol, max_iter=max_iter, seed=seed, bound="gap")
        tr = op.trace(trace_samples, seed=seed, rel_tol=trace_rel_tol, method=trace_method)
        records.append({
            "block": name, "params": ",".join(prefixes), "num_params": op.dim,
            "lambda_max": ext["lambda_max"], "lambda_min": ext["lambda_min"],
            "lanczos_converged": ext["converged"], "trace": tr["trace"],
            "trace_stderr": tr["trace_stderr"], "hvps": op.hvp_calls, "hvp": op.hvp_kind,
        })
    return records
