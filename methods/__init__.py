"""Registered methods: one module each. Importing this package registers the built-in ones.

Installed as the package ``bench_methods`` (pyproject maps it onto this folder), so no ``methods``
module in a user's working directory can shadow it; modules here import each other relatively.
"""

from . import ensemble, laplace, map, mc_dropout, regvar  # noqa: F401

# The methods' own benchmarks (``python -m bench perf NAME``), imported only when one is asked for.
PERF_MODULES = ("bench_methods.laplace_perf", "bench_methods.regvar.perf")
# ``python -m bench fidelity``: RegVar's variances against exact Laplace targets.
FIDELITY_MODULE = "bench_methods.regvar.fidelity"
