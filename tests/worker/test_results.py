"""Result objects: deterministic UIDs, the Secondary Capture and the Structured Report
(content, references, provenance), and their validity with dciodvfy + pydicom."""

from __future__ import annotations

import io
import re
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from ml.preprocess import dicom_to_display
from tests.conftest import DICOM_SAMPLES, make_chest_dataset
from tests.worker.conftest import FakePrediction, dciodvfy, read_sample
from worker.results import (
    MAX_SIDE,
    SERIES_DESCRIPTION_PREFIX,
    VERDICT_TRACKING_ID,
    build_heatmap,
    build_secondary_capture,
    build_structured_report,
    compose_result_image,
    render_result_image,
)
from worker.uids import is_valid_uid, output_uids

CHEST_SAMPLES = sorted((DICOM_SAMPLES / "chest").glob("*.dcm")) if DICOM_SAMPLES.exists() else []


# ------------------------------------------------------------------------------- UIDs
def test_output_uids_are_deterministic_and_distinct() -> None:
    a = output_uids("1.2.3.4.5", "1.0.0")
    b = output_uids("1.2.3.4.5", "1.0.0")
    assert a == b
    assert len(set(a.as_dict().values())) == 6
    assert output_uids("1.2.3.4.6", "1.0.0").sc_sop != a.sc_sop  # other source
    other_model = output_uids("1.2.3.4.5", "1.0.1")
    assert set(other_model.as_dict().values()).isdisjoint(a.as_dict().values())


@settings(max_examples=50, deadline=None)
@given(
    src=st.from_regex(r"[1-9][0-9]{0,5}(\.(0|[1-9][0-9]{0,8})){1,12}", fullmatch=True),
    version=st.text(min_size=0, max_size=20),
)
def test_output_uids_are_valid(src: str, version: str) -> None:
    for uid in output_uids(src, version).as_dict().values():
        assert is_valid_uid(uid), uid
        assert len(uid) <= 64 and uid.startswith("2.25.")


def test_output_uids_reject_empty_source() -> None:
    with pytest.raises(ValueError):
        output_uids("", "1")


def test_is_valid_uid() -> None:
    assert is_valid_uid("1.2.840.10008.1.2")
    for bad in ("", "1..2", "1.02", "999.999.01.23", "a.1", "1." * 40 + "1"):
        assert not is_valid_uid(bad), bad


# ------------------------------------------------------------------------- SC image
def test_render_places_cam_and_text(model_info) -> None:  # type: ignore[no-untyped-def]
    # 80 rows x 60 cols: padded left/right by 10 px to an 80 square for the model
    display = np.full((80, 60), 128, np.uint8)
    pred = FakePrediction(size=64, peak=(16, 40))  # peak at model-frame (row 16, col 40)
    result = compose_result_image(display, pred, model_info)
    img = result.pixels
    assert np.array_equal(img, render_result_image(display, pred, model_info))
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    scale = 512 / 80  # small images are enlarged to a 512 long side
    banner = result.image_box[1]
    assert result.image_box[3] - banner == round(80 * scale)
    assert img.shape[1] == round(60 * scale) and banner > 20
    # the banner holds text (bright pixels on black), the radiograph part starts below it
    assert (img[:banner] > 150).any()
    # model frame (16, 40) of 64 -> padded 80 square (20, 50) -> display (20, 40)
    hot = img[banner + round(20 * scale), round(40 * scale)].astype(int)
    cold = img[banner + round(75 * scale), round(5 * scale)].astype(int)
    assert hot.max() - hot.min() > 30, f"no heat colour at the CAM peak: {hot}"
    assert cold.max() - cold.min() <= 6, f"colour far from the CAM peak: {cold}"
    # mirror position: no heat (the mapping is not flipped)
    mirror = img[banner + round(20 * scale), round(20 * scale)].astype(int)
    assert mirror.max() - mirror.min() < hot.max() - hot.min()


