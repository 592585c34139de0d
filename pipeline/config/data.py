"""Where the declared data lives: ``schemas/`` and the default ``data_manifest.yaml``.

In a checkout (and an editable install) they are the repository's own files; a built wheel carries
copies inside the package (``pipeline/_data/``, put there by ``setup.py`` at build time), so an
installed morphset finds them without the repository.
"""

from __future__ import annotations

from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[2]
_PACKAGED = Path(__file__).resolve().parents[1] / "_data"


def data_root() -> Path:
    """The folder holding ``schemas/`` and ``data_manifest.yaml``."""
    if (_CHECKOUT / "schemas").is_dir() and (_CHECKOUT / "data_manifest.yaml").is_file():
        return _CHECKOUT
    if (_PACKAGED / "schemas").is_dir():
        return _PACKAGED
    raise FileNotFoundError(
        f"morphset's schemas were found neither in {_CHECKOUT} (a checkout) nor in {_PACKAGED} "
        "(an installed wheel); reinstall morphset"
    )
