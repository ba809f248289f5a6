"""User-facing errors: the CLI turns these into one line on stderr and exit code 2."""


class BenchError(Exception):
    """Bad input from the user (unknown name, bad option, missing data). Exit code 2."""

    exit_code = 2
