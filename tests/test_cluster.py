"""Cluster code paths that can run without a batch system: job-script generation and clear errors."""

from __future__ import annotations

import pytest

from dags.cluster import make_batch_cluster


def test_slurm_configuration_produces_the_expected_job_script():
    pytest.importorskip("dask_jobqueue")
    cluster = make_batch_cluster(
        {
            "kind": "slurm",
            "workers": 4,
            "options": {
                "queue": "gpu",
                "cores": 8,
                "processes": 8,
                "memory": "64GB",
                "walltime": "08:00:00",
                "job_extra_directives": ["--gres=gpu:1"],
                "worker_extra_args": ["--resources", "GPU=1"],
                "scheduler_options": {"host": "127.0.0.1"},
            },
        }
    )
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -p gpu" in script
    assert "#SBATCH --gres=gpu:1" in script
    assert "#SBATCH -t 08:00:00" in script
    assert "--resources GPU=1" in script and "--nworkers 8" in script


def test_kubernetes_without_the_package_is_a_clear_error():
    try:
        import dask_kubernetes  # noqa: F401
    except ImportError:
        with pytest.raises(
            RuntimeError,
            match=r"install the cluster extra \(pip install '<morphset wheel or checkout>\[cluster\]'\)",
        ):
            make_batch_cluster({"kind": "kubernetes", "options": {}})
    else:
        pytest.skip("dask-kubernetes installed; constructing a KubeCluster needs a Kubernetes API")


def test_workers_size_every_thread_pool_to_their_threads():
    """Two one-thread workers on two cores must not each start machine-sized pools."""
    from dags.cluster import open_client
    from pipeline.config.manifest import load_manifest
    from pipeline.core.threads import thread_budget

    def pools() -> dict:
        import os

        import cv2
        from threadpoolctl import threadpool_info

        return {
            "malloc_trim": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
            "budget": thread_budget(),
            "opencv": cv2.getNumThreads(),
            "blas": sorted({p["num_threads"] for p in threadpool_info()}),
        }

    m = load_manifest().with_overrides(
        {"execution.n_workers": 1, "execution.threads_per_worker": 2, "execution.dashboard": False}
    )
    with open_client(m, echo=False) as client:
        seen = client.run(pools)
    assert seen
    for p in seen.values():
        assert p["budget"] == 2 and p["opencv"] == 2 and set(p["blas"]) <= {2}, seen
        # Dask's malloc trim setting makes every large array page-fault (dags/cluster.py): not set
        assert p["malloc_trim"] is None, seen
