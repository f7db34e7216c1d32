"""Scale-out over torch.distributed: several processes (and machines) share one dataset pass.

``torchrun --nproc-per-node N -m bncli stats SHARDS...`` starts N copies of the command;
each finds its rank here, reads its own contiguous block of the inputs, and the ranks
exchange small results (headers, float64 moments, error statuses). Only rank 0 prints
and writes.

The contract of a :class:`World` (what every rank may rely on):

* Every rank calls the same collective methods (:meth:`World.gather`,
  :meth:`World.gather_moments`) in the same order; each returns the same value on every
  rank.
* :meth:`World.gather` never hangs on an expected failure: a rank whose function raised
  still takes part, sends its error, and then every rank raises that error (the one of
  the lowest failing rank). A bug on one rank makes it raise its own traceback and the
  others an :class:`~bncli.errors.InputError` that points at it.
* Results are gathered in rank order and merged in input order, so what is computed from
  them does not depend on the number of ranks.

:data:`LOCAL` is the one-process world (no torch needed); :func:`session` gives the
world the environment asks for. torch is imported only when a distributed environment
is detected.

Example (inside a script launched by ``torchrun``)::

    from bncli import datastats, distributed

    with distributed.session() as world:
        result = datastats.dataset_stats(paths, world=world)
        if world.is_primary:
            print(result.normalize_line())
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import numpy as np

from bncli import errors
from bncli.errors import BncliError, InputError
from bncli.moments import Moments

# Environment variables torchrun (and other launchers) set for every worker.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def split_contiguous(weights: Sequence[float], parts: int) -> list[range]:
    """Cut ``len(weights)`` items into ``parts`` contiguous ranges of about equal weight.

    Item ``i`` goes to the part its weight midpoint falls in, so the cut depends only on
    the weights (the same on every rank) and no part is more than one item's weight
    from its share. Parts may be empty when there are fewer items than parts.

    >>> split_contiguous([1, 1, 1, 1], 2)
    [range(0, 2), range(2, 4)]
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    total = float(sum(weights))
    owner: list[int] = []
    done = 0.0
    for i, w in enumerate(weights):
        if total > 0:
            owner.append(min(parts - 1, int((done + w / 2) / total * parts)))
        else:  # every weight zero (e.g. sizes unknown): by count
            owner.append(i * parts // len(weights))
        done += w
    # Midpoints grow with i, so owners never decrease: each part is one range.
    return [range(bisect.bisect_left(owner, p), bisect.bisect_right(owner, p)) for p in range(parts)]


class World:
    """The processes that share a pass: this one only (:data:`LOCAL`), or a process group.

    Attributes:
        rank: This process's rank (0 .. size-1).
        size: The number of processes.
    """

    rank: int = 0
    size: int = 1

    @property
    def is_primary(self) -> bool:
        """Rank 0: the one that prints and writes."""
        return self.rank == 0

    def share(self, weights: Sequence[float]) -> range:
        """This rank's contiguous block of items (see :func:`split_contiguous`)."""
        return split_contiguous(weights, self.size)[self.rank]

    def gather(self, fn: Callable[[], Any]) -> list[Any]:
        """Run ``fn`` on every rank; return every rank's result, in rank order.

        Results must be JSON-serialisable (they cross processes as JSON, never pickle).
        If ``fn`` raised a :class:`~bncli.errors.BncliError` on any rank, every rank
        raises it (same class, message and hint; the lowest failing rank's).
        """
        return [fn()]

    def gather_moments(self, parts: Sequence[Moments], counts: Sequence[int], channels: int) -> list[Moments]:
        """Every rank's moments, concatenated in rank order.

        Args:
            parts: This rank's moments (e.g. one per input file).
            counts: How many each rank holds (known to all, e.g. from :meth:`share`).
            channels: C of every part.
        """
        return list(parts)

    def close(self) -> None:
        """Release the process group if this world created it."""


LOCAL = World()


def _error_payload(exc: BaseException, rank: int) -> dict[str, Any]:
    if isinstance(exc, BncliError):
        return {"ok": False, "type": type(exc).__name__, "message": exc.message, "hint": exc.hint,
                "rank": rank}
    return {"ok": False, "type": None, "message": f"{type(exc).__name__}: {exc}", "hint": None, "rank": rank}


def _rebuild(payload: dict[str, Any], size: int) -> BncliError:
    where = f" (rank {payload['rank']} of {size})"
    if payload["type"] is None:
        return InputError(f"Rank {payload['rank']} of {size} failed with an unexpected error: "
                          f"{payload['message']}.",
                          hint="Its traceback is printed above by that rank; please report it as a bug.")
    cls = getattr(errors, payload["type"], BncliError)
    if not (isinstance(cls, type) and issubclass(cls, BncliError)):
        cls = BncliError
    return cls(payload["message"] + where, hint=payload["hint"])


class TorchWorld(World):
    """A ``torch.distributed`` process group (gloo for CPU tensors, nccl for CUDA ones)."""

    def __init__(self, *, owned: bool) -> None:
        import torch
        import torch.distributed as dist

        self._dist = dist
        self._owned = owned
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        backend = str(dist.get_backend()).lower()
        # nccl moves CUDA tensors only; gloo (and the rest) CPU ones.
        self._device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                        else torch.device("cpu"))

    def _all_gather(self, array: np.ndarray) -> list[np.ndarray]:
        """All-gather equal-shape arrays (a collective: every rank must call it)."""
        import torch

        t = torch.from_numpy(np.ascontiguousarray(array)).to(self._device)
        out = [torch.empty_like(t) for _ in range(self.size)]
        self._dist.all_gather(out, t)
        return [o.cpu().numpy() for o in out]

    def _gather_bytes(self, data: bytes) -> list[bytes]:
        sizes = self._all_gather(np.array([len(data)], dtype=np.int64))
        width = max(int(s[0]) for s in sizes)
        buf = np.zeros(max(width, 1), dtype=np.uint8)
        buf[:len(data)] = np.frombuffer(data, dtype=np.uint8)
        return [b[:int(s[0])].tobytes() for b, s in zip(self._all_gather(buf), sizes, strict=True)]

    def gather(self, fn: Callable[[], Any]) -> list[Any]:
        local: BaseException | None = None
        try:
            payload: dict[str, Any] = {"ok": True, "value": fn()}
        except Exception as exc:  # expected failures and bugs alike: tell the others first
            local, payload = exc, _error_payload(exc, self.rank)
        docs = [json.loads(b) for b in self._gather_bytes(json.dumps(payload).encode())]
        failed = [d for d in docs if not d["ok"]]
        if failed:
            if local is not None and not isinstance(local, BncliError):
                raise local  # a bug here: its own traceback
            if local is not None and failed[0]["rank"] == self.rank:
                raise local
            raise _rebuild(failed[0], self.size) from None
        return [d["value"] for d in docs]

    def gather_moments(self, parts: Sequence[Moments], counts: Sequence[int], channels: int) -> list[Moments]:
        width = Moments.packed_size(channels)
        rows = np.zeros((max(max(counts, default=0), 1), width), dtype=np.float64)
        for i, m in enumerate(parts):
            rows[i] = m.pack()
        out: list[Moments] = []
        for block, n in zip(self._all_gather(rows), counts, strict=True):
            out.extend(Moments.unpack(block[i]) for i in range(n))
        return out

    def close(self) -> None:
        if self._owned and self._dist.is_initialized():
            self._dist.destroy_process_group()


