"""Training with a frozen trunk: conv1-conv4 fixed, conv5 + head trained on cached features.

Why: the 2-core build machine trains the whole DenseNet169 at a few images/s. With the
trunk frozen (``cxr train --trainable conv5``, the original study's freezing) its output
(``pool4``) does not depend on the trained weights, so it is computed **once** per image
and augmented copy and kept in a :class:`FeatureCache`; conv5 + the head then train on it
at tens of images/s. One cache serves every run that shares the trunk and preprocessing:
the shipped model and each cross-source arm.

The cache folder (outside the work tree, ``--cache-dir``) is resumable: the arrays are
memory-mapped ``.npy`` files filled batch by batch, with the count done in ``meta.json``.
Augmented copies are fixed per (seed, copy, image): an epoch draws, for each sampled
image, one of its copies at random (copy 0 is the plain image).

Training (:func:`train_head`) draws each epoch's images **source-balanced within each
class**: every class keeps its share of the epoch and, within a class, every source gets
the same number of draws, so a large source cannot teach the model what its class looks
like by its look alone. Checkpoints (weights, optimizer state, epoch, best val loss) are
written after every epoch, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ml.augment import augment_display
from ml.labels import CLASSES
from ml.preprocess import PreprocessConfig, display_to_model_grey, grey_to_input, load_display

log = logging.getLogger(__name__)

CUT_LAYER = "pool4_pool"  # DenseNet169: conv1-conv4 end here, conv5 begins
TINY_CUT_LAYER = "pool1"  # the tests' tiny backbone (ml.model._tiny_backbone)
META = "meta.json"


def cut_layer(model: Any) -> str:
    names = {layer.name for layer in model.layers}
    for name in (CUT_LAYER, TINY_CUT_LAYER):
        if name in names:
            return name
    raise ValueError(f"model {model.name} has no trunk cut layer ({CUT_LAYER})")


def split_model(model: Any) -> tuple[Any, Any, Any]:
    """(trunk: image -> pool4, head: pool4 -> logits, head_features: pool4 -> [relu, logits]).

    The head models share their layers (and so their weights) with ``model``."""
    import keras

    from ml.model import FEATURE_LAYER, LOGITS_LAYER

    cut = model.get_layer(cut_layer(model)).output
    trunk = keras.Model(model.input, cut, name="trunk")
    head = keras.Model(cut, model.get_layer(LOGITS_LAYER).output, name="head")
    head_feat = keras.Model(
        cut,
        [model.get_layer(FEATURE_LAYER).output, model.get_layer(LOGITS_LAYER).output],
        name="head_features",
    )
    return trunk, head, head_feat


# --------------------------------------------------------------------------- feature cache


@dataclass
class FeatureCache:
    """``copies`` arrays (N, h, w, C) float16 of trunk features for ``files``."""

    root: Path
    files: list[str]
    copies: int
    shape: tuple[int, ...]

    def array(self, copy: int, mode: Literal["r+", "r", "w+", "c"] = "r") -> np.ndarray:
        arr: np.ndarray = np.load(self.root / f"feats_{copy}.npy", mmap_mode=mode)
        return arr

    def load(self) -> list[np.ndarray]:
        """All copies in memory (float16)."""
        return [np.asarray(self.array(c)) for c in range(self.copies)]

    def index(self) -> dict[str, int]:
        return {f: i for i, f in enumerate(self.files)}


def _cache_key(
    files: Sequence[str], pcfg: PreprocessConfig, copies: int, seed: int, trunk_id: str
) -> dict[str, Any]:
    return {
        "files": list(files),
        "preprocessing": pcfg.to_dict(),
        "copies": copies,
        "seed": seed,
        "trunk": trunk_id,
        "cut": CUT_LAYER,  # the trunk's identity is its weights' sha256 (trunk_id)
    }


def build_feature_cache(
    root: str | Path,
    samples: Sequence[Any],
    pcfg: PreprocessConfig,
    trunk: Any,
    trunk_id: str,
    copies: int = 4,
    seed: int = 42,
    batch_size: int = 16,
    progress: Callable[[str], None] | None = None,
) -> FeatureCache:
    """Compute (or finish computing) the trunk features of ``samples``.

    ``copies``: 1 plain + ``copies - 1`` augmented (:func:`ml.augment.augment_display`).
    A cache made with other files, preprocessing, copies, seed or trunk is refused."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    files = [str(s.path) for s in samples]
    key = _cache_key(files, pcfg, copies, seed, trunk_id)
    meta_path = root / META
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta and meta.get("key") != key:
        raise ValueError(
            f"feature cache {root} was made for other data/preprocessing/trunk; "
            "remove it or give another --cache-dir"
        )
    s = pcfg.size
    out_shape = tuple(int(d) for d in trunk.compute_output_shape((1, s, s, 3))[1:])
    done: list[int] = meta.get("done", [0] * copies)
    seconds = float(meta.get("seconds", 0.0))
    meta = {"key": key, "shape": list(out_shape), "done": done, "seconds": seconds}
    n = len(files)
    t0 = time.monotonic()
    for c in range(copies):
        path = root / f"feats_{c}.npy"
        if not path.is_file():
            np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, *out_shape))
            done[c] = 0
        arr = np.load(path, mmap_mode="r+")
        while done[c] < n:
            lo, hi = done[c], min(n, done[c] + batch_size)
            xs = []
            for i in range(lo, hi):
                display = load_display(samples[i].path)
                if c > 0:
                    rng = np.random.default_rng([seed, c, i])
                    display = augment_display(display, rng)
                xs.append(grey_to_input(display_to_model_grey(display, pcfg)))
            feats = np.asarray(trunk(np.stack(xs), training=False))
            arr[lo:hi] = feats.astype(np.float16)
            arr.flush()
            done[c] = hi
            meta["done"] = done
            meta["seconds"] = seconds + time.monotonic() - t0
            write_json(meta_path, meta)
            if progress and (hi // batch_size) % 10 == 0:
                rate = (sum(done) - 0) / max(1e-9, time.monotonic() - t0)
                progress(f"features copy {c}: {hi}/{n} ({rate:.1f} img/s this run)")
        del arr
    return FeatureCache(root=root, files=files, copies=copies, shape=out_shape)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


# --------------------------------------------------------------------------- sampling


def source_balanced_indices(
    labels: Sequence[int] | np.ndarray,
    sources: Sequence[str],
    n: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """``n`` indices: each class keeps its share of the data; within a class every source
    is drawn equally often (with replacement for small sources)."""
    by_class: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, (y, src) in enumerate(zip(labels, sources, strict=True)):
        by_class[int(y)][src or "unknown"].append(i)
    total = len(labels)
    out: list[np.ndarray] = []
    for y in sorted(by_class):
        groups = by_class[y]
        n_class = round(n * sum(len(v) for v in groups.values()) / total)
        per_source = np.full(len(groups), n_class // len(groups))
        per_source[: n_class - int(per_source.sum())] += 1
        for (_, idx), k in zip(sorted(groups.items()), per_source, strict=True):
            out.append(rng.choice(np.asarray(idx), size=int(k), replace=len(idx) < k))
    res = np.concatenate(out) if out else np.zeros(0, np.int64)
    rng.shuffle(res)
    return res


# --------------------------------------------------------------------------- feature style mixing


def mix_feature_style(
    x: np.ndarray,
    sources: Sequence[str],
    rng: np.random.Generator,
    p: float = 0.5,
    alpha: float = 0.1,
    eps: float = 1e-6,
) -> np.ndarray:
    """MixStyle (Zhou et al. 2021) on cached trunk features ``x`` (N, h, w, C).

    Instance-level channel statistics (mean and standard deviation over h x w) carry much
    of an image's *style*: its scanner, contrast and processing, i.e. its source. With
    probability ``p`` a sample's statistics are replaced by a Beta(alpha, alpha) mix of its
    own and those of a partner **from another source** (any class), while its normalised
    content stays; samples whose batch has no other source are left alone. Returns a new
    array; ``x`` is not changed."""
    out = np.array(x, dtype=np.float32, copy=True)
    n = len(out)
    src = np.asarray([s or "unknown" for s in sources])
    chosen = np.flatnonzero(rng.random(n) < p)
    if not len(chosen):
        return out
    mu = out.mean(axis=(1, 2), keepdims=True)
    sig = np.sqrt(out.var(axis=(1, 2), keepdims=True) + eps)
    for i in chosen:
        others = np.flatnonzero(src != src[i])
        if not len(others):
            continue
        j = int(rng.choice(others))
        lam = float(rng.beta(alpha, alpha))
        mu_mix = lam * mu[i] + (1 - lam) * mu[j]
        sig_mix = lam * sig[i] + (1 - lam) * sig[j]
        out[i] = (out[i] - mu[i]) / sig[i] * sig_mix + mu_mix
    return out


# --------------------------------------------------------------------------- training


@dataclass
class HeadData:
    """Features of one split: ``feats[copy][i]`` for the split's sample ``i``."""

    index: np.ndarray  # rows into the cache arrays
    labels: np.ndarray
    sources: list[str]


def split_data(cache_index: dict[str, int], samples: Sequence[Any]) -> HeadData:
    return HeadData(
        index=np.asarray([cache_index[str(s.path)] for s in samples], np.int64),
        labels=np.asarray([CLASSES.index(s.label) for s in samples], np.int64),
        sources=[s.source for s in samples],
    )


def gather(feats: list[np.ndarray], rows: np.ndarray, copy: np.ndarray) -> np.ndarray:
    """The cached features of ``rows``, each from its cached ``copy`` (0: unaugmented)."""
    out = np.empty((len(rows), *feats[0].shape[1:]), np.float32)
    for c in np.unique(copy):
        m = copy == c
        out[m] = feats[int(c)][rows[m]]
    return out


def head_logits(head: Any, feats: np.ndarray, rows: np.ndarray, batch: int = 64) -> np.ndarray:
    out = [
        np.asarray(head(np.asarray(feats[rows[i : i + batch]], np.float32), training=False))
        for i in range(0, len(rows), batch)
    ]
    return np.concatenate(out) if out else np.zeros((0, len(CLASSES)), np.float32)


def head_pooled(head_feat: Any, feats: np.ndarray, rows: np.ndarray, batch: int = 64) -> np.ndarray:
    """Global-average-pooled last-conv features (N, C): what the OOD detector measures."""
    out = []
    for i in range(0, len(rows), batch):
        f, _ = head_feat(np.asarray(feats[rows[i : i + batch]], np.float32), training=False)
        out.append(np.asarray(f).mean(axis=(1, 2)))
    return np.concatenate(out)


def epoch_draw(
    train: HeadData, copies: int, draw_seed: int, epoch: int, balanced: bool = True
) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
    """Epoch ``epoch``'s (0-based) draw: (its generator, the training rows drawn, the cached
    copy of each). A function of (``draw_seed``, ``epoch``) alone, so a resumed run draws
    what the interrupted one would have, and runs that differ only in ``draw_seed`` (``cxr
    train --draw-seed``) see other orders and copies from the same feature cache (whose
    augmented copies are fixed by the recipe's ``seed``)."""
    rng = np.random.default_rng([draw_seed, epoch])
    n = len(train.index)
    pick = (
        source_balanced_indices(train.labels, train.sources, n, rng)
        if balanced
        else rng.permutation(n)
    )
    copy = rng.integers(0, copies, size=len(pick))
    return rng, pick, copy


def train_head(
    model: Any,
    feats: list[np.ndarray],
    train: HeadData,
    val: HeadData,
    out_dir: Path,
    cfg: Any,
    class_weight: dict[int, float] | None = None,
    log_fn: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Train conv5 + head of ``model`` (its trunk frozen) on cached features; resumable.

    ``cfg`` is the :class:`ml.train.TrainConfig` (epochs, batch size, learning rate,
    patience, focal loss, seed, ``extra.source_balanced``). Best weights (lowest val loss)
    of the whole model go to ``out_dir/model.weights.h5``. With ``extra.weight_average``
    = START (:mod:`ml.swa`) the candidates are the running means of the weights from epoch
    START on, and early stopping watches the mean's val loss."""
    import keras

    from ml.train import HISTORY_FILE, STATE_FILE, WEIGHTS_FILE, make_loss, one_hot

    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "checkpoint"
    ckpt.mkdir(exist_ok=True)
    state_path = out_dir / STATE_FILE
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state.get("completed"):
        model.load_weights(out_dir / WEIGHTS_FILE)  # the trained weights, not the init's
        return state
    _, head, _ = split_model(model)
    for layer in head.layers:
        layer.trainable = True
    opt = keras.optimizers.Adam(cfg.learning_rate)
    loss_fn = make_loss(cfg)
    head.compile(
        optimizer=opt,
        loss=loss_fn,
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    opt.build(head.trainable_variables)
    epoch = int(state.get("epochs_run", 0))
    best = float(state.get("best_val_loss", math.inf))
    since_best = int(state.get("epochs_since_best", 0))
    if epoch and (ckpt / "last.weights.h5").is_file():
        model.load_weights(ckpt / "last.weights.h5")
        saved = np.load(ckpt / "optimizer.npz")
        for i, v in enumerate(opt.variables):
            v.assign(saved[f"v{i}"])
        log_fn(f"resumed after epoch {epoch} (best val loss {best:.4f})")
    lam = float(cfg.extra.get("source_adversary", 0.0) or 0.0)
    adv = None
    if lam > 0:
        from ml.adversary import SourceAdversary, ramp, source_targets

        src_ids, src_mask, src_names = source_targets(train.labels, train.sources)
        adv = SourceAdversary(
            model, len(src_names), len(CLASSES), cfg.learning_rate, loss_fn, cut_layer(model)
        )
        if epoch and adv.load(ckpt):
            log_fn(f"source adversary resumed ({len(src_names)} sources)")
    wa = None
    swa_start = int(cfg.extra.get("weight_average", 0) or 0)
    if swa_start:
        from ml.swa import WeightAverage

        wa = WeightAverage(head, swa_start)
        if epoch and wa.load(ckpt):
            log_fn(f"weight average resumed ({wa.count} epochs averaged)")
    mix_p = float(cfg.extra.get("feature_mixstyle", 0.0) or 0.0)
    balanced = bool(cfg.extra.get("source_balanced", True))
    copies = len(feats)
    yv = one_hot(val.labels)
    xv = gather(feats, val.index, np.zeros(len(val.index), np.int64))
    t_start = time.monotonic()
    hist = out_dir / HISTORY_FILE
    draw_seed = int(cfg.extra.get("draw_seed", cfg.seed))
    while epoch < cfg.epochs and since_best < cfg.patience:
        rng, pick, copy = epoch_draw(train, copies, draw_seed, epoch, balanced)
        x = gather(feats, train.index[pick], copy)
        if mix_p:
            x = mix_feature_style(x, [train.sources[i] for i in pick], rng, p=mix_p)
        y = one_hot(train.labels[pick])
        sw = None
        if class_weight:
            sw = np.asarray([class_weight[int(c)] for c in train.labels[pick]], np.float32)
        t0 = time.monotonic()
        epoch_note = ""
        if adv is not None:
            r = adv.fit_epoch(
                x, y, sw, src_ids[pick], src_mask[pick], ramp(lam, epoch), cfg.batch_size
            )
            train_loss, train_acc = r["loss"], r["accuracy"]
            epoch_note = (
                f" adversary loss {r['adv_loss']:.3f} source acc "
                f"{r['adv_source_accuracy']:.3f} (lambda {ramp(lam, epoch):.2f})"
            )
        else:
            h = head.fit(
                x,
                y,
                sample_weight=sw,
                batch_size=cfg.batch_size,
                epochs=1,
                shuffle=False,
                verbose=0,
            )
            train_loss = float(h.history["loss"][-1])
            train_acc = float(h.history["accuracy"][-1])
        lv = head_logits(head, xv, np.arange(len(xv)))
        val_loss = float(np.mean(np.asarray(loss_fn(yv, lv))))
        val_acc = float(np.mean(np.argmax(lv, 1) == val.labels))
        epoch += 1
        raw: list[np.ndarray] | None = None
        if wa is not None and wa.update(epoch):
            # select on the averaged weights (BN statistics recomputed on this epoch's
            # draws); the raw weights go on training and into the checkpoint
            raw = wa.snapshot()
            wa.apply(x[i : i + cfg.batch_size] for i in range(0, len(x), cfg.batch_size))
            epoch_note += (
                f" (raw val_loss {val_loss:.4f} val_acc {val_acc:.3f}; mean of {wa.count})"
            )
            lv = head_logits(head, xv, np.arange(len(xv)))
            val_loss = float(np.mean(np.asarray(loss_fn(yv, lv))))
            val_acc = float(np.mean(np.argmax(lv, 1) == val.labels))
        selecting = wa is None or raw is not None  # before the average starts: no selection
        improved = selecting and val_loss < best
        if improved:
            best, since_best = val_loss, 0
            tmp = out_dir / "model.tmp.weights.h5"
            model.save_weights(tmp)
            tmp.replace(out_dir / WEIGHTS_FILE)
            state.update(best_val_loss=best, best_epoch=epoch, best_val_accuracy=val_acc)
            if wa is not None:
                state.update(averaged_epochs=wa.count, average_from_epoch=wa.start)
        elif selecting:
            since_best += 1
        if raw is not None and wa is not None:
            wa.restore(raw)
            wa.save(ckpt)
        model.save_weights(ckpt / "last.tmp.weights.h5")
        (ckpt / "last.tmp.weights.h5").replace(ckpt / "last.weights.h5")
        if adv is not None:
            adv.save(ckpt)
        with open(ckpt / "optimizer.tmp.npz", "wb") as fh:
            arrays: dict[str, Any] = {f"v{i}": np.asarray(v) for i, v in enumerate(opt.variables)}
            np.savez(fh, **arrays)
        (ckpt / "optimizer.tmp.npz").replace(ckpt / "optimizer.npz")
        new = not hist.is_file()
        with open(hist, "a") as fh:
            if new:
                fh.write("epoch,accuracy,loss,val_accuracy,val_loss\n")
            fh.write(f"{epoch - 1},{train_acc:.5f},{train_loss:.5f},{val_acc:.5f},{val_loss:.5f}\n")
        state.update(
            epochs_run=epoch,
            epochs_since_best=since_best,
            train_seconds=float(state.get("train_seconds", 0.0)) + time.monotonic() - t0,
        )
        write_json(state_path, state)
        log_fn(
            f"epoch {epoch}/{cfg.epochs}: loss {train_loss:.4f} val_loss {val_loss:.4f} "
            f"val_acc {val_acc:.3f} ({time.monotonic() - t0:.0f}s){' *' if improved else ''}"
            + epoch_note
        )
        if cfg.max_minutes and (time.monotonic() - t_start) > cfg.max_minutes * 60:
            state["stopped_by_time_limit"] = True
            break
    if not (out_dir / WEIGHTS_FILE).is_file():  # stopped before the average started
        log_fn(f"stopped before epoch {swa_start}: the last raw weights are kept")
        model.save_weights(out_dir / WEIGHTS_FILE)
    model.load_weights(out_dir / WEIGHTS_FILE)
    state["completed"] = True
    write_json(state_path, state)
    return state


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class LeaveOut:
    """A cross-source arm: ``source`` (optionally only its ``label`` images) left out."""

    source: str
    label: str | None = None

    @classmethod
    def parse(cls, text: str) -> LeaveOut:
        src, _, label = text.partition(":")
        if not src:
            raise ValueError(f"bad leave-out {text!r}: SOURCE or SOURCE:CLASS")
        if label and label not in CLASSES:
            raise ValueError(f"bad leave-out {text!r}: class must be one of {CLASSES}")
        return cls(src, label or None)

    @property
    def name(self) -> str:
        return self.source + (f"-{self.label}" if self.label else "")

    def matches(self, s: Any) -> bool:
        return bool(s.source == self.source and (self.label is None or s.label == self.label))


def apply_leave_out(
    splits: dict[str, list[Any]], samples: Sequence[Any], leave: LeaveOut | None
) -> tuple[dict[str, list[Any]], list[Any]]:
    """(splits without the left-out images and anything sharing a group with them,
    the left-out images: the arm's test set, from every split)."""
    if leave is None:
        return splits, []
    held = [s for s in samples if leave.matches(s)]
    groups = {s.group for s in held if s.group}
    keep = {
        k: [s for s in v if not leave.matches(s) and not (s.group and s.group in groups)]
        for k, v in splits.items()
    }
    return keep, held


def trunk_id(init_from: str | Path) -> str:
    from ml.artifact import sha256_file

    return sha256_file(init_from)


def prepare_features(
    cfg: Any, samples: Sequence[Any], cache_dir: Path, log_fn: Callable[[str], None] = log.info
) -> tuple[Any, list[np.ndarray], dict[str, int]]:
    """(the model of ``cfg`` with its ``--init-from`` weights, the cached trunk features of
    ``samples`` (built or finished here), the cache's row of each file)."""
    from ml.model import build_model
    from ml.train import TrainConfig

    assert isinstance(cfg, TrainConfig)
    if not cfg.init_from:
        raise ValueError("--trainable conv5 needs --init-from WEIGHTS (the frozen trunk)")
    pcfg = PreprocessConfig(
        size=cfg.image_size,
        equalization=cfg.equalization,  # type: ignore[arg-type]
        square_policy=cfg.extra.get("square_policy", "trim-crop"),
    )
    model = build_model(
        cfg.image_size,
        head=cfg.head,
        dropout=cfg.dropout,
        backbone=cfg.backbone,
    )
    model.load_weights(cfg.init_from)
    trunk, _, _ = split_model(model)
    cache = build_feature_cache(
        cache_dir,
        samples,
        pcfg,
        trunk,
        trunk_id(cfg.init_from),
        copies=int(cfg.extra.get("aug_copies", 3)) + 1,
        seed=cfg.seed,
        progress=log_fn,
    )
    return model, cache.load(), cache.index()


def fit_ood(
    out: Path,
    model: Any,
    feats: list[np.ndarray],
    idx: dict[str, int],
    train_samples: Sequence[Any],
    log_fn: Callable[[str], None] = log.info,
) -> None:
    """Fit the OOD detector on the training images through the weights now in ``model``
    (always refitted: a detector left from an earlier, interrupted run would describe other
    weights)."""
    from ml.ood import OOD_FILE, MahalanobisOOD

    _, _, head_feat = split_model(model)
    tr = split_data(idx, train_samples)
    pooled = head_pooled(head_feat, feats[0], tr.index)
    MahalanobisOOD.fit(pooled, tr.labels).save(out / OOD_FILE)
    log_fn(f"OOD detector fitted on {len(pooled)} training images -> {OOD_FILE}")


def trained_left_out(out: Path) -> str | None:
    """The source a run in ``out`` was trained without (``extra.leave_out`` of its
    config.json; runs made before that key read their ``cross_source_cell.json``)."""
    saved = out / "config.json"
    extra = (json.loads(saved.read_text()).get("extra") or {}) if saved.is_file() else {}
    if "leave_out" in extra:
        return str(extra["leave_out"]) if extra["leave_out"] else None
    cell = out / "cross_source_cell.json"
    return json.loads(cell.read_text()).get("left_out") if cell.is_file() else None


def run_config(cfg: Any, out: Path, leave: LeaveOut | None) -> Any:
    """``cfg`` as the run in ``out`` records it: with the source it leaves out. Refused when
    ``out`` already holds a run trained with another source left out (its weights would be
    measured on images they were trained on, or the other way round)."""
    from ml.train import STATE_FILE

    want = leave.name if leave is not None else None
    if (out / STATE_FILE).is_file():
        had = trained_left_out(out)
        if had != want:
            raise ValueError(
                f"{out} holds a run trained with {had or 'nothing'} left out; this run leaves "
                f"{want or 'nothing'} out: give it another --out"
            )
    extra = {k: v for k, v in cfg.extra.items() if k != "leave_out"}
    if want is not None:
        extra["leave_out"] = want
    return dataclasses.replace(cfg, extra=extra)


def run_training(
    cfg: Any,
    out: Path,
    samples: Sequence[Any],
    splits: dict[str, list[Any]],
    cache_dir: Path,
    leave: LeaveOut | None = None,
    class_weight: dict[int, float] | None = None,
    log_fn: Callable[[str], None] = log.info,
) -> tuple[dict[str, Any], Any]:
    """Feature cache (shared) + conv5/head training (+ the OOD detector) into ``out``."""
    run_cfg = run_config(cfg, out, leave)  # before the cache: a refusal costs nothing
    model, feats, idx = prepare_features(cfg, samples, cache_dir, log_fn)
    kept, _ = apply_leave_out(splits, samples, leave)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(run_cfg.to_json())
    state = train_head(
        model,
        feats,
        split_data(idx, kept["train"]),
        split_data(idx, kept["val"]),
        out,
        cfg,
        class_weight=class_weight,
        log_fn=log_fn,
    )
    fit_ood(out, model, feats, idx, kept["train"], log_fn)
    return state, (model, feats, idx, split_model(model)[2])


def arm_cell(
    model: Any, feats: list[np.ndarray], idx: dict[str, int], held: Sequence[Any], leave: LeaveOut
) -> dict[str, Any]:
    """The left-out source's images through an arm's model: recall of their class."""
    _, head, _ = split_model(model)
    data = split_data(idx, held)
    logits = head_logits(head, feats[0], data.index)
    preds = np.argmax(logits, 1)
    labels = sorted({s.label for s in held})
    cell: dict[str, Any] = {
        "left_out": leave.name,
        "n": len(held),
        "accuracy": float(np.mean(preds == data.labels)) if len(held) else None,
        "predicted": {c: int((preds == i).sum()) for i, c in enumerate(CLASSES)},
        "recall": {
            c: float(np.mean(preds[data.labels == CLASSES.index(c)] == CLASSES.index(c)))
            for c in labels
        },
    }
    cell["metric"] = f"{labels[0]} recall" if len(labels) == 1 else "accuracy"
    cell["value"] = cell["recall"][labels[0]] if len(labels) == 1 else cell["accuracy"]
    return cell
