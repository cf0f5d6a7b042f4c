"""The Ray engine of `extract`: planned batches described by an actor pool on a Ray cluster (or a local instance).

Ray Data holds one row per planned batch (its image paths); `map_batches` with a callable class, one row per call,
decodes and describes it in an actor pool whose actors build the describer once, from the driver's ModelSpec.
Decoding runs in the actors rather than in separate Ray tasks: with actors holding every CPU (the default pool) the
decoding tasks never got a CPU and a 2-CPU run hung; in the actor a batch's decode and forward pass share its CPU.
Rows come back in plan order (preserve_order), so the driver yields one BatchResult per planned batch exactly as
LocalEngine does, and `extract`'s commit loop and store writer are shared: crash safety, resumption and
bit-identical stores hold as for the local engine. Only the driver (this process) writes the store.

Bit-identity on CPU: a network's float sums depend, in the last bit, on torch's intra-op thread count, so every actor
uses the driver's thread count (`threads`, default torch.get_num_threads() here: what the local engine would use).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EngineError, UsageError, VisearchError
from .extract import BatchResult, ModelSpec

RAY_MISSING = "ray is not installed: --engine ray needs the ray extra: pip install 'visearch[ray]'"


def import_ray():
    """The ray module, or EngineError with the one-line install hint."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise EngineError(RAY_MISSING) from None
    return ray


class _Describe:
    """Ray actor: builds the describer once, then decodes and describes one planned batch per call."""

    def __init__(self, spec: ModelSpec | None, describer_ref: Any, threads: int, options: dict[str, bool]):
        import sys

        import torch

        os.dup2(2, 1)  # anything a model prints goes to stderr: the driver's stdout carries results only
        sys.stdout = sys.stderr
        torch.set_num_threads(threads)  # the driver's count: CPU results then equal the local engine's, bit for bit
        self.options = options
        self.failed: VisearchError | None = None
        try:
            if spec is not None:
                self.describer = spec.load()
            else:
                import ray

                self.describer = ray.get(describer_ref)
        except VisearchError as e:  # e.g. a weight file missing on this node: reported by the first call
            self.failed = e

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        try:
            if self.failed is not None:
                raise self.failed
            return self._describe(batch)
        except VisearchError as e:  # Ray would pass on only its text: the driver raises it again, as itself
            return {"k": batch["k"], "fatal": [json.dumps([type(e).__name__, e.message, e.hint])]}

    def _describe(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from ..images import ImageFileDataset

        items = ImageFileDataset([str(p) for p in batch["paths"][0]], **self.options)
        got = [items[j] for j in range(len(items))]  # (j, array) or (j, error message), as LocalEngine decodes
        images = [a for _, a in got if isinstance(a, np.ndarray)]
        ok = [j for j, a in got if isinstance(a, np.ndarray)]
        errors = [(j, a) for j, a in got if isinstance(a, str)]
        out: dict[str, Any] = {"k": batch["k"], "fatal": [""], "ok": [json.dumps(ok)], "errors": [json.dumps(errors)]}
        fields = self.describer.local_fields
        if images:
            f = self.describer.extract(images)
            out["global"] = [np.ascontiguousarray(f.global_)]
            for name in fields:
                out[f"local.{name}"] = [np.ascontiguousarray(f.local[name])]
        else:
            out["global"] = [np.zeros((0, self.describer.dim), np.float32)]
            for name, fld in fields.items():
                out[f"local.{name}"] = [np.zeros((0, *fld.shape), fld.dtype)]
        return out


@dataclass
class RayEngine:
    """Describes planned batches on Ray. `address`: None starts a local instance (all this machine's CPUs) for the
    run, "auto" or "host:port" connects to a running cluster (Ray already initialised in this process is used as it
    is). `num_workers`: actors (default: as many as the cluster's CPUs, or GPUs / num_gpus). `num_gpus`: GPUs per
    actor (fractions share a GPU); actors describe on CUDA exactly when it is > 0. `device`: auto, cpu or cuda, as
    extract's --device, checked against num_gpus. `threads`: torch threads per actor (default: this process's)."""

    address: str | None = None
    num_workers: int | None = None
    num_gpus: float = 0
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        import_ray()  # fail now, before a model is loaded or a store is opened (or removed, with --rebuild)
        if self.address is not None:
            _check_reachable(self.address)
        elif self.num_gpus > 0:  # a local instance has this machine's GPUs
            import torch

            if torch.cuda.device_count() < self.num_gpus:
                raise EngineError(f"--num-gpus {self.num_gpus:g} asks for more GPUs per actor than this machine has "
                                  f"({torch.cuda.device_count()})", "drop --num-gpus to describe on CPUs")
        if self.num_workers is not None and self.num_workers < 1:
            raise UsageError("--num-workers must be at least 1")
        if self.num_gpus < 0:
            raise UsageError("--num-gpus must not be negative")
        dev = (self.device or "auto").lower()
        if dev.startswith("cuda") and self.num_gpus == 0:
            raise UsageError("--device cuda with --engine ray needs GPUs for the actors", "pass --num-gpus 1")
        if dev == "cpu" and self.num_gpus > 0:
            raise UsageError("--device cpu contradicts --num-gpus", "drop one of them")
        if dev not in ("auto", "cpu") and not dev.startswith("cuda"):
            raise UsageError(f"unknown device {self.device!r}", "use auto, cpu or cuda")

    @property
    def actor_device(self) -> str:
        """Each actor sees only the GPUs Ray assigned to it, so "cuda" is its own."""
        return "cuda" if self.num_gpus > 0 else "cpu"

    def run(self, ds, batches: list[list[str]], describer, spec: ModelSpec | None = None) -> Iterator[BatchResult]:
        if not batches:
            return
        ray = import_ray()
        started = _connect(ray, self.address)
        ctx = ray.data.DataContext.get_current()
        saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start)
        data_log = logging.getLogger("ray.data")
        level = data_log.level
        if not _verbose():  # Ray Data's notes (execution started / finished, bars disabled) only with --verbose
            data_log.setLevel(logging.ERROR)
        try:
            ctx.execution_options.preserve_order = True  # rows come back in plan order
            ctx.enable_progress_bars = False  # the driver advances extract's own progress bar
            ctx.print_on_execution_start = False
            yield from self._run(ray, ds, batches, describer, spec)
        finally:
            (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start) = saved
            data_log.setLevel(level)
            if started:
                ray.shutdown()

    def _run(self, ray, ds, batches, describer, spec) -> Iterator[BatchResult]:
        from .. import errors as errors_module
        from ..models.base import Features

        threads = self.threads
        if threads is None:
            import torch

            threads = torch.get_num_threads()
        ref = None
        if spec is not None:  # absolute paths: an actor's working directory is not ours
            spec = dataclasses.replace(
                spec, device=self.actor_device, weights_dir=str(Path(spec.weights_dir).absolute()),
                weights=str(Path(spec.weights).expanduser().absolute()) if spec.weights else None)
        else:  # a describer the caller built: shipped as it is
            ref = ray.put(describer)
        paths = [[str(ds.image_path(i)) for i in b] for b in batches]
        rows = [{"k": k, "paths": [str(Path(p).absolute()) for p in ps]} for k, ps in enumerate(paths)]
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0)
        if self.num_gpus > gpus:  # Ray would wait for them forever
            raise EngineError(f"--num-gpus {self.num_gpus:g} asks for more GPUs per actor than the Ray cluster has "
                              f"({gpus:g})", "run on nodes with GPUs, or drop --num-gpus to describe on CPUs")
        size = self.num_workers or _default_workers(resources, self.num_gpus)
        rds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 4 * size))
        # max_restarts=0: a lost actor stops the run (what is committed stays, a rerun resumes) rather than restart
        # from constructor arguments that Ray Data keeps in the object store (which it warns about on every run);
        # a keyword argument is still the only way to say so in Ray 2.60, deprecated or not
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            rds = rds.map_batches(_Describe, batch_size=1,
                                  fn_constructor_args=(spec, ref, threads, ds.load_options()),
                                  compute=ray.data.ActorPoolStrategy(size=size), num_gpus=self.num_gpus or None,
                                  num_cpus=1, max_restarts=0)
        names = list(describer.local_fields)
        k = 0
        for row in _rows(rds):
            if row.get("fatal"):
                name, message, hint = json.loads(row["fatal"])
                cls = getattr(errors_module, name, None)
                raise (cls if isinstance(cls, type) and issubclass(cls, VisearchError) else EngineError)(message, hint)
            if int(row["k"]) != k:  # preserve_order is what makes resumed stores identical: never go on without it
                raise EngineError(f"Ray returned planned batch {row['k']} where {k} was due")
            ids, rel, absolute = batches[k], paths[k], rows[k]["paths"]
            ok_ids = [ids[j] for j in json.loads(row["ok"])]
            errors = [(ids[j], _same_path(msg, absolute[j], rel[j])) for j, msg in json.loads(row["errors"])]
            features = None
            if ok_ids:
                local = {n: np.asarray(row[f"local.{n}"]) for n in names} or None
                features = Features(np.asarray(row["global"]), local)
            yield BatchResult(ids, ok_ids, features, errors)
            k += 1
        if k != len(batches):
            raise EngineError(f"Ray returned {k} of {len(batches)} planned batches")


