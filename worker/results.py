"""The result objects sent back to the PACS, built with highdicom: a Secondary Capture for
the radiologist, a Structured Report for machines and the heat map as a Segmentation.

* **Secondary Capture** (:func:`build_secondary_capture`): same patient and study as the
  source, a new series (deterministic UID, :mod:`worker.uids`), an RGB image = a banner
  with the burned-in text (verdict, the three calibrated probabilities, model name and
  version, "NOT FOR DIAGNOSTIC USE") above the radiograph with the Grad-CAM overlay
  (:func:`ml.gradcam.overlay`: opacity following the map, transparent where it is low),
  and a legend strip with the colour bar below it: no text over anatomy
  (:func:`compose_result_image`). ``BurnedInAnnotation`` is ``YES``.
* **Heat map** (:func:`build_heatmap`): the Grad-CAM map on the source's own pixel grid
  as a Segmentation with SegmentationType FRACTIONAL (why not a Parametric Map:
  docs/conformance.md 8.1). Sources without patient geometry get none invented.
* **Structured Report** (:func:`build_structured_report`): a Comprehensive SR with the TID
  1500 "Imaging Measurement Report" content: one TID 1501 measurement group per class with
  the calibrated probability as a coded numeric finding (DCM 122157 "Probability", UCUM
  ``1``), one group with the verdict as a qualitative evaluation (DCM 121071 "Finding";
  a TID 1410 planar ROI group whose region is the heat map when there is one), the
  algorithm (TID 4019, with parameters), the AI as observer device (TID 1004), the source
  image, the SC and the heat map in the image library and the evidence, and the
  research-use disclaimer as a text item.

All carry the algorithm's provenance as in IHE AI Results: Manufacturer ``cxr-triage``,
ManufacturerModelName = model name, SoftwareVersions = model version and package version,
and a Contributing Equipment Sequence item (purpose DCM 109102 "Processing Equipment")
with a Device UID stable per model version, the contribution date/time and a description.

Series descriptions start with ``AI TRIAGE`` (:data:`cxr.contracts.OWN_SERIES_PREFIX`),
then the verdict: the node ignores such instances, so results that a PACS routes back to
us never loop.
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

import cv2
import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import (
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from cxr import DISCLAIMER, __version__
from cxr.contracts import OWN_MANUFACTURER, OWN_SERIES_PREFIX
from cxr.logconfig import register_dataset_phi
from ml import gradcam
from ml.labels import CLASSES, VERDICT_TEXT
from ml.ood import OOD_MESSAGE
from worker.uids import uid_from

if TYPE_CHECKING:  # pragma: no cover
    from cxr.settings import Settings
    from worker.uids import OutputUIDs

log = logging.getLogger(__name__)

# one source of truth with the node's loop prevention (it ignores what carries these marks)
SERIES_DESCRIPTION_PREFIX = OWN_SERIES_PREFIX
NOT_FOR_DIAGNOSTIC_USE = "(NOT FOR DIAGNOSTIC USE)"
SC_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902
HM_SERIES_NUMBER = 9903
HM_SERIES_DESCRIPTION = f"{OWN_SERIES_PREFIX}: AI HEAT MAP {NOT_FOR_DIAGNOSTIC_USE}"
MANUFACTURER = OWN_MANUFACTURER
SC_SOP_CLASS_UID = str(SecondaryCaptureImageStorage)
SR_SOP_CLASS_UID = str(ComprehensiveSRStorage)
HM_SOP_CLASS_UID = str(SegmentationStorage)
MAX_SIDE = 1024  # long side of the SC image (the radiograph part) at most
MIN_SIDE = 512  # small sources are enlarged so that the burned-in text stays legible

# Codes of the three classes (SNOMED CT where one exists).
CLASS_CODES: dict[str, hd.sr.CodedConcept] = {
    "COVID": hd.sr.CodedConcept("840539006", "SCT", "COVID-19"),
    "Normal": hd.sr.CodedConcept("17621005", "SCT", "Normal"),
    "Other": hd.sr.CodedConcept("19829001", "SCT", "Disorder of lung"),
}
#: the coded verdict of an image outside the model's training distribution: its top class
#: is not asserted as the finding (the three probabilities stay in the report)
INDETERMINATE_CODE = hd.sr.CodedConcept("82334004", "SCT", "Indeterminate")
PROCEDURE_CODE = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
UNIT_ONE = hd.sr.CodedConcept("1", "UCUM", "no units")
_CHEST_TERMS = frozenset({"", "CHEST", "THORAX", "LUNG"})
VERDICT_TRACKING_ID = "AI triage verdict"  # the measurement group holding the verdict
# IHE AIR / PS3.16 CID 7005 "Contributing Equipment Purpose of Reference": the equipment
# that processed the source into this object (109103 is "Modifying Equipment", 109104
# "De-identifying Equipment": neither fits). See docs/conformance.md.
AIR_PURPOSE_OF_REFERENCE = codes.DCM.ProcessingEquipment  # (109102, DCM, "Processing Equipment")
HEATMAP_PROPERTY_CATEGORY = codes.SCT.Finding  # (404684003, SCT, "Finding"), CID 7150


#: the headline of a flagged image (series description): its top class is not shown there
OOD_HEADLINE = "OUT OF DISTRIBUTION"


def series_description(kind: str, label: str, ood: bool = False) -> str:
    """SeriesDescription of the SC (``kind`` "SC") or the SR ("SR"): it begins with the
    verdict, e.g. ``AI TRIAGE: COVID-19 SUSPECTED (NOT FOR DIAGNOSTIC USE)``; the SR adds
    ``REPORT``. For an image outside the model's training distribution (``ood``) the
    verdict is replaced by :data:`OOD_HEADLINE`: a PACS series list shows only this line,
    and it must not read as a confident result. Always within the 64 characters of LO,
    always starting with :data:`cxr.contracts.OWN_SERIES_PREFIX` (the node's loop
    prevention)."""
    verdict = OOD_HEADLINE if ood else VERDICT_TEXT[label].upper()
    middle = verdict if kind == "SC" else f"{verdict} REPORT"
    text = f"{OWN_SERIES_PREFIX}: {middle} {NOT_FOR_DIAGNOSTIC_USE}"
    if len(text) > 64:  # pragma: no cover - the texts above are fixed and short
        raise ValueError(f"series description too long: {text!r}")
    return text


class PredictionLike(Protocol):
    """What the builders need of :class:`ml.runtime.Prediction`."""

    label: str
    probabilities: dict[str, float]
    cam: np.ndarray | None
    # optional (ml.runtime.Prediction has them; read with getattr):
    # frame_box: display region of the model frame; ood: out-of-distribution flag


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the algorithm that produced a result (provenance on every output)."""

    name: str
    version: str
    sha256: str
    manufacturer: str = MANUFACTURER
    software_version: str = __version__

    @classmethod
    def from_classifier(cls, classifier: object) -> ModelInfo:
        """From an :class:`ml.runtime.Classifier` (its ``name``, ``version``, ``sha256``)."""
        return cls(
            name=str(getattr(classifier, "name", "") or "cxr-model"),
            version=str(getattr(classifier, "version", "") or "0"),
            sha256=str(getattr(classifier, "sha256", "") or ""),
        )

    @property
    def software_versions(self) -> list[str]:
        """SoftwareVersions (LO, multi-valued): model version, then package version."""
        return [_lo(self.version), _lo(f"cxr-triage {self.software_version}")]


