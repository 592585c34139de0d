"""Cluster code paths that can run without a batch system: job-script generation and clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from dags.cluster import make_batch_cluster
from pipeline.errors import MorphsetError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cluster.md"


def _documented_slurm_spec() -> dict:
    text = DOCS.read_text(encoding="utf-8")
    block = re.search(r"## Slurm \(dask-jobqueue\)\n\n```yaml\n(.*?)```", text, re.S).group(1)
    return yaml.safe_load(block)["execution"]["cluster"]


def test_the_documented_slurm_example_gives_one_gpu_task_per_gpu(monkeypatch):
    """docs/cluster.md's Slurm block, as written, generates a job script with one worker process
    that declares the job's one GPU (it had 8 workers each declaring GPU=1 on one GPU)."""
    pytest.importorskip("dask_jobqueue")
    import dags.cluster as dc

    monkeypatch.setattr(dc.shutil, "which", lambda name: f"/usr/bin/{name}")  # as on a login node
    spec = _documented_slurm_spec()
    spec["options"]["scheduler_options"] = {"host": "127.0.0.1"}
    cluster = make_batch_cluster(spec)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -p gpu" in script
    assert "#SBATCH --gres=gpu:1" in script
    assert "#SBATCH -t 08:00:00" in script
    # one worker process per job (dask-jobqueue writes --nworkers only for more than one)
    assert "--resources GPU=1" in script and "--nworkers" not in script and "--nthreads 8" in script

    bad = {**spec, "options": {**spec["options"], "processes": 8}}
    with pytest.raises(
        MorphsetError, match=r"8 worker processes per slurm job each declare GPU=1, but the job has 1 GPU"
    ):
        make_batch_cluster(bad)


def test_a_missing_sbatch_is_one_line_not_a_hang():
    pytest.importorskip("dask_jobqueue")
    import shutil

    if shutil.which("sbatch"):
        pytest.skip("this machine has sbatch")
    with pytest.raises(MorphsetError, match=r"`sbatch` is not on PATH here; run the build where slurm jobs"):
        make_batch_cluster(_documented_slurm_spec())


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
