"""Shared pieces of RegVar (McInerney & Kallus, AISTATS 2025): the objective, the batched
regularised fits, the probit predictive and the tuning of the variance scale.

The objective (it must be the one the MAP minimised, else the MAP is not its optimum):
``bench.training.train`` minimises mean cross-entropy with weight decay ``wd``. We read that as

    P(θ) = 1/n Σ_i CE(f(x_i; θ), y_i) + (wd/2)·‖θ‖²          (mean scale)

i.e. ``n·P = −log p(y|X, θ) − log p(θ)`` with a Gaussian prior N(0, 1/(n·wd)·I): **prior
precision n·wd** on the sum (log-joint) scale, over every trainable parameter, biases included
(torch's weight decay applies to them too). With SGD the correspondence is exact; with AdamW's
decoupled decay it is the usual nominal one, and the AdamW MAP is then not an exact stationary
point of P (which is one reason the estimators below difference two fits that share their
optimizer and data order instead of comparing against the MAP).
The network is evaluated in eval mode (dropout off, batch-norm statistics frozen), as Laplace
approximations do: the Laplace posterior is that of the deterministic network.

Scale of λ: the paper regularises the log-joint, ``L(θ) + λ·g(x*)``; on our mean scale that is
the term ``−(λ/n)·g(x*)`` in the minimised loss (the paper's listing writes ``λ·mean|f|/n`` for
the same reason). ``Regularizer.coef`` and ``regvar_variance`` take the log-joint λ, so that
``Δg/λ`` is the variance under the posterior of the log-joint, ``g'ᵀ(n·∇²P)⁻¹g'``, directly
comparable to laplace-torch with prior precision n·wd; the methods' options give λ per example
(λ/n), which moves the parameters by the same amount whatever n.

Many fits at once: Q copies of the flat parameter vector are stacked into one (Q, D) tensor and
evaluated with ``torch.func.functional_call`` + ``vmap``. Every copy sees the same data in the
same order, so drift common to all copies cancels in their differences.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from bench.errors import BenchError
from bench.options import option


class Optimizer(str, enum.Enum):
    """How the regularised fits are solved (all start from the MAP weights)."""

    AUTO = "auto"
    """lbfgs when one full pass costs little (n·P ≤ full_batch_budget, P every weight a pass
    goes through, frozen ones included), else adam."""
    LBFGS = "lbfgs"
    """Full-batch L-BFGS, one history per copy, gradient-only line search: converges."""
    ADAM = "adam"
    """Minibatch Adam for ``steps`` steps (fixed budget; may not converge, see summary)."""
    SGD = "sgd"
    """Minibatch SGD with momentum 0.9 for ``steps`` steps."""


class Precision(str, enum.Enum):
    """Floating-point type of the fits (the finite difference is a small difference)."""

    FLOAT32 = "float32"
    """Single precision: fast. On the fidelity problem as accurate as float64 for
    λ = 1e-3 … 1e-2 (``python -m bench fidelity``); needs λ/n·‖g'‖ well above float32
    round-off of the training gradient."""
    FLOAT64 = "float64"
    """Double precision: 2-6× slower on CPU (no fast float64 convolutions), allows tiny λ."""


def mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (as ``F.cross_entropy``), written out as a max-shifted log-sum-exp.

    Hand-written for speed, not for a different value: under ``vmap`` over stacked copies,
    torch's CPU log-softmax over a 10-wide class dimension took 2× longer per full-batch
    gradient than these elementwise ops (0.46 vs 0.22 s for 32 last-layer copies on 55k
    Fashion-MNIST rows, one thread); it agrees with ``F.cross_entropy`` to float round-off
    (tests/test_regvar_common.py)."""
    shift = logits.detach().amax(-1, keepdim=True)
    z = logits - shift
    return (z.exp().sum(-1).log() - z.gather(-1, labels[..., None]).squeeze(-1)).mean()


