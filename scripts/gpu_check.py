"""The GPU check: one call on a lent device machine proves the harness's CUDA paths.

    bash scripts/gpu_check.sh             # on the device (OUT set by the device tool)
    bash scripts/gpu_check.sh --dry-run   # anywhere, on CPU, small: what CI runs

Steps, each timed with its exit status and output tail in ``$OUT/gpu_check.json``:
the environment (torch, CUDA, device name); the CUDA-parametrised tests; a smoke sweep of every
registered method on ``tiny-digits`` (offline: scikit-learn's bundled digits, so nothing has to
travel) and on ``tiny-lora`` (imdb-lora's LoRA network on generated sentences and a tiny random
BERT) with ``--device cuda``, and their leaderboard; the perf benchmarks (Laplace predictive,
per-input RegVar) on the same task. Exit 0 only if every step passed. The device machine has no
network and gets 64 MiB of files: the test fixture task needs no data download.

The dry run checks the script's plumbing (every step's command line, on CPU) with two cheap
methods in each sweep: every method already runs on CPU in CI's smoke sweep of the embedded tasks
and, on tiny-lora, in the slow test tier, and a dry run of every method would repeat that for
four minutes of CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "tests" / "fixtures" / "tiny_task.py")
TINY_LORA = str(REPO / "tests" / "fixtures" / "tiny_lora_task.py")  # imdb-lora's model on generated text
TAIL = 3000
DRY_METHODS = "map,regvar-ll"  # the dry run's sweeps: plumbing only (see above); regvar-ll takes max_queries


def _step(name: str, argv: list[str], out: Path, timeout: float) -> dict:
    """Run one step, keep its status, seconds and output tail (and its stdout in a file)."""
    started = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        status, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        status, stdout, stderr = 124, str(exc.stdout or ""), f"timed out after {timeout:.0f} s"
    (out / f"{name}.out").write_text(stdout)
    print(f"[gpu_check] {name}: exit {status} in {time.perf_counter() - started:.1f} s", flush=True)
    return {"name": name, "argv": argv[1:], "exit": status, "seconds": round(time.perf_counter() - started, 2),
            "stderr_tail": stderr[-TAIL:], "stdout_tail": stdout[-TAIL:]}


def _environment(device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "device": device}
    if torch.cuda.is_available():
        info |= {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
                 "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    return info


def main(argv: list[str]) -> int:
    dry = "--dry-run" in argv
    device = "cpu" if dry else "cuda"
    out = Path(os.environ.get("OUT") or REPO / "results" / "gpu" / ("dry-run" if dry else "check"))
    out.mkdir(parents=True, exist_ok=True)
    env = _environment(device)
    if not dry and not env["cuda_available"]:
        print("[gpu_check] no CUDA device here; run with --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    py, bench = sys.executable, [sys.executable, "-m", "bench", "--plugin", TINY]
    queries = ["--set", "max_queries=20"]
    methods = DRY_METHODS if dry else "all"
    steps = [
        _step("cuda_tests", [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "slow or not slow",
                             "-k", "cuda",
                             "tests/test_ensemble.py", "tests/test_mc_dropout.py", "tests/test_harness_pieces.py",
                             "tests/test_imdb_lora.py", "tests/test_map_finish.py"],
              out, 600),
        _step("smoke_sweep", [*bench, "sweep", "--methods", methods, "--tasks", "tiny-digits", "--seeds", "0",
                              "--smoke", "--device", device, "--jobs", "1", "--out", str(out / "smoke"), *queries],
              out, 900),
        _step("lora_smoke_sweep", [py, "-m", "bench", "--plugin", TINY_LORA, "sweep", "--methods", methods, "--tasks",
                                   "tiny-lora", "--seeds", "0", "--device", device, "--jobs", "1", "--out",
                                   str(out / "smoke"), "--set", "max_queries=5"],
              out, 900),  # all-weight RegVar: each query's solve passes the transformer over every review
        _step("smoke_table", [py, "-m", "bench", "table", "--results", str(out / "smoke")], out, 300),
        _step("perf_laplace", [*bench, "perf", "laplace", "--task", "tiny-digits", "--device", device, "--json",
                               *(["--smoke"] if dry else [])], out, 600),
        _step("perf_regvar", [*bench, "perf", "regvar", "--tasks", "tiny-digits", "--device", device, "--json",
                              "--queries", "8" if dry else "64", *(["--smoke"] if dry else [])], out, 600),
    ]
    report = {"environment": env, "dry_run": dry, "passed": all(s["exit"] == 0 for s in steps), "steps": steps}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"[gpu_check] {'passed' if report['passed'] else 'FAILED'}; report in {out / 'gpu_check.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
