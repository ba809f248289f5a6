"""Registry, options, device selection, seeding and measurement."""

from __future__ import annotations

import enum
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bench.device import select_device
from bench.errors import BenchError
from bench.options import as_dict, build, option
from bench.profiling import current_rss_bytes, measure, settled_rss_bytes
from bench.registry import Registry, parse_settings, parse_spec
from bench.seeding import derive_seed, seed_everything


class Link(str, enum.Enum):
    PROBIT = "probit"  # closed form
    MC = "mc"  # sampling


@dataclass
class Opts:
    n: int = option(3, "count", min=1)
    lam: float = option(1e-3, "strength", min=0.0)
    link: Link = option(Link.PROBIT, "link")
    grid: tuple[float, ...] = option((0.1, 1.0), "grid")
    flag: bool = option(False, "flag")


def test_options_parse_every_kind() -> None:
    o = build(Opts, {"n": "5", "lam": "1e-6", "link": "mc", "grid": "1|2|3", "flag": "yes"}, "method x")
    assert (o.n, o.lam, o.link, o.grid, o.flag) == (5, 1e-6, Link.MC, (1.0, 2.0, 3.0), True)
    assert as_dict(o) == {"n": 5, "lam": 1e-6, "link": "mc", "grid": [1.0, 2.0, 3.0], "flag": True}


@pytest.mark.parametrize("raw,message", [
    ({"n": "0"}, "must be ≥ 1"), ({"n": "2.5"}, "expected int"), ({"link": "bridge"}, "one of probit, mc"),
    ({"lam": "nan"}, "must be finite"), ({"lam": "-inf"}, "must be finite"), ({"lam": "x"}, "expected float"),
    ({"zzz": "1"}, "unknown option 'zzz'"),
])
def test_bad_options_name_the_problem(raw: dict[str, str], message: str) -> None:
    with pytest.raises(BenchError, match=message):
        build(Opts, raw, "method x")


def test_registry_refuses_duplicates_and_suggests() -> None:
    reg: Registry[type] = Registry("widget")

    @reg.register("alpha")
    class A:
        pass

    with pytest.raises(BenchError, match="already registered"):
        reg.register("alpha")(type("B", (), {}))
    with pytest.raises(BenchError, match="Did you mean 'alpha'"):
        reg.get("alpah")
    assert reg.get("alpha") is A and reg.names() == ["alpha"]


def test_spec_strings() -> None:
    assert parse_spec("laplace") == ("laplace", {})
    assert parse_spec("laplace(link=mc, n_samples=100)") == ("laplace", {"link": "mc", "n_samples": "100"})
    with pytest.raises(BenchError):
        parse_spec("bad name(")
    with pytest.raises(BenchError, match="sets 'n' twice"):
        parse_spec("laplace(n=1, n=2)")
    assert parse_settings(["a=1", "b=2"]) == {"a": "1", "b": "2"}
    with pytest.raises(BenchError, match="--set a is given twice"):
        parse_settings(["a=1", "a=2"])


def test_a_spec_and_set_giving_one_option_is_refused() -> None:
    from bench.runner import RunConfig, resolve

    with pytest.raises(BenchError, match="'lam' is set both in 'regvar-ll\\(lam=0.1\\)' and by --set"):
        resolve(RunConfig(method="regvar-ll(lam=0.1)", task="imdb", settings={"lam": "0.2"}))
    assert resolve(RunConfig(method="regvar-ll(lam=0.1)", task="imdb")).method_options.lam == 0.1


def test_device_selection_on_this_machine() -> None:
    assert select_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert select_device("auto").type == expected
    with pytest.raises(BenchError):
        select_device("tpu:banana")
    if not torch.cuda.is_available():
        with pytest.raises(BenchError, match="no CUDA GPU"):
            select_device("cuda")


def test_seeding_is_reproducible_and_derived_seeds_differ() -> None:
    seed_everything(7)
    a = torch.randn(3)
    seed_everything(7)
    assert torch.equal(a, torch.randn(3))
    assert derive_seed(0, "member", 1) != derive_seed(0, "member", 2) == derive_seed(0, "member", 2)


def test_measure_sees_time_and_memory_growth() -> None:
    with measure(torch.device("cpu")) as m:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        block += 1
    assert m.seconds > 0 and m.kind == "cpu_peak_rss_above_baseline"
    assert m.peak_bytes > 32 * 2**20
    del block


