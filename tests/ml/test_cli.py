"""``cxr train / evaluate / predict / export-onnx`` on tiny generated data."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from apps.cli import main
from ml.artifact import CARD_MD, load_card, verify_sha
from ml.labels import CLASSES
from ml.runtime import Classifier

from .conftest import SHIPPED, TINY_SIZE, make_labelled_folder

REQUIRED_KEYS = {"accuracy", "macro_f1", "ece", "n", "per_class"}
PER_CLASS_KEYS = {"precision", "recall", "f1", "specificity", "auc"}


@pytest.fixture
def env(workdir: Path, onnx_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CXR_MODEL_CACHE_DIR", str(onnx_cache))
    return workdir


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_labelled_folder(tmp_path_factory.mktemp("cxr") / "data", per_class=12)


def test_train_then_finalise_writes_a_complete_artifact(
    env: Path, tiny_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = env / "model"
    args = [
        "train",
        "--data",
        str(tiny_folder),
        "--out",
        str(out),
        "--backbone",
        "tiny",
        "--image-size",
        str(TINY_SIZE),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--bootstrap",
        "50",
        "--model-version",
        "7",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "test split" in text and "NOT FOR DIAGNOSTIC USE" in text
    card = load_card(out)
    assert verify_sha(out)
    assert card["version"] == "7" and card["image_size"] == TINY_SIZE
    assert card["architecture"] == {
        "backbone": "tiny",
        "head": "gap",
        "dropout": 0.3,
        "trainable": "all",
        "init_weights": "scratch",
    }
    assert 0.05 <= card["temperature"] <= 20
    for split in ("val", "test"):
        m = card["metrics"][split]
        assert REQUIRED_KEYS <= set(m)
        assert (
            set(m["ci"]["accuracy"])
            and m["ci"]["accuracy"][0] <= m["accuracy"] <= m["ci"]["accuracy"][1]
        )
        assert set(m["per_source"]) == {"srcA", "srcB"}
        assert (out / "reports" / split / "confusion_matrix.png").is_file()
        assert (out / "reports" / split / "roc.png").is_file()
        assert (out / "reports" / split / "reliability.png").is_file()
    assert set(card["metrics"]["test"]["targets"]) == {
        "accuracy>=0.90",
        "COVID recall>=0.97",
        "ECE<=0.05",
    }
    assert card["preprocessing"]["square_policy"] == "trim-uniform-borders-centre-square"
    assert card["training_cost"]["epochs"] == 2
    assert card["data"]["sources"]["srcA"]["licence"] == "CC BY 4.0"
    assert sum(sum(c.values()) for c in card["data"]["split_counts"].values()) == 36
    assert any(item.startswith("SOURCE BIAS") for item in card["limitations"])
    assert card["training"]["epochs_run"] == 2
    md = (out / CARD_MD).read_text()
    assert "Research use only, not for diagnostic use." in md and card["weights_sha256"] in md
    assert (out / "learning_curves.png").is_file() and not (out / "backup").exists()

    # a completed run (e.g. assembled from the GPU box) is only finalised again
    with open(out / "history.csv") as fh:
        rows = fh.read()
    assert main(args) == 0
    assert "already completed" in capsys.readouterr().out
    assert (out / "history.csv").read_text() == rows
    assert load_card(out)["weights_sha256"] == card["weights_sha256"]


def test_evaluate_json(env: Path, tiny_artifact: Path, tiny_folder: Path) -> None:
    out = env / "eval.json"
    rep = env / "report"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tiny_artifact),
                "--data",
                str(tiny_folder),
                "--json",
                str(out),
                "--report-dir",
                str(rep),
                "--bootstrap",
                "100",
            ]
        )
        == 0
    )
    m = json.loads(out.read_text())
    assert REQUIRED_KEYS <= set(m)
    assert set(m["per_class"]) == set(CLASSES)
    for c in CLASSES:
        assert PER_CLASS_KEYS <= set(m["per_class"][c])
    assert m["n"] == 36
    # the metrics are those of the model's own predictions, file by file
    clf = Classifier.load(tiny_artifact, engine="keras")
    rows = list(csv.DictReader(open(tiny_folder / "manifest.csv")))
    preds = [clf.predict_file(tiny_folder / r["file"]).label for r in rows]
    truth = [r["label"] for r in rows]
    assert m["accuracy"] == pytest.approx(
        np.mean([p == t for p, t in zip(preds, truth, strict=True)])
    )
    for c in CLASSES:
        tp = sum(p == c and t == c for p, t in zip(preds, truth, strict=True))
        assert m["per_class"][c]["recall"] == pytest.approx(tp / truth.count(c))
    assert 0 <= m["ece"] <= 1 and 0 <= m["macro_f1"] <= 1
    assert set(m["per_source"]) == {"srcA", "srcB"}
    assert m["per_source"]["srcA"]["n"] == 12
    for name in ("confusion_matrix.png", "roc.png", "reliability.png", "metrics.json"):
        assert (rep / name).is_file()
    # --split: the same group-aware split as training
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tiny_artifact),
                "--data",
                str(tiny_folder),
                "--split",
                "test",
                "--json",
                str(out),
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )
    from ml.data import load_samples, split_samples

    test_split = split_samples(load_samples(tiny_folder))["test"]
    assert 0 < json.loads(out.read_text())["n"] == len(test_split) < 36


def _yellow_text_pixels(png: Path) -> int:
    rgb = cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2RGB)
    band = rgb[: max(8, rgb.shape[0] // 12)]
    return int(((band[..., 0] > 180) & (band[..., 1] > 180) & (band[..., 2] < 100)).sum())


def test_predict_every_chest_sample(
    env: Path, dicom_samples: Path, tiny_artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = SHIPPED if (SHIPPED / "model_card.json").is_file() else tiny_artifact
    files = sorted((dicom_samples / "chest").glob("*.dcm"))
    assert len(files) >= 5
    cams = env / "cams"
    # keras engine: exporting DenseNet169 to ONNX would cost a minute and ~3 GB here;
    # ONNX == Keras is tested on the tiny model
    rc = main(
        [
            "predict",
            "--json",
            "--engine",
            "keras",
            "--model",
            str(model),
            "--cam-dir",
            str(cams),
            *map(str, files),
        ]
    )
    lines = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    assert rc == 0, lines
    assert [r["file"] for r in lines] == [str(f) for f in files]
    for r in lines:
        assert r["label"] in CLASSES and set(r["probabilities"]) == set(CLASSES)
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        png = Path(r["cam"])
        img = cv2.imread(str(png))
        src = cv2.imread(str(png))  # overlay has the display's geometry
        assert img is not None and src.ndim == 3
        assert _yellow_text_pixels(png) > 50  # the burnt-in research-use banner


def test_predict_plain_text_and_errors(
    env: Path, tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "x.png"
    cv2.imwrite(str(good), np.random.default_rng(0).integers(0, 255, (50, 40), np.uint8))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"nope")
    rc = main(["predict", "--model", str(tiny_artifact), str(good), str(bad)])
    captured = capsys.readouterr()
    assert rc == 1
    assert "NOT FOR DIAGNOSTIC USE" in captured.out
    assert f"{good}: " in captured.out and all(c in captured.out for c in CLASSES)
    assert "broken.png: ERROR" in captured.err


def test_export_onnx_and_refuse_tampered(
    env: Path,
    tiny_artifact: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import onnxruntime as ort

    out = tmp_path / "m.onnx"
    assert main(["export-onnx", "--model", str(tiny_artifact), "--out", str(out)]) == 0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    x = np.random.default_rng(1).uniform(0, 255, (2, TINY_SIZE, TINY_SIZE, 3)).astype(np.float32)
    outs = sess.run(None, {"image": x})
    logits = next(o for o in outs if o.ndim == 2)
    clf = Classifier.load(tiny_artifact, engine="keras")
    np.testing.assert_allclose(logits, clf.logits(x), atol=1e-4)

    # --warm-cache fills the runtime's cache, so workers load without TensorFlow
    from cxr.settings import get_settings
    from ml.runtime import onnx_cache_paths

    monkeypatch.setenv("CXR_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    assert main(["export-onnx", "--model", str(tiny_artifact), "--warm-cache"]) == 0
    sha = clf.sha256
    assert all(p.is_file() for p in onnx_cache_paths(tmp_path / "cache", sha))
    assert main(["export-onnx", "--model", str(tiny_artifact)]) == 2

    bad = tmp_path / "bad"
    shutil.copytree(tiny_artifact, bad)
    w = bad / "model.weights.h5"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    w.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["predict", "--model", str(bad), str(tmp_path / "m.onnx")]) == 2
    assert "sha256" in capsys.readouterr().err
