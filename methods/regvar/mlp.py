"""Exact curvature products for a multilayer perceptron, written out layer by layer.

A head on frozen features (``Linear → act → … → Linear``, dropout off in eval mode) has a
Hessian-vector product in closed form: Pearlmutter's R-operator pushes a direction v forward
through the layers and the gradient's derivative back. Each layer's products with a stack of Q
vectors are *one* matrix product over the rows: the first layer's ``X V₁ᵀ`` and ``R(δ₁)ᵀ X``
take the fixed feature matrix X against all Q·H stacked output rows at once, so the stack's
cost is a few large GEMMs instead of Q passes of autograd's double backward through a graph.
The forward pass and backpropagated gradient at the point θ are computed once per point and
reused by every product there (conjugate gradients multiply at one θ̂ throughout).

The values are those of ``torch.func``'s forward-over-reverse product (the parent class): the
same Hessian, not an approximation of it (tests/test_regvar_mlp.py checks both kinds against
it). ``KroneckerPreconditioner`` is an approximation — KFAC of the Gauss-Newton matrix — but it
only *preconditions* conjugate gradients, which still solve the exact system.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .common import FlatModel
from .newton import CurvatureKind, CurvatureProducts

ROW_CHUNK_ELEMENTS = 2**23  # rows × Q × widest layer per chunk: GEMMs large, temporaries ≤ 32 MB each
_ACTIVATIONS = (nn.ReLU, nn.Tanh)
_PASS_THROUGH = (nn.Dropout, nn.Identity)  # identity in eval mode, which FlatModel always uses


@dataclass(frozen=True)
class LinearLayer:
    """One ``nn.Linear`` of the MLP: its parameters' offsets in θ and the activation after it."""

    weight: slice
    bias: slice | None
    out_features: int
    in_features: int
    activation: str | None  # "relu", "tanh" or None (the output layer)


def mlp_layers(fm: FlatModel) -> list[LinearLayer] | None:
    """The MLP's linear layers in θ's layout, or None when ``fm`` is not a plain trainable MLP
    (a ``Sequential`` of Linear layers with ReLU/Tanh between them and a Linear output)."""
    if not isinstance(fm.module, nn.Sequential):
        return None
    offsets = dict(zip(fm.names, _offsets(fm.sizes), strict=True))
    layers: list[LinearLayer] = []
    expected: list[str] = []
    pending_activation = False
    for name, child in fm.module.named_children():
        if isinstance(child, _PASS_THROUGH):
            continue
        if isinstance(child, _ACTIVATIONS):
            if not layers or layers[-1].activation is not None:
                return None
            layers[-1] = _with_activation(layers[-1], "relu" if isinstance(child, nn.ReLU) else "tanh")
            pending_activation = False
            continue
        if not isinstance(child, nn.Linear) or (layers and layers[-1].activation is None):
            return None
        names = [f"{name}.weight"] + ([f"{name}.bias"] if child.bias is not None else [])
        if any(k not in offsets for k in names):
            return None
        expected += names
        bias = offsets.get(f"{name}.bias") if child.bias is not None else None
        layers.append(LinearLayer(offsets[f"{name}.weight"], bias, child.out_features, child.in_features, None))
        pending_activation = True
    if not layers or not pending_activation or expected != fm.names:
        return None
    return layers


def _offsets(sizes: list[int]) -> Iterator[slice]:
    start = 0
    for size in sizes:
        yield slice(start, start + size)
        start += size


def _with_activation(layer: LinearLayer, activation: str) -> LinearLayer:
    return LinearLayer(layer.weight, layer.bias, layer.out_features, layer.in_features, activation)


@dataclass
class ChunkState:
    """Forward and backward quantities of one row chunk at θ: the layers' inputs h_l, the
    activations' first and second derivatives, each layer's output gradient δ_l (of the mean
    loss) and the softmax probabilities."""

    inputs: list[torch.Tensor]
    d1: list[torch.Tensor]
    d2: list[torch.Tensor | None]
    deltas: list[torch.Tensor]
    probs: torch.Tensor