def test_render_downsizes_large_images(model_info) -> None:  # type: ignore[no-untyped-def]
    display = np.zeros((3000, 2400), np.uint8)
    result = compose_result_image(display, FakePrediction(), model_info)
    img = result.pixels
    assert img.shape[1] == 2400 * MAX_SIDE // 3000
    x0, y0, x1, y1 = result.image_box
    assert (x0, x1, y1 - y0) == (0, img.shape[1], 1024)  # the image part is 1024 high
    margins = img.shape[0] - 1024  # plus the banner above and the legend strip below
    assert 0 < y0 and 0 < margins < 0.3 * 1024


def test_render_without_cam_is_grey(model_info) -> None:  # type: ignore[no-untyped-def]
    display = np.full((600, 600), 100, np.uint8)
    img = render_result_image(display, FakePrediction(peak=None), model_info)
    body = img[-500:]
    assert (body[..., 0] == body[..., 1]).all() and (body[..., 1] == body[..., 2]).all()


def test_render_rejects_bad_probabilities(model_info) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        render_result_image(
            np.zeros((10, 10), np.uint8), FakePrediction(probs=(1.5, 0, 0)), model_info
        )
    bad = FakePrediction()
    bad.label = "Flu"
    with pytest.raises(ValueError):
        render_result_image(np.zeros((10, 10), np.uint8), bad, model_info)


def _items(seq):  # type: ignore[no-untyped-def]
    """All SR content items, depth first."""
    for item in seq:
        yield item
        if "ContentSequence" in item:
            yield from _items(item.ContentSequence)


def _roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def _build(source: pydicom.Dataset, model_info, pred=None):  # type: ignore[no-untyped-def]
    pred = pred or FakePrediction()
    uids = output_uids(source.SOPInstanceUID, model_info.version)
    sc = build_secondary_capture(source, dicom_to_display(source), pred, model_info, uids)
    sr = build_structured_report(source, pred, model_info, uids, sc=sc)
    return uids, sc, sr


def _build_all(source: pydicom.Dataset, model_info, pred=None):  # type: ignore[no-untyped-def]
    """SC, heat map and the SR referencing both (what the pipeline builds)."""
    pred = pred or FakePrediction()
    uids = output_uids(source.SOPInstanceUID, model_info.version)
    sc = build_secondary_capture(source, dicom_to_display(source), pred, model_info, uids)
    hm = build_heatmap(source, pred, model_info, uids)
    sr = build_structured_report(source, pred, model_info, uids, sc=sc, heatmap=hm)
    return uids, sc, sr, hm


def test_secondary_capture_content(model_info) -> None:  # type: ignore[no-untyped-def]
    src = make_chest_dataset(rows=96, cols=80, modality="DX")
    uids, sc, _ = _build(src, model_info)
    sc = _roundtrip(sc)
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert (sc.SeriesInstanceUID, sc.SOPInstanceUID) == (uids.sc_series, uids.sc_sop)
    assert sc.StudyInstanceUID == src.StudyInstanceUID
    assert sc.SeriesInstanceUID != src.SeriesInstanceUID
    assert sc.PatientID == src.PatientID and str(sc.PatientName) == str(src.PatientName)
    assert sc.AccessionNumber == src.AccessionNumber
    assert sc.SeriesDescription == "AI TRIAGE: COVID-19 SUSPECTED (NOT FOR DIAGNOSTIC USE)"
    assert sc.SeriesDescription.startswith(SERIES_DESCRIPTION_PREFIX)
    assert "NOT FOR DIAGNOSTIC USE" in sc.SeriesDescription
    assert sc.BurnedInAnnotation == "YES"
    assert sc.Manufacturer == "cxr-triage"
    assert sc.ManufacturerModelName == model_info.name
    assert model_info.version in list(sc.SoftwareVersions)
    ours = [e for e in sc.ContributingEquipmentSequence if e.Manufacturer == "cxr-triage"]
    assert len(ours) == 1
    eq = ours[0]
    assert eq.ManufacturerModelName == model_info.name
    assert eq.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert is_valid_uid(eq.DeviceUID)
    assert eq.ContributionDateTime and eq.ContributionDescription
    ref = sc.SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == src.SOPClassUID
    assert sc.ReferencedImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    px = sc.pixel_array
    assert px.shape == (sc.Rows, sc.Columns, 3) and max(px.shape[:2]) <= MAX_SIDE + 200


