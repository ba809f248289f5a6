"""The networks a run uses, each trained once per task config, recipe, architecture and data
fingerprint, seed, ensemble member and variant, and cached with what it cost and where it stands
on its objective (its MAP certificate), so a cached network is charged as if trained now."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch

from bench.cache import cache_lock
from bench.errors import BenchError
from bench.map_finish import certify
from bench.profiling import measure, memory_kind
from bench.progress import Reporter
from bench.record import MapCertificate
from bench.seeding import derive_seed
from bench.tasks import Task, TaskData
from bench.training import (
    CorruptCheckpoint,
    TrainingCost,
    checkpoint_path,
    fingerprint,
    fingerprint_parts,
    load_state,
    map_checkpoint,
    move_aside,
    read_certificate,
    read_cost,
    save_certificate,
    save_cost,
    save_parts,
    save_state,
    train,
    why_not_cached,
)

NetworkKey = tuple[int, str]  # (ensemble member, variant): (0, "") is the MAP network


def network_name(key: NetworkKey) -> str:
    member, variant = key
    base = "MAP model" if member == 0 else f"ensemble member {member}"
    return f"{base} with {variant}" if variant else base


class ModelCache:
    """Trains a task's model with its recipe once per (task config, recipe, architecture and
    data fingerprint, seed, member, variant), and knows what each network cost to train, cached or not."""

    def __init__(self, task: Task, data: TaskData, device: torch.device, seed: int, reporter: Reporter,
                 baseline: int | None = None):
        self.task, self.data, self.device, self.seed, self.reporter = task, data, device, seed, reporter
        self.baseline = baseline  # memory figures are above this RSS (None on a GPU)
        self.recipe = task.recipe()
        self.costs: dict[NetworkKey, TrainingCost] = {}  # (0, ""): the MAP network
        self.certificates: dict[NetworkKey, MapCertificate] = {}  # where each stands on its objective
        self.trained_now_s = 0.0  # training done in this process (to separate it from post-hoc time)
        self.fingerprint: str | None = None  # of architecture and training data, hashed once
        self.loaded: list[NetworkKey] = []
        self.trained: list[NetworkKey] = []

    def make_model(self) -> torch.nn.Module:
        return self.task.make_model(self.data.num_classes)

    def get(self, member: int = 0) -> torch.nn.Module:
        """The task's network for ensemble member ``member`` (0: the MAP), trained or loaded."""
        model, path = map_checkpoint(self.task, self.data, self.seed, member, self.fingerprint)
        self.fingerprint = path.parent.name  # every member shares the architecture and the data
        seed = self.seed if member == 0 else derive_seed(self.seed, "member", member)
        return self._network((member, ""), model, path, seed,
                             lambda: map_checkpoint(self.task, self.data, self.seed, member, self.fingerprint)[0])

    def get_variant(self, variant: str, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` (the task's architecture changed as ``variant`` names, e.g. ``dropout=0.3``,
        seeded by the caller) trained with the task's recipe: cached under that name and charged
        to the run like any network."""
        if not variant or any(c in variant for c in "/\\"):
            raise BenchError(f"a network variant needs a name without slashes; got {variant!r}")
        fresh = copy.deepcopy(model)
        path = checkpoint_path(self.task.cache_key(), self.recipe, self._fingerprint(model), self.seed, 0, variant)
        seed = derive_seed(self.seed, "variant", variant)
        return self._network((0, variant), model, path, seed, lambda: copy.deepcopy(fresh), rng_seed=seed)

    def _fingerprint(self, model: torch.nn.Module) -> str:
        if self.fingerprint is None:
            self.fingerprint = fingerprint(model, self.data.train)
        return self.fingerprint

    def _network(self, key: NetworkKey, model: torch.nn.Module, path: Path, seed: int,
                 fresh: Callable[[], torch.nn.Module], rng_seed: int | None = None) -> torch.nn.Module:
        """Load ``model``'s weights from ``path`` or train it there (``seed``: its data order;
        ``rng_seed``: the dropout masks', on a forked RNG; None: the RNG as the caller left it)."""
        what = network_name(key)
        with cache_lock(path):  # a parallel run training the same model: wait, then load
            loaded = self._load(model, path, what)
            if loaded is None:  # a corrupt checkpoint was moved aside: start again from a fresh, seeded network
                model = fresh()
            if loaded:
                self.costs[key] = read_cost(path)
                self.certificates[key] = self._cached_certificate(model, path)
                self.loaded.append(key)
                self.reporter.log(f"{what}: loaded cached checkpoint {path} (trained in "
                                  f"{self.costs[key].seconds:.1f} s; charged as if trained now); "
                                  f"{self.certificates[key].describe()}")
                return model.to(self.device).eval()
            parts = fingerprint_parts(model, self.data.train)
            self.reporter.log(f"{what}: {why_not_cached(path, parts)}; training {self.recipe.epochs} epoch(s) "
                              f"on {len(self.data.train)} examples")
            generator = torch.Generator().manual_seed(derive_seed(seed, "data-order"))
            with measure(self.device, self.baseline, separate=True) as m:  # its peak: its own record
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    if rng_seed is not None:
                        torch.manual_seed(rng_seed)
                    train(model, self.data.train, self.recipe, self.device, generator, self.reporter.progress,
                          desc=what)
                self.certificates[key] = certify(model, self.data.train, self.recipe, self.reporter.log)
            self.reporter.log(f"{what}: {self.certificates[key].describe()}")
            self.costs[key] = TrainingCost(m.seconds, str(self.device), torch.get_num_threads(),
                                           m.peak_bytes, memory_kind(m, self.device))
            self.trained_now_s += m.seconds
            self.trained.append(key)
            save_cost(path, self.costs[key])  # first: a checkpoint without its cost is never left behind
            save_certificate(path, self.certificates[key])
            save_state(model, path)
            save_parts(path, parts)
        return model.eval()

    def _load(self, model: torch.nn.Module, path: Path, what: str) -> bool | None:
        """The cached weights into ``model`` (False: none cached); None: the checkpoint was corrupt
        (``model`` may hold its values), so it is moved aside, said so, and retrained instead of
        stopping the run."""
        try:
            return load_state(model, path)
        except CorruptCheckpoint as corrupt:
            moved = move_aside(path)
            self.reporter.log(f"{what}: {str(corrupt).split(';')[0]}; moved it to {moved.name} and retraining")
            return None

    def _cached_certificate(self, model: torch.nn.Module, path: Path) -> MapCertificate:
        """The certificate kept with a cached network; one trained before certificates were kept
        (never a finished one: finishing changed the recipe's key) is measured now, as trained."""
        kept = read_certificate(path)
        if kept is not None:
            return kept
        if self.recipe.newton_finish:
            raise BenchError(f"cached checkpoint {path} has no MAP certificate; delete it and rerun")
        certificate = certify(model.to(self.device), self.data.train, self.recipe)
        save_certificate(path, certificate)
        return certificate

    def member_seconds(self) -> float:
        """Training seconds of the ensemble members (k > 0) this run used, cached or trained now."""
        return sum(c.seconds for (member, _), c in self.costs.items() if member > 0)
