"""Losses of the three training phases (pure functions of tensors).

- coefficient loss (Phase I): mean squared error to the [-1,1]-normalised (alpha_id, alpha_exp);
- reconstruction loss L_R (Phases II/III): mean squared vertex-coordinate error in (unit mm)^2;
- identification loss L_C (Phase III): softmax cross-entropy, or SphereFace's A-Softmax margin;
- Genova et al. (CVPR 2018) batch-distribution loss: per-dimension batch mean -> 0 and variance -> 1
  of the predicted coefficients in prior units (alpha / std), the 3DMM prior being N(0, std^2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def coefficient_loss(
    pred_id: torch.Tensor, pred_exp: torch.Tensor, t_id: torch.Tensor, t_exp: torch.Tensor
) -> torch.Tensor:
    """MSE over all latent dimensions (normalised units), so k_id and k_exp weigh per dimension."""
    return torch.cat([pred_id - t_id, pred_exp - t_exp], dim=1).pow(2).mean()


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, unit_mm: float = 1.0) -> torch.Tensor:
    """Mean squared coordinate error of flattened shapes, in units of ``unit_mm``^2."""
    return (pred - target).pow(2).mean() / (unit_mm * unit_mm)


def batch_distribution_loss(z: torch.Tensor) -> torch.Tensor:
    """Genova et al.: mean_b(z) -> 0 and var_b(z) -> 1 per dimension; needs a batch of >= 2."""
    if z.shape[0] < 2:
        return z.new_zeros(())
    mean = z.mean(dim=0)
    var = z.var(dim=0, unbiased=False)
    return mean.pow(2).mean() + (var - 1.0).pow(2).mean()


def softmax_loss(
    c_id: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, logits) of a bias-free linear classifier over c_Id."""
    logits = c_id @ weight.t()
    return F.cross_entropy(logits, labels), logits


def _cos_m_theta(cos: torch.Tensor, m: int) -> torch.Tensor:
    # Chebyshev polynomials T_m(cos θ) = cos(mθ)
    if m == 1:
        return cos
    if m == 2:
        return 2 * cos**2 - 1
    if m == 3:
        return 4 * cos**3 - 3 * cos
    if m == 4:
        return 8 * cos**4 - 8 * cos**2 + 1
    raise ValueError(f"A-Softmax margin m must be 1..4, got {m}")


def asoftmax_lambda(iteration: int, lambda_min: float, base: float = 1000.0, gamma: float = 0.12) -> float:
    """SphereFace's annealing of the margin blend: large at first (≈softmax), down to lambda_min."""
    return max(lambda_min, base / (1.0 + gamma * iteration))


def asoftmax_loss(
    c_id: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, m: int, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A-Softmax (Liu et al. 2017): the target logit ‖x‖cos θ becomes ‖x‖ψ(θ), ψ = (-1)^k cos(mθ) - 2k.

    Blended as (λ‖x‖cos θ + ‖x‖ψ(θ)) / (1 + λ) for stable early training; returns (loss, logits
    without margin, usable for accuracy).
    """
    w = F.normalize(weight, dim=1)
    x_norm = c_id.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (c_id / x_norm) @ w.t()
    cos = cos.clamp(-1 + 1e-7, 1 - 1e-7)
    cos_t = cos.gather(1, labels[:, None])
    theta = torch.acos(cos_t.detach())
    k = torch.floor(m * theta / math.pi)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    psi = sign * _cos_m_theta(cos_t, m) - 2.0 * k
    target = (lam * cos_t + psi) / (1.0 + lam)
    logits = cos * x_norm
    margin_logits = logits.scatter(1, labels[:, None], target * x_norm)
    return F.cross_entropy(margin_logits, labels), logits
