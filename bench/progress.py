"""Progress bars and log lines that stay quiet when asked or when output is not a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


class Reporter:
    """tqdm bars + ``[bench]`` log lines on stderr; ``quiet`` silences both."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def progress(self, iterable: Iterable | None = None, **kwargs: Any) -> Iterable:
        disable = self.quiet or not sys.stderr.isatty()
        return tqdm(iterable, disable=disable, leave=False, dynamic_ncols=True, **kwargs)

    def log(self, message: str) -> None:
        if not self.quiet:
            print(f"[bench] {message}", file=sys.stderr, flush=True)