# ----------------------------------------------------------------------------- helpers


def _lo(text: str, n: int = 64) -> str:
    """Clamp to a VR length (LO/SH...) and drop backslashes (value delimiter)."""
    return str(text).replace("\\", "/")[:n]


def _probabilities(prediction: PredictionLike) -> dict[str, float]:
    probs = {c: float(prediction.probabilities[c]) for c in CLASSES}
    for c, p in probs.items():
        if not np.isfinite(p) or p < 0.0 or p > 1.0:
            raise ValueError(f"probability of {c} is {p}, not in [0, 1]")
    if prediction.label not in CLASSES:
        raise ValueError(f"unknown verdict {prediction.label!r}")
    return probs


def _fit_display(display: np.ndarray) -> np.ndarray:
    """Scale so that MIN_SIDE <= long side <= MAX_SIDE (aspect kept). Large images are
    halved with a Gaussian pyramid first (anti-aliased, ~6x faster than INTER_AREA alone
    on a 2,000 px radiograph), then INTER_AREA does the rest."""
    h, w = display.shape[:2]
    while max(h, w) >= 2 * MAX_SIDE:
        display = cv2.pyrDown(display)
        h, w = display.shape[:2]
    long_side = max(h, w)
    if long_side > MAX_SIDE:
        scale = MAX_SIDE / long_side
    elif long_side < MIN_SIDE:
        scale = MIN_SIDE / long_side
    else:
        return display
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(display, size, interpolation=interp)


def annotation_lines(prediction: PredictionLike, model: ModelInfo) -> list[str]:
    """The burned-in text (ASCII only: cv2's Hershey fonts). Line 1 is the headline: the
    verdict, or for an image outside the training distribution the warning, with the top
    class only on line 3 and marked unreliable."""
    probs = _probabilities(prediction)
    verdict = VERDICT_TEXT[prediction.label].upper()
    scores = "  ".join(f"{c} {100 * probs[c]:.1f}%" for c in CLASSES)
    if getattr(prediction, "ood", None):
        head = [
            f"{OWN_SERIES_PREFIX}: {OOD_MESSAGE.upper()}",
            scores,
            f"TOP CLASS (UNRELIABLE): {verdict}",
        ]
    else:
        head = [f"{OWN_SERIES_PREFIX}: {verdict}", scores]
    return head + [
        f"Model {model.name} v{model.version}",
        "NOT FOR DIAGNOSTIC USE - RESEARCH USE ONLY",
    ]


Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), end exclusive


