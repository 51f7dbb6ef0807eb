"""``cxr train --trainable conv5 --init-from``: cached trunk features, source-balanced
draws, resumable head training, the cross-source arms and the OOD detector, on tiny data."""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from apps.cli import main
from ml.artifact import load_card, make_tiny_artifact
from ml.frozen import LeaveOut, apply_leave_out, mix_feature_style, source_balanced_indices
from ml.ood import OOD_FILE
from ml.runtime import Classifier

from .conftest import TINY_SIZE, make_labelled_folder


@pytest.fixture(scope="module")
def three_source_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny data whose Normal class has two sources (srcB and srcC), like NIH + JSRT."""
    root = make_labelled_folder(tmp_path_factory.mktemp("cxr3") / "data", per_class=12)
    rows = list(csv.DictReader(open(root / "manifest.csv")))
    for r in rows:
        if r["label"] == "Normal" and int(r["file"][-7:-4]) % 2:
            r["source"] = "srcC"
    with open(root / "manifest.csv", "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    return root


@pytest.fixture
def tiny_frozen_args(
    workdir: Path, onnx_cache: Path, three_source_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., list[str]]:
    """``cxr train`` arguments of a frozen-trunk run on the tiny backbone and the tiny
    three-source data: the init artifact in WORKDIR/init, the model in WORKDIR/model, the
    feature cache in WORKDIR/features; extra arguments are appended."""
    monkeypatch.setenv("CXR_MODEL_CACHE_DIR", str(onnx_cache))
    init = make_tiny_artifact(workdir / "init", image_size=TINY_SIZE)

    def args(*extra: str) -> list[str]:
        return [
            "train", "--data", str(three_source_folder), "--out", str(workdir / "model"),
            "--backbone", "tiny", "--image-size", str(TINY_SIZE), "--trainable", "conv5",
            "--init-from", str(init / "model.weights.h5"), "--aug-copies", "1",
            "--cache-dir", str(workdir / "features"), "--batch-size", "8", "--bootstrap", "20",
            *extra,
        ]  # fmt: skip

    return args


def test_source_balanced_draws_equalise_sources_within_a_class() -> None:
    labels = [0] * 90 + [0] * 10 + [1] * 50
    sources = ["big"] * 90 + ["small"] * 10 + ["x"] * 50
    idx = source_balanced_indices(labels, sources, 3000, np.random.default_rng(0))
    drawn = Counter(sources[i] for i in idx)
    assert len(idx) == 3000
    # the class shares stay (100:50), the two COVID sources are drawn alike
    assert drawn["x"] == 1000
    assert drawn["big"] == drawn["small"] == 1000


def test_feature_style_mixing_swaps_statistics_across_sources_only() -> None:
    rng = np.random.default_rng(0)
    n = 40
    sources = ["a"] * 20 + ["b"] * 20
    # source a: channel means 0, std 1; source b: means 5, std 3 (its "style")
    x = rng.normal(0, 1, (n, 7, 7, 4)).astype(np.float32)
    x[20:] = x[20:] * 3 + 5
    content = (x - x.mean(axis=(1, 2), keepdims=True)) / x.std(axis=(1, 2), keepdims=True)
    before = x.copy()
    y = mix_feature_style(x, sources, np.random.default_rng(1), p=1.0, alpha=0.5)
    np.testing.assert_array_equal(x, before)  # the input is not changed
    mu = y.mean(axis=(1, 2))
    # with p = 1 every sample moved towards the other source's statistics
    assert (mu[:20] > 0.2).mean() > 0.7 and (mu[20:] < 4.8).mean() > 0.7
    # a mix of two samples' statistics stays within the range of the samples' own
    mu0 = x.mean(axis=(1, 2))
    assert (mu >= mu0.min(axis=0) - 1e-3).all() and (mu <= mu0.max(axis=0) + 1e-3).all()
    # what an image shows (its normalised content) is kept
    yc = (y - y.mean(axis=(1, 2), keepdims=True)) / y.std(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(yc, content, atol=1e-3)
    # p = 0, or a single source, leaves the features alone
    np.testing.assert_array_equal(mix_feature_style(x, sources, rng, p=0.0), x)
    np.testing.assert_array_equal(mix_feature_style(x, ["a"] * n, rng, p=1.0), x)


def test_leave_out_removes_the_source_and_its_groups() -> None:
    from ml.data import Sample

    s = [
        Sample(Path("a"), "Normal", "jsrt", "g1"),
        Sample(Path("b"), "Normal", "nih", "g1"),  # same group as a left-out image
        Sample(Path("c"), "Normal", "nih", "g2"),
        Sample(Path("d"), "Other", "jsrt", "g3"),
    ]
    kept, held = apply_leave_out({"train": s}, s, LeaveOut.parse("jsrt:Normal"))
    assert [x.path.name for x in held] == ["a"]
    assert [x.path.name for x in kept["train"]] == ["c", "d"]
    with pytest.raises(ValueError):
        LeaveOut.parse("jsrt:Nonsense")


def test_frozen_training_arms_ood_and_resume(
    workdir: Path, tiny_frozen_args: Callable[..., list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    out, cache = workdir / "model", workdir / "features"
    args = tiny_frozen_args("--model-version", "2.0.0")
    # a first run of 1 epoch, "interrupted" there (train only) ...
    assert main([*args, "--epochs", "1", "--no-finalise"]) == 0
    state = json.loads((out / "train_state.json").read_text())
    assert state["epochs_run"] == 1 and state["completed"]
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["done"] == [36, 36]  # 1 plain + 1 augmented copy of every image
    # ... a run of an unfinished state resumes from the checkpoint
    state["completed"] = False
    (out / "train_state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert main([*args, "--epochs", "3", "--patience", "5", "--cross-source", "srcC"]) == 0
    text = capsys.readouterr().out
    assert "resumed after epoch 1" in text
    rows = (out / "history.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3  # header + epochs 1..3, epoch 1 not repeated
    card = load_card(out)
    assert card["version"] == "2.0.0"
    assert card["preprocessing"]["square_policy"] == "trim-uniform-borders-centre-square"
    assert card["training"]["extra"]["source_balanced"] is True
    # the arm: srcC (half the Normal images) left out, its Normal recall measured
    (cell,) = card["cross_source"]
    assert cell["left_out"] == "srcC" and cell["metric"] == "Normal recall"
    assert cell["n"] == 6 and 0.0 <= cell["value"] <= 1.0
    assert "left-out srcC Normal recall>=0.80" in card["metrics"]["test"]["targets"]
    # the OOD detector ships with the artifact, its threshold set on val (95% pass)
    assert (out / OOD_FILE).is_file()
    assert card["ood"]["val_pass_rate"] >= 0.9
    clf = Classifier.load(out, engine="keras")
    p = clf.predict_display(np.full((80, 64), 128, np.uint8))
    assert p.ood_score is not None and isinstance(p.ood, bool)
    assert clf.ood_detector is not None
    noise = np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)
    far = clf.predict_display(noise)
    assert far.ood_score is not None
    # a completed run asked again (e.g. for its arms) uses the TRAINED weights: the same
    # cell and the same OOD detector come out, not the init weights'
    ood_before = (out / OOD_FILE).read_bytes()
    (out / OOD_FILE).unlink()
    assert main([*args, "--epochs", "3", "--cross-source", "srcC"]) == 0
    again = load_card(out)
    assert again["cross_source"] == card["cross_source"]
    from ml.ood import MahalanobisOOD

    a = MahalanobisOOD.load(out / OOD_FILE)
    (out / "b.npz").write_bytes(ood_before)
    b = MahalanobisOOD.load(out / "b.npz")
    probe = np.random.default_rng(2).normal(0, 1, (5, a.centre.shape[0])).astype(np.float32)
    probe = np.abs(probe) * float(np.abs(a.centre).mean()) + a.centre
    np.testing.assert_allclose(a.score(probe), b.score(probe), rtol=5e-2)