class FlatModel:
    """A copy of a module seen as a function of one flat vector θ of its trainable parameters.

    The copy is in eval mode and in ``dtype``; frozen parameters and buffers are constants.
    The caller's module is never modified.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        self.module = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
        named = [(k, p) for k, p in self.module.named_parameters() if p.requires_grad]
        if not named:
            raise BenchError("the model has no trainable parameters; RegVar needs some")
        self.names = [k for k, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.theta0 = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()
        self.const = {k: p.detach() for k, p in self.module.named_parameters() if not p.requires_grad}
        self.const.update({k: b for k, b in self.module.named_buffers()})
        self.dtype, self.device = dtype, device

    @property
    def dim(self) -> int:
        return self.theta0.numel()

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the fits' device, in their dtype if it is real-valued (token ids stay integers)."""
        return x.to(self.device, self.dtype if x.is_floating_point() else None)

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = theta.split(self.sizes)
        return {k: p.view(s) for k, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, {**self.const, **self.unflatten(theta)}, (x,))

    @torch.no_grad()
    def logits(self, theta: torch.Tensor, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """f(x; θ) for one θ, batched over inputs."""
        outs = [self(theta, self.inputs(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
        return torch.cat(outs)

    @torch.no_grad()
    def stacked_logits(self, thetas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """f(x_q; θ_q) for stacked copies: thetas (Q, D), x (Q, ...) → (Q, C)."""
        return vmap(lambda t, xi: self(t, xi[None])[0])(thetas, self.inputs(x))


@dataclass
class Regularizer:
    """The extra term of each copy's loss, ``coef`` = ±λ (or 0 for a reference fit).

    Per input (paper's eq.): ``−(coef/n) · wᵀ f(x_q; θ)`` with a fixed logit weighting w, i.e.
    the copy maximises log-joint + coef·wᵀf(x_q). Amortized (paper's listing):
    ``+(coef/n) · mean|f(x_b; θ)|`` over the training batch x_b, which shrinks the outputs.
    """

    coef: torch.Tensor  # (Q,)
    queries: torch.Tensor | None = None  # (Q, *input shape); None for the amortized term
    weights: torch.Tensor | None = None  # (Q, C)


@dataclass
class SolverSettings:
    """Resolved optimizer settings (no 'auto' left)."""

    optimizer: Optimizer
    steps: int
    lr: float
    batch_size: int  # minibatch size for adam/sgd; data chunk size for lbfgs
    history: int = 20
    rtol: float = 1e-7
    seed: int = 0
    atol: float = 0.0  # lbfgs also stops a copy once ‖g‖∞ ≤ atol
    xtol: float = 0.0  # lbfgs also stops a copy once its step is ≤ xtol·‖θ − θ_start‖∞


class StackedObjective:
    """P(θ_q) + regulariser_q for Q stacked copies; gradients via vmap over copies.
    ``tilt`` (D,), optional: the linear term −tiltᵀθ added to every copy's loss."""

    def __init__(
        self,
        fm: FlatModel,
        x: torch.Tensor,
        y: torch.Tensor,
        weight_decay: float,
        reg: Regularizer,
        tilt: torch.Tensor | None = None,
    ) -> None:
        self.fm, self.x, self.y, self.wd, self.reg = fm, x, y, weight_decay, reg
        self.n = len(x)
        self.stats = {"stalled": 0}  # copies whose L-BFGS line search found no acceptable step
        amortized = reg.queries is None

        def data_term(theta: torch.Tensor, coef: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            out = fm(theta, xb)
            loss = mean_cross_entropy(out, yb)
            if amortized:  # the paper's listing: + λ·mean|f|/n on the training batch
                loss = loss + coef / self.n * out.abs().mean()
            return loss

        def extra_term(theta: torch.Tensor, coef: torch.Tensor, xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
            prior = 0.5 * self.wd * (theta * theta).sum()
            if tilt is not None:  # −∇P(θ̂)ᵀθ: makes θ̂ a stationary point (per-input RegVar)
                prior = prior - (tilt * theta).sum()
            if amortized:
                return prior
            return prior - coef / self.n * (wq * fm(theta, xq[None])[0]).sum()

        self._data = vmap(grad_and_value(data_term), in_dims=(0, 0, None, None))
        self._extra = vmap(grad_and_value(extra_term), in_dims=(0, 0, 0, 0))

    def _extra_term(self, thetas: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        coef = self.reg.coef if rows is None else self.reg.coef[rows]
        if self.reg.queries is None or self.reg.weights is None:
            dummy = torch.zeros(len(thetas), 1, dtype=thetas.dtype, device=thetas.device)
            return self._extra(thetas, coef, dummy, dummy)
        q, w = self.reg.queries, self.reg.weights
        if rows is not None:
            q, w = q[rows], w[rows]
        return self._extra(thetas, coef, q, w)

    def minibatch_grad(self, thetas: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Gradient of every copy's loss on the training rows ``rows`` (Q, D)."""
        g, _ = self._data(thetas, self.reg.coef, self.x[rows], self.y[rows])
        return g + self._extra_term(thetas)[0]

    def full_grad_value(
        self, thetas: torch.Tensor, chunk: int, copies: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact full-batch gradient (Q, D) and loss (Q,), accumulated over data chunks;
        ``thetas`` holds the copies listed in ``copies`` (default: all of them)."""
        coef = self.reg.coef if copies is None else self.reg.coef[copies]
        g, v = self._extra_term(thetas, copies)
        for i in range(0, self.n, chunk):
            xb, yb = self.x[i : i + chunk], self.y[i : i + chunk]
            gb, vb = self._data(thetas, coef, xb, yb)
            g, v = g + (len(xb) / self.n) * gb, v + (len(xb) / self.n) * vb
        return g, v

    def full_grad(self, thetas: torch.Tensor, chunk: int) -> torch.Tensor:
        return self.full_grad_value(thetas, chunk)[0]


@dataclass
class SolverOptions:
    """Solver options shared by both RegVar methods (each adds its own and sets ``steps``)."""

    optimizer: Optimizer = option(Optimizer.AUTO, "solver of the regularised fits")
    precision: Precision = option(Precision.FLOAT32, "floating-point type of the fits")
    steps: int = option(300, "L-BFGS iterations (at most) or adam/sgd minibatch steps", min=1)
    lr: float = option(1e-4, "adam/sgd learning rate", min=0.0)
    batch_size: int = option(
        0, "adam/sgd minibatch size and smallest L-BFGS data chunk (0: the task's MAP training batch)", min=0
    )
    history: int = option(100, "L-BFGS history length (long: the fits are ill-conditioned)", min=1)
    rtol: float = option(1e-7, "L-BFGS stops a fit when ‖g‖∞ falls by this factor", min=0.0)
    xtol: float = option(
        1e-4, "L-BFGS stops a fit when its step is below xtol × its distance travelled (0: off)", min=0.0
    )
    full_batch_budget: float = option(
        5e7, "auto picks lbfgs when n_train·n_params ≤ this (frozen weights count: they cost a pass)", min=0.0)


    def settings(self, optimizer: Optimizer, seed: int, recipe_batch: int, steps: int | None = None) -> SolverSettings:
        """The resolved solver settings of these options (``optimizer`` with 'auto' resolved,
        ``batch_size=0`` by the MAP recipe's ``recipe_batch``: the listing fine-tunes with the
        training step, so a transformer recipe's 16 reviews, not a CNN's 128)."""
        return SolverSettings(
            optimizer,
            self.steps if steps is None else steps,
            self.lr,
            self.batch_size or recipe_batch,
            self.history,
            self.rtol,
            seed=seed,
            xtol=self.xtol,
        )


Callback = Callable[[int, torch.Tensor], None]
ProgressBar = Callable[..., Iterable]  # the harness's ``ctx.progress`` (tqdm)


def solve(
    objective: StackedObjective,
    theta0: torch.Tensor,
    settings: SolverSettings,
    checkpoints: Sequence[int] = (),
    callback: Callback | None = None,
    progress: ProgressBar | None = None,
) -> torch.Tensor:
    """Run the regularised fits of all copies from ``theta0`` (Q, D); returns the final (Q, D).

    ``callback(step, thetas)`` is called at each step listed in ``checkpoints`` (and at the end),
    e.g. to record predictions for a convergence study. ``progress`` (the harness's bar) shows
    the steps: an amortized fine-tune of a transformer runs for minutes.
    """
    if settings.optimizer is Optimizer.LBFGS:
        return batched_lbfgs(objective, theta0, settings, checkpoints, callback, progress)
    return first_order(objective, theta0, settings, checkpoints, callback, progress)


def _step_numbers(settings: SolverSettings, progress: ProgressBar | None) -> Iterable[int]:
    """1 … steps, through the progress bar when there is one."""
    steps = range(1, settings.steps + 1)
    return steps if progress is None else progress(steps, desc=f"{settings.optimizer.value} steps")


def first_order(
    objective: StackedObjective,
    theta0: torch.Tensor,
    settings: SolverSettings,
    checkpoints: Sequence[int] = (),
    callback: Callback | None = None,
    progress: ProgressBar | None = None,
) -> torch.Tensor:
    """Minibatch Adam or SGD. Both update elementwise, so one torch optimizer over the (Q, D)
    tensor is exactly Q independent optimizers; all copies share the minibatch sequence."""
    thetas = theta0.clone().requires_grad_(True)
    if settings.optimizer is Optimizer.ADAM:
        opt: torch.optim.Optimizer = torch.optim.Adam([thetas], lr=settings.lr)
    else:
        opt = torch.optim.SGD([thetas], lr=settings.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(settings.seed)
    n, b = objective.n, min(settings.batch_size, objective.n)
    order = torch.randperm(n, generator=gen)
    pos = 0
    for step in _step_numbers(settings, progress):
        if pos + b > n:
            order, pos = torch.randperm(n, generator=gen), 0
        rows = order[pos : pos + b].to(objective.x.device)
        pos += b
        thetas.grad = objective.minibatch_grad(thetas.detach(), rows)
        opt.step()
        if callback is not None and (step in checkpoints or step == settings.steps):
            callback(step, thetas.detach())
    return thetas.detach()


class _LbfgsHistory:
    """Each copy's last ``m`` curvature pairs (s, y), with ρ = 1/sᵀy (0: an inert pair with
    sᵀy ≤ 0) and the initial scaling γ = sᵀy/yᵀy of the two-loop recursion."""

    def __init__(self, m: int, like: torch.Tensor) -> None:
        q_count, dim = like.shape
        self.m, self.stored = m, 0
        self.s = like.new_zeros(m, q_count, dim)
        self.y = like.new_zeros(m, q_count, dim)
        self.rho = like.new_zeros(m, q_count)
        self.gamma = like.new_ones(q_count)

    def direction(self, g: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """The quasi-Newton direction −H·g per copy (two-loop recursion, dot products along dim 1);
        steepest descent for a copy where that is not a descent direction; 0 for inactive copies."""
        d = -g
        slots = [(self.stored - 1 - j) % self.m for j in range(min(self.stored, self.m))]
        alphas = []
        for i in slots:
            a = self.rho[i] * (self.s[i] * d).sum(1)
            d = d - a[:, None] * self.y[i]
            alphas.append(a)
        d = d * self.gamma[:, None]
        for i, a in zip(reversed(slots), reversed(alphas), strict=True):
            b = self.rho[i] * (self.y[i] * d).sum(1)
            d = d + (a - b)[:, None] * self.s[i]
        d = d * active[:, None]
        bad = (g * d).sum(1) >= 0  # not a descent direction: restart from steepest descent
        if bool(bad.any()):
            d[bad] = -g[bad] * active[bad, None]
        return d

    def push(self, step: torch.Tensor, y_vec: torch.Tensor, active: torch.Tensor) -> None:
        sy = (step * y_vec).sum(1)
        yy = (y_vec * y_vec).sum(1)
        slot = self.stored % self.m
        good = (sy > 0) & active
        self.s[slot], self.y[slot] = step, y_vec
        self.rho[slot] = torch.where(good, 1.0 / sy.where(good, torch.ones_like(sy)), torch.zeros_like(sy))
        self.gamma = torch.where(good, sy / yy.where(good, torch.ones_like(yy)), self.gamma)
        self.stored += 1


def _line_search(objective: StackedObjective, x: torch.Tensor, d: torch.Tensor, g: torch.Tensor, f: torch.Tensor,
                 active: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per copy, the step length t along ``d`` (0: no acceptable trial) with the gradient and
    value there, as :func:`batched_lbfgs` describes."""
    dphi0 = (g * d).sum(1)
    t = torch.ones(len(x), dtype=x.dtype, device=x.device)
    best_t, best_g, best_f = torch.zeros_like(t), g.clone(), f.clone()
    best_abs = torch.full_like(t, float("inf"))
    slack = 8 * torch.finfo(x.dtype).eps * f.abs()
    searching = active.clone()
    for _trial in range(8):
        # Only the copies still searching are evaluated (converged ones cost nothing).
        rows = searching.nonzero().squeeze(1)
        g_r, f_r = objective.full_grad_value(x[rows] + t[rows, None] * d[rows], chunk, rows)
        g_new, f_new = g.clone(), f.clone()
        g_new[rows], f_new[rows] = g_r, f_r
        dphi = (g_new * d).sum(1)
        armijo = searching & (f_new <= f + 1e-4 * t * dphi0 + slack)
        better = armijo & (dphi.abs() < best_abs)
        best_abs = torch.where(better, dphi.abs(), best_abs)
        best_t = torch.where(better, t, best_t)
        best_g = torch.where(better[:, None], g_new, best_g)
        best_f = torch.where(better, f_new, best_f)
        ok = armijo & (dphi.abs() <= 0.9 * dphi0.abs())
        searching = searching & ~ok
        if not bool(searching.any()):
            break
        denom = dphi0 - dphi  # positive when the curvature along d is positive
        secant = torch.where(denom > 0, t * dphi0 / denom.where(denom > 0, torch.ones_like(denom)), 4.0 * t)
        t = torch.where(searching, torch.where(armijo, secant.clamp(0.01 * t, 100.0 * t), 0.5 * t), t)
    return best_t, best_g, best_f


def batched_lbfgs(
    objective: StackedObjective,
    theta0: torch.Tensor,
    settings: SolverSettings,
    checkpoints: Sequence[int] = (),
    callback: Callback | None = None,
    progress: ProgressBar | None = None,
) -> torch.Tensor:
    """Full-batch L-BFGS run independently for every copy, vectorised over copies.

    Hand-written because ``torch.optim.LBFGS`` optimises one vector: on the stacked (Q, D)
    tensor it would share one history and one step length between unrelated fits. Each copy
    keeps its own curvature pairs (a pair with sᵀy ≤ 0 gets ρ = 0 and is inert).

    Line search, per copy, from t = 1 along the quasi-Newton direction d: a trial is accepted
    when it satisfies the strong Wolfe curvature condition |φ'(t)| ≤ 0.9·|φ'(0)| and the Armijo
    condition φ(t) ≤ φ(0) + 1e-4·t·φ'(0) + ε (ε: 8 ulps of φ(0), because near a converged MAP
    the loss changes by O(λ²), below float32 resolution, and only gradients are informative).
    A failed Armijo test halves t; a failed curvature test moves t to the secant root of φ'
    (exact on quadratics). After 8 trials the accepted trial with the smallest |φ'| is taken; a
    copy with none stops where it is (counted in ``objective.stats``). A copy also stops when
    ‖g‖∞ ≤ rtol·‖g₀‖∞ (relative to its initial gradient) or after ``steps`` iterations.
    """
    x = theta0.clone()
    start = x.clone()
    chunk = data_chunk(settings.batch_size, len(x), objective.x)
    g, f = objective.full_grad_value(x, chunk)
    gtol = (settings.rtol * g.abs().amax(dim=1)).clamp_min(max(settings.atol, torch.finfo(x.dtype).tiny))
    history = _LbfgsHistory(settings.history, x)
    active = g.abs().amax(dim=1) > gtol
    reported: set[int] = set()
    for it in _step_numbers(settings, progress):
        if not bool(active.any()):
            break
        d = history.direction(g, active)
        best_t, best_g, best_f = _line_search(objective, x, d, g, f, active, chunk)
        moved = best_t > 0
        objective.stats["stalled"] += int((active & ~moved).sum())
        active = active & moved
        step = best_t[:, None] * d
        history.push(step, best_g - g, active)
        x = x + step * active[:, None]
        g = torch.where(active[:, None], best_g, g)
        f = torch.where(active, best_f, f)
        active = active & (g.abs().amax(dim=1) > gtol)
        if settings.xtol > 0:  # the fit has stopped moving relative to how far it has come
            moved_far = (x - start).abs().amax(dim=1)
            active = active & (step.abs().amax(dim=1) > settings.xtol * moved_far)
        objective.stats["iterations"] = max(objective.stats.get("iterations", 0), it)
        if callback is not None and it in checkpoints:
            callback(it, x)
            reported.add(it)
    if callback is not None:  # converged copies stay put: later checkpoints see the final x
        for step in sorted({*checkpoints, settings.steps} - reported):
            callback(step, x)
    return x


CHUNK_ELEMENTS = 2**23


def data_chunk(batch_size: int, copies: int, x: torch.Tensor) -> int:
    """Training rows per full-batch gradient chunk: at least ``batch_size``, more while the
    stack's inputs stay under ``CHUNK_ELEMENTS`` values. Small chunks cost one vmapped call
    each: a last-layer fit on 55k rows in chunks of 128 spent its time in Python overhead."""
    per_row = max(1, x[0].numel() if len(x) else 1)
    return max(1, batch_size, CHUNK_ELEMENTS // (max(1, copies) * per_row))


def resolve(
    optimizer: Optimizer, precision: Precision, n: int, dim: int, full_batch_budget: float
) -> tuple[Optimizer, torch.dtype]:
    """The concrete optimizer ('auto' resolved, see ``Optimizer``) and dtype of the fits."""
    small = n * dim <= full_batch_budget
    opt = optimizer if optimizer is not Optimizer.AUTO else (Optimizer.LBFGS if small else Optimizer.ADAM)
    return opt, torch.float64 if precision is Precision.FLOAT64 else torch.float32


def train_tensors(data: torch.utils.data.TensorDataset, fm: FlatModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The training inputs (in the fits' dtype and device) and labels of the MAP objective."""
    x, y = data.tensors[0], data.tensors[1]
    if y.dtype.is_floating_point or y.ndim != 1:
        raise BenchError("RegVar needs class labels (a 1-D integer tensor) in the training set")
    return fm.inputs(x), y.to(fm.device).long()
