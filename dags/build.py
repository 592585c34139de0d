"""The Dask executor: submits each shard's chain of stage tasks and reports what finished.

Shard ``i`` of ``landmarks`` depends on shard ``i`` of ``detect`` only, so shards flow through
detect → landmarks → fit independently. Planning, failure markers, progress and the report are
``pipeline.core.runner``'s; this module only submits and collects. Dask retries a task
``execution.retries`` times; a task that still fails comes back as an error outcome, and its
shard's later tasks as blocked.
"""

from __future__ import annotations

import time
import traceback
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pipeline.core.runner import Outcome, ShardTask

if TYPE_CHECKING:
    from distributed import Client


class DaskExecutor:
    """Runs chains of shard tasks on a ``distributed.Client``.

    ``resources``: per stage, the worker resources its tasks need (``{"GPU": 1}``); a stage's
    annotation is applied only when some worker of the cluster declares that resource (a task
    that asks for a resource no worker has would wait for ever)."""

    def __init__(self, client: Client, retries: int = 2, resources: dict[str, dict] | None = None) -> None:
        self.client = client
        self.retries = retries
        self.resources = resources or {}

    def _declared(self) -> set[str]:
        info = self.client.scheduler_info()
        return {r for w in info.get("workers", {}).values() for r in (w.get("resources") or {})}

    def execute(self, task: ShardTask, plan: dict[int, list[str]]) -> Iterator[Outcome]:
        from distributed import as_completed

        declared = self._declared() if self.resources else set()
        token = uuid.uuid4().hex[:8]
        meta: dict[str, tuple[str, int]] = {}
        prev_of: dict[str, object] = {}
        futures = []
        for i, todo in plan.items():
            prev = None
            for s in todo:
                kwargs: dict = {"retries": self.retries, "key": f"{s}-{i:05d}-{token}", "pure": False}
                wanted = {k: v for k, v in self.resources.get(s, {}).items() if k in declared}
                if wanted:
                    kwargs["resources"] = wanted
                args = (s, i) + ((prev,) if prev is not None else ())
                fut = self.client.submit(task, *args, **kwargs)
                meta[fut.key] = (s, i)
                prev_of[fut.key] = prev
                futures.append(fut)
                prev = fut
        submitted = time.perf_counter()
        try:
            for fut in as_completed(futures):
                s, i = meta[fut.key]
                up = prev_of.get(fut.key)
                upstream_failed = up is not None and up.status in ("error", "cancelled")
                if fut.status in ("error", "cancelled") and upstream_failed:
                    # a downstream task fails with its upstream's exception: blocked, not failed
                    yield Outcome(s, i, blocked=True)
                elif fut.status == "error":
                    exc = fut.exception()
                    tb = "".join(traceback.format_exception(type(exc), exc, fut.traceback()))
                    yield Outcome(s, i, error=exc, traceback=tb, started=submitted)
                elif fut.status == "cancelled":
                    # Not cancelled by us (that only happens on Ctrl-C, below): the scheduler gave up
                    # on it, e.g. lost inputs. The shard is not done; say so and exit non-zero.
                    exc = RuntimeError("task cancelled by the Dask scheduler (lost worker or data)")
                    yield Outcome(s, i, error=exc, started=submitted)
                else:
                    yield Outcome(s, i, result=fut.result(), started=submitted, ended=time.perf_counter())
        except (KeyboardInterrupt, GeneratorExit):
            self.client.cancel(futures)
            raise
