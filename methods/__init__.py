"""Registered methods: one module each. Importing this package registers the built-in ones."""

from methods import map  # noqa: F401
from methods import ensemble  # noqa: F401
from methods import mc_dropout  # noqa: F401
