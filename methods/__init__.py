"""Registered methods: one module each. Importing this package registers the built-in ones."""

import methods.ensemble  # noqa: F401
import methods.laplace  # noqa: F401
import methods.mc_dropout  # noqa: F401
import methods.regvar  # noqa: F401
import methods.regvar_amortized  # noqa: F401
from methods import map  # noqa: F401
