"""Finish the MAP at a true local minimum of P = mean CE + (wd/2)‖θ‖², and certify it.

Every method reads its curvature (Laplace at prior precision n·wd, RegVar's Hessian) as that of
P, the objective with *coupled* L2 on the trainable weights. A network trained by AdamW with
decoupled decay stops near, not at, a stationary point of P, and possibly where ∇²P is
indefinite, so a Laplace variance there is not defined. After training, :func:`finish` runs a
trust-region Newton method on exact Hessian-vector products (Steihaug–Toint conjugate gradients,
which stop at the trust-region boundary along any direction of non-positive curvature, so
negative curvature is escaped, not divided by) in float64 until ‖∇P‖∞ ≤ ``grad_tol``; then
Lanczos (ARPACK through ``scipy.sparse.linalg.eigsh``) measures the extreme eigenvalues of ∇²P.
:class:`MapCertificate` keeps what was reached, certified or not; the checkpoint stores it and
every run record carries it.

Hand-written because no library offers a trust-region Newton-CG on torch's Hessian-vector
products (``scipy.optimize.minimize(method="trust-krylov")`` would need float64 numpy round trips
of every product and gives no access to the curvature met).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp
from torch.utils.data import DataLoader, TensorDataset

from bench.planning import random_inputs
from bench.record import MapCertificate
from bench.tasks.base import TrainRecipe

GRAD_TOL = 1e-6
MAX_NEWTON_STEPS = 200
MAX_CG_ITERATIONS = 400
# λ_min is read to an absolute accuracy of EIGEN_ATOL: ARPACK stops when a Ritz value θ has
# residual ≤ tol·|θ|, so it runs on ∇²P + EIGEN_SHIFT·I (the Krylov space, hence the speed, is
# the same for any shift) with tol = EIGEN_ATOL / EIGEN_SHIFT. An eigenvalue within EIGEN_ATOL of
# 0 is not told apart from 0: the minimum is then reported singular, not certified. A wide Krylov
# space (LANCZOS_VECTORS) spares restarts.
EIGEN_ATOL = 1e-6
EIGEN_SHIFT = 1.0
LANCZOS_VECTORS = 128
# ARPACK restarts before λ_min counts as unresolved (about LANCZOS_VECTORS products each): near a
# singular minimum the eigenvalues crowd at 0 and resolving one to ±EIGEN_ATOL can take tens of
# thousands of products. Unresolved, λ_min is read to ±ROUGH_ATOL and the network is not certified.
LANCZOS_RESTARTS = 8
ROUGH_ATOL = 1e-3
# A stationary point with λ_min < -EIGEN_ATOL is a saddle: Newton leaves it along the eigenvector
# (the sign and length that lower P most) and runs again, at most SADDLE_ESCAPES times.
SADDLE_ESCAPES = 3
# Planning: products a finish takes (Rotten Tomatoes head: Newton ≈ 110, Lanczos ≈ 300), timed
# on a probe of FINISH_PROBE_ROWS random rows and scaled to the training set.
PLANNED_FINISH_PRODUCTS = 450
FINISH_PROBE_ROWS = 1024


class Objective:
    """P(θ) = mean CE over the training set + (wd/2)‖θ‖², θ the trainable weights flattened,
    in float64 with dropout off (the network every method evaluates)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_decay: float):
        self.model = model.double().eval()
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shapes = [params[n].shape for n in self.names]
        self.sizes = [params[n].numel() for n in self.names]
        self.fixed = {n: p.detach() for n, p in params.items() if not p.requires_grad}
        self.x, self.y, self.wd = x.double(), y, weight_decay
        self.products = 0

    def flat(self) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names]).double()

    def unflat(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        chunks = torch.split(theta, self.sizes)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}

    def value(self, theta: torch.Tensor) -> torch.Tensor:
        logits = functional_call(self.model, {**self.fixed, **self.unflat(theta)}, (self.x,))
        return nn.functional.cross_entropy(logits, self.y) + 0.5 * self.wd * theta.dot(theta)

    def gradient(self, theta: torch.Tensor) -> torch.Tensor:
        return grad(self.value)(theta)

    def hvp(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Exact ∇²P·v (forward-over-reverse)."""
        self.products += 1
        return jvp(self.gradient, (theta,), (v,))[1]

    def load(self, theta: torch.Tensor, model: nn.Module) -> None:
        """Write θ back into ``model``'s trainable parameters (in the model's own dtype)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.unflat(theta).items():
                params[name].copy_(value.to(params[name].dtype))


