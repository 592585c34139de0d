"""The loader printed in docs/trainset.md works as written: pyarrow + Pillow + torch only, each row of
the chosen split once with any number of DataLoader workers."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pipeline.storage.run import Run
from pipeline.synthetic.trainset import write_synthetic_trainset

MODEL = {"k_id": 6, "k_exp": 3, "seed": 3, "spacing_mm": 7.0}  # the model fixture (conftest.py)
DOC = Path(__file__).resolve().parents[1] / "docs" / "trainset.md"


def _loader_code() -> str:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## A minimal torch loader") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_loader_reads_each_row_of_a_split_once(tmp_path, model):
    code = _loader_code()
    assert "pipeline" not in code and "cv2" not in code  # any framework: nothing of ours, no OpenCV
    run = tmp_path / "run"
    write_synthetic_trainset(str(run), model, n_subjects=6, images_per_subject=5, n_shards=3, val_subjects=2)
    rows = Run(run).table("export", ["label", "split"]).to_pylist()
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    shards = namespace["Shards"]
    for split in ("train", "val"):
        want = sorted(r["label"] for r in rows if r["split"] == split)
        for workers in (0, 2):
            dl = torch.utils.data.DataLoader(shards(str(run), split), batch_size=4, num_workers=workers)
            got = sorted(int(x) for batch in dl for x in batch[1])
            assert got == want, (split, workers)
        img, label, a_id, a_exp = next(iter(shards(str(run), split)))
        assert img.shape == (3, 112, 96) and -1.0 <= float(img.min()) and float(img.max()) <= 1.0
        assert a_id.shape == (6,) and a_exp.shape == (3,)
