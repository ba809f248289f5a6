"""Block conjugate gradients: every stacked query's system solved over one shared Krylov space.

Per-input RegVar solves ``A x_q = b_q`` with the same A = ∇²P(θ₀) for many queries. Plain CG
builds one Krylov space per query; block CG (O'Leary 1980) builds one for the whole stack,
``span{B, AB, A²B, …}``, and each query's x_q is the A-orthogonal projection of its solution on
it. The space grows by one direction per query per iteration, so the curvature's large
eigenvalues — shared by every query's system — are found once for all, and each query needs
far fewer iterations (each still one exact product per query). The solution is the same: x_q
minimises the A-norm error over a space that contains the query's own Krylov space, so bᵀx_q
grows monotonically to bᵀA⁻¹b, exactly as in plain CG, and the same stopping rules apply.

Numerics: the search block is re-orthonormalised every iteration (float64 Gram eigenvectors),
dropping directions that have become linearly dependent (converged
queries make the block rank deficient); a block whose curvature PᵀAP is not positive definite
means A is not positive definite on the shared space, and every query of the block is flagged
as having met non-positive curvature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .newton import CGResult, MatVec

DEPENDENT = 100.0  # directions below DEPENDENT·eps (relative, see _orthonormal) are round-off
GRAM_FLOOR = 1e-12  # float64 eigenvalues of a Gram matrix below this share of the largest are noise


def _orthonormal(z: torch.Tensor, scale: float) -> torch.Tensor:
    """Orthonormal rows spanning z's row space, without directions that are round-off: below
    DEPENDENT·eps of the block's largest singular value, or of ``scale`` (the right-hand sides'
    size: the recurrences' round-off does not shrink with the residuals, so once a residual is
    that small its direction is noise). Through the eigenvectors of the float64 Gram matrix
    z zᵀ (Q × Q), far cheaper than an SVD of the wide block."""
    gram = z.double() @ z.double().T
    values, vectors = torch.linalg.eigh(0.5 * (gram + gram.T))
    top = float(values[-1]) if len(values) else 0.0
    relative = max((DEPENDENT * torch.finfo(z.dtype).eps) ** 2, GRAM_FLOOR)
    floor = max(relative * top, (DEPENDENT * torch.finfo(z.dtype).eps * scale) ** 2)
    keep = values > floor
    basis = vectors[:, keep] / values[keep].sqrt()
    return (basis.T @ z.double()).to(z.dtype)


def block_cg(
    matvec: MatVec,
    b: torch.Tensor,
    rtol: float,
    max_iter: int,
    energy_tol: float = 0.0,
    checkpoints: Sequence[int] = (),
    record: Callable[[int, torch.Tensor], None] | None = None,
    precondition: Callable[[torch.Tensor], torch.Tensor] | None = None,
    energy_delay: int = 1,
) -> CGResult:
    """Block CG for ``A x_q = b_q`` (rows of ``b``, Q × D), x₀ = 0, stopping when every query
    meets ``batched_cg``'s rules: ‖r‖ ≤ rtol·‖b‖, or bᵀx grew by ≤ ``energy_tol`` (relative)
    over the last ``energy_delay`` iterations. ``matvec(P, rows)`` multiplies the search block
    (its rows are directions, not queries: ``rows`` is None). Iterations count block iterations:
    each costs one product per direction, at most one per query."""
    q = len(b)
    x = torch.zeros_like(b)
    r = b.clone()
    b_norm = b.norm(dim=1)
    tiny = torch.finfo(b.dtype).tiny
    apply_m = precondition if precondition is not None else (lambda v: v)
    scale = float(b_norm.max()) if q else 0.0
    p = _orthonormal(apply_m(r), scale)
    energy = torch.zeros(q, dtype=torch.float64, device=b.device)
    gains = torch.zeros(q, max(1, energy_delay), dtype=torch.float64, device=b.device)
    converged = b_norm == 0
    negative = torch.zeros(q, dtype=torch.bool, device=b.device)
    iterations = torch.zeros(q, dtype=torch.long, device=b.device)
    todo = sorted(k for k in set(checkpoints) if k >= 0)
    for it in range(max_iter + 1):
        while todo and todo[0] <= it and record is not None:
            record(todo.pop(0), x)
        if it == max_iter or bool(converged.all()) or len(p) == 0:
            break
        ap = matvec(p, None)
        pap = (p.double() @ ap.double().T)
        pap = 0.5 * (pap + pap.T)
        chol, info = torch.linalg.cholesky_ex(pap)
        if int(info) != 0:  # A is not positive definite on the shared space
            negative |= ~converged
            break
        alpha = torch.cholesky_solve((p.double() @ r.double().T), chol).to(b.dtype)  # (dirs, Q)
        step = alpha.T @ p
        x = x + step
        r = r - alpha.T @ ap
        gain = (b.double() * step.double()).sum(1)
        energy += gain
        gains[:, it % gains.shape[1]] = gain
        iterations += (~converged).long()
        done = r.norm(dim=1) <= rtol * b_norm
        if energy_tol > 0 and it + 1 >= gains.shape[1]:
            done |= gains.sum(1) <= energy_tol * energy
        converged |= done
        z = apply_m(r)
        beta = -torch.cholesky_solve(ap.double() @ z.double().T, chol).to(b.dtype)
        p = _orthonormal(z + beta.T @ p, scale)
    if record is not None:
        for k in todo:
            record(k, x)
    rel = r.norm(dim=1) / b_norm.clamp_min(tiny)
    gain_share = (gains.sum(1) / energy.clamp_min(tiny)).to(b.dtype)
    return CGResult(x, iterations, rel, converged & ~negative, negative, gain_share)
