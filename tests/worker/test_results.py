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


def test_output_uids_change_with_the_source_content_version() -> None:
    """Other pixels under a known SOP Instance UID (audit version 2) get results under new
    UIDs, so the PACS never holds two different objects under one UID; version 1 keys as
    before (results already in PACSs keep their UIDs)."""
    v1 = output_uids("1.2.3.4.5", "1.0.0")
    assert output_uids("1.2.3.4.5", "1.0.0", 1) == v1
    v2 = output_uids("1.2.3.4.5", "1.0.0", 2)
    v3 = output_uids("1.2.3.4.5", "1.0.0", 3)
    assert set(v2.as_dict().values()).isdisjoint(v1.as_dict().values())
    assert set(v3.as_dict().values()).isdisjoint(v2.as_dict().values())
    assert output_uids("1.2.3.4.5", "1.0.0", 2) == v2  # still deterministic
    assert all(is_valid_uid(u) for u in v2.as_dict().values())
    with pytest.raises(ValueError):
        output_uids("1.2.3.4.5", "1.0.0", 0)


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


# ------------------------------------------------------------- SC legibility (issue 11)
def _gradient(rows: int, cols: int) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:cols]
    return ((xx * 3 + yy * 2) % 200 + 30).astype(np.uint8)


def test_sc_overlay_is_transparent_where_the_cam_is_low(model_info) -> None:  # type: ignore[no-untyped-def]
    from ml.gradcam import ALPHA_FLOOR
    from worker.results import cam_on_grid

    display = _gradient(600, 520)  # within MIN_SIDE..MAX_SIDE: not rescaled
    pred = FakePrediction(size=64, peak=(20, 30))
    result = compose_result_image(display, pred, model_info)
    x0, y0, x1, y1 = result.image_box
    body = result.pixels[y0:y1, x0:x1].astype(int)
    cam = cam_on_grid(pred.cam, display.shape, None, display.shape)
    grey = np.repeat(display[..., None], 3, axis=-1).astype(int)
    cold = cam < ALPHA_FLOOR
    assert cold.mean() > 0.5 and (~cold).any()
    # where the map is below the floor: exactly the grey radiograph
    assert np.array_equal(body[cold], grey[cold])
    # where it is strong: coloured, the more so the stronger (opacity follows the map)
    strong, mid = cam > 0.9, (cam > 0.3) & (cam < 0.4)
    delta = np.abs(body - grey).sum(axis=-1)
    assert delta[strong].mean() > 60
    assert delta[strong].mean() > delta[mid].mean() > 0


def test_sc_has_a_colour_bar_below_the_radiograph(model_info) -> None:  # type: ignore[no-untyped-def]
    from ml.gradcam import colour_bar

    display = _gradient(600, 520)
    result = compose_result_image(display, FakePrediction(), model_info)
    assert result.legend_box is not None
    lx0, ly0, lx1, ly1 = result.legend_box
    assert ly0 >= result.image_box[3]  # below the radiograph, not on it
    assert lx1 - lx0 > 100 and ly1 - ly0 >= 5
    bar = result.pixels[ly0:ly1, lx0:lx1]
    assert np.array_equal(bar, colour_bar(ly1 - ly0, lx1 - lx0))
    # the JET ramp: blue-ish at the low end, red-ish at the high end
    lo, hi = bar[0, 0].astype(int), bar[0, -1].astype(int)
    assert lo[2] > lo[0] and hi[0] > hi[2]
    # no CAM, no legend
    assert compose_result_image(display, FakePrediction(peak=None), model_info).legend_box is None


@pytest.mark.parametrize("shape", [(600, 520), (80, 60), (3000, 2400), (400, 1000)])
def test_sc_text_is_off_the_radiograph(shape: tuple[int, int], model_info) -> None:  # type: ignore[no-untyped-def]
    from ml import gradcam
    from worker.results import _fit_display, cam_on_grid

    display = _gradient(*shape)
    pred = FakePrediction()
    pred.ood = True  # the longest text: five lines
    result = compose_result_image(display, pred, model_info)
    x0, y0, x1, y1 = result.image_box
    assert len(result.text_boxes) >= 5 + 3  # banner lines + "Grad-CAM", "low", "high"
    for bx0, by0, bx1, by1 in result.text_boxes:
        assert by1 <= y0 or by0 >= y1, f"text box {(bx0, by0, bx1, by1)} over the radiograph"
    # the radiograph part is exactly the overlay: nothing was drawn on it
    fitted = _fit_display(display)
    cam = cam_on_grid(pred.cam, fitted.shape, None, display.shape)
    assert np.array_equal(result.pixels[y0:y1, x0:x1], gradcam.overlay(fitted, cam))
    # and the text is there: bright pixels in the banner and in the legend strip
    assert (result.pixels[:y0] > 150).any() and (result.pixels[y1:] > 150).any()


