"""Stage fingerprints: what invalidates a shard, and what does not."""

from __future__ import annotations

from pipeline.config.manifest import load_manifest
from pipeline.core.registry import STAGES


def _hashes(**overrides):
    m = load_manifest(overrides=overrides or None)
    return {s: STAGES[s].params_hash(m) for s in STAGES}


def test_a_stage_parameter_changes_only_that_stage():
    base = _hashes()
    changed = _hashes(**{"stages.fit.max_iterations": 7})
    assert [s for s in STAGES if base[s] != changed[s]] == ["fit"]


def test_decode_settings_invalidate_every_stage_that_reads_pixels():
    base = _hashes()
    changed = _hashes(**{"stages.decode.max_pixels": 1000})
    assert sorted(s for s in STAGES if base[s] != changed[s]) == [
        "crop",
        "detect",
        "embed",
        "landmarks",
        "refine",
    ]


def test_another_morphable_model_invalidates_the_fit_and_the_refinement():
    base = _hashes()
    changed = _hashes(**{"models.morphable_model.sha256": "0" * 64})
    assert [s for s in STAGES if base[s] != changed[s]] == ["fit", "refine"]


def test_execution_settings_do_not_invalidate_anything():
    assert _hashes() == _hashes(
        **{"execution.n_workers": 7, "execution.retries": 5, "execution.decoded_images_mib": 0}
    )
