"""The Dask executor: submits each shard's chain of tasks and reports what finished.

A shard's tasks depend on its earlier tasks only, so shards flow through the stages
independently; one task runs a group of stages (``pipeline.core.runner.fuse``: detect, landmarks
and embed share one task and one decode per image). Planning, failure markers, progress and the
report are ``pipeline.core.runner``'s; this module only submits and collects. A task tries a
failing stage again ``execution.retries`` times itself (``ShardTask``); a task that still fails
reports the error for that stage and blocks the rest of its shard.
"""

from __future__ import annotations

import time
import traceback
import uuid
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

from pipeline.core.runner import PROGRESS_TOPIC, Outcome, ShardTask, outcomes
from pipeline.errors import ClusterLost

if TYPE_CHECKING:
    from distributed import Client


class DaskExecutor:
    """Runs chains of shard tasks on a ``distributed.Client``.

    ``resources``: per stage, the worker resources its tasks need (``{"GPU": 1}``); a stage's
    annotation is applied only when some worker of the cluster declares that resource (a task
    that asks for a resource no worker has would wait for ever)."""

    def __init__(
        self,
        client: Client,
        retries: int = 2,
        resources: dict[str, dict] | None = None,
        no_worker_timeout_s: float = 120.0,
    ) -> None:
        self.client = client
        self.retries = retries
        self.resources = resources or {}
        self.no_worker_timeout_s = no_worker_timeout_s

    def on_progress(self, receiver: Callable[[str, int, int], None] | None) -> None:
        """Receive ``(stage, shard, rows)`` events the workers' tasks send as they progress within
        a shard (topic ``morphset-progress``); None stops."""
        if receiver is None:
            self.client.unsubscribe_topic(PROGRESS_TOPIC)
            return

        def handler(event: tuple) -> None:
            try:
                stage, shard, n = event[1]
                receiver(str(stage), int(shard), int(n))
            except Exception:  # a malformed or late event moves no bar; the build goes on
                pass

        self.client.subscribe_topic(PROGRESS_TOPIC, handler)

    def _workers(self) -> int:
        try:
            return len(self.client.scheduler_info().get("workers", {}))
        except Exception as exc:  # the scheduler no longer answers
            raise ClusterLost(
                f"lost the Dask scheduler ({type(exc).__name__}: {exc}); committed shards are kept, "
                "run the build again to resume"
            ) from None

    def _check_scheduler(self) -> None:
        """A cancelled task may mean the scheduler is gone: ask it (one RPC, a few seconds at
        most) and stop the build with one :class:`ClusterLost` if it does not answer."""
        try:
            self.client.sync(self.client.scheduler.identity, callback_timeout=5)
        except Exception as exc:
            raise ClusterLost(
                f"lost the Dask scheduler ({type(exc).__name__}: {exc or 'no answer'}; client "
                f"{self.client.status}); committed shards are kept, run the build again to resume"
            ) from None

    def _completed(self, futures: list) -> Iterator:
        """Futures as they finish; a cluster left without a worker for ``no_worker_timeout_s`` (or
        without its scheduler) stops the build with one :class:`ClusterLost` instead of waiting."""
        from distributed import as_completed

        pending = as_completed(futures)
        alone_since: float | None = None
        checked = 0.0
        while not pending.is_empty():
            batch = pending.next_batch(block=False)
            if batch:
                alone_since = None
                yield from batch
                continue
            now = time.monotonic()
            if now - checked >= 1.0:
                checked = now
                if self._workers():
                    alone_since = None
                else:
                    alone_since = alone_since or now
                    if now - alone_since >= self.no_worker_timeout_s:
                        raise ClusterLost(
                            f"no Dask worker for {self.no_worker_timeout_s:g} s (all gone or none joined "
                            f"{self.client.scheduler.address}); committed shards are kept, run the build "
                            "again to resume"
                        )
            time.sleep(0.05)

    def _declared(self) -> set[str]:
        info = self.client.scheduler_info()
        return {r for w in info.get("workers", {}).values() for r in (w.get("resources") or {})}

    def _wanted(self, group: tuple[str, ...], declared: set[str]) -> dict[str, float]:
        """A group's resources: each stage's that some worker declares, the largest amount."""
        out: dict[str, float] = {}
        for s in group:
            for k, v in self.resources.get(s, {}).items():
                if k in declared:
                    out[k] = max(out.get(k, 0), v)
        return out

    def execute(self, task: ShardTask, chains: dict[int, list[tuple[str, ...]]]) -> Generator[Outcome]:
        declared = self._declared() if self.resources else set()
        token = uuid.uuid4().hex[:8]
        meta: dict[Any, tuple[tuple[str, ...], int]] = {}  # future key -> (stages, shard)
        prev_of: dict[Any, Any] = {}  # future key -> the future it follows
        futures = []
        for i, groups in chains.items():
            prev = None
            for g in groups:
                kwargs: dict = {
                    "retries": self.retries,
                    "key": f"{'+'.join(g)}-{i:05d}-{token}",
                    "pure": False,
                }
                wanted = self._wanted(g, declared)
                if wanted:
                    kwargs["resources"] = wanted
                args = (g, i) + ((prev,) if prev is not None else ())
                fut = self.client.submit(task, *args, **kwargs)
                meta[fut.key] = (g, i)
                prev_of[fut.key] = prev
                futures.append(fut)
                prev = fut
        submitted = time.perf_counter()
        try:
            for fut in self._completed(futures):
                g, i = meta[fut.key]
                up = prev_of.get(fut.key)
                upstream_failed = up is not None and up.status in ("error", "cancelled")
                if fut.status in ("error", "cancelled") and upstream_failed:
                    # a downstream task fails with its upstream's exception: blocked, not failed
                    yield from (Outcome(s, i, blocked=True) for s in g)
                    continue
                if fut.status == "error":
                    exc = fut.exception()
                    tb = "".join(traceback.format_exception(type(exc), exc, fut.traceback()))
                elif fut.status == "cancelled":
                    # Not cancelled by us (that only happens on Ctrl-C, below): the scheduler gave up
                    # on it, e.g. lost inputs. The shard is not done; say so and exit non-zero.
                    self._check_scheduler()
                    exc, tb = RuntimeError("task cancelled by the Dask scheduler (lost worker or data)"), ""
                else:
                    yield from outcomes(fut.result(), i, submitted, time.perf_counter())
                    continue
                # the task itself failed (its stages report their own errors): its first stage
                # carries the error, the rest of the group is blocked
                yield Outcome(g[0], i, error=exc, traceback=tb, started=submitted)
                yield from (Outcome(s, i, blocked=True) for s in g[1:])
        except (KeyboardInterrupt, GeneratorExit):
            self.client.cancel(futures)
            raise