# ------------------------------------------------------------ series descriptions
@pytest.mark.parametrize(
    ("label", "verdict"),
    [
        ("COVID", "AI TRIAGE: COVID-19 SUSPECTED"),
        ("Normal", "AI TRIAGE: NORMAL"),
        ("Other", "AI TRIAGE: OTHER LUNG DISEASE"),
    ],
)
def test_series_descriptions_begin_with_the_verdict(label: str, verdict: str, model_info) -> None:  # type: ignore[no-untyped-def]
    from cxr.contracts import OWN_SERIES_PREFIX
    from dicom_node.filters import Header, PixelInfo, is_own_output

    src = make_chest_dataset()
    probs = {"COVID": (0.7, 0.2, 0.1), "Normal": (0.1, 0.8, 0.1), "Other": (0.1, 0.2, 0.7)}
    _, sc, sr, hm = _build_all(src, model_info, FakePrediction(label=label, probs=probs[label]))
    for ds in (sc, sr, hm):
        desc = _roundtrip(ds).SeriesDescription
        assert len(desc) <= 64 and desc.startswith(OWN_SERIES_PREFIX)
        assert "NOT FOR DIAGNOSTIC USE" in desc
        # the node recognises each as its own output, by the description alone too
        assert is_own_output(Header(ds=ds, pixels=PixelInfo(present=True, length=1)))
        bare = pydicom.Dataset()
        bare.SeriesDescription = desc
        assert is_own_output(Header(ds=bare, pixels=PixelInfo(present=True, length=1)))
    assert sc.SeriesDescription == f"{verdict} (NOT FOR DIAGNOSTIC USE)"
    assert sr.SeriesDescription == f"{verdict} REPORT (NOT FOR DIAGNOSTIC USE)"
    assert "HEAT MAP" in hm.SeriesDescription
    assert len({sc.SeriesNumber, sr.SeriesNumber, hm.SeriesNumber}) == 3
    assert hm.SeriesNumber == 9903


# ------------------------------------------------------------------------ heat map
def _frames(seg: pydicom.Dataset) -> np.ndarray:
    px = seg.pixel_array
    return px if px.ndim == 2 else px[0]


