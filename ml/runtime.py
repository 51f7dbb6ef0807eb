"""Serving runtime: load a model artifact once per process and classify images.

The worker calls :func:`get_classifier` (lazy, cached per process) and then
:meth:`Classifier.predict_display` / :meth:`Classifier.predict_file`.

Engines (same weights, same outputs up to float rounding):

* ``onnx``: ONNX Runtime on Keras' own ONNX export (TensorFlow backend, tf2onnx) of
  :func:`ml.model.feature_logit_model`, so the network returns the last-conv features and
  the logits in one pass and Grad-CAM needs no backward pass (:mod:`ml.gradcam`). The
  export is cached under ``cache_dir`` keyed by the weights' sha256 (written atomically);
  with a warm cache the runtime never imports TensorFlow.
* ``keras``: the Keras model (``tf.function``-compiled on the TensorFlow backend).
* ``auto``: ONNX Runtime when it loads, else Keras. ONNX Runtime is the default because it
  measured faster on CPU (``benchmarks/inference.py``).

The artifact's weights are checked against the sha256 in its card at load; a mismatch is
refused (:class:`ml.artifact.ArtifactError`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ml.artifact import ArtifactError, Card, load_card, sha256_file
from ml.calibration import softmax
from ml.gradcam import cam_from_features, normalise_cam, upsample
from ml.ood import OOD_MESSAGE, MahalanobisOOD
from ml.preprocess import (
    Box,
    PreprocessConfig,
    display_to_model_frame,
    display_to_model_grey,
    grey_to_input,
    load_display,
)

log = logging.getLogger(__name__)

Engine = Literal["auto", "onnx", "keras"]
ENGINES = ("auto", "onnx", "keras")
DEFAULT_BATCH = 16
DEFAULT_CACHE_DIR = Path(tempfile.gettempdir()) / "cxr-model-cache"


@dataclass
class Prediction:
    label: str  # one of CLASSES
    probabilities: dict[str, float]  # calibrated softmax(logits / T), keys = CLASSES
    cam: np.ndarray  # (S, S) float32 in [0, 1], Grad-CAM of the predicted class, model frame
    model_grey: np.ndarray  # (S, S) uint8 equalised model input
    timings_ms: dict[str, float] = field(default_factory=dict)  # preprocess, forward, cam
    # the display-image region (x0, y0, x1, y1) the model frame covers (ml.preprocess)
    frame_box: tuple[int, int, int, int] | None = None
    # out-of-distribution score and flag (None when the model has no detector, e.g. 1.0.0)
    ood_score: float | None = None
    ood: bool | None = None

    @property
    def ood_message(self) -> str | None:
        return OOD_MESSAGE if self.ood else None

    @property
    def confidence(self) -> float:
        return self.probabilities[self.label]


# --------------------------------------------------------------------------- ONNX export


def onnx_cache_paths(cache_dir: str | Path, sha256: str) -> tuple[Path, Path]:
    d = Path(cache_dir)
    return d / f"{sha256}.onnx", d / f"{sha256}.head.npz"


def _logits_kernel(model: Any) -> tuple[np.ndarray, np.ndarray]:
    from ml.model import LOGITS_LAYER

    kernel, bias = model.get_layer(LOGITS_LAYER).get_weights()
    return np.asarray(kernel, np.float32), np.asarray(bias, np.float32)


def export_onnx(model: Any, path: str | Path) -> Path:
    """Export ``feature_logit_model(model)`` with Keras' ONNX export (TF backend).

    tf2onnx turns constants captured by the traced function (the ImageNet mean/variance
    of the Normalization layer) into extra graph inputs; they are folded back into
    initialisers here so the graph has the single input ``image``. Written atomically.
    """
    import keras
    import onnx
    from onnx import numpy_helper

    from ml.model import feature_logit_model

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError("ONNX export needs the TensorFlow backend")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fl = feature_logit_model(model)
    size = int(model.inputs[0].shape[1])
    fl([np.zeros((1, size, size, 3), np.float32)], training=False)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.onnx")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        fl.export(str(tmp), format="onnx", verbose=False)
        proto = onnx.load(str(tmp))
        captured = _captured_constants(fl)
        inputs = list(proto.graph.input)
        extra = [i for i in inputs if i.name in captured]
        used = {name for node in proto.graph.node for name in node.input}
        for inp in extra:
            if inp.name in used:
                init = numpy_helper.from_array(captured[inp.name], inp.name)
                proto.graph.initializer.append(init)
            proto.graph.input.remove(inp)
        left = [i.name for i in proto.graph.input]
        if len(left) != 1:
            raise RuntimeError(f"ONNX export has unexpected inputs {left}")
        onnx.save(proto, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported ONNX model %s", path)
    return path


def _captured_constants(fl: Any) -> dict[str, np.ndarray]:
    """Names (as tf2onnx sees them) and values of non-variable tensors the traced
    function captures."""
    from keras.src import tree
    from keras.src.export.export_utils import get_input_signature, make_tf_tensor_spec
    from keras.src.export.onnx import get_concrete_fn

    sig = tree.map_structure(make_tf_tensor_spec, get_input_signature(fl))
    cf = get_concrete_fn(fl, sig).get_concrete_function(*sig)
    n_args = len(cf.inputs) - len(cf.captured_inputs)
    out: dict[str, np.ndarray] = {}
    for placeholder, value in zip(cf.inputs[n_args:], cf.captured_inputs, strict=True):
        if value.dtype.name == "resource":
            continue
        out[placeholder.name] = np.asarray(value.numpy())
    return out


# --------------------------------------------------------------------------- engines


class _KerasEngine:
    name = "keras"

    def __init__(self, model: Any) -> None:
        import keras

        from ml.model import feature_logit_model

        self.model = model
        self.fl = feature_logit_model(model)
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            self._call = tf.function(
                lambda x: self.fl([x], training=False), reduce_retracing=True, jit_compile=False
            )
        else:  # pragma: no cover - other backends
            self._call = lambda x: self.fl([x], training=False)
        self.kernel, self.bias = _logits_kernel(model)

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f, z = self._call(x)
        return np.asarray(f), np.asarray(z)


class _OnnxEngine:
    name = "onnx"

    def __init__(self, onnx_path: Path, head_npz: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        # no busy-waiting worker threads: workers share the CPU with other processes (node,
        # other workers); on the shared 2-core dev box spinning threads measured 1.5-2x
        # slower than non-spinning ones (benchmarks/inference.py, /tmp A/B in the report)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        ins = self.session.get_inputs()
        if len(ins) != 1:
            raise RuntimeError(f"ONNX model has {len(ins)} inputs, expected 1")
        self.input_name = ins[0].name
        outs = self.session.get_outputs()
        self.out_names = [o.name for o in outs]
        self.feature_idx = next(i for i, o in enumerate(outs) if len(o.shape) == 4)
        self.logit_idx = next(i for i, o in enumerate(outs) if len(o.shape) == 2)
        head = np.load(head_npz)
        self.kernel, self.bias = head["kernel"], head["bias"]

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        res = self.session.run(
            self.out_names, {self.input_name: np.ascontiguousarray(x, np.float32)}
        )
        return res[self.feature_idx], res[self.logit_idx]


# --------------------------------------------------------------------------- classifier


class Classifier:
    """A loaded, verified model artifact. Thread-safe for prediction."""

    def __init__(self, card: Card, engine: Any, keras_model: Any | None, model_dir: Path) -> None:
        self.card = dict(card)
        self.model_dir = model_dir
        self.name: str = str(card.get("name", model_dir.name))
        self.version: str = str(card.get("version", ""))
        self.sha256: str = str(card["weights_sha256"])
        self.classes: tuple[str, ...] = tuple(card["classes"])
        self.image_size: int = int(card["image_size"])
        self.temperature: float = float(card.get("temperature", 1.0))
        pre = dict(card.get("preprocessing") or {})
        pre["size"] = self.image_size
        self.preprocess_config = PreprocessConfig.from_dict(pre)
        self.head: str = str((card.get("architecture") or {}).get("head", "gap"))
        self._engine = engine
        self.engine: str = engine.name
        self._keras_model = keras_model
        self._gradcam_fn: Any = None
        self._lock = threading.Lock()
        self.ood_detector: MahalanobisOOD | None = _load_ood(card, model_dir)

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        engine: Engine = "auto",
        cache_dir: str | Path | None = None,
    ) -> Classifier:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
        d = Path(model_dir)
        card = load_card(d)
        weights = d / card.get("weights_file", "model.weights.h5")
        if not weights.is_file():
            raise ArtifactError(f"{d} has no weights file {weights.name}")
        digest = sha256_file(weights)
        if digest != card["weights_sha256"]:
            raise ArtifactError(
                f"weights of {d} do not match the model card (sha256 {digest[:12]} != "
                f"{str(card['weights_sha256'])[:12]}): refusing a mismatched artifact"
            )
        cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
        t0 = time.perf_counter()
        keras_model = None
        eng: Any = None
        if engine in ("auto", "onnx"):
            try:
                eng = cls._onnx_engine(card, d, cache)
            except Exception as exc:
                if engine == "onnx":
                    raise
                log.warning(
                    "ONNX Runtime unavailable (%s: %s); using Keras", type(exc).__name__, exc
                )
        if eng is None:
            from ml.artifact import build_model_from_card

            keras_model = build_model_from_card(card, d)
            eng = _KerasEngine(keras_model)
        clf = cls(card, eng, keras_model, d)
        log.info(
            "loaded model %s %s (sha256 %s, engine %s) in %.1f s",
            clf.name,
            clf.version,
            clf.sha256[:12],
            clf.engine,
            time.perf_counter() - t0,
        )
        return clf

    @staticmethod
    def _onnx_engine(card: Card, model_dir: Path, cache: Path) -> _OnnxEngine:
        onnx_path, head_path = onnx_cache_paths(cache, str(card["weights_sha256"]))
        for attempt in (1, 2):
            if not (onnx_path.is_file() and head_path.is_file()):
                from ml.artifact import build_model_from_card

                model = build_model_from_card(card, model_dir)
                export_onnx(model, onnx_path)
                kernel, bias = _logits_kernel(model)
                fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp.npz")
                with os.fdopen(fd, "wb") as fh:
                    np.savez(fh, kernel=kernel, bias=bias)
                os.replace(tmp, head_path)
            try:
                return _OnnxEngine(onnx_path, head_path)
            except Exception:
                if attempt == 2:
                    raise
                log.warning("cached ONNX model %s unusable; exporting again", onnx_path.name)
                onnx_path.unlink(missing_ok=True)
                head_path.unlink(missing_ok=True)
        raise AssertionError("unreachable")  # pragma: no cover

    @property
    def keras_model(self) -> Any:
        """The Keras model (built on first use when the engine is ONNX)."""
        with self._lock:
            if self._keras_model is None:
                from ml.artifact import build_model_from_card

                self._keras_model = build_model_from_card(self.card, self.model_dir)
            return self._keras_model

    # ---------------------------------------------------------------- inference
    def preprocess(self, display: np.ndarray) -> np.ndarray:
        """Display image -> (S, S) uint8 equalised model input."""
        return display_to_model_grey(display, self.preprocess_config)

    def preprocess_frame(self, display: np.ndarray) -> tuple[np.ndarray, Box]:
        """Display image -> ((S, S) uint8 model input, the display box it covers)."""
        return display_to_model_frame(display, self.preprocess_config)

    def ood_scores(self, features: np.ndarray) -> np.ndarray | None:
        """(N, h, w, C) last-conv features -> (N,) OOD scores (None without a detector)."""
        if self.ood_detector is None:
            return None
        return self.ood_detector.score(np.asarray(features, np.float32).mean(axis=(1, 2)))

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, S, S, 3) float32 -> (features (N, h, w, C), logits (N, K))."""
        out: tuple[np.ndarray, np.ndarray] = self._engine.forward(np.asarray(x, np.float32))
        return out

    def logits(self, x: np.ndarray, batch_size: int = DEFAULT_BATCH) -> np.ndarray:
        out = [self.forward(x[i : i + batch_size])[1] for i in range(0, len(x), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits, self.temperature)

    def _cam(self, features: np.ndarray, x: np.ndarray, idx: int) -> np.ndarray:
        if self.head == "gap":
            m = cam_from_features(features, self._engine.kernel, idx)
        else:  # non-linear head: real Grad-CAM with a backward pass
            from ml.gradcam import gradcam_gradient, make_gradcam_fn

            if self._gradcam_fn is None:
                self._gradcam_fn = make_gradcam_fn(self.keras_model)
            m = gradcam_gradient(self.keras_model, x, idx, fn=self._gradcam_fn)
        return upsample(normalise_cam(m), self.image_size)

    def predict_displays(
        self, displays: Sequence[np.ndarray], batch_size: int = DEFAULT_BATCH
    ) -> list[Prediction]:
        out: list[Prediction] = []
        for i in range(0, len(displays), batch_size):
            chunk = displays[i : i + batch_size]
            t0 = time.perf_counter()
            frames = [self.preprocess_frame(d) for d in chunk]
            greys = [g for g, _ in frames]
            x = np.stack([grey_to_input(g) for g in greys])
            t1 = time.perf_counter()
            features, logits = self.forward(x)
            t2 = time.perf_counter()
            probs = self.probabilities(logits)
            scores = self.ood_scores(features)
            t3 = time.perf_counter()
            n = len(chunk)
            for j in range(n):
                idx = int(np.argmax(probs[j]))
                tc = time.perf_counter()
                cam = self._cam(features[j], x[j], idx)
                out.append(
                    Prediction(
                        label=self.classes[idx],
                        probabilities={
                            c: float(p) for c, p in zip(self.classes, probs[j], strict=True)
                        },
                        cam=cam,
                        model_grey=greys[j],
                        timings_ms={
                            "preprocess": (t1 - t0) * 1000 / n,
                            "forward": (t2 - t1) * 1000 / n,
                            "ood": (t3 - t2) * 1000 / n,
                            "cam": (time.perf_counter() - tc) * 1000,
                        },
                        frame_box=frames[j][1],
                        ood_score=None if scores is None else float(scores[j]),
                        ood=None
                        if scores is None or self.ood_detector is None
                        else bool(scores[j] > self.ood_detector.threshold),
                    )
                )
        return out

    def predict_display(self, display: np.ndarray) -> Prediction:
        return self.predict_displays([display])[0]

    def predict_file(self, path: str | Path) -> Prediction:
        """DICOM (with or without a Part 10 header), PNG or JPEG."""
        return self.predict_display(load_display(path))

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "engine": self.engine,
            "classes": list(self.classes),
            "image_size": self.image_size,
            "temperature": self.temperature,
            "ood_threshold": None if self.ood_detector is None else self.ood_detector.threshold,
        }


