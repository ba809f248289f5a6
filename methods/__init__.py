"""Registered methods: one module each. Importing this package registers the built-in ones.

Installed as the package ``bench_methods`` (pyproject maps it onto this folder), so no ``methods``
module in a user's working directory can shadow it; modules here import each other relatively.
"""

from . import ensemble, laplace, map, mc_dropout, regvar, regvar_amortized  # noqa: F401