def test_heatmap_of_a_cr_without_geometry(tmp_path: Path, model_info) -> None:  # type: ignore[no-untyped-def]
    from worker.results import heatmap_array

    src = make_chest_dataset(rows=80, cols=60, modality="CR")
    for kw in ("FrameOfReferenceUID", "PixelSpacing", "ImagePositionPatient"):
        assert kw not in src
    uids, _, _, hm = _build_all(src, model_info)
    path = tmp_path / "hm.dcm"
    hm.save_as(path, enforce_file_format=True)
    seg = hd.seg.segread(path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == (uids.hm_series, uids.hm_sop)
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.PatientID == src.PatientID and seg.Modality == "SEG"
    assert seg.SegmentationType == "FRACTIONAL" and seg.MaximumFractionalValue == 255
    assert (seg.Rows, seg.Columns) == (80, 60)
    assert "FrameOfReferenceUID" not in seg  # none invented
    # references the source image
    assert src.SOPInstanceUID in {
        r.ReferencedSOPInstanceUID for r in seg.get("SourceImageSequence", [])
    } | {
        i.ReferencedSOPInstanceUID
        for s in seg.ReferencedSeriesSequence
        for i in s.ReferencedInstanceSequence
    }
    desc = seg.SegmentSequence[0]
    assert desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == "840539006"
    assert desc.SegmentAlgorithmType == "AUTOMATIC"
    # the values are the CAM on the source grid (8-bit fractions)
    expected = heatmap_array(src, FakePrediction())
    got = _frames(seg).astype(np.float32) / 255.0
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1 / 255 + 1e-6
    # provenance
    ours = [e for e in seg.ContributingEquipmentSequence if e.Manufacturer == "cxr-triage"]
    assert len(ours) == 1 and ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert seg.Manufacturer == "cxr-triage" and model_info.version in seg.SoftwareVersions


def test_heatmap_maps_the_model_frame_back_to_the_source_grid(model_info) -> None:  # type: ignore[no-untyped-def]
    from worker.results import heatmap_array

    src = make_chest_dataset(rows=80, cols=60)
    pred = FakePrediction(size=64, peak=(16, 40))
    pred.frame_box = (5, 10, 55, 60)  # the model frame covers x 5..55, y 10..60
    values = heatmap_array(src, pred)
    assert values.shape == (80, 60)
    # model (16, 40) of 64 -> source (10 + 16 * 50 / 64, 5 + 40 * 50 / 64) = (22.5, 36.25)
    r, c = np.unravel_index(int(np.argmax(values)), values.shape)
    assert abs(r - 22.5) <= 1.5 and abs(c - 36.25) <= 1.5
    outside = np.ones_like(values, bool)
    outside[10:60, 5:55] = False
    assert (values[outside] == 0).all()
    hm = build_heatmap(src, pred, model_info, output_uids(src.SOPInstanceUID, "1"))
    assert np.abs(_frames(hm) / 255.0 - values).max() <= 1 / 255 + 1e-6


@pytest.mark.dcmtk
def test_heatmap_of_a_dx_with_geometry(tmp_path: Path, model_info) -> None:  # type: ignore[no-untyped-def]
    from pydicom.uid import generate_uid

    src = make_chest_dataset(rows=70, cols=90, modality="DX")
    src.FrameOfReferenceUID = generate_uid()
    src.PixelSpacing = [0.15, 0.2]
    src.ImagePositionPatient = [-10.0, -20.0, 5.0]
    src.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    src.SliceThickness = 1.0
    src.PatientOrientation = ["L", "F"]
    _, _, _, hm = _build_all(src, model_info)
    path = tmp_path / "hm_dx.dcm"
    hm.save_as(path, enforce_file_format=True)
    errors, warnings = dciodvfy(path)
    assert errors == [] and _not_device_uid(warnings) == []
    seg = hd.seg.segread(path)
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert (seg.Rows, seg.Columns) == (70, 90)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [0.15, 0.2]
    pos = seg.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    assert [float(v) for v in pos.ImagePositionPatient] == [-10.0, -20.0, 5.0]
    assert list(seg.PatientOrientation) == ["L", "F"]


def test_heatmap_refuses_what_it_cannot_map(model_info) -> None:  # type: ignore[no-untyped-def]
    src = make_chest_dataset()
    uids = output_uids(src.SOPInstanceUID, "1")
    with pytest.raises(ValueError, match="CAM"):
        build_heatmap(src, FakePrediction(peak=None), model_info, uids)
    src.NumberOfFrames = 2
    with pytest.raises(ValueError, match="single-frame"):
        build_heatmap(src, FakePrediction(), model_info, uids)


def test_send_heatmap_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr.settings import Settings

    monkeypatch.delenv("CXR_SEND_HEATMAP", raising=False)
    assert Settings().send_heatmap is True
    monkeypatch.setenv("CXR_SEND_HEATMAP", "false")
    assert Settings().send_heatmap is False


# ------------------------------------------------------------------- IHE AIR (SR)
def _code(item: pydicom.Dataset) -> tuple[str, str]:
    c = item.ConceptNameCodeSequence[0]
    return str(c.CodeValue), str(c.CodingSchemeDesignator)


def test_sr_air_content(tmp_path: Path, model_info) -> None:  # type: ignore[no-untyped-def]
    from worker.results import device_uid

    src = make_chest_dataset()
    pred = FakePrediction(label="COVID", probs=(0.7, 0.2, 0.1))
    _, sc, sr, hm = _build_all(src, model_info, pred)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    items = list(_items(back.ContentSequence))
    # TID 4019: algorithm name, version, parameters (DCM 111001, 111003, 111002) and family
    texts = {_code(i): str(i.TextValue) for i in items if i.ValueType == "TEXT"}
    assert texts[("111001", "DCM")] == model_info.name
    assert texts[("111003", "DCM")] == model_info.version
    params = [str(i.TextValue) for i in items if _code(i) == ("111002", "DCM")]
    assert any(model_info.sha256 in p for p in params) and any("Grad-CAM" in p for p in params)
    families = {i.ConceptCodeSequence[0].CodeValue for i in items if _code(i) == ("111000", "DCM")}
    assert families == {"123110"}  # DCM "Artificial Intelligence"
    # the device observer (TID 1004) and every output's Contributing Equipment: one UID
    uid = device_uid(model_info)
    observer = [str(i.UID) for i in items if _code(i) == ("121012", "DCM")]
    assert observer == [uid]
    for ds in (sc, sr, hm):
        eq = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == "cxr-triage"]
        assert len(eq) == 1 and eq[0].DeviceUID == uid
        assert eq[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        assert eq[0].ManufacturerModelName == model_info.name
        assert list(eq[0].SoftwareVersions)[0] == model_info.version
    # findings: SNOMED CT codes; three probabilities with UCUM unit "1"
    findings = {
        i.ConceptCodeSequence[0].CodeValue
        for i in items
        if i.ValueType == "CODE" and _code(i) == ("121071", "DCM")
    }
    assert findings == {"840539006", "17621005", "19829001"}
    nums = [i for i in items if i.ValueType == "NUM" and _code(i) == ("122157", "DCM")]
    assert len(nums) == 3  # DCM "Probability", one per class
    for n in nums:
        unit = n.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
        assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("1", "UCUM")
    # references: the verdict group's region is the heat map (segment frame), whose source
    # is the source image; the evidence lists source, SC and heat map
    seg_refs = [
        i
        for i in items
        if i.ValueType == "IMAGE"
        and i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == hm.SOPInstanceUID
        and "ReferencedFrameNumber" in i.ReferencedSOPSequence[0]
    ]
    assert len(seg_refs) == 1
    seg_sources = [  # DCM 121233 "Source Image for Segmentation"
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for i in items
        if i.ValueType == "IMAGE" and _code(i) == ("121233", "DCM")
    ]
    assert seg_sources == [src.SOPInstanceUID]
    evid = {
        r.ReferencedSOPInstanceUID
        for s in back.CurrentRequestedProcedureEvidenceSequence
        for se in s.ReferencedSeriesSequence
        for r in se.ReferencedSOPSequence
    }
    assert evid == {src.SOPInstanceUID, sc.SOPInstanceUID, hm.SOPInstanceUID}
    # highdicom reads the planar ROI group back, its region being the heat map's segment
    doc = hd.sr.srread(path)
    (group,) = doc.content.get_planar_roi_measurement_groups()
    frame = group.referenced_segmentation_frame
    assert frame is not None
    assert frame.referenced_sop_instance_uid == hm.SOPInstanceUID
    assert frame.source_image_for_segmentation.referenced_sop_instance_uid == src.SOPInstanceUID


def test_device_uid_is_stable_per_model_version(model_info) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from worker.results import device_uid

    assert device_uid(model_info) == device_uid(replace(model_info))
    assert is_valid_uid(device_uid(model_info))
    assert device_uid(replace(model_info, version="9.9.9")) != device_uid(model_info)


# ------------------------------------------------- out of distribution: the headline
def _ood_prediction() -> FakePrediction:
    pred = FakePrediction(label="Normal", probs=(0.001, 0.998, 0.001))
    pred.ood = True  # type: ignore[attr-defined]
    pred.ood_score = 40.2  # type: ignore[attr-defined]
    return pred


def test_out_of_distribution_is_the_headline_not_the_verdict(model_info) -> None:  # type: ignore[no-untyped-def]
    """A flagged image keeps its three probabilities, but what a PACS series list and the
    top of the SC show is the warning, never a confident "NORMAL" (a dental panoramic once
    read "AI TRIAGE: NORMAL" at 99.8%)."""
    from cxr.contracts import OWN_SERIES_PREFIX
    from dicom_node.filters import Header, PixelInfo, is_own_output
    from ml.ood import OOD_MESSAGE
    from worker.results import annotation_lines

    pred = _ood_prediction()
    lines = annotation_lines(pred, model_info)
    assert lines[0] == f"{OWN_SERIES_PREFIX}: {OOD_MESSAGE.upper()}"
    assert "TOP CLASS (UNRELIABLE): NORMAL" in lines
    assert "Normal 99.8%" in lines[1] and "COVID 0.1%" in lines[1]
    assert lines[-1] == "NOT FOR DIAGNOSTIC USE - RESEARCH USE ONLY"
    _, sc, sr, hm = _build_all(make_chest_dataset(), model_info, pred)
    sc, sr = _roundtrip(sc), _roundtrip(sr)
    assert sc.SeriesDescription == "AI TRIAGE: OUT OF DISTRIBUTION (NOT FOR DIAGNOSTIC USE)"
    assert sr.SeriesDescription == "AI TRIAGE: OUT OF DISTRIBUTION REPORT (NOT FOR DIAGNOSTIC USE)"
    for ds in (sc, sr):  # still recognised as our own output (loop prevention)
        assert is_own_output(Header(ds=ds, pixels=PixelInfo(present=True, length=1)))
    texts = [str(i.TextValue) for i in _items(sr.ContentSequence) if "TextValue" in i]
    assert any(OOD_MESSAGE[1:] in t and "40.2" in t for t in texts), texts
    # software reading the codes: the verdict group's finding is "Indeterminate", not the
    # top class (whose probability stays in its own group)
    assert _verdict_codes(sr) == ["82334004"]
    # in distribution: the verdict is the headline and no warning appears anywhere
    plain = FakePrediction(label="Normal", probs=(0.001, 0.998, 0.001))
    plain_lines = annotation_lines(plain, model_info)
    assert plain_lines[0] == f"{OWN_SERIES_PREFIX}: NORMAL"
    assert not any("DISTRIBUTION" in t or "UNRELIABLE" in t for t in plain_lines)
    _, sc2, sr2, _ = _build_all(make_chest_dataset(), model_info, plain)
    assert sc2.SeriesDescription == "AI TRIAGE: NORMAL (NOT FOR DIAGNOSTIC USE)"
    texts2 = [str(i.TextValue) for i in _items(sr2.ContentSequence) if "TextValue" in i]
    assert not any("distribution" in t for t in texts2)
    assert _verdict_codes(_roundtrip(sr2)) == ["17621005"]  # SCT "Normal"


def _verdict_codes(sr: pydicom.Dataset) -> list[str]:
    """The Finding code(s) of the measurement group tracked as the verdict."""
    out = []
    for group in _items(sr.ContentSequence):
        if group.ValueType != "CONTAINER" or "ContentSequence" not in group:
            continue
        children = list(group.ContentSequence)
        if not any(
            c.ValueType == "TEXT" and str(c.TextValue) == VERDICT_TRACKING_ID for c in children
        ):
            continue
        out += [
            c.ConceptCodeSequence[0].CodeValue
            for c in children
            if c.ValueType == "CODE" and c.ConceptNameCodeSequence[0].CodeValue == "121071"
        ]
    return out


@pytest.mark.parametrize("width", [512, 560, 640, 700, 768, 830, 900, 960, 1000, 1024])
def test_sc_banner_text_fits_the_width(width: int, model_info) -> None:  # type: ignore[no-untyped-def]
    """The longest banner line (the out-of-distribution headline) ends inside the image at
    every width (it once ran 8 px past the right edge of a 1,024 px SC)."""
    result = compose_result_image(_gradient(width, width), _ood_prediction(), model_info)
    w = result.pixels.shape[1]
    assert w == width
    for box in result.text_boxes:
        assert box[0] >= 0 and box[2] <= w, f"text box {box} outside 0..{w}"


# --------------------------------------------------------- lossy sources (PS3.3 C.7.6.1.1.5)
def test_results_of_a_lossy_source_say_lossy(model_info) -> None:  # type: ignore[no-untyped-def]
    """Lossy Image Compression 01 is never reset: the SC and the heat map of a JPEG Baseline
    source say 01 with the source's ratio and method; without those attributes the method
    comes from the transfer syntax and the ratio from the encoded size. A lossless source
    gives an SC without the attribute and a heat map with 00."""
    src = read_sample(DICOM_SAMPLES / "chest" / "cr_chest_sc_jpeg_baseline.dcm")
    assert str(src.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.50"
    src.LossyImageCompressionRatio = "12.5"  # the sample has a method only
    _, sc, _, hm = _build_all(src, model_info)
    for ds in (_roundtrip(sc), _roundtrip(hm)):
        assert ds.LossyImageCompression == "01"
        assert ds.LossyImageCompressionMethod == src.LossyImageCompressionMethod
        assert float(ds.LossyImageCompressionRatio) == 12.5
    bare = read_sample(DICOM_SAMPLES / "chest" / "cr_chest_sc_jpeg_baseline.dcm")
    for kw in (
        "LossyImageCompression",
        "LossyImageCompressionRatio",
        "LossyImageCompressionMethod",
    ):
        if kw in bare:
            del bare[kw]
    _, sc, _, hm = _build_all(bare, model_info)
    for ds in (_roundtrip(sc), _roundtrip(hm)):
        assert ds.LossyImageCompression == "01"
        assert ds.LossyImageCompressionMethod == "ISO_10918_1"
        assert float(ds.LossyImageCompressionRatio) > 1.5
    _, sc, _, hm = _build_all(make_chest_dataset(), model_info)
    assert "LossyImageCompression" not in sc and hm.LossyImageCompression == "00"


def test_heatmap_content_description_carries_the_whole_disclaimer(model_info) -> None:  # type: ignore[no-untyped-def]
    from cxr import DISCLAIMER

    _, _, _, hm = _build_all(make_chest_dataset(), model_info)
    desc = _roundtrip(hm).ContentDescription
    assert len(desc) <= 64 and desc.endswith(DISCLAIMER), desc


@pytest.mark.parametrize("shape", [(1000, 100), (1000, 200), (2000, 500), (1024, 300)])
def test_sc_of_a_narrow_strip_keeps_all_its_text(shape: tuple[int, int], model_info) -> None:  # type: ignore[no-untyped-def]
    """A long strip (a stitched spine, say) is narrower than the text even at the smallest
    font: the canvas is widened around the radiograph; nothing raises, nothing is cut."""
    from worker.results import _fit_display

    result = compose_result_image(_gradient(*shape), _ood_prediction(), model_info)
    w = result.pixels.shape[1]
    x0, y0, x1, y1 = result.image_box
    assert x1 - x0 == _fit_display(_gradient(*shape)).shape[1] and 0 <= x0 and x1 <= w
    for box in result.text_boxes:
        assert box[0] >= 0 and box[2] <= w, f"text box {box} outside 0..{w}"
        assert box[3] <= y0 or box[1] >= y1


def test_lossy_flag_from_damaged_or_ambiguous_attributes() -> None:
    """A malformed ratio is dropped (01 and the method stay; nothing raises); JPEG 2000 with
    an explicit 00 was coded reversibly and stays lossless; JPEG Baseline is lossy whatever
    the attribute says; ratios and methods that do not pair up are not copied."""
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import FileMetaDataset
    from pydicom.tag import Tag

    from worker.results import _carry_lossy_compression, source_was_lossy

    def src(ts: str, **kw: object) -> pydicom.Dataset:
        d = pydicom.Dataset()
        d.file_meta = FileMetaDataset()
        d.file_meta.TransferSyntaxUID = ts
        for k, v in kw.items():
            setattr(d, k, v)
        return d

    bad = src(
        "1.2.840.10008.1.2.1", LossyImageCompression="01", LossyImageCompressionMethod="ISO_10918_1"
    )
    tag = Tag(0x0028, 0x2112)
    bad[tag] = RawDataElement(tag, "DS", 4, b"abc ", 0, False, True)  # type: ignore[assignment]
    out = pydicom.Dataset()
    _carry_lossy_compression(bad, out)
    assert out.LossyImageCompression == "01" and out.LossyImageCompressionMethod == "ISO_10918_1"
    assert "LossyImageCompressionRatio" not in out
    assert not source_was_lossy(src("1.2.840.10008.1.2.4.91", LossyImageCompression="00"))
    assert source_was_lossy(src("1.2.840.10008.1.2.4.91"))  # unknown: may be lossy
    assert source_was_lossy(src("1.2.840.10008.1.2.4.50", LossyImageCompression="00"))
    assert not source_was_lossy(src("1.2.840.10008.1.2.1"))
    odd = src(
        "1.2.840.10008.1.2.1",
        LossyImageCompression="01",
        LossyImageCompressionRatio="10",
        LossyImageCompressionMethod=["ISO_10918_1", "ISO_14495_1"],
    )
    out = pydicom.Dataset()
    _carry_lossy_compression(odd, out)
    assert out.LossyImageCompression == "01"
    assert "LossyImageCompressionRatio" not in out and "LossyImageCompressionMethod" not in out
