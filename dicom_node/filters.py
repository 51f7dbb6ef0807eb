"""Header-only inspection of a received instance and the filtering rules.

Only the header is parsed (``stop_before_pixels``); the Pixel Data element header is read
directly from the byte stream to check it is present and not empty, so that a 20 MB image
costs no pixel copy and no decode in the C-STORE handler.

Rules (configurable through settings, see docs/conformance.md):

* our own outputs are ignored (loop prevention);
* objects without pixel data are ignored (non-image objects);
* SOP classes other than CR / DX (presentation, processing) / Secondary Capture are ignored;
* modality, body part and view position must be in the configured lists ('' = empty).

An object that would be classified must also pass the integrity checks: Rows x Columns x
Frames under ``CXR_MAX_PIXELS`` (decompression bomb guard) and non-empty pixel data of a
plausible length; otherwise it is refused.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pydicom
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)

from cxr.contracts import OWN_MANUFACTURER, OWN_SERIES_PREFIX  # how results are marked
from dicom_node.status import CannotUnderstand, DoesNotMatchSOPClass, OutOfResources

if TYPE_CHECKING:  # pragma: no cover
    from pydicom import Dataset

    from cxr.settings import Settings

log = logging.getLogger(__name__)

#: SOP classes that are classified (others are acknowledged and ignored)
CLASSIFIED_SOP_CLASSES: tuple[str, ...] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)

_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
_ITEM_TAG = 0xE000FFFE  # (FFFE,E000) read as little-endian uint32
_UNDEFINED = 0xFFFFFFFF


@dataclass(frozen=True)
class FilterRules:
    chest_body_parts: frozenset[str]
    frontal_views: frozenset[str]
    accepted_modalities: frozenset[str]
    classified_sop_classes: frozenset[str] = frozenset(CLASSIFIED_SOP_CLASSES)
    max_pixels: int = 100_000_000

    @classmethod
    def from_settings(cls, settings: Settings) -> FilterRules:
        return cls(
            chest_body_parts=frozenset(x.upper() for x in settings.chest_body_parts),
            frontal_views=frozenset(x.upper() for x in settings.frontal_views),
            accepted_modalities=frozenset(x.upper() for x in settings.accepted_modalities),
            max_pixels=settings.max_pixels,
        )


@dataclass
class PixelInfo:
    present: bool
    encapsulated: bool = False
    length: int = 0  # value length (native) or first fragment length (encapsulated)


@dataclass
class Header:
    ds: Dataset
    pixels: PixelInfo

    def text(self, keyword: str) -> str:
        v = self.ds.get(keyword)
        return "" if v is None else str(v).strip()

    def integer(self, keyword: str, default: int = 0) -> int:
        try:
            v = self.ds.get(keyword)
            return default if v in (None, "") else int(v)
        except (TypeError, ValueError):
            return default


def _read_pixel_header(buf: memoryview, pos: int, implicit: bool) -> PixelInfo:
    """Read the (7FE0,0010) element header at ``pos`` without copying its value."""
    if bytes(buf[pos : pos + 4]) != _PIXEL_DATA_TAG:
        return PixelInfo(present=False)
    if implicit:
        if len(buf) < pos + 8:
            return PixelInfo(present=True, length=0)
        (length,) = struct.unpack_from("<I", buf, pos + 4)
        value_at = pos + 8
    else:
        if len(buf) < pos + 12:
            return PixelInfo(present=True, length=0)
        (length,) = struct.unpack_from("<I", buf, pos + 8)
        value_at = pos + 12
    if length != _UNDEFINED:
        return PixelInfo(present=True, length=min(length, len(buf) - value_at))
    # encapsulated: Basic Offset Table item, then the first fragment item
    at = value_at
    first = 0
    for _ in range(2):
        if len(buf) < at + 8:
            break
        tag, item_len = struct.unpack_from("<II", buf, at)
        if tag != _ITEM_TAG or item_len == _UNDEFINED:
            break
        at += 8
        if _ == 1:
            first = min(item_len, len(buf) - at)
        at += item_len
    return PixelInfo(present=True, encapsulated=True, length=first)


HEADER_WINDOW = 256 * 1024  # bytes of the data set parsed first; the rest only if needed


def _parse(data: bytes) -> tuple[Dataset, int]:
    fp = io.BytesIO(data)
    ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
    for kw in ("SOPInstanceUID", "SOPClassUID", "Rows", "Columns", "Modality", "NumberOfFrames"):
        ds.get(kw)  # force conversion of the commonly needed elements now
    return ds, fp.tell()


def _is_deflated(head: bytes) -> bool:
    """The File Meta Information at the start of ``head`` names Deflated Explicit VR
    Little Endian (a stream without a readable file meta is not)."""
    # (0002,0010) Transfer Syntax UID, UI: the file meta is always Explicit VR Little Endian
    at = head.find(b"\x02\x00\x10\x00UI", 0, 8192)
    if at < 0 or len(head) < at + 8:
        return False
    (length,) = struct.unpack_from("<H", head, at + 6)
    value = head[at + 8 : at + 8 + length].rstrip(b"\x00 ").decode("ascii", "replace")
    return value == DeflatedExplicitVRLittleEndian


def _parse_deflated(data: bytes) -> Header:
    """A deflated data set is inflated and read once, pixel data included (its pixel
    element cannot be located in the compressed stream; such objects are small)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        for kw in ("SOPInstanceUID", "SOPClassUID", "Rows", "Columns", "Modality"):
            ds.get(kw)
        pd = ds.get("PixelData")
    except Exception as exc:
        raise CannotUnderstand(f"unparseable data set ({type(exc).__name__})") from None
    pixels = PixelInfo(present=pd is not None, length=len(pd) if pd is not None else 0)
    return Header(ds=ds, pixels=pixels)


