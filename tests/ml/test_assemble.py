"""scripts/assemble_gpu_run.py: rebuild a training folder from a GPU run's returned files."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from ml.train import TrainConfig, fit, one_hot, read_state

from .conftest import REPO, TINY_SIZE, blob_images


def _script():
    spec = importlib.util.spec_from_file_location(
        "assemble_gpu_run", REPO / "scripts" / "assemble_gpu_run.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


@pytest.fixture(scope="module")
def gpu_like_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run, as scripts/gpu_train.py leaves it before chunking."""
    run = tmp_path_factory.mktemp("gpu") / "run"
    x, y, _ = blob_images(32, seed=5)
    cfg = TrainConfig(
        image_size=TINY_SIZE, epochs=1, batch_size=16, backbone="tiny", extra={"device": "gpu"}
    )
    fit(cfg, run, (x, one_hot(y)), (x[:8], one_hot(y[:8])), verbose=0)
    return run


def _returned(
    run: Path, dest: Path, embedded: bool, chunk: int = 50_000, whole: bool = False
) -> Path:
    dest.mkdir()
    blob = (run / "model.weights.h5").read_bytes()
    if whole:  # already concatenated on the way back
        (dest / "model.weights.h5").write_bytes(blob)
    else:
        for i in range(0, len(blob), chunk):
            (dest / f"weights.part{i // chunk}").write_bytes(blob[i : i + chunk])
    names = ("history.csv", "config.json", "train_state.json")
    summary: dict = {"best": "gap_hist", "gap_hist": {"state": read_state(run)}}
    if embedded:
        summary["best_files"] = {n: (run / n).read_text() for n in names}
    else:
        for n in names:
            (dest / f"best_{n}").write_text((run / n).read_text())
    (dest / "summary.json").write_text(json.dumps(summary))
    return dest


@pytest.mark.parametrize(("embedded", "whole"), [(True, False), (False, False), (True, True)])
def test_assemble_rebuilds_the_training_folder(
    gpu_like_run: Path,
    tmp_path: Path,
    embedded: bool,
    whole: bool,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mod = _script()
    returned = _returned(gpu_like_run, tmp_path / "returned", embedded, whole=whole)
    assert whole or len(list(returned.glob("weights.part*"))) > 2
    out = tmp_path / "model"
    assert mod.main([str(returned), str(out), "--check"]) == 0
    original = (gpu_like_run / "model.weights.h5").read_bytes()
    assert (out / "model.weights.h5").read_bytes() == original
    for n in ("history.csv", "config.json", "train_state.json"):
        assert (out / n).read_text() == (gpu_like_run / n).read_text()
    assert read_state(out)["completed"]
    assert "best_files" not in json.loads((out / "gpu_summary.json").read_text())
    text = capsys.readouterr().out
    assert hashlib.sha256(original).hexdigest()[:12] in text and "weights load" in text


def test_assemble_refuses_gaps_and_incomplete_runs(gpu_like_run: Path, tmp_path: Path) -> None:
    mod = _script()
    returned = _returned(gpu_like_run, tmp_path / "r1", embedded=True)
    (returned / "weights.part1").unlink()
    with pytest.raises(SystemExit, match="contiguous"):
        mod.assemble(returned, tmp_path / "o1")
    returned = _returned(gpu_like_run, tmp_path / "r2", embedded=True)
    summary = json.loads((returned / "summary.json").read_text())
    summary["best_files"]["train_state.json"] = json.dumps({"epochs_run": 1})
    (returned / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(SystemExit, match="did not complete"):
        mod.assemble(returned, tmp_path / "o2")
