"""One preprocessing function for training and serving.

Pipeline (identical for DICOM, PNG and JPEG):

1. **To a display image** (:func:`dicom_to_display`, :func:`read_image_file`):
   DICOM pixel data goes through the Modality LUT / Rescale Slope-Intercept, then the
   VOI LUT or the first Window Center/Width (or, with neither, a min-max window over the
   stored range), then MONOCHROME1 is inverted so that bone/air look the same as in a
   MONOCHROME2 image. The result is 8-bit, like the PNGs the model is trained on. 8- to
   16-bit data and signed pixels are handled by pydicom's LUT functions.
2. **Square policy** (``PreprocessConfig.square_policy``):

   * ``trim-crop`` (default since model 2.0.0): uniform borders (black or white bars,
     padding, collimation, film edges; :func:`trim_borders`) are cut away, then the
     centre square of what is left is kept (:func:`centre_square_box`). Every image, from
     every source, reaches the model as anatomy filling a square frame: no black bar, no
     aspect ratio, no border width survives to mark where it came from (the data's README,
     "Known biases": NIH images are square, most COVID images were padded with bars).
   * ``lung-box`` (measured against ``trim-crop``, docs/benchmarks.md §7.7): after the
     trim, the two lung fields are found with OpenCV and their darkness profiles
     (:func:`lung_fields`) and the square around them,
     with a margin, is kept; when they are not found it falls back to the centre square.
   * ``pad`` (model 1.0.0): padded symmetrically with black to a square. Kept so that
     older artifacts keep serving exactly as they were trained.

   :func:`model_frame_box` returns the region of the display image that the model's
   square frame covers, so heat maps are mapped back onto the right pixels.
3. **Resize** to the model's input size with ``cv2.INTER_AREA`` (anti-aliased downscaling).
4. **Histogram equalisation** at the model resolution (``cv2.equalizeHist`` by default;
   CLAHE selectable). Equalising *after* resizing makes the step independent of the
   source resolution (a 4,000 px CR and a 384 px PNG give the same kind of histogram) and
   is cheap at serving time. The original study equalised before resizing; the difference
   is documented in the model card.
5. **3 channels**: the grey image is repeated, ``float32`` in 0..255. Intensity
   normalisation (ImageNet mean/std) is a layer inside the model, so ONNX/Keras runtimes
   and training share it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import cv2
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from pydicom import Dataset

log = logging.getLogger(__name__)

Equalization = Literal["hist", "clahe", "none"]
SquarePolicy = Literal["trim-crop", "pad", "lung-box"]
SQUARE_POLICIES = ("trim-crop", "pad", "lung-box")
# names written into model cards (1.0.0's card says "pad-black-symmetric")
_POLICY_NAMES = {
    "trim-crop": "trim-uniform-borders-centre-square",
    "pad": "pad-black-symmetric",
    "lung-box": "trim-uniform-borders-lung-field-square",
}
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in display pixels (may lie outside: padding)
DEFAULT_SIZE = 256
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class PreprocessError(ValueError):
    """The input cannot be turned into a model input (no pixels, bad geometry...)."""


@dataclass(frozen=True)
class PreprocessConfig:
    size: int = DEFAULT_SIZE
    equalization: Equalization = "hist"
    clahe_clip: float = 2.0
    clahe_grid: int = 8
    square_policy: SquarePolicy = "trim-crop"

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"image size {self.size} is too small")
        if self.equalization not in ("hist", "clahe", "none"):
            raise ValueError(f"unknown equalization {self.equalization!r}")
        if self.square_policy not in SQUARE_POLICIES:
            raise ValueError(f"unknown square policy {self.square_policy!r}")

    def to_dict(self) -> dict[str, object]:
        step = {
            "trim-crop": "trim borders -> centre square",
            "lung-box": "trim borders -> square around the lung fields",
            "pad": "pad",
        }[self.square_policy]
        return {
            "size": self.size,
            "equalization": self.equalization,
            "clahe_clip": self.clahe_clip,
            "clahe_grid": self.clahe_grid,
            "square_policy": _POLICY_NAMES[self.square_policy],
            "resize": "cv2.INTER_AREA",
            "order": f"display8bit -> {step} -> resize -> equalize -> 3ch",
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> PreprocessConfig:
        name = str(d.get("square_policy", _POLICY_NAMES["pad"]))
        policy = {v: k for k, v in _POLICY_NAMES.items()}.get(name, name)
        return cls(
            size=int(d.get("size", DEFAULT_SIZE)),  # type: ignore[call-overload]
            equalization=d.get("equalization", "hist"),  # type: ignore[arg-type]
            clahe_clip=float(d.get("clahe_clip", 2.0)),  # type: ignore[arg-type]
            clahe_grid=int(d.get("clahe_grid", 8)),  # type: ignore[call-overload]
            square_policy=policy,  # type: ignore[arg-type]
        )


# --------------------------------------------------------------------------- decoding


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Min-max scale any numeric grey image to 8 bits (constant images become 0)."""
    img = np.asarray(img)
    if img.dtype == np.uint8:
        return img
    f = img.astype(np.float64)
    lo, hi = float(np.min(f)), float(np.max(f))
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(f.shape, np.uint8)
    return np.clip((f - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def dicom_to_display(ds: Dataset, max_pixels: int | None = None) -> np.ndarray:
    """Decode a DICOM image to an 8-bit MONOCHROME2-looking display image (H, W)."""
    from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise PreprocessError("dataset has no pixel data")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows <= 0 or cols <= 0:
        raise PreprocessError("Rows/Columns missing or zero")
    if max_pixels is not None and rows * cols * frames > max_pixels:
        raise PreprocessError(f"image too large: {rows}x{cols}x{frames}")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # decoder missing, truncated data...
        raise PreprocessError(f"cannot decode pixel data: {type(exc).__name__}: {exc}") from exc
    if frames > 1 and arr.ndim >= 3 and arr.shape[0] == frames:
        arr = arr[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:  # colour (e.g. a secondary capture in RGB): use luminance
        if photometric.startswith("YBR"):
            from pydicom.pixels.processing import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        return cv2.cvtColor(to_uint8(arr), cv2.COLOR_RGB2GRAY)
    if arr.ndim != 2 or arr.size == 0:
        raise PreprocessError(f"unexpected pixel array shape {arr.shape}")

    data = apply_modality_lut(arr, ds)
    has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
    if has_voi:
        try:
            data = apply_voi_lut(data, ds, index=0, prefer_lut=True)
        except Exception as exc:  # malformed window values: fall back to min-max
            log.warning("ignoring unusable VOI LUT/window: %s", type(exc).__name__)
    img = to_uint8(data)
    if photometric == "MONOCHROME1":
        img = 255 - img
    return img


def read_image_file(path: str | Path) -> np.ndarray:
    """Read a PNG/JPEG (8 or 16 bit, grey or colour) to an 8-bit grey display image."""
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise PreprocessError(f"cannot decode image file {Path(path).name}")
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if img.dtype != np.uint8:
        img = to_uint8(img)
    return img


def is_dicom_file(path: str | Path) -> bool:
    p = Path(path)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return False
    with open(p, "rb") as fh:
        head = fh.read(132)
    if head[128:132] == b"DICM":
        return True
    # files without a Part 10 header: try pydicom with force
    return p.suffix.lower() in {".dcm", ".dicom", ""}


def load_display(path: str | Path) -> np.ndarray:
    """Any supported file (DICOM with or without Part 10 header, PNG, JPEG) -> display."""
    if is_dicom_file(path):
        import pydicom

        ds = pydicom.dcmread(str(path), force=True)
        _ensure_transfer_syntax(ds)
        return dicom_to_display(ds)
    return read_image_file(path)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def sniff_image_kind(data: bytes) -> str | None:
    """``png``, ``jpeg``, ``dicom`` (Part 10 preamble) or None (unknown: maybe a DICOM
    data set without the Part 10 header)."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def load_display_bytes(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """The bytes of a DICOM file (with or without a Part 10 header), PNG or JPEG -> an
    8-bit display image, as :func:`load_display` does for a path. Anything else, an
    image above ``max_pixels`` (checked from the header, before decoding) or a corrupt
    one raises :class:`PreprocessError` with a message fit for the user."""
    import io

    if not data:
        raise PreprocessError("the file is empty")
    kind = sniff_image_kind(data)
    if kind in ("png", "jpeg"):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                bands = len(im.getbands())
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise PreprocessError(f"cannot read the {kind.upper()} header: corrupt file") from exc
        if max_pixels is not None and w * h * bands > max_pixels:
            raise PreprocessError(f"image too large: {w}x{h} pixels x {bands} samples")
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None or img.size == 0:
            raise PreprocessError(f"cannot decode the {kind.upper()} image (truncated or corrupt)")
        if img.ndim == 3:
            img = cv2.cvtColor(
                img, cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY
            )
        return img if img.dtype == np.uint8 else to_uint8(img)
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=kind is None)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as exc:
        raise PreprocessError("not a PNG, JPEG or DICOM file") from exc
    except Exception as exc:  # pydicom raises many kinds on garbage
        raise PreprocessError("not a PNG, JPEG or DICOM file") from exc
    if kind is None and not any(
        tag in ds for tag in ("SOPClassUID", "PixelData", "Modality", "StudyInstanceUID")
    ):
        raise PreprocessError("not a PNG, JPEG or DICOM file")
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise PreprocessError("the DICOM file has no pixel data (not an image)")
    if max_pixels is not None:  # before decoding: compressed data can expand a lot
        try:
            n = (
                int(ds.get("Rows", 0) or 0)
                * int(ds.get("Columns", 0) or 0)
                * int(ds.get("NumberOfFrames", 1) or 1)
                * int(ds.get("SamplesPerPixel", 1) or 1)
            )
        except (TypeError, ValueError) as exc:
            raise PreprocessError("unreadable image size in the DICOM header") from exc
        if n > max_pixels:
            raise PreprocessError(f"image too large: {n} samples")
    _ensure_transfer_syntax(ds)
    return dicom_to_display(ds, max_pixels=max_pixels)


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """A file without a Part 10 header has no Transfer Syntax UID: take the encoding
    pydicom detected while reading (only uncompressed syntaxes can lack the header)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if implicit is None or little is None:  # not read from a file: the common default
        implicit, little = True, True
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


# --------------------------------------------------------------------------- geometry/contrast


def pad_to_square(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    if h == w:
        return img
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    return cv2.copyMakeBorder(
        img, top, s - h - top, left, s - w - left, cv2.BORDER_CONSTANT, value=0
    )


# A border row/column is one whose pixels (95% of them) lie within BORDER_TOLERANCE grey
# levels of its median, with that median dark or bright: a padding bar, a collimator
# shadow, the film edge of a digitised film, a burnt-in frame. Text inside a bar is
# tolerated by the 95% rule. No side loses more than MAX_TRIM of the image.
BORDER_TOLERANCE = 12
BORDER_DARK, BORDER_BRIGHT = 40, 215
MAX_TRIM = 0.3


def _border_lines(lines: np.ndarray) -> np.ndarray:
    """(n, m) array of lines -> bool (n,): is each line a uniform dark/bright border?"""
    med: np.ndarray = np.median(lines, axis=1)
    dev: np.ndarray = np.percentile(np.abs(lines - med[:, None]), 95, axis=1)
    return (dev <= BORDER_TOLERANCE) & ((med <= BORDER_DARK) | (med >= BORDER_BRIGHT))


def _trim_count(flags: np.ndarray, limit: int) -> int:
    """Leading True run of ``flags``, at most ``limit``."""
    n = 0
    while n < min(limit, len(flags)) and flags[n]:
        n += 1
    return n


def trim_borders(img: np.ndarray) -> Box:
    """The box (x0, y0, x1, y1) left after cutting uniform borders from each side.

    Analysed on a copy of at most 512 px (speed), mapped back to full resolution.
    Repeated until stable, so a white frame inside a black bar goes too.
    """
    h, w = img.shape[:2]
    scale = min(1.0, 512.0 / max(h, w))
    small = (
        img
        if scale == 1.0
        else cv2.resize(
            img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
        )
    )
    f = small.astype(np.float32)
    sh, sw = f.shape
    x0, y0, x1, y1 = 0, 0, sw, sh
    for _ in range(4):
        before = (x0, y0, x1, y1)
        region = f[y0:y1, x0:x1]
        rows, cols = _border_lines(region), _border_lines(region.T)
        if rows.all() or cols.all():  # nothing but border (a blank image): keep it
            break
        lim_y, lim_x = int(MAX_TRIM * sh), int(MAX_TRIM * sw)
        y0 += _trim_count(rows, lim_y - y0)
        y1 -= _trim_count(rows[::-1], lim_y - (sh - y1))
        x0 += _trim_count(cols, lim_x - x0)
        x1 -= _trim_count(cols[::-1], lim_x - (sw - x1))
        if (x0, y0, x1, y1) == before or x1 - x0 < 8 or y1 - y0 < 8:
            break
    inv = 1.0 / scale
    bx0, by0 = int(np.floor(x0 * inv)), int(np.floor(y0 * inv))
    bx1, by1 = min(w, int(np.ceil(x1 * inv))), min(h, int(np.ceil(y1 * inv)))
    if bx1 - bx0 < 8 or by1 - by0 < 8:  # nothing but border: keep the whole image
        return 0, 0, w, h
    return bx0, by0, bx1, by1


def centre_square_box(box: Box) -> Box:
    """The centred square inside ``box`` (side = its shorter side)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    s = min(w, h)
    left, top = x0 + (w - s) // 2, y0 + (h - s) // 2
    return left, top, left + s, top + s


LUNG_WORK_SIZE = 256
# 0.08 until docs/benchmarks.md 7.8 measured it against real lung masks: it cut into the
# lungs of 96 of 278 images (0.15: 58), so the margin is 0.15 since the 224 px lung-box arm
LUNG_MARGIN = 0.15
LUNG_CONTRAST = 12.0  # darkness (0-255, equalised) the lungs need over the mediastinum


def _smooth(v: np.ndarray, k: int) -> np.ndarray:
    k = max(1, k | 1)
    return np.convolve(np.pad(v, k // 2, mode="edge"), np.ones(k) / k, mode="valid")


def _extent(profile: np.ndarray, peak: int, lo: int, hi: int, frac: float = 0.5) -> tuple[int, int]:
    """From ``peak`` walk outward (within lo..hi) while ``profile`` stays above ``frac`` of
    the way from the lowest value on that side up to the peak."""
    left_min = float(profile[lo : peak + 1].min())
    right_min = float(profile[peak:hi].min())
    t_left = left_min + frac * (float(profile[peak]) - left_min)
    t_right = right_min + frac * (float(profile[peak]) - right_min)
    a = peak
    while a > lo and profile[a - 1] > t_left:
        a -= 1
    b = peak
    while b < hi - 1 and profile[b + 1] > t_right:
        b += 1
    return a, b + 1


def lung_fields(img: np.ndarray, box: Box) -> Box | None:
    """The box around both lung fields inside ``box`` (display pixels), or None.

    Found on a blurred, histogram-equalised copy of at most 256 px from its darkness
    profiles: across the columns of the mid-thorax rows, the two lungs are the darkest
    bands left and right of the bright mediastinum; each lung's lateral edge is where the
    darkness falls half-way to the ribs and soft tissue beside it. Down the rows of those
    lung bands, the apices and the diaphragm bound the lungs the same way. When the two
    bands are not clearly darker than the mediastinum, or the box is implausibly small,
    the answer is "not found"."""
    x0, y0, x1, y1 = box
    region = img[y0:y1, x0:x1]
    h, w = region.shape[:2]
    if h < 16 or w < 16:
        return None
    scale = min(1.0, LUNG_WORK_SIZE / max(h, w))
    sw, sh = max(16, round(w * scale)), max(16, round(h * scale))
    small = cv2.resize(region, (sw, sh), interpolation=cv2.INTER_AREA)
    dark = 255.0 - cv2.equalizeHist(cv2.GaussianBlur(small, (5, 5), 0)).astype(np.float32)
    cols = _smooth(dark[int(0.2 * sh) : int(0.7 * sh)].mean(0), sw // 25)
    lo_m, hi_m = int(0.3 * sw), int(0.7 * sw)
    mid = lo_m + int(np.argmin(cols[lo_m:hi_m]))
    lpk = int(np.argmax(cols[: mid - 1]))
    rpk = mid + 1 + int(np.argmax(cols[mid + 1 :]))
    if min(cols[lpk], cols[rpk]) - cols[mid] < LUNG_CONTRAST:
        return None
    la, _ = _extent(cols, lpk, 0, mid + 1)
    _, rb = _extent(cols, rpk, mid, sw)
    lungs = np.r_[la:mid, mid + 1 : rb]
    rows = _smooth(dark[:, lungs].mean(1), sh // 25)
    lo_r, hi_r = int(0.15 * sh), int(0.8 * sh)
    rpk_row = lo_r + int(np.argmax(rows[lo_r:hi_r]))
    ta, tb = _extent(rows, rpk_row, 0, sh, frac=0.3)  # the bases are paler
    if rb - la < 0.35 * sw or tb - ta < 0.3 * sh:
        return None
    inv = 1.0 / scale
    return (
        x0 + int(la * inv),
        y0 + int(ta * inv),
        x0 + min(w, int(np.ceil(rb * inv))),
        y0 + min(h, int(np.ceil(tb * inv))),
    )


def lung_field_box(img: np.ndarray) -> Box:
    """``lung-box`` policy: the square around the lung fields (plus a margin), inside the
    trimmed image; the centre square of the trimmed image when no lung fields are found."""
    trimmed = trim_borders(img)
    lungs = lung_fields(img, trimmed)
    if lungs is None:
        return centre_square_box(trimmed)
    tx0, ty0, tx1, ty1 = trimmed
    lx0, ly0, lx1, ly1 = lungs
    side = int(round(max(lx1 - lx0, ly1 - ly0) * (1 + 2 * LUNG_MARGIN)))
    side = max(16, min(side, tx1 - tx0, ty1 - ty0))
    cx, cy = (lx0 + lx1) // 2, (ly0 + ly1) // 2
    left = min(max(cx - side // 2, tx0), tx1 - side)
    top = min(max(cy - side // 2, ty0), ty1 - side)
    return left, top, left + side, top + side


def model_frame_box(img: np.ndarray, policy: SquarePolicy = "trim-crop") -> Box:
    """The square region of ``img`` (display pixels) that becomes the model's frame.

    For ``pad`` it reaches outside the image (the black padding)."""
    h, w = img.shape[:2]
    if policy == "pad":
        s = max(h, w)
        top, left = (s - h) // 2, (s - w) // 2
        return -left, -top, w + (s - w - left), h + (s - h - top)
    if policy == "lung-box":
        return lung_field_box(img)
    return centre_square_box(trim_borders(img))


def crop_box(img: np.ndarray, box: Box) -> np.ndarray:
    """``img`` cut to ``box``; parts outside the image are black (padding)."""
    x0, y0, x1, y1 = box
    h, w = img.shape[:2]
    if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h:
        return img[y0:y1, x0:x1]
    out = np.zeros((y1 - y0, x1 - x0), img.dtype)
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = img[sy0:sy1, sx0:sx1]
    return out


def resize_to(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return img
    interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Pad to a square and resize (the ``pad`` policy; used for previews)."""
    return resize_to(pad_to_square(img), size)


def equalize(img: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    if cfg.equalization == "hist":
        return cv2.equalizeHist(img)
    if cfg.equalization == "clahe":
        clahe = cv2.createCLAHE(clipLimit=cfg.clahe_clip, tileGridSize=(cfg.clahe_grid,) * 2)
        return clahe.apply(img)
    return img


def display_to_model_frame(display: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, Box]:
    """Steps 2-4: 8-bit display image -> (equalised (size, size) uint8, frame box)."""
    if display.ndim != 2 or display.size == 0:
        raise PreprocessError(f"expected a non-empty grey image, got shape {display.shape}")
    if display.dtype != np.uint8:
        display = to_uint8(display)
    box = model_frame_box(display, cfg.square_policy)
    return equalize(resize_to(crop_box(display, box), cfg.size), cfg), box


def display_to_model_grey(display: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Steps 2-4: 8-bit display image -> equalised (size, size) uint8."""
    return display_to_model_frame(display, cfg)[0]


def grey_to_input(grey: np.ndarray) -> np.ndarray:
    """Step 5: (S, S) uint8 -> (S, S, 3) float32 in 0..255."""
    return np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)


def preprocess_display(display: np.ndarray, cfg: PreprocessConfig | None = None) -> np.ndarray:
    """8-bit display image -> model input (S, S, 3) float32."""
    return grey_to_input(display_to_model_grey(display, cfg or PreprocessConfig()))


def preprocess_dataset(ds: Dataset, cfg: PreprocessConfig | None = None) -> np.ndarray:
    return preprocess_display(dicom_to_display(ds), cfg)


def preprocess_file(path: str | Path, cfg: PreprocessConfig | None = None) -> np.ndarray:
    """DICOM/PNG/JPEG path -> model input (S, S, 3) float32. Used by training and serving."""
    return preprocess_display(load_display(path), cfg)
