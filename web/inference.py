"""Try it / ``POST /api/v1/predict``: classify one uploaded file in the web process.

Inference runs here, with the model loaded once per process (:func:`ml.runtime.get_classifier`,
the same cache the worker uses), not through the Celery worker: a user waiting at the page
would otherwise queue behind the PACS backlog, and the broker round trip adds to every
request (docs/benchmarks.md, "web upload to verdict"). Uploads are classified one at a
time (a semaphore; two cores: parallel passes only slow each other down).

Uploads are decoded from memory and are not written anywhere unless
``CXR_WEB_KEEP_UPLOADS`` is set.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from ml.gradcam import overlay
from ml.labels import VERDICT_TEXT
from ml.preprocess import PreprocessError, load_display_bytes

if TYPE_CHECKING:  # pragma: no cover
    from cxr.settings import Settings

log = logging.getLogger(__name__)

PREVIEW_MAX_SIDE = 1024


class UploadError(ValueError):
    """A file we cannot classify; ``status`` is the HTTP status to answer with (a 503
    carries ``retry_after`` seconds)."""

    def __init__(self, message: str, status: int = 422, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


BUSY_WAIT_S = 20.0  # an upload waits this long for the one at work, then gets a 503


@dataclass
class WebPrediction:
    label: str
    verdict_text: str
    probabilities: dict[str, float]
    model: dict[str, Any]
    ood: bool | None
    ood_score: float | None
    ood_message: str | None
    image_png: bytes | None  # the plain radiograph (the page's heat-map switch), optional
    overlay_png: bytes
    timings_ms: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def b64(png: bytes) -> str:
        return base64.b64encode(png).decode("ascii")

    def as_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "verdict": self.verdict_text,
            "probabilities": self.probabilities,
            "model": self.model,
            "ood": self.ood,
            "ood_score": self.ood_score,
            "ood_message": self.ood_message,
            "overlay_png_base64": self.b64(self.overlay_png),
            "image_png_base64": None if self.image_png is None else self.b64(self.image_png),
            "timings_ms": self.timings_ms,
            "disclaimer": "Research use only, not for diagnostic use.",
        }


def _png(rgb_or_grey: np.ndarray) -> bytes:
    img = rgb_or_grey
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:  # pragma: no cover - cv2 encodes any uint8 array
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _preview(display: np.ndarray, box: tuple[int, int, int, int] | None) -> tuple[np.ndarray, Any]:
    """The display image scaled to at most PREVIEW_MAX_SIDE, with the frame box scaled."""
    h, w = display.shape[:2]
    scale = min(1.0, PREVIEW_MAX_SIDE / max(h, w))
    if scale >= 1.0:
        return display, box
    small = cv2.resize(
        display, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
    )
    if box is not None:
        box = tuple(int(round(v * scale)) for v in box)  # type: ignore[assignment]
    return small, box


class WebClassifier:
    """The model of this process for uploads (loaded once, in the background at start)."""

    def __init__(self, settings: Settings, loader: Any = None) -> None:
        self.settings = settings
        self._loader = loader
        self._clf: Any = None
        self._error: str | None = None
        self._lock = threading.Lock()
        # one upload decoded and classified at a time: bounds the memory a large image
        # takes (times one) and the threads waiting for the CPU
        self._busy = threading.BoundedSemaphore(1)
        self._warming = threading.Event()  # set while warm_up() loads the model

    def _load(self) -> Any:
        if self._loader is not None:
            return self._loader(self.settings)
        from ml.runtime import get_classifier

        return get_classifier(self.settings)

    def warm_up(self) -> None:
        """Load the model (called in a background thread at start-up); uploads meanwhile
        get a 503 with Retry-After instead of a thread waiting on the load."""
        self._warming.set()
        try:
            self.get()
        except Exception as exc:  # reported by /api/v1/health and the page
            log.error("web: model failed to load: %s: %s", type(exc).__name__, exc)
        finally:
            self._warming.clear()

    def get(self) -> Any:
        with self._lock:
            if self._clf is None:
                try:
                    self._clf = self._load()
                    self._error = None
                except Exception as exc:
                    self._error = f"{type(exc).__name__}: {exc}"
                    raise
            return self._clf

    @property
    def state(self) -> str:
        if self._clf is not None:
            return "loaded"
        return "error" if self._error else "loading"

    @property
    def error(self) -> str | None:
        return self._error

    def info(self) -> dict[str, Any]:
        if self._clf is None:
            return {}
        info = self._clf.info()
        return {"name": info["name"], "version": info["version"], "engine": info["engine"]}

    def predict_bytes(
        self, data: bytes, filename: str | None = None, with_image: bool = True
    ) -> WebPrediction:
        if self._warming.is_set() and self._clf is None:
            raise UploadError("the model is still loading: try again shortly", 503, 10)
        if not self._busy.acquire(timeout=BUSY_WAIT_S):
            raise UploadError("busy with another image: try again shortly", 503, 5)
        try:
            return self._predict_bytes(data, filename, with_image)
        finally:
            self._busy.release()

    def _predict_bytes(self, data: bytes, filename: str | None, with_image: bool) -> WebPrediction:
        t0 = time.perf_counter()
        try:
            display = load_display_bytes(data, max_pixels=self.settings.web_max_pixels)
        except PreprocessError as exc:
            raise UploadError(str(exc), 415 if "not a PNG" in str(exc) else 422) from None
        except MemoryError:
            raise UploadError("image too large to decode", 413) from None
        except Exception as exc:  # any decoder failure is the file's fault, not a 500
            log.info("web: upload not decodable: %s", type(exc).__name__)
            raise UploadError(f"cannot decode the file ({type(exc).__name__})") from None
        if min(display.shape[:2]) < 32:
            raise UploadError(f"image too small ({display.shape[1]}x{display.shape[0]} pixels)")
        t1 = time.perf_counter()
        clf = self.get()
        try:
            pred = clf.predict_display(display)  # one at a time: the _busy semaphore
            t2 = time.perf_counter()
            small, box = _preview(display, pred.frame_box)
            # the model frame box maps the CAM onto the (scaled) display image
            rgb = overlay(small, pred.cam, box=box if box is not None else None)
            image_png, overlay_png = (_png(small) if with_image else None), _png(rgb)
        except Exception as exc:  # an image the model cannot take is the file's, not a 500
            log.exception("web: classification of an upload failed")
            raise UploadError(f"cannot classify this image ({type(exc).__name__})") from None
        t3 = time.perf_counter()
        if self.settings.web_keep_uploads:
            self._keep(data, filename)
        info = clf.info()
        timings = {k: round(float(v), 2) for k, v in pred.timings_ms.items()}
        timings.update(
            decode=round((t1 - t0) * 1000, 2),
            model_total=round((t2 - t1) * 1000, 2),
            render=round((t3 - t2) * 1000, 2),
        )
        return WebPrediction(
            label=pred.label,
            verdict_text=VERDICT_TEXT.get(pred.label, pred.label),
            probabilities={k: round(float(v), 6) for k, v in pred.probabilities.items()},
            model={"name": info["name"], "version": info["version"]},
            ood=pred.ood,
            ood_score=None if pred.ood_score is None else float(pred.ood_score),
            ood_message=pred.ood_message,
            image_png=image_png,
            overlay_png=overlay_png,
            timings_ms=timings,
        )

    def _keep(self, data: bytes, filename: str | None) -> None:
        """Store a copy of an upload (only with CXR_WEB_KEEP_UPLOADS), named by content,
        readable by this user only (a DICOM upload carries PHI)."""
        import os

        d = Path(self.settings.web_upload_dir)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        suffix = Path(filename or "").suffix.lower()[:8] if filename else ""
        if not suffix.replace(".", "").isalnum():
            suffix = ""
        path = d / f"{hashlib.sha256(data).hexdigest()}{suffix}"
        if not path.exists():
            tmp = path.with_name(path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            tmp.replace(path)
        log.info("web: upload kept as %s", path.name)
