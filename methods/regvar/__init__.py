"""RegVar (McInerney and Kallus, AISTATS 2025): the variance of a prediction from how far it moves
when training is pushed on it. Importing this package registers its three methods.

- ``per_input``: ``regvar`` (all weights) and ``regvar-ll`` (last layer), one exact solve per query,
  through ``response`` (the objective around θ₀, the stacked fits and the variances read from them);
- ``amortized``: ``regvar-amortized``, one pair of λ-regularised refits for all queries;
- ``common``, ``newton``, ``block``, ``mlp``, ``kfac``: the objective P, curvature products, CG
  and block CG, closed-form MLP products and the KFAC preconditioner they share;
- ``fidelity`` (``bench fidelity``; the full-model check in ``fidelity_full``) and ``perf``
  (``bench perf regvar``): RegVar's own studies, kept
  with the method so that the harness never reaches into its internals.
"""

from . import amortized, per_input  # noqa: F401