def _load_ood(card: Any, model_dir: Path) -> MahalanobisOOD | None:
    """The artifact's OOD detector, verified against the card (None if it has none)."""
    info = card.get("ood")
    if not info:
        return None
    path = model_dir / str(info.get("file", "ood.npz"))
    if not path.is_file() or sha256_file(path) != info.get("sha256"):
        raise ArtifactError(f"{model_dir}: OOD detector {path.name} missing or not the card's")
    return MahalanobisOOD.load(path)


# --------------------------------------------------------------------------- process cache

_CACHE: dict[tuple[str, str, str], Classifier] = {}
_CACHE_LOCK = threading.Lock()


def _cache_key(settings: Any) -> tuple[str, str, str]:
    model_dir = Path(settings.model_dir).resolve()
    engine = str(getattr(settings, "inference_engine", "auto"))
    cache_dir = getattr(settings, "model_cache_dir", None)
    return (str(model_dir), engine, str(cache_dir))


def is_loaded(settings: Any) -> bool:
    """Whether :func:`get_classifier` already holds the model for ``settings``."""
    with _CACHE_LOCK:
        return _cache_key(settings) in _CACHE


def get_classifier(settings: Any) -> Classifier:
    """The process-wide classifier for ``settings`` (loaded lazily, once): the one model
    cache of every process (worker, web console, CLI)."""
    key = _cache_key(settings)
    model_dir, engine, cache_dir = Path(key[0]), key[1], getattr(settings, "model_cache_dir", None)
    with _CACHE_LOCK:
        clf = _CACHE.get(key)
        if clf is None:
            clf = Classifier.load(model_dir, engine=engine, cache_dir=cache_dir)  # type: ignore[arg-type]
            _CACHE[key] = clf
        return clf


def clear_classifier_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
