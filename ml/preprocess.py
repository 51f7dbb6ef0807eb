"""One preprocessing function for training and serving.

Pipeline (identical for DICOM, PNG and JPEG):

1. **To a display image** (:func:`dicom_to_display`, :func:`read_image_file`):
   DICOM pixel data goes through the Modality LUT / Rescale Slope-Intercept, then the
   VOI LUT or the first Window Center/Width (or, with neither, a min-max window over the
   stored range), then MONOCHROME1 is inverted so that bone/air look the same as in a
   MONOCHROME2 image. The result is 8-bit, like the PNGs the model is trained on. 8- to
   16-bit data and signed pixels are handled by pydicom's LUT functions.
2. **Square policy** (:func:`pad_to_square`): the image is padded symmetrically with black
   (0) to a square, never cropped or stretched, so the aspect ratio of the anatomy is
   kept and no lung is cut off. Black matches collimation borders in real radiographs.
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

    def to_dict(self) -> dict[str, object]:
        return {
            "size": self.size,
            "equalization": self.equalization,
            "clahe_clip": self.clahe_clip,
            "clahe_grid": self.clahe_grid,
            "square_policy": "pad-black-symmetric",
            "resize": "cv2.INTER_AREA",
            "order": "display8bit -> pad -> resize -> equalize -> 3ch",
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> PreprocessConfig:
        return cls(
            size=int(d.get("size", DEFAULT_SIZE)),  # type: ignore[arg-type]
            equalization=d.get("equalization", "hist"),  # type: ignore[arg-type]
            clahe_clip=float(d.get("clahe_clip", 2.0)),  # type: ignore[arg-type]
            clahe_grid=int(d.get("clahe_grid", 8)),  # type: ignore[arg-type]
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
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

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
            from pydicom.pixels import convert_color_space

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
    return cv2.copyMakeBorder(img, top, s - h - top, left, s - w - left, cv2.BORDER_CONSTANT, 0)


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    img = pad_to_square(img)
    if img.shape[0] == size:
        return img
    interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def equalize(img: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    if cfg.equalization == "hist":
        return cv2.equalizeHist(img)
    if cfg.equalization == "clahe":
        clahe = cv2.createCLAHE(clipLimit=cfg.clahe_clip, tileGridSize=(cfg.clahe_grid,) * 2)
        return clahe.apply(img)
    return img


def display_to_model_grey(display: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Steps 2-4: 8-bit display image -> equalised (size, size) uint8."""
    if display.ndim != 2 or display.size == 0:
        raise PreprocessError(f"expected a non-empty grey image, got shape {display.shape}")
    if display.dtype != np.uint8:
        display = to_uint8(display)
    return equalize(resize_square(display, cfg.size), cfg)


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