@dataclass(frozen=True)
class ResultImage:
    """The Secondary Capture's pixels and where things are on them: the radiograph (with
    the overlay) in ``image_box``; every burned-in character in ``text_boxes``, all in the
    banner above or the legend strip below the radiograph, never over it; the colour bar
    in ``legend_box``."""

    pixels: np.ndarray
    image_box: Box
    text_boxes: tuple[Box, ...]
    legend_box: Box | None


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def cam_on_grid(
    cam: np.ndarray,
    shape: tuple[int, int],
    box: Sequence[int] | None,
    source_shape: tuple[int, int],
) -> np.ndarray:
    """The model-frame CAM on a (h, w) grid of the source image (the source's own grid or a
    scaled copy): ``box`` is :attr:`ml.runtime.Prediction.frame_box`, in source pixels."""
    h, w = shape
    h0, w0 = source_shape
    scaled: Box | None = None
    if box is not None:
        sx, sy = w / w0, h / h0
        scaled = (
            round(box[0] * sx),
            round(box[1] * sy),
            round(box[2] * sx),
            round(box[3] * sy),
        )
    return gradcam.cam_to_display(np.asarray(cam), (h, w), scaled)


def compose_result_image(
    display: np.ndarray, prediction: PredictionLike, model: ModelInfo
) -> ResultImage:
    """RGB uint8: a banner with the burned-in text above the radiograph + Grad-CAM overlay
    (opacity following the map, :func:`ml.gradcam.overlay`), and a legend strip below it
    with the colour bar. No text lies on the radiograph."""
    if display.ndim != 2 or display.size == 0:
        raise ValueError(f"expected a non-empty (H, W) display image, got {display.shape}")
    if display.dtype != np.uint8:
        from ml.preprocess import to_uint8

        display = to_uint8(display)
    # downsize first (cheap overlay), then map the model-frame CAM onto that image: the
    # mapping only depends on the aspect ratio
    h0, w0 = display.shape[:2]
    display = _fit_display(display)
    h, w = display.shape[:2]
    cam = getattr(prediction, "cam", None)
    if cam is not None:
        on_grid = cam_on_grid(cam, (h, w), getattr(prediction, "frame_box", None), (h0, w0))
        image = gradcam.overlay(display, on_grid)
    else:
        image = cv2.cvtColor(display, cv2.COLOR_GRAY2RGB)

    lines = annotation_lines(prediction, model)
    font = cv2.FONT_HERSHEY_SIMPLEX
    # the font scale that makes the longest line fit the width (with margins)
    widest = max(cv2.getTextSize(t, font, 1.0, 2)[0][0] for t in lines)
    scale = min(1.2, max(0.3, (w - 16) / widest))
    thick = max(1, round(scale * 2))
    # glyph widths do not scale linearly (thickness is rounded, and OpenCV versions
    # differ): shrink until the longest line really fits between the margins
    while scale > 0.3 and (
        max(cv2.getTextSize(t, font, scale, thick)[0][0] for t in lines) + 2 * thick > w - 16
    ):
        scale = max(0.3, scale * 0.96)
        thick = max(1, round(scale * 2))
    line_h = cv2.getTextSize("Ag", font, scale, thick)[0][1]
    gap = max(4, line_h // 2)
    banner_h = len(lines) * (line_h + gap) + gap + 4
    # legend strip: "Grad-CAM  low [colour bar] high", one text line high plus margins
    small = max(0.3, scale * 0.8)
    small_thick = max(1, round(small * 2))
    small_h = cv2.getTextSize("Ag", font, small, small_thick)[0][1]
    legend_h = (small_h + 2 * gap + 4) if cam is not None else 0
    # a narrow radiograph (a long strip) whose text does not fit even at the smallest
    # scale: the canvas is widened and the radiograph centred on it, never text cut off
    text_w = max(cv2.getTextSize(t, font, scale, thick)[0][0] for t in lines) + 2 * thick + 16
    cw = max(w, text_w)
    x_off = (cw - w) // 2
    canvas = np.zeros((banner_h + h + legend_h, cw, 3), np.uint8)
    canvas[banner_h : banner_h + h, x_off : x_off + w] = image
    image_box: Box = (x_off, banner_h, x_off + w, banner_h + h)
    text_boxes: list[Box] = []

    def put(text: str, x: int, y: int, sc: float, th: int, colour: tuple[int, int, int]) -> None:
        (tw, tht), base = cv2.getTextSize(text, font, sc, th)
        cv2.putText(canvas, text, (x, y), font, sc, colour, th, cv2.LINE_AA)
        # the glyphs' extent (anti-aliasing and thickness included)
        text_boxes.append((max(0, x - th), max(0, y - tht - th), x + tw + th, y + base + th))

    y = gap + line_h
    if getattr(prediction, "ood", None):  # the warning is the headline, in orange
        colours = [(255, 160, 0), (255, 255, 255), (200, 200, 200)]
    else:
        colours = [(255, 255, 0), (255, 255, 255)]
    colours += [(200, 200, 200), (255, 80, 80)]
    for text, colour in zip(lines, colours, strict=True):
        put(text, 8, y, scale, thick, colour)
        y += line_h + gap
    legend_box: Box | None = None
    if cam is not None:
        y_text = banner_h + h + gap + 2 + small_h
        x = 8
        for label in ("Grad-CAM", "low"):
            put(label, x, y_text, small, small_thick, (200, 200, 200))
            x = text_boxes[-1][2] + gap
        high_w = cv2.getTextSize("high", font, small, small_thick)[0][0]
        bar_x1 = max(x + 8, cw - high_w - 8 - gap)
        bar_y0, bar_y1 = banner_h + h + gap + 2, banner_h + h + gap + 2 + small_h
        if bar_x1 > x:
            canvas[bar_y0:bar_y1, x:bar_x1] = gradcam.colour_bar(bar_y1 - bar_y0, bar_x1 - x)
            legend_box = (x, bar_y0, bar_x1, bar_y1)
        put("high", bar_x1 + gap, y_text, small, small_thick, (200, 200, 200))
    assert not any(_overlaps(b, image_box) for b in text_boxes), "text over the radiograph"
    return ResultImage(canvas, image_box, tuple(text_boxes), legend_box)


def render_result_image(
    display: np.ndarray, prediction: PredictionLike, model: ModelInfo
) -> np.ndarray:
    """The pixels of :func:`compose_result_image`."""
    return compose_result_image(display, prediction, model).pixels


def contributing_equipment(model: ModelInfo, description: str) -> hd.ContributingEquipment:
    """The algorithm as Contributing Equipment (IHE AI Results provenance): purpose
    :data:`AIR_PURPOSE_OF_REFERENCE`, Manufacturer, ManufacturerModelName, SoftwareVersions
    and DeviceUID, a UID stable per model version (:func:`device_uid`)."""
    item = hd.ContributingEquipment(
        manufacturer=_lo(model.manufacturer),
        purpose_of_reference=AIR_PURPOSE_OF_REFERENCE,
        manufacturer_model_name=_lo(model.name),
        software_versions=model.software_versions,
        contribution_datetime=datetime.now().astimezone(),
        contribution_description=_lo(description),
    )
    item.DeviceUID = device_uid(model)
    return item


def _source_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def _set_provenance(ds: Dataset, model: ModelInfo, settings: Settings | None) -> None:
    ds.Manufacturer = _lo(model.manufacturer)
    ds.ManufacturerModelName = _lo(model.name)
    ds.SoftwareVersions = model.software_versions
    if settings is not None and settings.institution_name:
        ds.InstitutionName = _lo(settings.institution_name)


_ORIENTATION_RE = re.compile(r"^[APRLHF]{1,3}$")


def _patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's PatientOrientation when it holds two valid values, else None."""
    elem = source.get("PatientOrientation")
    if elem is None:
        return None
    values = [str(elem)] if isinstance(elem, str) else [str(v).strip() for v in elem]
    if len(values) == 2 and all(_ORIENTATION_RE.match(v) for v in values):
        return values[0], values[1]
    return None


def _check_source(source: Dataset) -> None:
    for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"):
        if not source.get(kw):
            raise ValueError(f"source dataset lacks {kw}")


@contextmanager
def _no_phi_warnings(source: Dataset) -> Iterator[None]:
    """highdicom warns (and may log) about odd person names *quoting the name*: register
    the patient's name/ID with the log scrubber and silence those warnings."""
    register_dataset_phi(source)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
        warnings.filterwarnings("ignore", message="Invalid value for VR", category=UserWarning)
        yield


# ----------------------------------------------------------------------- Secondary Capture


#: transfer syntaxes that are lossy whatever the data set says (PS3.5 section 8.2): JPEG
#: Baseline/Extended and the MPEG/video syntaxes
_ALWAYS_LOSSY = frozenset(
    {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        *(f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)),
    }
)
#: syntaxes that may be lossy or lossless (JPEG-LS near-lossless with NEAR 0, JPEG 2000,
#: HTJ2K): an explicit Lossy Image Compression 00 is trusted there
_MAYBE_LOSSY = frozenset(
    {"1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.203"}
)
_LOSSY_SYNTAXES = _ALWAYS_LOSSY | _MAYBE_LOSSY


