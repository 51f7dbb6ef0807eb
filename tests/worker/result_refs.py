"""The results of one pushed image as a PACS holds them, read back over Orthanc's REST
API, and the references that tie them to the source image (issue 11: "Each test waits
until all results of a pushed image are in the source study and checks their
references"). Used by the STOW-RS tests (direct and end to end) and the C-STORE ones.

* SC: Source Image Sequence (purpose DCM 121322) and Referenced Image Sequence -> source;
* heat map (Segmentation): Referenced Series Sequence (Common Instance Reference: source
  series > source instance), Source Image Sequence, and the frame's Derivation Image >
  Source Image Sequence -> source;
* SR: the evidence (Current Requested Procedure Evidence) lists source, SC and heat map
  in their series; the verdict group's region is the heat map's frame (TID 1410
  Referenced Segmentation Frame) with the source as "Source image for segmentation";
  the probability measurements reference the source image.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pydicom
from pydicom import Dataset
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage, SegmentationStorage

from tests.worker.conftest import wait_for
from tests.worker.orthanc import Orthanc

#: SOP class of each result kind (the audit DB's delivery kinds)
RESULT_CLASSES = {
    "SC": str(SecondaryCaptureImageStorage),
    "SR": str(ComprehensiveSRStorage),
    "HM": str(SegmentationStorage),
}
SOURCE_FOR_PROCESSING = "121322"  # DCM "Source image for image processing operation"
# SR concept names (code values)
IMAGE_LIBRARY_ENTRY = "260753009"  # SCT "Source"
SEGMENTATION_FRAME = "121214"  # DCM "Referenced Segmentation Frame"
SOURCE_FOR_SEGMENTATION = "121233"  # DCM "Source Image for Segmentation"
PROBABILITY = "122157"  # DCM "Probability"
SOURCE_OF_MEASUREMENT = "121112"  # DCM "Source of Measurement"


def _in_study(orthanc: Orthanc, source: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Simplified tags of every instance of the source's study but the source itself,
    by SOP Instance UID."""
    return {
        t["SOPInstanceUID"]: t
        for t in orthanc.all_instance_tags()
        if t.get("StudyInstanceUID") == source["StudyInstanceUID"]
        and t.get("SOPInstanceUID") != source["SOPInstanceUID"]
    }


def wait_results(
    orthanc: Orthanc, source: dict[str, Any], timeout: float = 30
) -> dict[str, Dataset]:
    """Wait until the SC, the SR and the heat map of ``source`` (Orthanc simplified tags,
    or any mapping with its Study/SOP Instance UIDs) are all in its study, nothing else
    beside them; return them as read back from Orthanc, by kind."""

    def complete() -> dict[str, dict[str, Any]] | None:
        found = _in_study(orthanc, source)
        classes = sorted(t.get("SOPClassUID", "") for t in found.values())
        return found if classes == sorted(RESULT_CLASSES.values()) else None

    found = wait_for(complete, timeout, what="SC + SR + heat map in the source study")
    by_class = {t["SOPClassUID"]: t for t in found.values()}
    out: dict[str, Dataset] = {}
    for kind, cls in RESULT_CLASSES.items():
        raw = orthanc.file(by_class[cls]["_id"])
        out[kind] = pydicom.dcmread(io.BytesIO(raw))
    return out


def _content_items(items: Any) -> Iterator[Dataset]:
    for item in items or []:
        yield item
        yield from _content_items(item.get("ContentSequence"))


def _code(item: Dataset) -> str | None:
    names = item.get("ConceptNameCodeSequence")
    return str(names[0].CodeValue) if names else None


def _ref(item: Dataset) -> tuple[str, str]:
    return str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID)


