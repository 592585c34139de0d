"""Where the graph runs: an embedded LocalCluster (default), an existing Dask cluster, or in-process.

``execution.scheduler`` (or ``--scheduler``):
- ``null``: a ``distributed.LocalCluster`` sized to the machine — one single-threaded worker process
  per core with a memory limit — started and closed by the command;
- ``tcp://host:8786``: join a running cluster (dask-jobqueue, dask-kubernetes, ``dask scheduler`` ...);
- ``sync``: no cluster, shards run one after another in this process (debugging, tiny runs).

``execution.cluster`` (with ``scheduler: null``) instead starts a batch-system cluster through
dask-jobqueue (``kind: slurm | pbs | sge | lsf``) or a dask-kubernetes ``KubeCluster``
(``kind: kubernetes``), scaled to ``workers`` jobs/pods. See docs/cluster.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from typing import Any

import dask

from pipeline.config.manifest import Manifest
from pipeline.core.processes import refuse_unguarded_main
from pipeline.errors import MissingPackage, MorphsetError

log = logging.getLogger("morphset.cluster")


@contextlib.contextmanager
def _workers_ignore_ctrl_c() -> Iterator[None]:
    """Worker processes started inside this block ignore SIGINT: Ctrl-C in a terminal signals the
    whole process group, and the driver alone handles it (cancels, keeps what is committed, says
    so in one line); workers that also took it printed a KeyboardInterrupt traceback each. An
    ignored signal is inherited across the spawn and Python keeps it ignored."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may change signal handlers
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def worker_malloc_environ() -> dict:
    """The environment Dask's nanny gives a worker process before it starts, without
    ``MALLOC_TRIM_THRESHOLD_``. Dask sets it (65536) to hand freed memory back to the system;
    setting it switches off glibc's adaptive mmap threshold, so every array over 128 kB is
    mapped and unmapped again, and each use page-faults. Measured on the torch MTCNN in a
    one-thread worker: 27.8 ms per image (12.6 ms of it system CPU, 7x the page faults) with it,
    16.6 ms without, 15.8 ms in the driver process (docs/cluster.md)."""
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    dask_value = environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    # A nanny runs in this process for a LocalCluster and writes its pre-spawn values into
    # os.environ, where later workers inherit them: drop Dask's value (not one a user set).
    if dask_value is not None and os.environ.get("MALLOC_TRIM_THRESHOLD_") == str(dask_value):
        os.environ.pop("MALLOC_TRIM_THRESHOLD_")
    return environ