def launched() -> bool:
    """Whether this process was started by torchrun (or a launcher like it) with 2+ ranks.

    ``BNCLI_DISTRIBUTED=0`` turns detection off, e.g. for a ``bncli`` run as a subprocess
    of a script that torchrun started.
    """
    if os.environ.get("BNCLI_DISTRIBUTED", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not all(os.environ.get(v) for v in LAUNCH_VARS):
        return False
    try:
        return int(os.environ["WORLD_SIZE"]) > 1
    except ValueError:
        return False


def env_rank() -> int:
    """This process's rank as the launcher set it (0 when not launched), without torch."""
    if not launched():
        return 0
    try:
        return int(os.environ["RANK"])
    except ValueError:
        return 0


def _backend() -> str:
    import torch

    chosen = os.environ.get("BNCLI_DIST_BACKEND", "").strip().lower()
    if chosen:
        return chosen
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    # nccl needs one GPU per rank on a node; otherwise gloo (the data are NumPy on CPU anyway).
    if torch.cuda.is_available() and torch.cuda.device_count() >= local:
        return "nccl"
    return "gloo"


def _timeout() -> timedelta | None:
    value = os.environ.get("BNCLI_DIST_TIMEOUT", "").strip()
    if not value:
        return None  # torch's default (30 minutes for gloo, 10 for nccl)
    try:
        seconds = float(value)
    except ValueError:
        raise InputError(f"BNCLI_DIST_TIMEOUT={value!r} is not a number of seconds.",
                         hint="E.g. BNCLI_DIST_TIMEOUT=3600, or unset it for torch's default.") from None
    return timedelta(seconds=seconds)


@contextlib.contextmanager
def session(enabled: bool | None = None) -> Iterator[World]:
    """The world to compute in, for the duration of the block.

    Args:
        enabled: ``None`` (auto): a process group already initialised in this process is
            used as it is; else, when :func:`launched`, one is initialised from the
            launcher's environment (``env://``; backend nccl when every local rank has a
            GPU, else gloo; ``BNCLI_DIST_BACKEND`` overrides it, ``BNCLI_DIST_TIMEOUT``
            sets the collective timeout in seconds) and destroyed at the end; otherwise
            :data:`LOCAL`. ``False``: always :data:`LOCAL`. ``True``: like ``None`` but
            an error when there is no distributed environment.

    Raises:
        InputError: ``enabled=True`` without a distributed environment, or the process
            group cannot be set up (the message says why).
    """
    if enabled is False:
        yield LOCAL
        return
    existing = "torch.distributed" in sys.modules and _initialized()
    if not existing and not launched():
        if enabled:
            raise InputError("No torch.distributed environment: RANK, WORLD_SIZE, MASTER_ADDR and "
                             "MASTER_PORT are not all set (or WORLD_SIZE is 1).",
                             hint="Start the command with torchrun, e.g. torchrun --nproc-per-node 4 "
                                  "-m bncli stats SHARDS...")
        yield LOCAL
        return
    if not existing:
        _init_from_env()
    world = TorchWorld(owned=not existing)
    if world.size == 1:
        world.close()
        yield LOCAL
        return
    try:
        yield world
    finally:
        world.close()


def _initialized() -> bool:
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized())


def _init_from_env() -> None:
    import torch
    import torch.distributed as dist

    backend = _backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0") or 0))
    kwargs: dict[str, Any] = {"backend": backend}
    timeout = _timeout()
    if timeout is not None:
        kwargs["timeout"] = timeout
    try:
        dist.init_process_group(**kwargs)
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"Cannot join the torch.distributed process group (backend {backend}, "
                         f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
                         f"MASTER_PORT={os.environ.get('MASTER_PORT')}): {exc}",
                         hint="Check the torchrun flags (--nnodes, --rdzv-endpoint) and that the "
                              "nodes reach each other; BNCLI_DISTRIBUTED=0 runs single-process.") from None
