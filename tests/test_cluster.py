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