def _rows(rds) -> Iterator[dict[str, Any]]:
    """The dataset's rows; Ray's own failures (an actor or node lost, a bug in an actor) as one EngineError line.
    Our errors raised in an actor come back as rows (see _Describe) and are raised again by the caller."""
    import re

    from ..errors import first_line

    try:
        yield from rds.iter_rows()
    except Exception as e:  # noqa: BLE001 - an actor died, a node was lost, a bug in an actor: Ray's exception types
        text = re.sub(r"\x1b\[[0-9;]*m", "", first_line(e))  # Ray colours its messages
        raise EngineError(f"the Ray engine failed: {type(e).__name__}: {text}", "Ray's log is on stderr") from e


def _same_path(msg: str, absolute: str, given: str) -> str:
    """Error messages name the image as the local engine would (the dataset's path, relative when it is)."""
    return msg.replace(absolute, given) if absolute != given else msg


def _default_workers(res: dict[str, float], num_gpus: float) -> int:
    if num_gpus > 0:
        return max(1, int(res.get("GPU", 0) // num_gpus))
    return max(1, int(res.get("CPU", 1)))


def _verbose() -> bool:
    return logging.getLogger().getEffectiveLevel() <= logging.INFO  # the CLI's --verbose


def _connect(ray, address: str | None) -> bool:
    """Initialise Ray unless it already is; True when this call started it (the caller shuts it down). Ray logs to
    stderr (errors only, unless --verbose); workers' output reaches the driver's stderr."""
    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "log_to_driver": True,
             "logging_level": logging.INFO if _verbose() else logging.ERROR}
    try:
        if address is None:
            ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            ray.init(address="local", num_cpus=ncpu, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        from ..errors import first_line

        where = "a local Ray instance" if address is None else f"the Ray cluster at {address}"
        raise EngineError(f"cannot start or reach {where}: {first_line(e)}",
                          "check --address (ray status on the head node shows it)") from None
    return True


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A "host:port" (or "ray://host:port") that does not accept TCP connections is an EngineError now: ray.init
    would retry it without end. "auto" and other forms are left to Ray."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise EngineError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}",
                          "check --address (ray status on the head node shows it)") from None
