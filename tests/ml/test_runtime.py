"""Model artifact + serving runtime: card, sha256 check, ONNX vs Keras, Prediction contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from ml.artifact import (
    CARD_JSON,
    CARD_MD,
    DISCLAIMER,
    ArtifactError,
    load_card,
    make_tiny_artifact,
    verify_sha,
)
from ml.calibration import softmax
from ml.labels import CLASSES
from ml.runtime import (
    Classifier,
    Prediction,
    clear_classifier_cache,
    get_classifier,
    onnx_cache_paths,
)

from .conftest import SHIPPED, TINY_SIZE, chest_like


def _displays(n: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    shapes = [(90, 70), (64, 64), (50, 120), (200, 180)]
    return [chest_like(rng, *shapes[i % 4], i % 3) for i in range(n)]


def test_tiny_artifact_card_and_sha(tiny_artifact: Path) -> None:
    card = load_card(tiny_artifact)
    assert card["classes"] == list(CLASSES)
    assert card["image_size"] == TINY_SIZE
    assert card["architecture"]["backbone"] == "tiny"
    assert card["preprocessing"]["size"] == TINY_SIZE
    assert card["disclaimer"] == DISCLAIMER
    assert len(card["weights_sha256"]) == 64
    assert verify_sha(tiny_artifact)
    md = (tiny_artifact / CARD_MD).read_text()
    assert "not for diagnostic use" in md.lower()
    assert card["weights_sha256"] in md


def test_tiny_artifact_is_deterministic(tiny_artifact: Path, tmp_path: Path) -> None:
    again = make_tiny_artifact(tmp_path / "again", image_size=TINY_SIZE, seed=0)
    other = make_tiny_artifact(tmp_path / "other", image_size=TINY_SIZE, seed=1)
    sha = load_card(tiny_artifact)["weights_sha256"]
    assert load_card(again)["weights_sha256"] == sha
    assert load_card(other)["weights_sha256"] != sha


def test_mismatched_weights_are_refused(tiny_artifact: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_artifact, bad)
    w = bad / "model.weights.h5"
    data = bytearray(w.read_bytes())
    data[-100] ^= 0xFF
    w.write_bytes(bytes(data))
    assert not verify_sha(bad)
    with pytest.raises(ArtifactError, match="sha256"):
        Classifier.load(bad, engine="keras")
    (bad / CARD_JSON).unlink()
    with pytest.raises(ArtifactError, match="not a model artifact"):
        Classifier.load(bad)


def test_onnx_and_keras_give_the_same_probabilities(tiny_artifact: Path, onnx_cache: Path) -> None:
    onnx = Classifier.load(tiny_artifact, engine="onnx", cache_dir=onnx_cache)
    keras_ = Classifier.load(tiny_artifact, engine="keras", cache_dir=onnx_cache)
    assert (onnx.engine, keras_.engine) == ("onnx", "keras")
    model_file, head_file = onnx_cache_paths(onnx_cache, onnx.sha256)
    assert model_file.is_file() and head_file.is_file()  # cached, keyed by sha256
    displays = _displays(6)
    po, pk = onnx.predict_displays(displays), keras_.predict_displays(displays)
    for a, b in zip(po, pk, strict=True):
        assert a.label == b.label
        for c in CLASSES:
            assert a.probabilities[c] == pytest.approx(b.probabilities[c], abs=1e-4)
        np.testing.assert_allclose(a.cam, b.cam, atol=1e-3)
        np.testing.assert_array_equal(a.model_grey, b.model_grey)
    # the cached export is reused: a second load finds it and agrees
    again = Classifier.load(tiny_artifact, engine="onnx", cache_dir=onnx_cache)
    assert again.predict_display(displays[0]).probabilities == po[0].probabilities


def test_prediction_contract(tiny_artifact: Path, onnx_cache: Path) -> None:
    clf = Classifier.load(tiny_artifact, engine="auto", cache_dir=onnx_cache)
    assert clf.engine == "onnx"  # default engine (chosen by benchmarks/inference.py)
    assert clf.classes == CLASSES and clf.image_size == TINY_SIZE
    assert clf.sha256 == load_card(tiny_artifact)["weights_sha256"]
    p = clf.predict_display(_displays(1)[0])
    assert isinstance(p, Prediction)
    assert p.label in CLASSES
    assert set(p.probabilities) == set(CLASSES)
    assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert p.label == max(p.probabilities, key=p.probabilities.__getitem__)
    assert p.cam.shape == (TINY_SIZE, TINY_SIZE) and p.cam.dtype == np.float32
    assert 0.0 <= p.cam.min() and p.cam.max() <= 1.0
    assert p.model_grey.shape == (TINY_SIZE, TINY_SIZE) and p.model_grey.dtype == np.uint8
    assert set(p.timings_ms) == {"preprocess", "forward", "ood", "cam"}
    assert p.ood_score is None and p.ood is None  # the tiny artifact has no OOD detector
    assert p.frame_box is not None
    # batched == one at a time
    ds = _displays(4)
    batch = clf.predict_displays(ds, batch_size=3)
    for d, b in zip(ds, batch, strict=True):
        one = clf.predict_display(d)
        assert one.label == b.label
        assert one.probabilities == pytest.approx(b.probabilities, abs=1e-5)


def test_temperature_is_applied(tmp_path: Path, onnx_cache: Path) -> None:
    d = make_tiny_artifact(tmp_path / "t2", image_size=TINY_SIZE, seed=0, temperature=2.5)
    clf = Classifier.load(d, engine="keras")
    assert clf.temperature == 2.5
    disp = _displays(1)[0]
    x = np.repeat(clf.preprocess(disp)[None, ..., None], 3, axis=-1).astype(np.float32)
    logits = clf.logits(x)
    p = clf.predict_display(disp)
    expected = softmax(logits, 2.5)[0]
    assert [p.probabilities[c] for c in CLASSES] == pytest.approx(list(expected), abs=1e-6)
    assert not np.allclose(expected, softmax(logits, 1.0)[0], atol=1e-3)


def test_predict_file_formats(tiny_artifact: Path, onnx_cache: Path, tmp_path: Path) -> None:
    from tests.conftest import make_chest_dataset

    clf = Classifier.load(tiny_artifact, engine="onnx", cache_dir=onnx_cache)
    img = _displays(1)[0]
    cv2.imwrite(str(tmp_path / "a.png"), img)
    cv2.imwrite(str(tmp_path / "a.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 100])
    ds = make_chest_dataset(pixels=img.astype(np.uint16), bits=8)
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    del ds.file_meta  # no Part 10 header: bare implicit VR little endian data set
    ds.save_as(
        tmp_path / "raw.dcm", enforce_file_format=False, implicit_vr=True, little_endian=True
    )
    raw = (tmp_path / "raw.dcm").read_bytes()
    assert raw[128:132] != b"DICM" and raw[:2] == b"\x08\x00"  # starts with group 0008
    preds = {n: clf.predict_file(tmp_path / n) for n in ("a.png", "a.jpg", "a.dcm", "raw.dcm")}
    ref = preds["a.png"]
    for name, p in preds.items():
        tol = 0.05 if name.endswith(".jpg") else 1e-6
        assert p.probabilities == pytest.approx(ref.probabilities, abs=tol), name


def test_get_classifier_loads_once(tiny_artifact: Path, onnx_cache: Path) -> None:
    clear_classifier_cache()
    settings = SimpleNamespace(
        model_dir=tiny_artifact, inference_engine="keras", model_cache_dir=onnx_cache
    )
    a = get_classifier(settings)
    assert get_classifier(settings) is a
    assert a.engine == "keras"
    clear_classifier_cache()


def test_settings_object_works_with_get_classifier(
    tiny_artifact: Path, onnx_cache: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cxr.settings import load_settings

    monkeypatch.setenv("CXR_MODEL_DIR", str(tiny_artifact))
    monkeypatch.setenv("CXR_MODEL_CACHE_DIR", str(onnx_cache))
    clear_classifier_cache()
    clf = get_classifier(load_settings())
    assert clf.engine == "onnx" and clf.sha256 == load_card(tiny_artifact)["weights_sha256"]
    clear_classifier_cache()


def test_shipped_model_loads_and_matches_its_card(onnx_cache: Path) -> None:
    if not (SHIPPED / CARD_JSON).is_file():
        pytest.skip(f"no shipped model at {SHIPPED} yet (the lead trains and commits it)")
    card = load_card(SHIPPED)
    assert verify_sha(SHIPPED), "shipped weights do not match the sha256 in model_card.json"
    assert card["architecture"]["backbone"] == "densenet169"
    assert card["image_size"] >= 224
    assert card["disclaimer"] == DISCLAIMER
    assert (SHIPPED / "model.weights.h5").stat().st_size <= 60 * 1024 * 1024
    for key in ("val", "test"):
        assert "accuracy" in card["metrics"][key]
    assert any("source" in item.lower() for item in card["limitations"])
    clf = Classifier.load(SHIPPED, engine="keras")
    p = clf.predict_display(_displays(1)[0])
    assert p.label in CLASSES
    json.dumps(clf.info())


def test_study_head_uses_the_gradient_gradcam(tmp_path: Path, onnx_cache: Path) -> None:
    """The study's Flatten/Dense head is not linear in the pooled features: the runtime
    must fall back to the real gradient Grad-CAM, with either engine."""
    import keras

    from ml.artifact import save_artifact
    from ml.gradcam import gradcam_gradient
    from ml.model import build_model

    keras.utils.set_random_seed(0)
    model = build_model(image_size=TINY_SIZE, backbone="tiny", head="study")
    d = save_artifact(
        model,
        tmp_path / "study",
        {"image_size": TINY_SIZE, "architecture": {"backbone": "tiny", "head": "study"}},
    )
    disp = _displays(1)[0]
    po = Classifier.load(d, engine="onnx", cache_dir=onnx_cache).predict_display(disp)
    pk = Classifier.load(d, engine="keras").predict_display(disp)
    assert po.probabilities == pytest.approx(pk.probabilities, abs=1e-4)
    x = np.repeat(pk.model_grey[..., None], 3, axis=-1).astype(np.float32)
    idx = CLASSES.index(pk.label)
    expected = cv2.resize(gradcam_gradient(model, x, idx), (TINY_SIZE, TINY_SIZE))
    np.testing.assert_allclose(pk.cam, np.clip(expected, 0, 1), atol=1e-4)
    np.testing.assert_allclose(po.cam, pk.cam, atol=1e-3)


def test_auto_falls_back_to_keras_when_onnx_fails(
    tiny_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ml.runtime

    def broken_export(model, path):  # e.g. tf2onnx missing or failing on a new layer
        raise RuntimeError("export failed")

    monkeypatch.setattr(ml.runtime, "export_onnx", broken_export)
    clf = Classifier.load(tiny_artifact, engine="auto", cache_dir=tmp_path / "c")
    assert clf.engine == "keras"
    assert clf.predict_display(_displays(1)[0]).label in CLASSES
    with pytest.raises(RuntimeError, match="export failed"):
        Classifier.load(tiny_artifact, engine="onnx", cache_dir=tmp_path / "c")