def _transfer_syntax(source: Dataset) -> str:
    meta = getattr(source, "file_meta", None)
    return str(meta.get("TransferSyntaxUID") or "") if meta is not None else ""


def _raw_text(source: Dataset, keyword: str) -> list[str]:
    """An element's values as strings, without pydicom's conversion (a malformed DS must
    not raise here); [] when absent or unreadable."""
    try:
        elem = source.get(keyword)
        if elem is None:
            return []
        values = list(elem) if isinstance(elem, MultiValue | list | tuple) else [elem]
        return [str(v).strip() for v in values if str(v).strip()]
    except Exception:
        return []


def source_was_lossy(source: Dataset) -> bool:
    """Whether the source's pixels went through lossy compression: its Lossy Image
    Compression is 01, or its transfer syntax is one that is always lossy (JPEG Baseline,
    say) whatever the attribute says; for a syntax that may be lossless (JPEG 2000) an
    explicit 00 is trusted, and without the attribute it counts as lossy."""
    flag = _raw_text(source, "LossyImageCompression")
    ts = _transfer_syntax(source)
    if flag == ["01"] or ts in _ALWAYS_LOSSY:
        return True
    if flag == ["00"]:
        return False
    return ts in _LOSSY_SYNTAXES


def _valid_ds(values: list[str]) -> bool:
    try:
        return bool(values) and all(len(v) <= 16 and float(v) > 0 for v in values)
    except ValueError:
        return False