def test_structured_report_content(model_info) -> None:  # type: ignore[no-untyped-def]
    src = make_chest_dataset()
    pred = FakePrediction(label="Other", probs=(0.15, 0.25, 0.6))
    uids, sc, sr = _build(src, model_info, pred)
    sr = _roundtrip(sr)
    assert sr.SOPClassUID == ComprehensiveSRStorage
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == (uids.sr_series, uids.sr_sop)
    assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.Modality == "SR"
    assert sr.SeriesDescription.startswith(SERIES_DESCRIPTION_PREFIX)
    assert sr.Manufacturer == "cxr-triage" and sr.ManufacturerModelName == model_info.name
    assert any(e.Manufacturer == "cxr-triage" for e in sr.ContributingEquipmentSequence)
    items = list(_items(sr.ContentSequence))
    # one measurement group per class: finding type = the class, NUM "Probability"
    # (DCM 122157) in UCUM "1", referencing the source image; one group with the verdict
    probs: dict[str, float] = {}
    verdicts: list[str] = []
    groups = [
        i
        for i in items
        if i.ValueType == "CONTAINER" and i.ConceptNameCodeSequence[0].CodeValue == "125007"
    ]
    assert len(groups) == 4
    for group in groups:
        children = list(group.ContentSequence)
        findings = [
            c.ConceptCodeSequence[0].CodeValue
            for c in children
            if c.ValueType == "CODE" and c.ConceptNameCodeSequence[0].CodeValue == "121071"
        ]
        tracking = [
            str(c.TextValue)
            for c in children
            if c.ValueType == "TEXT" and c.ConceptNameCodeSequence[0].CodeValue == "112039"
        ]
        nums = [c for c in children if c.ValueType == "NUM"]
        assert len(findings) == 1
        if tracking == [VERDICT_TRACKING_ID]:
            assert nums == []
            verdicts.append(findings[0])
            continue
        assert len(nums) == 1
        num = nums[0]
        assert num.ConceptNameCodeSequence[0].CodeValue == "122157"
        mv = num.MeasuredValueSequence[0]
        assert mv.MeasurementUnitsCodeSequence[0].CodeValue == "1"
        assert mv.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
        probs[findings[0]] = float(mv.NumericValue)
        refs = [c for c in _items(num.ContentSequence) if c.ValueType == "IMAGE"]
        assert refs[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert probs == pytest.approx({"840539006": 0.15, "17621005": 0.25, "19829001": 0.6})
    assert verdicts == ["19829001"]  # Other -> SCT "Disorder of lung"
    texts = [str(i.TextValue) for i in items if i.ValueType == "TEXT"]
    assert any("NOT FOR DIAGNOSTIC USE" in t for t in texts)
    # evidence: source and SC, both in this study
    evid = {
        r.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for se in s.ReferencedSeriesSequence
        for r in se.ReferencedSOPSequence
    }
    assert evid == {src.SOPInstanceUID, sc.SOPInstanceUID}
    # image library lists both
    lib = {
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items if i.ValueType == "IMAGE"
    }
    assert {src.SOPInstanceUID, sc.SOPInstanceUID} <= lib


def test_rebuild_gives_the_same_uids(model_info) -> None:  # type: ignore[no-untyped-def]
    src = make_chest_dataset(seed=3)
    _, sc1, sr1 = _build(src, model_info)
    _, sc2, sr2 = _build(src, model_info, FakePrediction(label="Normal", probs=(0.1, 0.8, 0.1)))
    assert (sc1.SOPInstanceUID, sc1.SeriesInstanceUID) == (
        sc2.SOPInstanceUID,
        sc2.SeriesInstanceUID,
    )
    assert (sr1.SOPInstanceUID, sr1.SeriesInstanceUID) == (
        sr2.SOPInstanceUID,
        sr2.SeriesInstanceUID,
    )


# ------------------------------------------------------------------------- validity
_UID_IN_LINE = re.compile(r"[0-9][0-9.]*\.[0-9.]*[0-9]")


def _invalid_source_uids(src: pydicom.Dataset) -> set[str]:
    uids = {str(src.get(k, "")) for k in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID")}
    return {u for u in uids if u and not is_valid_uid(u)}


def _our_errors(errors: list[str], src: pydicom.Dataset) -> list[str]:
    """dciodvfy errors not caused by an invalid UID *of the source* that we must reference
    verbatim (a reference has to match the PACS's instance)."""
    bad = _invalid_source_uids(src)
    left = [e for e in errors if not any(u in e for u in bad)]
    if bad and len(left) < len(errors):  # dciodvfy's summary line of those same errors
        left = [e for e in left if "contains invalid data values" not in e]
    return left


# dicom3tools' dciodvfy does not (yet) list Device UID (0018,1002) in the Contributing
# Equipment Sequence, where IHE AIR puts the algorithm's UID: the only warnings we accept
DEVICE_UID_WARNINGS = (
    "Warning - Attribute is not present in standard DICOM IOD - (0x0018,0x1002) UI Device UID",
    "Warning - Dicom dataset contains attributes not present in standard DICOM IOD - "
    "this is a Standard Extended SOP Class",
)


def _not_device_uid(warnings: list[str]) -> list[str]:
    return [w for w in warnings if w.strip() not in DEVICE_UID_WARNINGS]


def _check_valid(tmp_path: Path, name: str, src: pydicom.Dataset, model_info) -> list[str]:  # type: ignore[no-untyped-def]
    _, sc, sr, hm = _build_all(src, model_info)
    warnings: list[str] = []
    for kind, ds in (("sc", sc), ("sr", sr), ("hm", hm)):
        path = tmp_path / f"{name}_{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        errors, warns = dciodvfy(path)
        assert _our_errors(errors, src) == [], f"{kind} of {name}: {errors}"
        back = pydicom.dcmread(path)
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        if kind == "sc":
            assert back.pixel_array.shape == (back.Rows, back.Columns, 3)
        elif kind == "sr":  # highdicom reads it back as the TID 1500 document it wrote
            doc = hd.sr.srread(path)
            assert isinstance(doc, hd.sr.ComprehensiveSR)
            assert len(doc.content.get_planar_roi_measurement_groups()) == 1
        else:
            seg = hd.seg.segread(path)
            assert seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
            assert (seg.Rows, seg.Columns) == (src.Rows, src.Columns)
        warnings += _not_device_uid(warns)
    return warnings


@pytest.mark.dcmtk
@pytest.mark.parametrize("modality", ["CR", "DX", "DX-geometry"])
def test_dciodvfy_generated(tmp_path: Path, modality: str, model_info) -> None:  # type: ignore[no-untyped-def]
    src = make_chest_dataset(modality=modality[:2], rows=70, cols=90)
    if modality == "DX-geometry":  # orientation + spacing: TID 1603 library descriptors
        src.PatientOrientation = ["P", "FL"]
        src.ImagerPixelSpacing = [0.2, 0.2]
        src.BodyPartExamined = "THORAX"
    warnings = _check_valid(tmp_path, modality, src, model_info)
    assert warnings == []  # a complete source: no warning but the Device UID one
    if modality == "DX-geometry":
        _, sc, sr = _build(src, model_info)
        assert list(sc.PatientOrientation) == ["P", "FL"] and sc.BodyPartExamined == "CHEST"
        names = {i.ConceptNameCodeSequence[0].CodeMeaning for i in _items(sr.ContentSequence)}
        assert {"Patient Orientation Row", "Horizontal Pixel Spacing"} <= names


@pytest.mark.dcmtk
@pytest.mark.parametrize("path", CHEST_SAMPLES, ids=[p.name for p in CHEST_SAMPLES])
def test_dciodvfy_shared_samples(tmp_path: Path, path: Path, model_info) -> None:  # type: ignore[no-untyped-def]
    src = read_sample(path)
    warnings = _check_valid(tmp_path, path.stem, src, model_info)
    # what remains are the source's own gaps (e.g. no Study ID) copied into the same study
    for w in warnings:
        assert "DICOMDIR" in w or "Person Name" in w, w


def test_shared_samples_present_or_skip(dicom_samples: Path) -> None:
    """Makes the absence of ../shared visible as a skip rather than an empty parametrisation."""
    assert CHEST_SAMPLES, f"no chest samples under {dicom_samples}"