def test_measure_sees_a_freed_spike_after_an_earlier_larger_peak_and_nested_blocks() -> None:
    """The old growth figure read 0 for any block below an earlier peak of the process."""
    big = torch.ones(256 * 2**20 // 4)
    big += 1
    del big  # the process's lifetime peak is now ≥ 256 MiB above what follows
    with measure(torch.device("cpu")) as outer:
        with measure(torch.device("cpu")) as inner:
            spike = torch.ones(96 * 2**20 // 4)
            spike += 1
            del spike  # freed before the block ends: only a high-water mark sees it
        after = torch.ones(16 * 2**20 // 4)
        after += 1
    assert 80 * 2**20 < inner.peak_bytes < 200 * 2**20
    assert outer.peak_bytes >= inner.peak_bytes  # the inner reset did not hide the outer's peak
    del after


def test_a_separate_block_is_not_counted_by_the_enclosing_one_but_what_it_leaves_is() -> None:
    """A network trained inside a fit has its own cost record: the fit's peak must be the same
    whether the network was trained there or loaded from the cache."""
    with measure(torch.device("cpu")) as fit:
        with measure(torch.device("cpu"), separate=True) as training:
            spike = torch.ones(128 * 2**20 // 4)  # training's activations, freed before it ends
            spike += 1
            del spike
            network = torch.ones(24 * 2**20 // 4)  # the trained network, kept
            network += 1
        after = torch.ones(8 * 2**20 // 4)
        after += 1
    assert training.peak_bytes > 112 * 2**20
    assert 24 * 2**20 < fit.peak_bytes < 80 * 2**20
    del network, after


def test_measure_counts_a_block_that_reuses_heap_earlier_work_freed() -> None:
    """Small freed allocations stay in the RSS until trimmed; a baseline holding them let the
    next block reuse them with no growth (a KFAC fit on Fashion-MNIST once read 0 MiB)."""
    def pinned_garbage(mib: int) -> list[torch.Tensor]:
        pieces = [torch.ones(4000) for _ in range(mib * 2**20 // 16000)]  # 16 KB each: heap, not mmap
        return pieces[::50]  # every 50th kept: the freed heap cannot shrink from its top

    keep = pinned_garbage(128)  # ≈125 MiB freed but resident, as data loading leaves it
    resident = current_rss_bytes()
    assert resident - settled_rss_bytes() > 64 * 2**20  # a runner baseline no longer holds it
    keep += pinned_garbage(128)
    with measure(torch.device("cpu")) as m:  # the block's own start settles too
        reused = [torch.ones(4000) for _ in range(64 * 2**20 // 16000)]
    assert m.peak_bytes > 48 * 2**20
    del keep, reused


@pytest.mark.parametrize(("value", "edge"), [(0.01, "floor"), (0.001, "floor"), (100.0, "ceiling"), (1.0, None)])
def test_grid_edge_flag_names_the_edge_and_the_grid(value: float, edge: str | None) -> None:
    from bench.method_api import grid_edge_flag

    flag = grid_edge_flag("prior precision", value, [0.01, 0.1, 1.0, 10.0, 100.0], "widen it")
    if edge is None:
        assert flag is None
    else:
        assert f"on the {edge} of its grid [0.01, 100]: widen it" in flag
    assert grid_edge_flag("x", 5.0, [5.0]) is None  # a one-point grid is a fixed value, not a tuning


RATCHET = '''
import sys
import numpy as np
from bench.profiling import current_rss_bytes, fix_mmap_threshold, settled_rss_bytes
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
block = np.ones(30 << 20, dtype=np.uint8)
del block  # freed: glibc's dynamic threshold rises to 30 MiB
base = settled_rss_bytes()
kept = []
for i in range(20):  # growing blocks, each followed by a small object that outlives it
    block = np.ones((4 + i) << 20, dtype=np.uint8)
    kept.append(np.ones(2000))
    del block
print((current_rss_bytes() - base) >> 20)
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_fixed_mmap_threshold_stops_the_heap_keeping_freed_blocks(tmp_path: Path) -> None:
    """With glibc's dynamic threshold the freed blocks stay resident (the peak of identical runs then
    depends on the allocation history); with it fixed each is unmapped when freed."""
    script = tmp_path / "ratchet.py"
    script.write_text(RATCHET)

    def growth(mode: str) -> int:
        proc = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout)

    assert growth("dynamic") >= 16 and growth("fixed") <= 2