def parse_header(head: bytes, body: bytes | memoryview | None = None) -> Header:
    """Parse the header of a received instance without copying its pixel data.

    ``head`` is the Part 10 preamble + file meta and ``body`` the data set as received (or
    ``head`` alone holds the whole Part 10 stream). Only the first :data:`HEADER_WINDOW`
    bytes of the data set are parsed unless the header is longer. Raises
    :class:`CannotUnderstand` when it is not a parseable DICOM data set."""
    probe = head[:8192] if head or body is None else bytes(memoryview(body)[:8192])
    if _is_deflated(probe):
        return _parse_deflated(head if body is None else head + bytes(body))
    if body is None:
        head, body = b"", head
    body = memoryview(body)
    full: bytes | None = None
    try:
        truncated = len(body) > HEADER_WINDOW
        window = head + bytes(body[:HEADER_WINDOW])
        try:
            ds, pos = _parse(window)
        except Exception:
            if not truncated:
                raise
            ds, pos = None, -1
        if ds is not None and truncated and window[pos : pos + 4] != _PIXEL_DATA_TAG:
            ds = None  # the header is longer than the window: parse it all
        if ds is None:
            full = head + bytes(body)
            ds, pos = _parse(full)
    except Exception as exc:
        raise CannotUnderstand(f"unparseable data set ({type(exc).__name__})") from None
    implicit = bool(ds.original_encoding[0]) if ds.original_encoding else False
    pixels = _read_pixel_header(body, pos - len(head), implicit)
    return Header(ds=ds, pixels=pixels)


def is_own_output(h: Header) -> bool:
    if h.text("Manufacturer") == OWN_MANUFACTURER:
        return True
    if h.text("SeriesDescription").upper().startswith(OWN_SERIES_PREFIX):
        return True
    for item in h.ds.get("ContributingEquipmentSequence", None) or []:
        if str(item.get("Manufacturer", "")).strip() == OWN_MANUFACTURER:
            return True
    return False


def ignore_reason(h: Header, rules: FilterRules) -> str | None:
    """Why this object is acknowledged but not classified, or None to classify it."""
    if is_own_output(h):
        return "own output (loop prevention)"
    if not h.pixels.present:
        return "non-image object (no pixel data)"
    sop_class = h.text("SOPClassUID")
    if sop_class not in rules.classified_sop_classes:
        name = getattr(pydicom.uid.UID(sop_class), "name", sop_class) if sop_class else "absent"
        return f"SOP class not classified: {name}"
    modality = h.text("Modality").upper()
    if modality not in rules.accepted_modalities:
        return f"modality not accepted: {modality or '(empty)'}"
    body_part = h.text("BodyPartExamined").upper()
    if body_part not in rules.chest_body_parts:
        return f"body part not chest: {body_part}"
    view = h.text("ViewPosition").upper()
    if view not in rules.frontal_views:
        return f"view not frontal: {view}"
    return None


def check_image_structure(h: Header, rules: FilterRules) -> None:
    """An instance of an image SOP class we classify (CR, DX, SC...) must carry usable
    pixel data, whatever its body part or view: a missing, empty or short Pixel Data
    element is refused with A900 (PS3.4 B.2.3), never acknowledged as "processed", and
    a pixel bomb with A700 (:func:`check_integrity`). Own outputs are not checked (they
    are ignored by loop prevention)."""
    if is_own_output(h) or h.text("SOPClassUID") not in rules.classified_sop_classes:
        return
    if not h.pixels.present:
        raise DoesNotMatchSOPClass("image SOP class without pixel data", "missing_pixel_data")
    check_integrity(h, rules)


def check_integrity(h: Header, rules: FilterRules) -> None:
    """Refuse an image we would classify when it cannot be decoded safely."""
    rows, cols = h.integer("Rows"), h.integer("Columns")
    frames = max(h.integer("NumberOfFrames", 1), 1)
    samples = max(h.integer("SamplesPerPixel", 1), 1)
    if rows <= 0 or cols <= 0:
        raise DoesNotMatchSOPClass("image without Rows/Columns", "missing_dimensions")
    n_pixels = rows * cols * frames
    if n_pixels > rules.max_pixels:
        raise OutOfResources(
            f"{rows}x{cols}x{frames} pixels exceeds CXR_MAX_PIXELS={rules.max_pixels}",
            "pixel_limit",
        )
    if h.pixels.length <= 0:
        raise DoesNotMatchSOPClass("empty pixel data", "empty_pixel_data")
    if not h.pixels.encapsulated:
        bits = h.integer("BitsAllocated", 16)
        expected = (n_pixels * samples * bits + 7) // 8
        if h.pixels.length < expected:
            raise DoesNotMatchSOPClass(
                f"pixel data has {h.pixels.length} bytes, {expected} expected",
                "short_pixel_data",
            )