def _boundary(z: torch.Tensor, d: torch.Tensor, radius: float) -> float:
    """τ ≥ 0 with ‖z + τd‖ = radius."""
    a, b, c = d.dot(d), 2 * z.dot(d), z.dot(z) - radius**2
    return float((-b + torch.sqrt(b * b - 4 * a * c)) / (2 * a))


def steihaug(g: torch.Tensor, product: Callable[[torch.Tensor], torch.Tensor], radius: float,
             tol: float, max_iter: int) -> tuple[torch.Tensor, float, bool]:
    """Approximate minimiser p of m(p) = g·p + ½ p·Bp within ‖p‖ ≤ radius (Steihaug–Toint CG),
    its model value m(p), and whether it stopped on the boundary (non-positive curvature or the
    radius reached)."""
    z, r = torch.zeros_like(g), g.clone()
    d = -r

    def model_value(z: torch.Tensor, r: torch.Tensor) -> float:  # r = g + Bz ⇒ m(z) = ½(g + r)·z
        return float(0.5 * (g + r).dot(z))

    for _ in range(max_iter):
        bd = product(d)
        curvature = d.dot(bd)
        if curvature <= 0:
            tau = _boundary(z, d, radius)
            return z + tau * d, model_value(z + tau * d, r + tau * bd), True
        alpha = r.dot(r) / curvature
        z_next = z + alpha * d
        if z_next.norm() >= radius:
            tau = _boundary(z, d, radius)
            return z + tau * d, model_value(z + tau * d, r + tau * bd), True
        r_next = r + alpha * bd
        if r_next.norm() <= tol:
            return z_next, model_value(z_next, r_next), False
        d = -r_next + (r_next.dot(r_next) / r.dot(r)) * d
        z, r = z_next, r_next
    return z, model_value(z, r), False


def newton_finish(obj: Objective, theta: torch.Tensor, grad_tol: float = GRAD_TOL,
                  max_steps: int = MAX_NEWTON_STEPS, progress: Callable[[str], None] | None = None
                  ) -> tuple[torch.Tensor, int]:
    """Trust-region Newton from θ until ‖∇P‖∞ ≤ ``grad_tol`` (or ``max_steps``); θ and steps."""
    value, g = float(obj.value(theta)), obj.gradient(theta)
    radius, steps = max(1.0, float(theta.norm()) * 0.1), 0
    while float(g.abs().max()) > grad_tol and steps < max_steps:
        steps += 1
        gnorm = float(g.norm())
        p, predicted, on_boundary = steihaug(g, functools.partial(obj.hvp, theta), radius,
                                             min(0.5, math.sqrt(gnorm)) * gnorm, MAX_CG_ITERATIONS)
        trial = theta + p
        new_value = float(obj.value(trial))
        actual = new_value - value
        # Below float64's resolution of P the ratio is noise: judge the step by the gradient.
        tiny = abs(predicted) < 1e-13 * max(1.0, abs(value))
        new_g = obj.gradient(trial) if tiny or actual < 0 else None
        rho = actual / predicted if predicted < 0 else -1.0
        accept = (new_g is not None and new_g.norm() < gnorm) if tiny else rho > 1e-4
        if rho < 0.25 and not tiny:
            radius = 0.25 * float(p.norm())
        elif rho > 0.75 and on_boundary:
            radius *= 2.0
        if accept:
            theta, value, g = trial, new_value, new_g if new_g is not None else obj.gradient(trial)
        if progress is not None:
            progress(f"Newton step {steps}: P {value:.10f}, ‖∇P‖∞ {float(g.abs().max()):.2e}, "
                     f"radius {radius:.2e}, products {obj.products}")
    return theta, steps


