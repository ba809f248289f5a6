"""Hessian-free curvature products and batched conjugate gradients for per-input RegVar.

Every regularised fit of per-input RegVar starts at the MAP θ̂ and moves O(λ) from it, so a
Newton step of the fit solves ``H d = λ·∇g`` with ``H = ∇²P(θ̂)`` (``methods.regvar``).
Conjugate gradients solve that with Hessian-vector products only: no curvature matrix is
formed, stored or inverted. The products are exact (forward-over-reverse: the JVP of the
gradient, as ``torch.func.hessian`` computes its rows), over the training rows in chunks, and
vmapped over a stack of vectors at one shared point θ̂: the network's own forward and backward
pass is computed once per chunk for the whole stack, and the stack's tangents go through it as
matrix-matrix products. That sharing is where the speed of stacking queries comes from.

``CurvatureKind.GGN`` gives the generalised Gauss-Newton product ``Jᵀ ∇²_f CE J v`` instead
(what laplace-torch's GLM Laplace uses); ``bench fidelity`` uses it for its GGN target.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import grad, jvp, vjp, vmap

from .common import FlatModel, mean_cross_entropy

# Values per tensor of the vmapped chunk (stack × rows × activations per row): bounds memory.
CHUNK_ELEMENTS = 2**24
VECTORIZE_MAX_PARAMS = 10_000  # CPU: vmap the products of small networks (see CurvatureProducts)
LINEAR_CHUNK_ELEMENTS = 2**16  # closed-form products: (rows, Q, C) temporaries that stay in cache


class CurvatureKind(str, enum.Enum):
    """Which curvature of P = mean CE + (wd/2)‖θ‖² the products use."""

    HESSIAN = "hessian"
    """The true Hessian ∇²P: the limit of RegVar's finite difference (the paper's Theorem 4.1)."""
    GGN = "ggn"
    """The generalised Gauss-Newton JᵀΛJ + wd·I (positive definite; laplace-torch's GLM)."""


def activations_per_row(fm: FlatModel, x: torch.Tensor) -> int:
    """Values the network computes for one input (sum of every module's output sizes): the
    per-row memory of a vmapped product, which for a CNN is far more than its input size."""
    sizes: list[int] = []

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            sizes.append(out[0].numel() if out.ndim > 1 else out.numel())

    handles = [m.register_forward_hook(hook) for m in fm.module.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            fm(fm.theta0, fm.inputs(x[:1]))
    finally:
        for h in handles:
            h.remove()
    return max(1, sum(sizes), x[0].numel())


class CurvatureProducts:
    """``v ↦ ∇²P(θ) v`` (or the GGN's) for stacks of vectors, P on the rows ``x, y``.

    ``at(theta, V)``: every vector at one point θ (D,); ``stacked(thetas, V)``: vector q at its
    own point θ_q. ``vectorize`` (default: on a GPU, or for at most ``VECTORIZE_MAX_PARAMS``
    parameters): vmap over the vectors, one wide kernel per operation; else each chunk's
    gradient graph is built once and every vector is one double-backward pass through it.
    Measured on one CPU thread: the IMDB head (99k parameters), whose per-vector matrix products
    are already compute-bound, is 1.5× faster looped; a Fashion-MNIST last layer (650 parameters,
    55k rows), where per-vector overhead dominates, 6.5× faster vmapped (16 vs 105 ms per vector).
    """

    def __init__(
        self,
        fm: FlatModel,
        x: torch.Tensor,
        y: torch.Tensor,
        weight_decay: float,
        kind: CurvatureKind = CurvatureKind.HESSIAN,
        vectorize: bool | None = None,
    ) -> None:
        self.fm, self.x, self.y, self.wd, self.kind = fm, x, y, weight_decay, kind
        self.n = len(x)
        self.per_row = activations_per_row(fm, x)
        if vectorize is None:
            vectorize = fm.device.type != "cpu" or fm.dim <= VECTORIZE_MAX_PARAMS
        self.vectorize = vectorize

        def loss(theta: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return mean_cross_entropy(fm(theta, xb), yb)

        self._loss = loss
        self._grad = grad(loss)

    def rows_per_chunk(self, stack: int) -> int:
        width = stack if self.vectorize else 1
        return max(1, min(self.n, CHUNK_ELEMENTS // (max(1, width) * self.per_row)))

    def _chunks(self, stack: int) -> Iterator[tuple[float, torch.Tensor, torch.Tensor]]:
        rows = self.rows_per_chunk(stack)
        for i in range(0, self.n, rows):
            xb, yb = self.x[i : i + rows], self.y[i : i + rows]
            yield len(xb) / self.n, xb, yb

    def _one(self, theta: torch.Tensor, v: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """Product of the curvature of the mean loss on (xb, yb) with one vector v (torch.func)."""
        if self.kind is CurvatureKind.HESSIAN:
            return jvp(lambda t: self._grad(t, xb, yb), (theta,), (v,))[1]

        def f(t: torch.Tensor) -> torch.Tensor:
            return self.fm(t, xb)

        logits, jv = jvp(f, (theta,), (v,))
        p = logits.softmax(-1)
        hjv = p * jv - p * (p * jv).sum(-1, keepdim=True)  # softmax-CE Hessian in logit space
        return vjp(f, theta)[1](hjv)[0] / len(xb)

    def _looped(self, theta: torch.Tensor, vectors: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """The chunk's products with every vector, one backward pass each through one graph
        (GGN: Jv by the double-vjp trick, then Jᵀ(ΛJv), two passes through the logits' graph)."""
        if self.kind is CurvatureKind.GGN:
            with torch.enable_grad():
                t = theta.detach().requires_grad_(True)
                logits = self.fm(t, xb)
                p = logits.detach().softmax(-1)
                u = torch.zeros_like(logits, requires_grad=True)
                (jt_u,) = torch.autograd.grad(logits, t, u, create_graph=True)
                rows = []
                for v in vectors:
                    (jv,) = torch.autograd.grad(jt_u, u, v, retain_graph=True)
                    hjv = p * jv - p * (p * jv).sum(-1, keepdim=True)
                    rows.append(torch.autograd.grad(logits, t, hjv, retain_graph=True)[0] / len(xb))
            return torch.stack(rows).detach()
        with torch.enable_grad():
            t = theta.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self._loss(t, xb, yb), t, create_graph=True)
            rows = [
                torch.autograd.grad(g, t, v, retain_graph=True, allow_unused=True, materialize_grads=True)[0]
                for v in vectors
            ]
        return torch.stack(rows).detach()

    def at(self, theta: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """(Q, D) products at one shared point ``theta`` (D,)."""
        out = self.wd * vectors
        for weight, xb, yb in self._chunks(len(vectors)):
            if self.vectorize:
                part = vmap(lambda v, xb=xb, yb=yb: self._one(theta, v, xb, yb))(vectors)
            else:
                part = self._looped(theta, vectors, xb, yb)
            out = out + weight * part
        return out

    def stacked(self, thetas: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """(Q, D) products, vector q at point ``thetas[q]``."""
        if not self.vectorize:
            return torch.cat([self.at(t, v[None]) for t, v in zip(thetas, vectors, strict=True)])
        out = self.wd * vectors
        for weight, xb, yb in self._chunks(len(vectors)):
            part = vmap(lambda t, v, xb=xb, yb=yb: self._one(t, v, xb, yb))(thetas, vectors)
            out = out + weight * part
        return out

    def gradient(self, thetas: torch.Tensor) -> torch.Tensor:
        """∇P at every stacked point (Q, D), full batch."""
        out = self.wd * thetas
        for weight, xb, yb in self._chunks(len(thetas)):
            if self.vectorize:
                part = vmap(lambda t, xb=xb, yb=yb: self._grad(t, xb, yb))(thetas)
            else:
                part = torch.stack([self._grad(t, xb, yb) for t in thetas])
            out = out + weight * part
        return out



class LinearSoftmaxProducts(CurvatureProducts):
    """The same products in closed form for a softmax read-out that is one ``nn.Linear`` on fixed
    features (``regvar-ll``): logits z = Wφ + b are linear in θ, so ∇²P = GGN =
    (1/n) Σ_i φ̃_i φ̃_iᵀ ⊗ Λ_i + wd·I with φ̃ = (φ, 1) and Λ_i = diag(p_i) − p_i p_iᵀ.

    A stack of Q vectors V = (V_W, V_b) costs two products with the feature matrix per chunk:
    Z = Φ V_Wᵀ + V_b (every row's Jv), then Φᵀ(Λ Z). Nothing is formed: memory is Q·rows·C.
    Autograd's generic product (the parent class) computes the same values through a vmapped
    forward-over-reverse pass; on Fashion-MNIST's last layer (650 parameters, 55k rows, a stack
    of 64, one contended CPU thread) 7 instead of 15 ms per vector. tests/test_regvar_newton.py
    checks that both agree."""

    @staticmethod
    def applies(fm: FlatModel) -> bool:
        return isinstance(fm.module, nn.Linear) and "weight" in fm.names and set(fm.names) <= {"weight", "bias"}

    def __init__(self, fm: FlatModel, x: torch.Tensor, y: torch.Tensor, weight_decay: float,
                 kind: CurvatureKind = CurvatureKind.HESSIAN) -> None:
        super().__init__(fm, x, y, weight_decay, kind, vectorize=True)
        self.classes, self.features = fm.module.weight.shape
        self.x, self.y = fm.inputs(self.x), self.y.to(fm.device)

    def _split(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(Q, D) → weights as a (d, Q·C) matrix and biases (Q, C), or None when not trained."""
        parts = dict(zip(self.fm.names, flat.split(self.fm.sizes, dim=1), strict=True))
        w = parts["weight"].reshape(-1, self.features).T  # row q·C + c is W_q[c]
        return w, parts.get("bias")

    def _logits(self, w: torch.Tensor, b: torch.Tensor | None, xb: torch.Tensor) -> torch.Tensor:
        """Φ W_qᵀ + b_q for every stacked q as one matrix product: (rows, Q, C)."""
        z = (xb @ w).view(len(xb), -1, self.classes)
        if b is not None:
            return z + b
        const = self.fm.const.get("bias")
        return z if const is None else z + const

    def _join(self, lz: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        """Φᵀ-side of a product: rows (rows, Q, C) → (Q, D) in θ's layout (weight, then bias)."""
        q = lz.shape[1]
        gw = (lz.reshape(len(xb), -1).T @ xb).view(q, -1)
        return torch.cat([gw, lz.sum(0)], dim=1) if "bias" in self.fm.names else gw

    def _products(self, p: torch.Tensor, vectors: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        vw, vb = self._split(vectors)
        z = (xb @ vw).view(len(xb), -1, self.classes) + (vb if vb is not None else 0.0)  # J v per row
        lz = p * z - p * (p * z).sum(-1, keepdim=True)  # Λ J v
        return self._join(lz, xb) / self.n

    def _chunks(self, stack: int) -> Iterator[tuple[float, torch.Tensor, torch.Tensor]]:
        rows = max(1, min(self.n, LINEAR_CHUNK_ELEMENTS // (max(1, stack) * self.classes)))
        for i in range(0, self.n, rows):
            yield (min(rows, self.n - i) / self.n, self.x[i : i + rows], self.y[i : i + rows])

    def at(self, theta: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        out = self.wd * vectors
        w, b = self._split(theta[None])
        for _, xb, _yb in self._chunks(len(vectors)):
            out = out + self._products(self._logits(w, b, xb).softmax(-1), vectors, xb)
        return out

    def stacked(self, thetas: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        out = self.wd * vectors
        w, b = self._split(thetas)
        for _, xb, _yb in self._chunks(len(vectors)):
            out = out + self._products(self._logits(w, b, xb).softmax(-1), vectors, xb)
        return out

    def gradient(self, thetas: torch.Tensor) -> torch.Tensor:
        out = self.wd * thetas
        w, b = self._split(thetas)
        for _, xb, yb in self._chunks(len(thetas)):
            onehot = nn.functional.one_hot(yb.long(), self.classes).to(xb.dtype)[:, None, :]
            out = out + self._join(self._logits(w, b, xb).softmax(-1) - onehot, xb) / self.n
        return out


class ProductEngine(str, enum.Enum):
    """How exact curvature products are computed (the same values either way)."""

    AUTO = "auto"
    """Closed form where the network allows it (a linear read-out, an MLP), else autograd."""
    AUTOGRAD = "autograd"
    """torch.func forward-over-reverse (or looped double backward) for any network."""


def curvature_products(fm: FlatModel, x: torch.Tensor, y: torch.Tensor, weight_decay: float,
                       kind: CurvatureKind = CurvatureKind.HESSIAN,
                       engine: ProductEngine = ProductEngine.AUTO) -> CurvatureProducts:
    """The fastest exact products for ``fm``: closed form for a linear softmax read-out or an
    MLP (``engine=auto``), autograd's otherwise or when asked."""
    from .mlp import MLPProducts  # it subclasses CurvatureProducts

    if engine is ProductEngine.AUTO and LinearSoftmaxProducts.applies(fm):
        return LinearSoftmaxProducts(fm, x, y, weight_decay, kind)
    if engine is ProductEngine.AUTO and MLPProducts.applies(fm):
        return MLPProducts(fm, x, y, weight_decay, kind)
    return CurvatureProducts(fm, x, y, weight_decay, kind)

@dataclass
class CGResult:
    """Per right-hand side: the solution, iterations used, final relative residual ‖r‖/‖b‖
    (recursive, as CG updates it), whether it met its stopping rule, whether CG met a direction
    of non-positive curvature first (then it stopped there: A is not positive definite on the
    Krylov space of this right-hand side), and bᵀx's relative growth over its last iterations
    (the variance's own convergence: with a near-singular A the residual need not shrink while
    bᵀx has converged)."""

    x: torch.Tensor
    iterations: torch.Tensor
    rel_residual: torch.Tensor
    converged: torch.Tensor
    negative_curvature: torch.Tensor
    energy_gain: torch.Tensor  # bᵀx's relative growth over its last energy_delay iterations


MatVec = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ENERGY_DELAY = 10


def batched_cg(
    matvec: MatVec,
    b: torch.Tensor,
    rtol: float,
    max_iter: int,
    energy_tol: float = 0.0,
    checkpoints: Sequence[int] = (),
    record: Callable[[int, torch.Tensor], None] | None = None,
    precondition: Callable[[torch.Tensor], torch.Tensor] | None = None,
    energy_delay: int = ENERGY_DELAY,
) -> CGResult:
    """Conjugate gradients for ``A x_q = b_q``, all right-hand sides (Q, D) at once, x₀ = 0.

    ``matvec(P, rows)`` returns A p for the still-active right-hand sides ``rows`` (their search
    directions P): converged ones cost nothing. With x₀ = 0 the quadratic form bᵀx_k (RegVar's
    variance, up to scale) grows monotonically to bᵀA⁻¹b, by α_k‖r_k‖² per iteration, and its
    gain over the last ``ENERGY_DELAY`` iterations is the standard lower estimate of its
    remaining error (Strakoš & Tichý 2002). A right-hand side is converged when ‖r‖ ≤ rtol·‖b‖
    or when that gain is ≤ ``energy_tol`` × bᵀx_k; it stops there, after ``max_iter``
    iterations (not converged), or at a direction p with pᵀAp ≤ 0 (flagged, not converged).
    ``record(k, x)`` is called at each iteration count in ``checkpoints`` (stopped right-hand
    sides keep their final x). ``precondition(R)`` applies M⁻¹ (symmetric positive definite) to
    residuals: preconditioned CG solves the same system, with bᵀx growing by α_k r_kᵀM⁻¹r_k, and
    its residual rule still reads the true residual ‖r‖. ``energy_delay``: the window of the
    gain rule (a fast-converging preconditioned solve needs fewer iterations to read it).
    """
    q = len(b)
    x = torch.zeros_like(b)
    r = b.clone()
    apply_m = precondition if precondition is not None else (lambda v: v)
    z = apply_m(r)
    p = z.clone()
    rz = (r * z).sum(1)  # rᵀM⁻¹r, = ‖r‖² without a preconditioner
    rr = (r * r).sum(1)
    b_norm = rr.sqrt()
    tiny = torch.finfo(b.dtype).tiny
    iterations = torch.zeros(q, dtype=torch.long, device=b.device)
    negative = torch.zeros(q, dtype=torch.bool, device=b.device)
    converged = b_norm == 0
    active = ~converged
    gains = torch.zeros(q, energy_delay, dtype=b.dtype, device=b.device)  # last α_k‖r_k‖² per copy
    energy = torch.zeros(q, dtype=b.dtype, device=b.device)
    todo = sorted(k for k in set(checkpoints) if k >= 0)
    for it in range(max_iter + 1):
        while todo and todo[0] <= it and record is not None:
            record(todo.pop(0), x)
        if it == max_iter or not bool(active.any()):
            break
        rows = active.nonzero().squeeze(1)
        p_r = p[rows]
        ap = matvec(p_r, rows)
        pap = (p_r * ap).sum(1)
        bad = pap <= 0
        negative[rows[bad]] = True
        alpha = torch.where(bad, torch.zeros_like(pap), rz[rows] / pap.where(~bad, torch.ones_like(pap)))
        x[rows] = x[rows] + alpha[:, None] * p_r
        r_new = r[rows] - alpha[:, None] * ap
        rr_new = (r_new * r_new).sum(1)
        z_new = apply_m(r_new)
        rz_new = (r_new * z_new).sum(1)
        gain = alpha * rz[rows]
        energy[rows] += gain
        gains[rows, it % energy_delay] = gain
        p[rows] = z_new + (rz_new / rz[rows].clamp_min(tiny))[:, None] * p_r
        r[rows], rr[rows], rz[rows] = r_new, rr_new, rz_new
        iterations[rows] += (~bad).long()
        done = rr_new.sqrt() <= rtol * b_norm[rows]
        if energy_tol > 0 and it + 1 >= energy_delay:
            done = done | (gains[rows].sum(1) <= energy_tol * energy[rows])
        converged[rows] = done & ~bad
        active[rows] = ~bad & ~done
    if record is not None:
        for k in todo:
            record(k, x)
    rel = rr.sqrt() / b_norm.clamp_min(tiny)
    return CGResult(x, iterations, rel, converged, negative, gains.sum(1) / energy.clamp_min(tiny))