def _quiet_dask_logs() -> None:
    for name in ("distributed", "distributed.worker", "distributed.scheduler", "distributed.nanny"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # bokeh warns about its websocket origin wildcard on every dashboard start; the dashboard listens
    # on execution.dashboard_address (127.0.0.1 by default), which is what limits who can reach it
    logging.getLogger("bokeh").setLevel(logging.ERROR)
    # a scheduler that cannot be reached is one error line (above), not a log of every retry
    logging.getLogger("distributed.core").setLevel(logging.ERROR)
    logging.getLogger("distributed.comm").setLevel(logging.ERROR)


def _quiet_shutdown() -> None:
    """An interrupted build closes its cluster mid-flight; distributed's own callbacks can then fail
    inside tornado's loop and be logged with tracebacks. The command says in one line what happened
    (committed shards are kept); those logs say nothing a user can act on."""
    for name in ("tornado.application", "tornado.general", "asyncio", "distributed"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


_JOBQUEUE = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}


def make_batch_cluster(spec: dict) -> Any:
    """Create (not scale) the dask-jobqueue or dask-kubernetes cluster described by ``execution.cluster``."""
    kind = spec["kind"]
    options = dict(spec.get("options") or {})
    if kind in _JOBQUEUE:
        try:
            import dask_jobqueue
        except ImportError:
            raise MissingPackage(
                f"execution.cluster.kind={kind} needs dask-jobqueue: install the cluster extra (pip install '<morphset wheel or checkout>[cluster]')"
            ) from None
        check_gpu_jobs(kind, options)
        cluster_cls = getattr(dask_jobqueue, _JOBQUEUE[kind])
        submit = getattr(cluster_cls.job_cls, "submit_command", None)
        if submit and shutil.which(submit) is None:
            # dask-jobqueue would start a scheduler and wait forever on jobs it cannot submit
            raise MorphsetError(
                f"execution.cluster.kind={kind}: `{submit}` is not on PATH here; run the build where "
                f"{kind} jobs can be submitted (a login node), or join a running cluster with --scheduler"
            )
        return cluster_cls(**options)
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError:
        raise MissingPackage(
            "execution.cluster.kind=kubernetes needs dask-kubernetes: install the cluster extra (pip install '<morphset wheel or checkout>[cluster]')"
        ) from None
    return KubeCluster(**options)


def _declared_gpus(args: list[str]) -> float:
    """The GPU resource each worker declares in ``--resources GPU=n`` worker arguments."""
    for k, a in enumerate(args):
        text = a.split("=", 1)[1] if a.startswith("--resources=") else None
        if a == "--resources" and k + 1 < len(args):
            text = args[k + 1]
        for item in (text or "").replace(",", " ").split():
            name, _, value = item.partition("=")
            if name == "GPU":
                return float(value or 0)
    return 0.0


def _job_gpus(directives: list[str]) -> int | None:
    """GPUs a Slurm job asks for (``--gres=gpu[:type]:N`` or ``--gpus[-per-node]=N``); None if unsaid."""
    for d in directives:
        d = d.strip()
        if d.startswith("--gres=gpu"):
            last = d.rsplit(":", 1)[-1]
            return int(last) if last.isdigit() else 1
        for key in ("--gpus-per-node=", "--gpus="):
            if d.startswith(key) and d[len(key) :].isdigit():
                return int(d[len(key) :])
    return None


def check_gpu_jobs(kind: str, options: dict) -> None:
    """Refuse a job whose worker processes together declare more GPUs than the job has: with
    ``processes: 8`` and ``--resources GPU=1`` on a one-GPU job, 8 GPU tasks would share one GPU."""
    per_worker = _declared_gpus([str(a) for a in options.get("worker_extra_args") or []])
    gpus = _job_gpus([str(d) for d in options.get("job_extra_directives") or []])
    processes = int(options.get("processes") or 1)
    if per_worker and gpus is not None and per_worker * processes > gpus:
        raise MorphsetError(
            f"execution.cluster.options: {processes} worker processes per {kind} job each declare GPU="
            f"{per_worker:g}, but the job has {gpus} GPU(s): set processes to {max(int(gpus // per_worker), 1)} "
            "(one GPU task per GPU; give the worker more threads with cores instead)"
        )


@contextlib.contextmanager
def open_client(manifest: Manifest, echo: bool = True) -> Iterator[Any]:
    """Yield a ``distributed.Client`` (or None for ``sync``); close what this function started."""
    ex = manifest.data.get("execution", {})
    scheduler = ex.get("scheduler")
    if scheduler == "sync":
        yield None
        return
    from distributed import Client, LocalCluster

    _quiet_dask_logs()
    if scheduler:
        try:
            client = Client(scheduler, timeout=ex.get("connect_timeout") or "30s")
        except (OSError, TimeoutError) as exc:
            raise MorphsetError(
                f"cannot reach the Dask scheduler at {scheduler} ({type(exc).__name__}: {exc}); is it running "
                "and reachable from here? (--scheduler / execution.scheduler)"
            ) from None
        register_thread_budget(client)
        if echo:
            print(
                f"joined Dask cluster {scheduler}; dashboard: {client.dashboard_link}",
                file=sys.stderr,
                flush=True,
            )
        try:
            yield client
        except KeyboardInterrupt:
            _quiet_shutdown()
            raise
        finally:
            client.close()
        return
    if ex.get("cluster"):
        spec = ex["cluster"]
        cluster = make_batch_cluster(spec)
        cluster.scale(spec.get("workers", 1))
        with _serve(
            cluster, f"{spec['kind']} cluster scaled to {spec.get('workers', 1)} worker(s)", echo
        ) as client:
            yield client
        return
    n_workers = ex.get("n_workers") or os.cpu_count() or 1
    # Workers inherit this; it keeps TensorFlow quiet and stops BLAS oversubscribing the cores.
    env = {
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    os.environ.update({k: os.environ.get(k, v) for k, v in env.items()})
    refuse_unguarded_main("a LocalCluster build")
    with (
        dask.config.set({"distributed.nanny.pre-spawn-environ": worker_malloc_environ()}),
        _workers_ignore_ctrl_c(),
    ):
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=ex.get("threads_per_worker", 1),
            processes=True,
            memory_limit=ex.get("memory_limit", "4GiB"),
            dashboard_address=(ex.get("dashboard_address") or "127.0.0.1:0")
            if ex.get("dashboard", True)
            else None,
            silence_logs=logging.ERROR,  # a failed task is reported (and kept) by the build, once
        )
    desc = f"LocalCluster: {n_workers} worker process(es) x {ex.get('threads_per_worker', 1)} thread(s)"
    with _serve(cluster, desc, echo, dashboard=ex.get("dashboard", True)) as client:
        register = getattr(client, "register_plugin", None) or client.register_worker_plugin
        register(local_worker_plugin())
        yield client


def thread_budget_plugin() -> object:
    """A worker plugin that sizes every library's thread pool to the worker's threads at start
    (:func:`pipeline.core.threads.limit_threads`): workers that do not fight over the cores."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class ThreadBudget(WorkerPlugin):
        name = "morphset-thread-budget"

        def setup(self, worker: object) -> None:
            from pipeline.core.threads import limit_threads

            limit_threads(int(getattr(getattr(worker, "state", worker), "nthreads", 1) or 1))

    return ThreadBudget()


def local_worker_plugin() -> object:
    """A plugin for the workers of the LocalCluster this module starts: they live and die with the
    driver, so when it stops (Ctrl-C) their failed heartbeats to its vanished scheduler are
    expected, and logged tracebacks of them would bury the driver's one line."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class QuietEnd(WorkerPlugin):
        name = "morphset-quiet-end"

        def setup(self, worker: object) -> None:
            class DropLostScheduler(logging.Filter):
                def filter(self, record: logging.LogRecord) -> bool:
                    return not str(record.msg).startswith("Failed to communicate with scheduler")

            logging.getLogger("distributed.worker").addFilter(DropLostScheduler())

    return QuietEnd()


def register_thread_budget(client: Any) -> None:
    """Install the thread budget on every current and future worker of ``client``'s cluster."""
    register = getattr(client, "register_plugin", None) or client.register_worker_plugin
    register(thread_budget_plugin())


@contextlib.contextmanager
def _serve(cluster: Any, description: str, echo: bool, dashboard: bool = True) -> Iterator[Any]:
    """A client on a cluster this module started; both are closed on the way out."""
    from distributed import Client

    client = Client(cluster)
    register_thread_budget(client)
    if echo:
        print(
            f"{description}; dashboard: {client.dashboard_link if dashboard else 'off'}",
            file=sys.stderr,
            flush=True,
        )
    try:
        yield client
    except KeyboardInterrupt:
        _quiet_shutdown()
        raise
    finally:
        client.close()
        cluster.close()
