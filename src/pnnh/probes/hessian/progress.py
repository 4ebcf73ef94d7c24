"""Progress of the curvature estimators: one tqdm bar per stage on stderr.

Each stage of a curvature run (Lanczos, trace, SLQ, the dense Hessian) shows the HVPs done out
of its budget and, where the estimator has them, its current estimate and error bound
(``λmax 12.3 ± 4e-05``). Bars appear only after two seconds (short runs stay silent), go to
stderr, vanish when the stage ends, and are on where stderr is a terminal unless the operator
was made with ``progress=False`` (``pnnh probe hessian --quiet``) — so tests and logs stay
quiet. The training loop's bar (:mod:`pnnh.train`) follows the same pattern.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


def enabled(progress: bool | None) -> bool:
    """``progress`` if given, else whether stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else bool(progress)


@contextlib.contextmanager
def stage_bar(on: bool, desc: str, total: int) -> Iterator[object | None]:
    """A bar of ``total`` HVPs named ``desc`` (``None`` when off), closed on exit."""
    if not on:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="HVP", leave=False, dynamic_ncols=True,
               file=sys.stderr, delay=2.0)
    try:
        yield bar
    finally:
        bar.close()