def check_references(results: dict[str, Dataset], source: dict[str, Any]) -> None:
    """Assert the references of the results of one image (see the module docstring).
    ``source``: the source's SOPClassUID, SOPInstanceUID, SeriesInstanceUID and
    StudyInstanceUID."""
    src = (str(source["SOPClassUID"]), str(source["SOPInstanceUID"]))
    sc, sr, hm = results["SC"], results["SR"], results["HM"]
    for kind, ds in results.items():
        assert ds.SOPClassUID == RESULT_CLASSES[kind], kind
        assert ds.StudyInstanceUID == source["StudyInstanceUID"], kind
        assert ds.SeriesInstanceUID != source["SeriesInstanceUID"], kind
    assert len({ds.SeriesInstanceUID for ds in results.values()}) == 3

    # SC: derived from the source image
    assert [_ref(i) for i in sc.SourceImageSequence] == [src]
    purpose = sc.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodingSchemeDesignator, purpose.CodeValue) == ("DCM", SOURCE_FOR_PROCESSING)
    assert [_ref(i) for i in sc.ReferencedImageSequence] == [src]

    # heat map: the source's series and instance, and the source of its one frame
    assert len(hm.ReferencedSeriesSequence) == 1
    series = hm.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source["SeriesInstanceUID"]
    assert [_ref(i) for i in series.ReferencedInstanceSequence] == [src]
    assert [_ref(i) for i in hm.SourceImageSequence] == [src]
    assert int(hm.NumberOfFrames) == 1
    derivation = hm.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert [_ref(i) for i in derivation.SourceImageSequence] == [src]
    assert (hm.Rows, hm.Columns) == (int(source["Rows"]), int(source["Columns"]))

    # SR evidence: source, SC and heat map, each in its own series
    evidence = {
        (str(s.SeriesInstanceUID), _ref(i))
        for st in sr.CurrentRequestedProcedureEvidenceSequence
        for s in st.ReferencedSeriesSequence
        for i in s.ReferencedSOPSequence
    }
    assert all(
        st.StudyInstanceUID == source["StudyInstanceUID"]
        for st in sr.CurrentRequestedProcedureEvidenceSequence
    )
    assert evidence == {
        (str(source["SeriesInstanceUID"]), src),
        (str(sc.SeriesInstanceUID), (str(sc.SOPClassUID), str(sc.SOPInstanceUID))),
        (str(hm.SeriesInstanceUID), (str(hm.SOPClassUID), str(hm.SOPInstanceUID))),
    }
    # SR content: the image library holds the source, the SC and the heat map; the
    # verdict group's region is the heat map's frame, beside the source image as its
    # source for segmentation; each probability is measured on the source image
    sc_ref = (str(sc.SOPClassUID), str(sc.SOPInstanceUID))
    hm_ref = (str(hm.SOPClassUID), str(hm.SOPInstanceUID))
    items = list(_content_items(sr.ContentSequence))
    library = [i for i in items if _code(i) == IMAGE_LIBRARY_ENTRY]
    assert sorted(_ref(i.ReferencedSOPSequence[0]) for i in library) == sorted(
        [src, sc_ref, hm_ref]
    )
    groups = [
        g
        for g in items
        if g.get("ValueType") == "CONTAINER"
        and any(_code(i) == SEGMENTATION_FRAME for i in g.get("ContentSequence", []))
    ]
    assert len(groups) == 1
    children = list(groups[0].ContentSequence)
    frames = [i.ReferencedSOPSequence[0] for i in children if _code(i) == SEGMENTATION_FRAME]
    assert [_ref(f) for f in frames] == [hm_ref]
    assert [int(f.ReferencedFrameNumber) for f in frames] == [1]
    seg_sources = [i for i in children if _code(i) == SOURCE_FOR_SEGMENTATION]
    assert [_ref(i.ReferencedSOPSequence[0]) for i in seg_sources] == [src]
    measured_on = [
        _ref(i.ReferencedSOPSequence[0])
        for n in items
        if n.get("ValueType") == "NUM" and _code(n) == PROBABILITY
        for i in n.ContentSequence
        if _code(i) == SOURCE_OF_MEASUREMENT
    ]
    assert measured_on == [src] * 3