def extreme_eigenvalues(obj: Objective, theta: torch.Tensor) -> tuple[float, float, torch.Tensor, bool]:
    """λ_min, λ_max (to 1 %) of ∇²P(θ), λ_min's eigenvector, and whether λ_min was resolved to
    ±EIGEN_ATOL within LANCZOS_RESTARTS (else it is read to ±ROUGH_ATOL), by implicitly restarted
    Lanczos (ARPACK) on exact float64 products."""
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    n = theta.numel()

    def shifted(v: np.ndarray) -> np.ndarray:  # ARPACK works in host memory; θ may live on a GPU
        vector = torch.from_numpy(np.ascontiguousarray(v.reshape(-1))).to(theta.device)
        return obj.hvp(theta, vector).cpu().numpy() + EIGEN_SHIFT * v.reshape(-1)

    op = LinearOperator((n, n), matvec=shifted, dtype=np.float64)
    start = np.random.default_rng(0).standard_normal(n)  # seeded: the same certificate every run
    ncv = min(LANCZOS_VECTORS, n - 1)
    try:
        values, vectors = eigsh(op, k=1, which="SA", tol=EIGEN_ATOL / EIGEN_SHIFT, v0=start, ncv=ncv,
                                maxiter=LANCZOS_RESTARTS)
        resolved = True
    except ArpackNoConvergence:
        values, vectors = eigsh(op, k=1, which="SA", tol=ROUGH_ATOL / EIGEN_SHIFT, v0=start, ncv=ncv)
        resolved = False
    high = eigsh(op, k=1, which="LA", tol=1e-2, v0=start, ncv=min(20, n - 1), return_eigenvectors=False)
    direction = torch.from_numpy(np.ascontiguousarray(vectors[:, 0])).to(theta.device)
    return float(values[0]) - EIGEN_SHIFT, float(high[0]) - EIGEN_SHIFT, direction, resolved


def escape_saddle(obj: Objective, theta: torch.Tensor, direction: torch.Tensor) -> torch.Tensor | None:
    """The point along ±``direction`` (negative curvature) with the lowest P, trying lengths from
    1 down by halves; None when no trial lowers P."""
    base = float(obj.value(theta))
    for length in (2.0 ** -k for k in range(30)):
        trials = [theta + sign * length * direction for sign in (1.0, -1.0)]
        values = [float(obj.value(t)) for t in trials]
        best = int(np.argmin(values))
        if values[best] < base:
            return trials[best]
    return None


def finish(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_decay: float,
           grad_tol: float = GRAD_TOL, progress: Callable[[str], None] | None = None) -> MapCertificate:
    """Take ``model`` (in place) to ‖∇P‖∞ ≤ ``grad_tol`` at a point where ∇²P has no negative
    eigenvalue (leaving saddles along their eigenvector), and measure ∇²P's extreme eigenvalues."""
    start = time.perf_counter()
    dtype = next(model.parameters()).dtype
    obj = Objective(model, x, y, weight_decay)
    theta, steps = newton_finish(obj, obj.flat(), grad_tol, progress=progress)
    low, high, direction, resolved = extreme_eigenvalues(obj, theta)
    escapes = 0
    while low < -(EIGEN_ATOL if resolved else ROUGH_ATOL) and escapes < SADDLE_ESCAPES:
        moved = escape_saddle(obj, theta, direction)
        if moved is None:
            break
        escapes += 1
        if progress is not None:
            progress(f"saddle point (λ_min {low:.3g}): escaping along its eigenvector ({escapes})")
        theta, more = newton_finish(obj, moved, grad_tol, progress=progress)
        steps += more
        low, high, direction, resolved = extreme_eigenvalues(obj, theta)
    obj.load(theta, model)
    grad_inf = float(obj.gradient(theta).abs().max())
    model.to(dtype)
    return MapCertificate(float(obj.value(theta)), grad_inf, grad_tol, low, high, steps, obj.products,
                          time.perf_counter() - start, _note(grad_inf, grad_tol, low, steps, escapes, resolved))