_LOSSY_METHOD = {  # PS3.3 C.7.6.1.1.5.1, Defined Terms of Lossy Image Compression Method
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",
    "1.2.840.10008.1.2.4.100": "ISO_13818_2",
    "1.2.840.10008.1.2.4.101": "ISO_13818_2",
}


def _carry_lossy_compression(source: Dataset, derived: Dataset) -> None:
    """PS3.3 C.7.6.1.1.5: an image derived from a lossy-compressed one keeps Lossy Image
    Compression 01 ("once set to 01, it shall not be reset"), with the source's ratio and
    method when they are well-formed and pair up (one ratio per method); where the source
    lacks them (a JPEG Baseline file without the attribute) the method is the transfer
    syntax's and the ratio that of its encoded pixel data. A lossless source leaves the
    derived object as built (00 or absent)."""
    if not source_was_lossy(source):
        return
    derived.LossyImageCompression = "01"
    ts = _transfer_syntax(source)
    ratio = _raw_text(source, "LossyImageCompressionRatio")
    method = [m for m in _raw_text(source, "LossyImageCompressionMethod") if len(m) <= 16]
    if ratio and not _valid_ds(ratio):
        ratio = []
    if not method and ts in _LOSSY_METHOD:
        method = [_LOSSY_METHOD[ts]]
    if not ratio and len(method) <= 1 and ts in _LOSSY_SYNTAXES:
        try:
            encoded = len(source.PixelData or b"") if "PixelData" in source else 0
            raw = (
                int(source.get("Rows", 0) or 0)
                * int(source.get("Columns", 0) or 0)
                * int(source.get("SamplesPerPixel", 1) or 1)
                * int(source.get("NumberOfFrames", 1) or 1)
                * ((int(source.get("BitsAllocated", 8) or 8) + 7) // 8)
            )
        except Exception:
            encoded = raw = 0
        if encoded and raw:
            ratio = [f"{raw / encoded:.4g}"]
    if ratio and method and len(ratio) != len(method):
        ratio, method = [], []  # they would not pair up: 01 alone is still true
    for kw, value in (
        ("LossyImageCompressionRatio", ratio),
        ("LossyImageCompressionMethod", method),
    ):
        if kw in derived:
            del derived[kw]
        if value:
            setattr(derived, kw, value if len(value) > 1 else value[0])


def build_secondary_capture(
    source: Dataset,
    display: np.ndarray,
    prediction: PredictionLike,
    model: ModelInfo,
    uids: OutputUIDs,
    settings: Settings | None = None,
) -> Dataset:
    """The Secondary Capture (RGB, burned-in annotation) for one source image."""
    _check_source(source)
    pixels = render_result_image(display, prediction, model)
    orientation = _patient_orientation(source)
    ref = _reference_copy(source)
    with _no_phi_warnings(source):
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=uids.sc_series,
            series_number=SC_SERIES_NUMBER,
            sop_instance_uid=uids.sc_sop,
            instance_number=1,
            manufacturer=_lo(model.manufacturer),
            # highdicom only takes single-letter orientations; the source's own values (or an
            # empty Type 2C value) are set below
            patient_orientation=("L", "F"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[
                contributing_equipment(model, "AI triage: Grad-CAM overlay and burned-in result")
            ],
        )
    sc.PatientOrientation = list(orientation) if orientation else ""  # type: ignore[assignment]
    _set_provenance(sc, model, settings)
    sc.SeriesDescription = series_description(
        "SC", prediction.label, bool(getattr(prediction, "ood", None))
    )
    _carry_lossy_compression(source, sc)
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = _lo(
        f"{DISCLAIMER}. AI triage result of {model.name} {model.version}", 1024
    )
    # Only chest radiographs are classified: a chest synonym (or no body part at all) is
    # written as the PS3.16 term CHEST, an unpaired part, so Laterality (General Series,
    # Type 2C) is absent. Any other body part is not copied and Laterality is present
    # and empty (unknown).
    body_part = str(source.get("BodyPartExamined") or "").strip().upper()
    if body_part in _CHEST_TERMS:
        sc.BodyPartExamined = "CHEST"
    else:
        sc.Laterality = None  # type: ignore[assignment]
    src_item = _source_reference(source)
    src_item.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    sc.SourceImageSequence = [src_item]
    sc.ReferencedImageSequence = [_source_reference(source)]
    return sc


_TYPE2_PATIENT_STUDY = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def _reference_copy(source: Dataset, image: bool = False) -> Dataset:
    """The source's patient/study attributes only (no pixel data), with empty/invalid
    optional values removed so that highdicom copies nothing it would reject."""
    keep: tuple[str, ...] = (
        "SpecificCharacterSet",
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "Manufacturer",
        "ManufacturerModelName",
        "SoftwareVersions",
        "DeviceSerialNumber",
        "InstitutionName",
        "StationName",
        "SOPClassUID",
        "SOPInstanceUID",
    )
    if image:  # series/image attributes for SR evidence and image library entries
        keep += ("SeriesInstanceUID", "Modality", "Rows", "Columns", "ImageType")
    ref = Dataset()
    for kw in keep:
        if kw in source:  # a copy: the caller may change it (never the source's element)
            ref.add(copy.deepcopy(source[kw]))
    if str(ref.get("PatientSex") or "") not in ("M", "F", "O"):
        ref.PatientSex = None
    for kw in _TYPE2_PATIENT_STUDY:  # absent Type 2 attributes: present and empty
        if kw not in ref or ref[kw].value in ("", b""):
            setattr(ref, kw, None)
    return ref


# ----------------------------------------------------------------------------- heat map

# what highdicom needs to place the segment frame in the source's patient frame of reference
_GEOMETRY = (
    "FrameOfReferenceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
)


def heatmap_array(source: Dataset, prediction: PredictionLike) -> np.ndarray:
    """The CAM on the source image's own pixel grid: float32 (Rows, Columns) in [0, 1].
    The model frame's CAM is mapped back with ``prediction.frame_box`` (the region of the
    source/display image the model frame covers); outside it the map is 0."""
    cam = getattr(prediction, "cam", None)
    if cam is None:
        raise ValueError("the prediction has no CAM")
    rows, cols = int(source.Rows), int(source.Columns)
    box = getattr(prediction, "frame_box", None)
    return cam_on_grid(cam, (rows, cols), box, (rows, cols)).astype(np.float32)


def build_heatmap(
    source: Dataset,
    prediction: PredictionLike,
    model: ModelInfo,
    uids: OutputUIDs,
    settings: Settings | None = None,
) -> Dataset:
    """The Grad-CAM heat map as a DICOM Segmentation, SegmentationType FRACTIONAL
    (FractionalType PROBABILITY, 8 bits, 255 = map value 1), one segment whose property
    type is the verdict's finding; same study, series :data:`HM_SERIES_NUMBER`, same
    Rows/Columns as the source, referencing it (Derivation Image / Source Image Sequence,
    spatial locations preserved).

    A source without patient geometry (a CR/DX without Frame of Reference, the usual
    radiograph) gives a Segmentation without Frame of Reference (highdicom's "no FoR"
    mode: the segment frame is aligned pixel by pixel with the source image). A source with
    a full geometry (Frame of Reference, Image Position/Orientation (Patient), Pixel
    Spacing) gives one in the source's frame, with the source's pixel spacing."""
    _check_source(source)
    if int(source.get("NumberOfFrames", 1) or 1) != 1:
        raise ValueError("the heat map is built for single-frame sources only")
    if int(source.get("SamplesPerPixel", 1) or 1) != 1:
        raise ValueError("the heat map is built for greyscale sources only")
    values = heatmap_array(source, prediction)
    ref = _reference_copy(source, image=True)
    for kw in ("SeriesNumber", "InstanceNumber"):
        if kw in source:
            ref.add(source[kw])
    # full geometry: the segmentation is in the source's frame of reference (highdicom
    # copies plane position/orientation and pixel measures); otherwise (the usual CR/DX)
    # none is invented and the segment frame is aligned pixel by pixel with the source
    if all(source.get(k) for k in _GEOMETRY):
        for kw in _GEOMETRY:
            ref.add(source[kw])
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_lo(model.name),
        family=codes.DCM.ArtificialIntelligence,
        version=_lo(model.version),
        source=_lo(model.manufacturer),
        parameters={"map": "Grad-CAM", "class": prediction.label},
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=_lo(f"Grad-CAM {VERDICT_TEXT[prediction.label]}"),
        segmented_property_category=HEATMAP_PROPERTY_CATEGORY,
        segmented_property_type=CLASS_CODES[prediction.label],
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    with _no_phi_warnings(source):
        seg = hd.seg.Segmentation(
            source_images=[ref],
            pixel_array=values,
            segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
            segment_descriptions=[segment],
            series_instance_uid=uids.hm_series,
            series_number=HM_SERIES_NUMBER,
            sop_instance_uid=uids.hm_sop,
            instance_number=1,
            manufacturer=_lo(model.manufacturer),
            manufacturer_model_name=_lo(model.name),
            software_versions=model.software_versions[0],  # all of them: _set_provenance
            device_serial_number=_lo(model.sha256[:16] or "0"),
            fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
            max_fractional_value=255,
            content_label="GRADCAM",
            content_description=_lo(f"Grad-CAM heat map. {DISCLAIMER}", 64),
            omit_empty_frames=False,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[contributing_equipment(model, "AI triage: Grad-CAM heat map")],
        )
    doc = Dataset(seg)
    doc.file_meta = seg.file_meta
    doc.preamble = seg.preamble
    orientation = _patient_orientation(source)
    doc.PatientOrientation = list(orientation) if orientation else ""
    _set_provenance(doc, model, settings)
    doc.SeriesDescription = HM_SERIES_DESCRIPTION
    _carry_lossy_compression(source, doc)
    body_part = str(source.get("BodyPartExamined") or "").strip().upper()
    if body_part in _CHEST_TERMS:
        doc.BodyPartExamined = "CHEST"
    return doc


# ----------------------------------------------------------------------- Structured Report


def algorithm_parameters(model: ModelInfo) -> list[str]:
    """TID 4019 Algorithm Parameters: what identifies the model beyond name and version."""
    params = ["output: calibrated softmax over COVID/Normal/Other", "saliency: Grad-CAM"]
    if model.sha256:
        params.insert(0, f"weights sha256: {model.sha256}")
    return params


def device_uid(model: ModelInfo) -> str:
    """The algorithm's Device UID: the same for every output of one model version (name,
    version, weights digest), another for another version (deterministic, ``2.25.``)."""
    return uid_from("device", model.name, model.version, model.sha256)


def build_structured_report(
    source: Dataset,
    prediction: PredictionLike,
    model: ModelInfo,
    uids: OutputUIDs,
    sc: Dataset | None = None,
    settings: Settings | None = None,
    heatmap: Dataset | None = None,
) -> Dataset:
    """A Comprehensive SR (TID 1500) with the probabilities, the verdict and references.

    With ``heatmap`` (the :func:`build_heatmap` Segmentation) the verdict group is a TID
    1410 planar ROI group whose region is the heat map's segment (so the SR references the
    heat map, and through it the source image); without, a TID 1501 group."""
    _check_source(source)
    probs = _probabilities(prediction)
    algorithm = hd.sr.AlgorithmIdentification(
        name=_lo(model.name),
        version=_lo(model.version),
        parameters=algorithm_parameters(model),
        family=codes.DCM.ArtificialIntelligence,
        manufacturer=_lo(model.manufacturer),
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(model),
            name=_lo(model.name),
            manufacturer_name=_lo(model.manufacturer),
            model_name=_lo(model.name),
        ),
    )
    src_ref = hd.sr.SourceImageForMeasurement(
        referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID,
    )
    verdict_tracking = hd.sr.TrackingIdentifier(
        uid=uid_from(uids.sr_sop, "verdict"), identifier=VERDICT_TRACKING_ID
    )
    flagged = bool(getattr(prediction, "ood", None))
    verdict_evaluation = [
        hd.sr.QualitativeEvaluation(
            name=codes.DCM.Finding,
            value=INDETERMINATE_CODE if flagged else CLASS_CODES[prediction.label],
        )
    ]
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ] = []
    if heatmap is not None:
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=verdict_tracking,
                referenced_segment=hd.sr.ReferencedSegmentationFrame(
                    sop_class_uid=heatmap.SOPClassUID,
                    sop_instance_uid=heatmap.SOPInstanceUID,
                    frame_number=1,
                    segment_number=1,
                    source_image=hd.sr.SourceImageForSegmentation(
                        referenced_sop_class_uid=source.SOPClassUID,
                        referenced_sop_instance_uid=source.SOPInstanceUID,
                    ),
                ),
                algorithm_id=algorithm,
                qualitative_evaluations=verdict_evaluation,
            )
        )
    else:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=verdict_tracking,
                algorithm_id=algorithm,
                qualitative_evaluations=verdict_evaluation,
            )
        )
    for cls in CLASSES:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=uid_from(uids.sr_sop, cls),
                    identifier=f"Probability {cls}",
                ),
                finding_type=CLASS_CODES[cls],
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(
                        name=codes.DCM.Probability,
                        value=round(probs[cls], 6),
                        unit=UNIT_ONE,
                        referenced_images=[src_ref],
                    )
                ],
            )
        )
    library = [source] + [ds for ds in (sc, heatmap) if ds is not None]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_CODE,
        imaging_measurements=groups,
        referenced_images=[_library_entry(ds) for ds in library],
    )
    root = report[0]
    _drop_segment_number_beside_frame(root)
    disclaimer = hd.sr.TextContentItem(
        name=codes.DCM.Comment,
        value=f"{DISCLAIMER}. Automated triage by {_lo(model.name)} {_lo(model.version)}.",
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    root.ContentSequence.append(disclaimer)
    if getattr(prediction, "ood", None):
        root.ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=(
                    f"{OOD_MESSAGE[0].upper()}{OOD_MESSAGE[1:]}: out-of-distribution score "
                    f"{float(getattr(prediction, 'ood_score', 0.0) or 0.0):.1f} is above the "
                    "model's threshold; the probabilities above are not reliable."
                ),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    evidence = [_reference_copy(source, image=True)]
    evidence += [_reference_copy(ds, image=True) for ds in (sc, heatmap) if ds is not None]
    _check_references(root, evidence)
    # Performance: highdicom's SR constructor deep-copies and re-parses the whole content
    # tree (~65 ms of pure Python for this small report on the 2-core reference machine).
    # The tree was just built and checked by highdicom's templates, so the document is
    # constructed around the root container with only the disclaimer item, and the full
    # content is put in afterwards. Evidence does not depend on the content (highdicom
    # lists every evidence dataset); _check_references did highdicom's reference check.
    shell = Dataset()
    for elem in root:
        if elem.keyword != "ContentSequence":
            shell.add(elem)
    shell.ContentSequence = [disclaimer]
    with _no_phi_warnings(source):
        sr = hd.sr.ComprehensiveSR(
            evidence=evidence,
            content=shell,
            series_instance_uid=uids.sr_series,
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=uids.sr_sop,
            instance_number=1,
            manufacturer=_lo(model.manufacturer),
            is_complete=True,
            is_final=False,
            is_verified=False,
            institution_name=_lo(settings.institution_name)
            if settings and settings.institution_name
            else None,
            contributing_equipment=[contributing_equipment(model, "AI triage: classification")],
        )
    # a plain pydicom Dataset (highdicom's parsed view of the content would be the shell's)
    doc = Dataset(sr)
    doc.file_meta = sr.file_meta
    doc.preamble = sr.preamble
    doc.ContentSequence = root.ContentSequence
    _set_provenance(doc, model, settings)
    doc.SeriesDescription = series_description(
        "SR", prediction.label, bool(getattr(prediction, "ood", None))
    )
    return doc


def _drop_segment_number_beside_frame(root: Dataset) -> None:
    """highdicom's TID 1410 "Referenced Segmentation Frame" item carries both the frame and
    the segment number; PS3.3 (Image SOP Instance Reference Macro) forbids Referenced
    Segment Number beside Referenced Frame Number (dciodvfy: error). The heat map has one
    frame holding its one segment, so the frame number alone identifies it."""
    stack = list(root.ContentSequence)
    while stack:
        item = stack.pop()
        if item.get("ValueType") == "IMAGE":
            for ref in item.ReferencedSOPSequence:
                if "ReferencedFrameNumber" in ref and "ReferencedSegmentNumber" in ref:
                    del ref.ReferencedSegmentNumber
        stack.extend(item.get("ContentSequence", []))


def _check_references(root: Dataset, evidence: Sequence[Dataset]) -> None:
    """Every IMAGE/COMPOSITE item must reference one of the evidence instances."""
    known = {str(e.SOPInstanceUID) for e in evidence}
    stack = list(root.ContentSequence)
    while stack:
        item = stack.pop()
        if item.get("ValueType") in ("IMAGE", "COMPOSITE"):
            uid = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            if uid not in known:
                raise ValueError(f"SR content references {uid}, which is not in the evidence")
        stack.extend(item.get("ContentSequence", []))


def _library_entry(ds: Dataset) -> Dataset:
    """An image library (TID 1601) entry. highdicom adds the projection radiography
    descriptors (TID 1603) for CR/DX only when the image has what they need: two
    PatientOrientation values and ImagerPixelSpacing; otherwise the entry is generic."""
    entry = _reference_copy(ds, image=True)
    has_geometry = _patient_orientation(ds) is not None and "ImagerPixelSpacing" in ds
    if has_geometry:
        entry.PatientOrientation = list(_patient_orientation(ds) or ())
        entry.ImagerPixelSpacing = ds.ImagerPixelSpacing
    else:
        entry.Modality = "OT"  # selects no modality-specific descriptors (coded modality
        # itself comes from the SOP class)
    return entry
