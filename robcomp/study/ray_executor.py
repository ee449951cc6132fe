"""Run a study's points as Ray tasks: ``robcomp run --executor ray [--address ADDR]``.

One task per point (train-or-load the baseline, compress, fine-tune, evaluate), each with its own
resources (``task_cpus``, ``task_gpus``). Baselines are trained first, one task per distinct
baseline, into the checkpoint cache (``$ROBCOMP_CACHE_DIR``, passed to every task: on a cluster it
must name a path every node sees); the point tasks then load them from there. The driver alone
appends records to ``results.jsonl``, as they finish, so resume, report and findings work as with
the in-process executor. Ray is an optional extra: ``pip install -e ".[ray]"``.
"""
from __future__ import annotations

from typing import Iterator, Sequence

from robcomp.study.checkpoints import cache_dir

__all__ = ["RayExecutor"]


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError('--executor ray needs Ray: pip install -e ".[ray]" (or pip install "robcomp[ray]")') from None
    return ray


def _baseline_task(spec, point, use_cache: bool) -> bool:
    """Train (or find) the point's baseline in the shared cache; True when it was already there."""
    from robcomp.study.runner import _Context, _threads

    with _threads(spec.threads):
        return _Context(spec, use_cache, progress=False).baseline(point)[1]["cached"]


def _point_task(spec, point, use_cache: bool) -> dict:
    """The point's record, exactly as the in-process executor computes it."""
    from robcomp.study.runner import _Context, _record_for, _threads

    with _threads(spec.threads):
        return _record_for(point, _Context(spec, use_cache, progress=False))


class RayExecutor:
    """Runs points on a Ray cluster (``address``: ``"auto"``, ``"ray://host:10001"``, or None for a
    local Ray that uses this machine's cores). A Ray already initialised by the caller is reused."""

    def __init__(self, address: str | None = None, task_cpus: float | None = None, task_gpus: float = 0):
        for name, v in (("task_cpus", task_cpus), ("task_gpus", task_gpus)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"{name} must be a non-negative number, got {v!r}")
        if task_cpus == 0:
            raise ValueError("task_cpus must be positive: a point needs a CPU")
        self.address, self.task_cpus, self.task_gpus = address, task_cpus, task_gpus
        self.baselines: dict[str, int] = {"trained": 0, "cached": 0}

    def describe(self) -> str:
        b = self.baselines
        return f"baselines in Ray tasks: {b['trained']} trained, {b['cached']} from cache"

    def run(self, spec, points: Sequence, use_cache: bool) -> Iterator[tuple[object, dict]]:
        """Yield ``(point, record)`` in the order the tasks finish."""
        ray = _import_ray()
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        try:
            yield from self._run(ray, spec, list(points), use_cache)
        finally:
            if started:
                ray.shutdown()

    def _run(self, ray, spec, points, use_cache):
        options = {"num_cpus": self.task_cpus if self.task_cpus is not None else spec.threads,
                   "num_gpus": self.task_gpus, "max_retries": 0,
                   # the checkpoint cache every task reads and fills: the driver's, shared
                   "runtime_env": {"env_vars": {"ROBCOMP_CACHE_DIR": str(cache_dir())}}}
        baseline = ray.remote(_baseline_task).options(**options)
        point = ray.remote(_point_task).options(**options)
        spec_ref = ray.put(spec)
        bases = {}
        if use_cache:  # one training per baseline; without the cache every point trains its own
            for p in points:
                key = (p.model, p.width, p.base, p.seed, str(sorted(p.train.items())))
                if key not in bases:
                    bases[key] = baseline.remote(spec_ref, p, use_cache)
            for cached in ray.get(list(bases.values())):
                self.baselines["cached" if cached else "trained"] += 1
        pending = {point.remote(spec_ref, p, use_cache): p for p in points}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                p = pending.pop(ready[0])
                yield p, ray.get(ready[0])
        finally:
            for ref in pending:  # a failed task or a stopped driver: do not leave work running
                ray.cancel(ref, force=True)