def _note(grad_inf: float, grad_tol: float, low: float, steps: int, escapes: int, resolved: bool = True) -> str:
    """Why a finished network is not certified ('' when it is)."""
    if grad_inf > grad_tol:
        return f"Newton stopped after {steps} steps above the tolerance"
    if not resolved and -ROUGH_ATOL <= low <= ROUGH_ATOL:
        return (f"λ_min not resolved to ±{EIGEN_ATOL:g} within {LANCZOS_RESTARTS} Lanczos restarts (eigenvalues "
                f"crowd at 0): read to ±{ROUGH_ATOL:g} only, a flat or slightly negative direction is not excluded")
    if low < -EIGEN_ATOL:
        return f"a saddle point: negative curvature remained after {escapes} escape(s)"
    if low <= EIGEN_ATOL:
        return f"∇²P is singular to within {EIGEN_ATOL:g} (a flat direction): a non-strict minimum"
    return ""


def finish_seconds(make_model: Callable[[], nn.Module], example: torch.Tensor, num_classes: int,
                   n_train: int, weight_decay: float, device: torch.device) -> float:
    """Planned seconds of a finish: one float64 product timed on random rows, scaled to
    ``n_train`` rows and PLANNED_FINISH_PRODUCTS products."""
    rows = min(n_train, FINISH_PROBE_ROWS)
    if rows == 0:
        return 0.0
    x = random_inputs(example, rows).to(device)
    y = torch.randint(0, num_classes, (rows,), device=device)
    obj = Objective(make_model().to(device), x, y, weight_decay)
    theta = obj.flat()
    v = torch.randn_like(theta)
    obj.hvp(theta, v)  # warm-up
    start = time.perf_counter()
    obj.hvp(theta, v)
    return (time.perf_counter() - start) * n_train / rows * PLANNED_FINISH_PRODUCTS


def gradient_reached(model: nn.Module, data: TensorDataset, weight_decay: float,
                     batch_size: int = 256) -> tuple[float, float]:
    """P and ‖∇P‖∞ at ``model`` as trained, in its own dtype over minibatches (any network: the
    CNN and the LoRA model too, where a float64 Newton finish is unaffordable on a CPU)."""
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    model.zero_grad(set_to_none=True)
    total, n = 0.0, len(data)
    for xb, yb in DataLoader(data, batch_size=batch_size):
        loss = nn.functional.cross_entropy(model(xb.to(device)), yb.to(device), reduction="sum") / n
        loss.backward()
        total += float(loss.detach())
    with torch.no_grad():
        norm2 = sum(float(p.double().pow(2).sum()) for p in params)
        grad_inf = max(float((p.grad + weight_decay * p).abs().max()) for p in params)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return total + 0.5 * weight_decay * norm2, grad_inf


def certify(model: nn.Module, data: TensorDataset, recipe: TrainRecipe,
            progress: Callable[[str], None] | None = None) -> MapCertificate:
    """A freshly trained network's certificate: finished by Newton where the recipe asks for it
    (``model`` changes in place), else measured as trained and marked uncertified."""
    if recipe.newton_finish:
        x, y = data.tensors
        device = next(model.parameters()).device
        return finish(model, x.to(device), y.to(device), recipe.weight_decay, progress=progress)
    start = time.perf_counter()
    value, grad_inf = gradient_reached(model, data, recipe.weight_decay)
    return MapCertificate(value, grad_inf, GRAD_TOL, None, None, 0, 0, time.perf_counter() - start,
                          "the recipe has no Newton finish (unaffordable for this network on a CPU): "
                          "the MAP is where training stopped")
