"""Robust landmark loss: Huber on the 2D residual length, minimised by IRLS.

``rho(e) = e^2`` for ``e <= delta`` and ``2 delta e - delta^2`` beyond, so inliers cost exactly
what least squares charges and a landmark off by 40 px costs like one off by ~sqrt(80 delta).
The IRLS weight ``rho'(e) / (2 e) = min(1, delta / e)`` turns each step into the weighted least
squares the pose/expression/identity solvers already do; re-weighting from the current residuals
is a majorise-minimise step, so the Huber objective still decreases monotonically.
"""

from __future__ import annotations

from typing import Any

from pipeline.fit.xp import namespace_of

Array = Any
LOSSES = ("none", "huber")


def residual_norm(residual: Array) -> Array:
    """Per-landmark 2D residual length: (..., 2, L) -> (..., L)."""
    xp = namespace_of(residual)
    return xp.sqrt(xp.sum(residual * residual, axis=-2))


def huber_loss(e: Array, delta: float) -> Array:
    xp = namespace_of(e)
    return xp.where(e <= delta, e * e, 2.0 * delta * e - delta * delta)


def huber_weights(e: Array, delta: float) -> Array:
    xp = namespace_of(e)
    return xp.where(e <= delta, xp.ones_like(e), delta / xp.maximum(e, delta))


def loss(e: Array, kind: str, delta: float) -> Array:
    """Per-landmark loss for residual lengths ``e``."""
    if kind == "none":
        return e * e
    if kind == "huber":
        return huber_loss(e, delta)
    raise ValueError(f"robust loss: expected one of {list(LOSSES)}, got {kind!r}")


def weights(e: Array, kind: str, delta: float) -> Array:
    """IRLS weights for residual lengths ``e`` (ones for plain least squares)."""
    xp = namespace_of(e)
    if kind == "none":
        return xp.ones_like(e)
    if kind == "huber":
        return huber_weights(e, delta)
    raise ValueError(f"robust loss: expected one of {list(LOSSES)}, got {kind!r}")
