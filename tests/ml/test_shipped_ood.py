"""The shipped model's out-of-distribution flag (issue 8, point 4) and its card (point 7).

Flagged: the ``cxr demo`` phantoms, the non-chest samples of ``../shared/dicom-samples``
(CT, MR, a dental panoramic, decoded), a lateral thorax radiograph (the veterinary DX
sample), and a natural photograph (scikit-learn's bundled sample image). Not flagged: at
least 90% of the test-split radiographs.
"""

from __future__ import annotations

import numpy as np
import pytest

from ml.artifact import CARD_JSON, load_card, verify_sha
from ml.data import load_samples, split_samples
from ml.evaluate import predict_samples_pooled
from ml.ood import OOD_MESSAGE
from ml.preprocess import load_display
from ml.runtime import Classifier

from .conftest import SHIPPED

pytestmark = pytest.mark.slow

OUT_OF_SCOPE_SAMPLES = [
    "not-chest/ct.dcm",
    "not-chest/mr.dcm",
    "not-chest/ct_rle_fragments.dcm",
    "not-chest/deflated.dcm",
    "chest/cr_jpeg_lossless_modality_lut_sequence.dcm",  # a dental panoramic, not a chest
    "chest/dx_thorax_monochrome1.dcm",  # a lateral thorax (veterinary)
]


@pytest.fixture(scope="module")
def clf() -> Classifier:
    if not (SHIPPED / CARD_JSON).is_file():
        pytest.fail(f"no shipped model at {SHIPPED}")
    return Classifier.load(SHIPPED, engine="keras")


def test_card_of_the_shipped_model(clf: Classifier) -> None:
    card = load_card(SHIPPED)
    assert verify_sha(SHIPPED)
    assert card["name"] == "cxr-densenet169" and card["version"] == "2.0.0"
    assert card["preprocessing"]["square_policy"] == "trim-uniform-borders-centre-square"
    total = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert total <= 60 * 1024 * 1024
    cells = {c["left_out"]: c for c in card["cross_source"]}
    assert set(cells) == {"jsrt", "hannover", "cohen-Other"}
    assert cells["jsrt"]["metric"] == "Normal recall"
    assert cells["hannover"]["metric"] == "COVID recall"
    assert cells["cohen-Other"]["metric"] == "Other recall"
    test = card["metrics"]["test"]
    assert {"jsrt", "darkcovidnet-nih", "hannover", "cohen", "covid-cxnet"} <= set(
        test["per_source"]
    )
    assert card["ood"]["threshold"] > 0 and card["ood"]["val_pass_rate"] >= 0.95
    assert clf.ood_detector is not None
    assert clf.ood_detector.threshold == pytest.approx(card["ood"]["threshold"])


def _flagged(clf: Classifier, displays: list[np.ndarray]) -> list[bool]:
    preds = clf.predict_displays(displays)
    for p in preds:
        assert p.ood_score is not None and p.ood_message in (None, OOD_MESSAGE)
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    return [bool(p.ood) for p in preds]


def test_out_of_scope_images_are_flagged(clf: Classifier, dicom_samples) -> None:  # type: ignore[no-untyped-def]
    from sklearn.datasets import load_sample_image

    from apps.demo import demo_dataset
    from ml.preprocess import dicom_to_display

    cases: dict[str, np.ndarray] = {}
    for i in range(3):
        cases[f"demo phantom {i}"] = dicom_to_display(demo_dataset(i))
    for name in OUT_OF_SCOPE_SAMPLES:
        cases[name] = load_display(dicom_samples / name)
    for photo in ("china.jpg", "flower.jpg"):
        rgb = load_sample_image(photo)
        cases[photo] = (rgb.astype(np.float32) @ [0.299, 0.587, 0.114]).astype(np.uint8)
    flags = dict(zip(cases, _flagged(clf, list(cases.values())), strict=True))
    assert all(flags.values()), {k: v for k, v in flags.items() if not v}


def test_test_split_radiographs_pass(clf: Classifier, cxr_data) -> None:  # type: ignore[no-untyped-def]
    test = split_samples(load_samples(cxr_data))["test"]
    assert clf.ood_detector is not None
    _, pooled = predict_samples_pooled(clf, test)
    passed = clf.ood_detector.score(pooled) <= clf.ood_detector.threshold
    assert passed.mean() >= 0.90, passed.mean()


def test_predict_json_carries_the_ood_flag(tmp_path, dicom_samples, capsys, workdir) -> None:  # type: ignore[no-untyped-def]
    import json

    from apps.cli import main
    from apps.demo import demo_dataset

    phantom = tmp_path / "phantom.dcm"
    demo_dataset(0).save_as(phantom, enforce_file_format=True)
    chest = dicom_samples / "chest" / "cr_chest_sc_jpeg_baseline.dcm"
    assert (
        main(
            [
                "predict",
                "--json",
                "--engine",
                "keras",
                "--model",
                str(SHIPPED),
                str(phantom),
                str(chest),
            ]
        )
        == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 2
    card = load_card(SHIPPED)
    for rec in lines:
        assert isinstance(rec["ood_score"], float) and isinstance(rec["ood"], bool)
        # every line stands alone: which model said it, and that it is not a diagnosis
        assert rec["model"] == card["name"] and rec["model_version"] == card["version"]
        assert rec["disclaimer"] == "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE"
        assert rec["ood"] == (rec["ood_score"] > rec["ood_threshold"])
    assert lines[0]["ood"] is True and lines[0]["warning"] == OOD_MESSAGE