class MLPProducts(CurvatureProducts):
    """``v ↦ ∇²P(θ) v`` (or the Gauss-Newton product) for an MLP, stacks of vectors as GEMMs."""

    @staticmethod
    def applies(fm: FlatModel) -> bool:
        return mlp_layers(fm) is not None

    def __init__(self, fm: FlatModel, x: torch.Tensor, y: torch.Tensor, weight_decay: float,
                 kind: CurvatureKind = CurvatureKind.HESSIAN) -> None:
        super().__init__(fm, x, y, weight_decay, kind, vectorize=False)
        layers = mlp_layers(fm)
        if layers is None:
            raise ValueError("MLPProducts needs a Sequential MLP of trainable Linear layers")
        self.layers = layers
        self.x, self.y = fm.inputs(x).reshape(len(x), -1), y.to(fm.device)
        self.width = max(max(layer.out_features, layer.in_features) for layer in layers)
        self._point: torch.Tensor | None = None
        self._state: list[ChunkState] = []

    def _row_chunks(self, stack: int) -> list[slice]:
        rows = max(64, ROW_CHUNK_ELEMENTS // (max(1, stack) * self.width))
        return [slice(i, min(i + rows, self.n)) for i in range(0, self.n, rows)]

    def layer_weights(self, theta: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [(theta[layer.weight].view(layer.out_features, layer.in_features),
                 None if layer.bias is None else theta[layer.bias]) for layer in self.layers]

    def _forward_backward(self, theta: torch.Tensor, rows: slice) -> ChunkState:
        h = self.x[rows]
        inputs, d1, d2 = [], [], []
        for layer, (w, b) in zip(self.layers, self.layer_weights(theta), strict=True):
            inputs.append(h)
            a = h @ w.T + (b if b is not None else 0.0)
            if layer.activation == "relu":
                h = a.clamp_min(0.0)
                d1.append((a > 0).to(a.dtype))
                d2.append(None)
            elif layer.activation == "tanh":
                h = a.tanh()
                d1.append(1.0 - h * h)
                d2.append(-2.0 * h * d1[-1])
            else:
                h = a
        probs = h.softmax(-1)
        delta = probs.clone()
        delta[torch.arange(len(delta)), self.y[rows]] -= 1.0
        deltas = [delta / self.n]
        for layer_i in range(len(self.layers) - 1, 0, -1):
            w, _ = self.layer_weights(theta)[layer_i]
            deltas.insert(0, d1[layer_i - 1] * (deltas[0] @ w))
        return ChunkState(inputs, d1, d2, deltas, probs)

    def state_at(self, theta: torch.Tensor) -> list[ChunkState]:
        """The per-chunk state at θ, computed once per point (CG multiplies at one θ)."""
        if self._point is None or self._point.shape != theta.shape or not torch.equal(self._point, theta):
            self._state = [self._forward_backward(theta, rows) for rows in self._row_chunks(1)]
            self._point = theta.detach().clone()
        return self._state

    def at(self, theta: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """(Q, D) exact products at one shared point ``theta``: every chunk's state is reused,
        and each layer's weight products accumulate in place over the chunks (one GEMM each)."""
        weights = self.layer_weights(theta)
        stack = _Stack.of(self.layers, vectors)
        state = self.state_at(theta)
        per_chunk = self._row_chunks(len(vectors))
        for chunk, rows in zip(state, self._row_chunks(1), strict=True):
            for sub in _split(rows, per_chunk[0].stop - per_chunk[0].start):
                self._accumulate(_slice_chunk(chunk, sub, rows.start), weights, stack)
        return self.wd * vectors + stack.flat()

    def _accumulate(self, c: ChunkState, weights: list, stack: _Stack) -> None:
        """Add the chunk's rows' share of the product with every stacked direction to ``stack``."""
        hessian = self.kind is CurvatureKind.HESSIAN
        n_rows, q = len(c.probs), stack.q
        r_in = None  # R(h_{l-1}): zero for the fixed inputs
        r_inputs: list[torch.Tensor | None] = []
        r_pre: list[torch.Tensor] = []
        for layer_i, (w, _) in enumerate(weights):
            r_inputs.append(r_in)
            r_a = (c.inputs[layer_i] @ stack.forward[layer_i]).view(n_rows, q, -1)  # (rows, Q, out)
            if stack.bias[layer_i] is not None:
                r_a += stack.bias[layer_i]
            if r_in is not None:
                r_a += r_in @ w.T
            r_pre.append(r_a)
            if layer_i < len(self.layers) - 1:
                r_in = c.d1[layer_i][:, None, :] * r_a
        p = c.probs[:, None, :]
        r_delta = (p * r_pre[-1] - p * (p * r_pre[-1]).sum(-1, keepdim=True)) / self.n
        for layer_i in range(len(self.layers) - 1, -1, -1):
            layer, (w, _) = self.layers[layer_i], weights[layer_i]
            h, delta = c.inputs[layer_i], c.deltas[layer_i]
            stack.grad_w[layer_i].addmm_(r_delta.reshape(n_rows, -1).T, h)
            if hessian and r_inputs[layer_i] is not None:
                stack.grad_w[layer_i].view(q, layer.out_features, -1).add_(
                    torch.einsum("no,nqi->qoi", delta, r_inputs[layer_i]))
            if stack.grad_b[layer_i] is not None:
                stack.grad_b[layer_i] += r_delta.sum(0)
            if layer_i == 0:
                break
            r_e = r_delta @ w
            if hessian:
                r_e += (delta @ stack.backward[layer_i]).view(n_rows, q, -1)
            d1, d2 = c.d1[layer_i - 1][:, None, :], c.d2[layer_i - 1]
            r_delta = d1 * r_e
            if hessian and d2 is not None:
                r_delta += d2[:, None, :] * r_pre[layer_i - 1] * (delta @ w)[:, None, :]


@dataclass
class _Stack:
    """A stack of Q directions laid out for the layer GEMMs, and the products' accumulators.

    ``forward[l]``: V_l as (in, Q·out), contiguous, for h @ V_lᵀ; ``backward[l]``: V_l as
    (out, Q·in) for δ V_l; ``grad_w[l]`` (Q·out, in) and ``grad_b[l]`` (Q, out) sum the chunks."""

    q: int
    layers: list[LinearLayer]
    forward: list[torch.Tensor]
    backward: list[torch.Tensor]
    bias: list[torch.Tensor | None]
    grad_w: list[torch.Tensor]
    grad_b: list[torch.Tensor | None]

    @classmethod
    def of(cls, layers: list[LinearLayer], vectors: torch.Tensor) -> _Stack:
        q = len(vectors)
        weights = [vectors[:, layer.weight].view(q, layer.out_features, layer.in_features) for layer in layers]
        bias = [None if layer.bias is None else vectors[:, layer.bias] for layer in layers]
        return cls(
            q, layers,
            [v.reshape(-1, v.shape[2]).T.contiguous() for v in weights],
            [v.permute(1, 0, 2).reshape(v.shape[1], -1) for v in weights],
            bias,
            [vectors.new_zeros(q * layer.out_features, layer.in_features) for layer in layers],
            [None if layer.bias is None else vectors.new_zeros(q, layer.out_features) for layer in layers],
        )

    def flat(self) -> torch.Tensor:
        """The accumulated products in θ's layout (Q, D)."""
        parts: list[torch.Tensor] = []
        for gw, gb in zip(self.grad_w, self.grad_b, strict=True):
            parts.append(gw.view(self.q, -1))
            if gb is not None:
                parts.append(gb)
        return torch.cat(parts, dim=1)


def _split(rows: slice, size: int) -> Iterator[slice]:
    for i in range(rows.start, rows.stop, max(1, size)):
        yield slice(i, min(i + size, rows.stop))


def _slice_chunk(c: ChunkState, sub: slice, offset: int) -> ChunkState:
    if sub.start == offset and sub.stop - sub.start == len(c.probs):
        return c
    s = slice(sub.start - offset, sub.stop - offset)
    return ChunkState([h[s] for h in c.inputs], [d[s] for d in c.d1], [None if d is None else d[s] for d in c.d2],
                  [d[s] for d in c.deltas], c.probs[s])
