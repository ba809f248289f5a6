"""A Kronecker-factored preconditioner for RegVar's conjugate gradients on an MLP.

Per layer, the Gauss-Newton block of P = mean CE + (wd/2)‖θ‖² is approximated by KFAC,
``G ⊗ A + wd·I`` with A the mean outer product of the layer's inputs (a column of ones for the
bias) and G that of the backpropagated square roots of the softmax Hessian (the exact expected
Gauss-Newton factor, no sampling). Its inverse is applied exactly through the factors'
eigendecompositions: ``M⁻¹V = Q_G [(Q_Gᵀ V Q_A) / (g aᵀ + wd)] Q_Aᵀ``.

It is a preconditioner only: conjugate gradients still solve the exact system ∇²P·u = ∇g to
their tolerance, so the variance is the same; M only changes how many exact products that
takes. Using KFAC as the curvature itself would make the method a KFAC Laplace instead.
"""

from __future__ import annotations

import torch

from .mlp import MLPProducts


class KroneckerPreconditioner:
    """``r ↦ M⁻¹ r`` for stacks of residuals (Q, D), M = blockwise (G_l ⊗ A_l + wd·I) at θ."""

    def __init__(self, products: MLPProducts, theta: torch.Tensor) -> None:
        self.layers, self.wd = products.layers, products.wd
        a_sum, g_sum = _factor_sums(products, theta)
        self.factors = []
        for a, g in zip(a_sum, g_sum, strict=True):
            ea, qa = torch.linalg.eigh((a / products.n).double())
            eg, qg = torch.linalg.eigh((g / products.n).double())
            denom = eg.clamp_min(0.0)[:, None] * ea.clamp_min(0.0)[None, :] + self.wd
            dtype = theta.dtype
            self.factors.append((qa.to(dtype), qg.to(dtype), (1.0 / denom).to(dtype)))

    def __call__(self, residuals: torch.Tensor) -> torch.Tensor:
        q = len(residuals)
        parts = []
        for layer, (qa, qg, inv) in zip(self.layers, self.factors, strict=True):
            v = residuals[:, layer.weight].view(q, layer.out_features, layer.in_features)
            if layer.bias is not None:
                v = torch.cat([v, residuals[:, layer.bias][:, :, None]], dim=2)
            z = qg @ ((qg.T @ v @ qa) * inv) @ qa.T
            parts.append(z[:, :, : layer.in_features].reshape(q, -1))
            if layer.bias is not None:
                parts.append(z[:, :, -1])
        return torch.cat(parts, dim=1)


def _factor_sums(products: MLPProducts, theta: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Σ over rows of each layer's input outer products (A) and backpropagated Λ-root outer
    products (G), from the products' own forward state at θ."""
    layers = products.layers
    weights = products.layer_weights(theta)
    a_sum = [torch.zeros(l.in_features + (l.bias is not None), l.in_features + (l.bias is not None),
                         dtype=theta.dtype, device=theta.device) for l in layers]
    g_sum = [torch.zeros(l.out_features, l.out_features, dtype=theta.dtype, device=theta.device) for l in layers]
    for chunk in products.state_at(theta):
        root_p = chunk.probs.sqrt()
        # Λ = diag(p) − ppᵀ = S Sᵀ with S = diag(√p) − p √pᵀ: columns c of S, per row (rows, C, C)
        s = torch.diag_embed(root_p) - chunk.probs[:, :, None] * root_p[:, None, :]
        s = s.transpose(1, 2)  # (rows, column c, output)
        for layer_i in range(len(layers) - 1, -1, -1):
            h = chunk.inputs[layer_i]
            if layers[layer_i].bias is not None:
                h = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype, device=h.device)], dim=1)
            a_sum[layer_i] += h.T @ h
            flat = s.reshape(-1, s.shape[-1])
            g_sum[layer_i] += flat.T @ flat
            if layer_i:
                s = chunk.d1[layer_i - 1][:, None, :] * (s @ weights[layer_i][0])
    return a_sum, g_sum
