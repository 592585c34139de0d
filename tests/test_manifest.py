"""Manifest loading: validation errors name the key path and what was expected; overrides apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config.manifest import DEFAULT_MANIFEST, ManifestError, load_manifest


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.fixture()
def base() -> dict:
    return yaml.safe_load(DEFAULT_MANIFEST.read_text())


def test_repository_manifest_is_valid_and_declares_the_datasets():
    m = load_manifest()
    assert m.dataset("casia-webface")["expected_images"] == 494414
    assert m.dataset("casia-webface")["expected_subjects"] == 10575
    assert m.dataset("lfw")["expected_images"] == 13233
    assert m.dataset("lfw")["expected_subjects"] == 5749
    assert m.dataset("synthetic")["synthetic"] is True
    assert len(m.model("morphable_model")["sha256"]) == 64


def test_unknown_key_is_refused_with_its_path(tmp_path, base):
    base["execution"]["n_wrokers"] = 2
    with pytest.raises(ManifestError, match=r"execution: unknown key\(s\) \['n_wrokers'\]"):
        load_manifest(_write(tmp_path, base))


def test_wrong_type_names_key_and_expected_type(tmp_path, base):
    base["stages"] = {"ingest": {"shard_size": "big"}}
    with pytest.raises(ManifestError) as e:
        load_manifest(_write(tmp_path, base))
    assert "stages.ingest.shard_size: expected integer, got 'big'" in str(e.value)
    assert str(tmp_path / "m.yaml") in str(e.value)


def test_missing_required_field(tmp_path, base):
    # a dataset of the user's own (one of the defaults would be completed by the packaged manifest)
    base["datasets"]["mine"] = {k: v for k, v in base["datasets"]["lfw"].items() if k != "root"}
    with pytest.raises(ManifestError, match=r"datasets\.mine: 'root' is required but missing"):
        load_manifest(_write(tmp_path, base))


def test_bad_enum_and_bad_sha(tmp_path, base):
    base["datasets"]["lfw"]["layout"] = "flat"
    base["models"]["dlib_landmarks"]["sha256"] = "abc"
    with pytest.raises(ManifestError) as e:
        load_manifest(_write(tmp_path, base))
    msg = str(e.value)
    assert "datasets.lfw.layout: expected one of ['subject-folders', 'list-file'], got 'flat'" in msg
    assert "models.dlib_landmarks.sha256" in msg


def test_invalid_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("version: 1\ndatasets: [\n  oops\nstages: {}\n")
    with pytest.raises(ManifestError, match=r"bad\.yaml:\d+: not valid YAML"):
        load_manifest(p)


def test_overrides_win_and_are_validated():
    m = load_manifest(overrides=["stages.ingest.shard_size=17", "execution.scheduler=tcp://h:8786"])
    assert m.stage_params("ingest")["shard_size"] == 17
    assert m.get("execution.scheduler") == "tcp://h:8786"
    with pytest.raises(ManifestError, match="stages.ingest.shard_size: expected integer"):
        load_manifest(overrides=["stages.ingest.shard_size=lots"])
    with pytest.raises(ManifestError, match="expected KEY.PATH=VALUE"):
        load_manifest(overrides=["stages.ingest.shard_size"])


def test_stage_defaults_come_from_the_stage_schema():
    m = load_manifest()
    p = m.stage_params("ingest")
    assert p["shard_size"] == 2000 and ".jpg" in p["image_extensions"]


@pytest.mark.parametrize(
    "key, value",
    [
        ("stages.detect.min_score", ".nan"),
        ("stages.fit.reject_nme", ".nan"),
        ("stages.fit.identity_prior_weight", ".inf"),
        ("stages.export.val_fraction", "-.inf"),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_key(key, value):
    """JSON Schema's bounds pass NaN (every comparison with it is false): checked apart."""
    with pytest.raises(ManifestError, match=rf"{key}: expected a finite number"):
        load_manifest(overrides=[f"{key}={value}"])


def test_a_nan_setting_stops_a_build_before_anything_is_written(tmp_path, capsys):
    from pipeline.cli import main

    run = tmp_path / "run"
    rc = main(["build", str(run), "--root", str(tmp_path), "--set", "stages.detect.min_score=.nan"])
    assert rc == 2 and not run.exists()
    assert "stages.detect.min_score: expected a finite number, got nan" in capsys.readouterr().err


def test_memory_limit_must_be_a_size():
    for good in ("4GiB", "auto", "0", "500MB", "2.5 GB", "1e9"):
        assert load_manifest(overrides={"execution.memory_limit": good}).get("execution.memory_limit") == good
    for bad in ("-5GiB", "lots", "4 gigabytes"):
        with pytest.raises(
            ManifestError, match=r"execution.memory_limit: expected memory per worker process"
        ):
            load_manifest(overrides={"execution.memory_limit": bad})


def test_a_partial_manifest_overlays_the_defaults_and_config_prints_the_result(tmp_path, capsys):
    """A manifest that names only what it changes (as docs/cluster.md shows one) is accepted: the
    packaged defaults fill the rest; `morphset config` prints what a command would use."""
    import json

    import yaml

    from pipeline.cli import main
    from pipeline.config.manifest import load_manifest

    partial = tmp_path / "mine.yaml"
    partial.write_text("execution:\n  n_workers: 3\nstages:\n  fit:\n    max_iterations: 7\n")
    m = load_manifest(partial)
    default = load_manifest()
    assert m.get("execution.n_workers") == 3 and m.stage_params("fit")["max_iterations"] == 7
    assert m.get("execution.retries") == default.get("execution.retries")  # from the defaults
    assert m.data["datasets"] == default.data["datasets"] and m.path == str(partial)

    assert main(["config", "--manifest", str(partial), "--set", "execution.retries=5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["execution"]["n_workers"] == 3 and printed["execution"]["retries"] == 5
    assert printed["stages"]["fit"]["max_iterations"] == 7 and "models" in printed
    assert main(["config", "--manifest", str(partial), "--key", "stages.fit.max_iterations", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == 7
    assert main(["config", "--key", "stages.nothing"]) == 2
    assert "stages.nothing: no such key in the effective manifest" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("execution:\n  workers: 3\n")
    assert main(["config", "--manifest", str(bad)]) == 2
    assert "unknown key(s) ['workers']" in capsys.readouterr().err
