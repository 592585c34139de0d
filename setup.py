"""Build hook only (the metadata is in pyproject.toml): a wheel carries ``schemas/`` and the default
``data_manifest.yaml`` inside the package as ``pipeline/_data/``, where
``pipeline.config.data.data_root`` finds them when morphset runs from an installed wheel."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithData(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "pipeline" / "_data"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(HERE / "schemas", target / "schemas")
        shutil.copy2(HERE / "data_manifest.yaml", target / "data_manifest.yaml")


setup(cmdclass={"build_py": BuildPyWithData})
