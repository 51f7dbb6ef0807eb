"""Model soups for the frozen-trunk head (``cxr train --soup-of DIR,DIR,...``).

Why: runs of one recipe that differ only in the order of their draws (``--draw-seed``)
end in different places: the shipped recipe rerun moved its worst cross-source cell by 3
of 69 images, more than the targets it misses by one. Averaging the *weights* of such
runs (a model soup, Wortsman et al. 2022) gives one model of the same size and inference
cost whose accuracy and robustness under distribution shift are usually at least those of
its best ingredient; an ensemble of outputs would cost one model per member at serving.
It works when the ingredients were fine-tuned from the same weights and stay in one basin
of the loss, as here: every run starts from the same conv5 + head (``--init-from``) over
the same frozen trunk.

:func:`greedy_soup` is the paper's greedy recipe: the ingredients sorted by their own
validation loss, each added to the mean only if the validation loss of the mean does not
rise. Every candidate mean gets its batch-normalisation statistics recomputed
(:func:`ml.swa.recompute_batchnorm`), since averaged weights do not fit any ingredient's
statistics. Selection uses the validation split only.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml.artifact import sha256_file
from ml.swa import recompute_batchnorm


def soup_variables(model: Any, head: Any) -> tuple[list[Any], list[Any]]:
    """(the variables that are averaged: conv5 + head's trainable weights, the frozen
    trunk's weights: must be the same in every ingredient)."""
    for layer in head.layers:
        layer.trainable = True
    averaged = list(head.trainable_variables)
    ids = {id(v) for v in head.weights}
    trunk = [v for v in model.weights if id(v) not in ids]
    return averaged, trunk


def _digest(arrays: Iterable[Any]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    return h.hexdigest()


@dataclass
class Ingredient:
    name: str
    weights: list[np.ndarray]  # the averaged variables, in soup_variables order
    state: list[np.ndarray]  # every weight of the model as trained (BN statistics too)
    val_loss: float = float("nan")


@dataclass
class Soup:
    """What :func:`greedy_soup` decided, for the train state and the card."""

    order: list[str]
    kept: list[str]
    val_loss: dict[str, float] = field(default_factory=dict)  # each ingredient alone
    greedy_steps: list[dict[str, Any]] = field(default_factory=list)
    uniform_val_loss: float = float("nan")
    soup_val_loss: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "greedy model soup (Wortsman et al. 2022) on validation loss",
            "order": self.order,
            "kept": self.kept,
            "ingredient_val_loss": self.val_loss,
            "greedy_steps": self.greedy_steps,
            "uniform_val_loss": self.uniform_val_loss,
            "soup_val_loss": self.soup_val_loss,
        }


def trunk_digest(model: Any, head: Any) -> str:
    """A digest of the frozen trunk's weights now in ``model``."""
    return _digest(soup_variables(model, head)[1])


def load_ingredients(
    model: Any, head: Any, paths: Sequence[tuple[str, Path]], reference: str | None = None
) -> list[Ingredient]:
    """Each weights file into ``model`` in turn; refused when a frozen trunk differs from
    ``reference`` (the trunk the cached features come from; default: the first file's)."""
    if len(paths) < 2:
        raise ValueError("a soup needs at least two ingredients")
    averaged, trunk = soup_variables(model, head)
    out: list[Ingredient] = []
    for name, path in paths:
        model.load_weights(path)
        digest = _digest(trunk)
        if reference is None:
            reference = digest
        elif digest != reference:
            raise ValueError(
                f"ingredient {name} has another frozen trunk than "
                f"{'--init-from' if not out else out[0].name}: a soup averages runs over the "
                "trunk its features come from (the same --init-from)"
            )
        out.append(
            Ingredient(
                name=name,
                weights=[np.asarray(v, np.float64) for v in averaged],
                state=[np.asarray(v) for v in model.weights],
            )
        )
    return out


def mean_weights(ingredients: Sequence[Ingredient]) -> list[np.ndarray]:
    return [
        np.mean(np.stack(ws), axis=0) for ws in zip(*(i.weights for i in ingredients), strict=True)
    ]


def apply_mean(
    model: Any,
    head: Any,
    ingredients: Sequence[Ingredient],
    batches: Callable[[], Iterable[np.ndarray]],
) -> None:
    """Put the mean of ``ingredients`` into ``model`` and recompute the BN statistics of
    the averaged part on ``batches()``; a single ingredient is restored as it was trained."""
    if len(ingredients) == 1:
        for v, s in zip(model.weights, ingredients[0].state, strict=True):
            v.assign(s)
        return
    averaged, _ = soup_variables(model, head)
    for v, m in zip(averaged, mean_weights(ingredients), strict=True):
        v.assign(m.astype(np.float32))
    recompute_batchnorm(head, batches())


def greedy_soup(
    model: Any,
    head: Any,
    ingredients: list[Ingredient],
    val_loss: Callable[[], float],
    batches: Callable[[], Iterable[np.ndarray]],
    log_fn: Callable[[str], None] = print,
) -> Soup:
    """Greedy soup of ``ingredients`` into ``model`` (left holding the soup).

    ``val_loss()``: the validation loss of the weights now in ``model``; ``batches()``: the
    training feature batches on which a mean's BN statistics are recomputed."""
    for ing in ingredients:
        apply_mean(model, head, [ing], batches)
        ing.val_loss = val_loss()
        log_fn(f"soup ingredient {ing.name}: val loss {ing.val_loss:.4f}")
    finite = [i for i in ingredients if math.isfinite(i.val_loss)]
    for ing in ingredients:
        if ing not in finite:
            log_fn(f"soup ingredient {ing.name} left out: its validation loss is not finite")
    if not finite:
        raise ValueError("no soup ingredient has a finite validation loss")
    ranked = sorted(finite, key=lambda i: i.val_loss)
    soup = Soup(
        order=[i.name for i in ranked],
        kept=[ranked[0].name],
        val_loss={i.name: i.val_loss for i in ingredients},
    )
    apply_mean(model, head, finite, batches)
    soup.uniform_val_loss = val_loss()
    log_fn(f"uniform soup of {len(finite)}: val loss {soup.uniform_val_loss:.4f}")
    kept = [ranked[0]]
    best = ranked[0].val_loss
    best_state = ranked[0].state
    for ing in ranked[1:]:
        apply_mean(model, head, [*kept, ing], batches)
        loss = val_loss()
        take = loss <= best
        soup.greedy_steps.append({"add": ing.name, "val_loss": loss, "kept": take})
        log_fn(f"greedy soup + {ing.name}: val loss {loss:.4f} ({'kept' if take else 'left out'})")
        if take:
            kept.append(ing)
            best = loss
            best_state = [np.asarray(v) for v in model.weights]
    soup.kept = [i.name for i in kept]
    for v, w in zip(model.weights, best_state, strict=True):
        v.assign(w)
    soup.soup_val_loss = best
    return soup


# what makes two runs one model over the same inputs (the rest may differ: epochs, rate...)
RECIPE_FIELDS = ("backbone", "image_size", "equalization", "head", "dropout", "trainable")
RECIPE_EXTRA = ("square_policy", "aug_copies", "stage")


def ingredient_path(folder: Path, cfg: Any, leave_out: str | None) -> Path:
    """The best weights of a finished ``cxr train`` run in ``folder``; refused unless it
    has completed, is of ``cfg``'s recipe and was trained with ``leave_out`` left out."""
    from ml.frozen import trained_left_out
    from ml.train import STATE_FILE, WEIGHTS_FILE

    path, state, config = folder / WEIGHTS_FILE, folder / STATE_FILE, folder / "config.json"
    if not folder.is_dir() or not path.is_file() or not config.is_file():
        raise ValueError(
            f"soup ingredient {folder}: not a training run (a cxr train --out folder with "
            f"{WEIGHTS_FILE} and config.json)"
        )
    if not state.is_file() or not json.loads(state.read_text()).get("completed"):
        raise ValueError(f"soup ingredient {folder}: its training has not completed")
    had = trained_left_out(folder)
    if had != leave_out:
        raise ValueError(
            f"soup ingredient {folder} was trained with {had or 'nothing'} left out, "
            f"this soup with {leave_out or 'nothing'}"
        )
    theirs = json.loads(config.read_text())
    mine = json.loads(cfg.to_json())
    for key in RECIPE_FIELDS:
        if theirs.get(key) != mine.get(key):
            raise ValueError(
                f"soup ingredient {folder}: {key} {theirs.get(key)!r}, this soup {mine.get(key)!r}"
            )
    for key in RECIPE_EXTRA:
        a, b = (theirs.get("extra") or {}).get(key), (mine.get("extra") or {}).get(key)
        if a != b:
            raise ValueError(f"soup ingredient {folder}: {key} {a!r}, this soup {b!r}")
    return path


def run_soup(
    cfg: Any,
    out: Path,
    samples: Sequence[Any],
    splits: dict[str, list[Any]],
    cache_dir: Path,
    folders: Sequence[Path],
    leave: Any = None,
    log_fn: Callable[[str], None] = print,
) -> tuple[dict[str, Any], Any]:
    """The greedy soup of the runs in ``folders`` (same recipe and frozen trunk, trained
    with the same ``leave`` out) into ``out``, with its OOD detector; the same return as
    :func:`ml.frozen.run_training`. A finished soup in ``out`` is loaded, not remade."""
    from ml.frozen import (
        apply_leave_out,
        epoch_draw,
        fit_ood,
        gather,
        head_logits,
        prepare_features,
        run_config,
        split_data,
        split_model,
        write_json,
    )
    from ml.train import STATE_FILE, WEIGHTS_FILE, make_loss, one_hot

    want = leave.name if leave is not None else None
    resolved = [str(f.resolve()) for f in folders]
    if len(set(resolved)) != len(resolved):
        raise ValueError("--soup-of names an ingredient twice")
    if str(out.resolve()) in resolved:
        raise ValueError(f"--out {out} is one of the soup's ingredients")
    if len(folders) < 2:
        raise ValueError("a soup needs at least two ingredients")
    state_path = out / STATE_FILE
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state:
        made = [r.get("path") for r in (state.get("soup") or {}).get("ingredients", [])]
        if sorted(map(str, made)) != sorted(resolved) or not state.get("completed"):
            raise ValueError(
                f"{out} holds another run than this soup (of {', '.join(resolved)}): "
                "give the soup another --out"
            )
    # the checks first: the feature cache may take long to build
    paths = [ingredient_path(f, cfg, want) for f in folders]
    run_cfg = run_config(cfg, out, leave)
    model, feats, idx = prepare_features(cfg, samples, cache_dir, log_fn)
    kept_splits, _ = apply_leave_out(splits, samples, leave)
    if state:
        model.load_weights(out / WEIGHTS_FILE)
        log_fn(f"soup in {out} already made: loaded")
        return state, (model, feats, idx, split_model(model)[2])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    _, head, _ = split_model(model)
    reference = trunk_digest(model, head)  # the trunk of --init-from: the features' own
    names = [f.name for f in folders]
    if len(set(names)) != len(names):  # runs in folders of one name: named by their paths
        names = resolved
    ingredients = load_ingredients(
        model, head, list(zip(names, paths, strict=True)), reference=reference
    )
    train = split_data(idx, kept_splits["train"])
    val = split_data(idx, kept_splits["val"])
    loss_fn = make_loss(cfg)
    yv = one_hot(val.labels)
    xv = gather(feats, val.index, np.zeros(len(val.index), np.int64))
    _, pick, copy = epoch_draw(
        train,
        len(feats),
        int(cfg.extra.get("draw_seed", cfg.seed)),
        0,
        bool(cfg.extra.get("source_balanced", True)),
    )
    x = gather(feats, train.index[pick], copy)  # one source-balanced epoch, as in training

    def batches() -> Iterable[np.ndarray]:
        return (x[i : i + cfg.batch_size] for i in range(0, len(x), cfg.batch_size))

    def val_loss() -> float:
        return float(np.mean(np.asarray(loss_fn(yv, head_logits(head, xv, np.arange(len(xv)))))))

    soup = greedy_soup(model, head, ingredients, val_loss, batches, log_fn)
    runs = []
    for n, f, r, w in zip(names, folders, resolved, paths, strict=True):
        st = json.loads((f / STATE_FILE).read_text())
        c = json.loads((f / "config.json").read_text())
        own = st.get("best_val_loss")
        if own is not None and abs(float(own) - soup.val_loss[n]) > 1e-3:
            log_fn(
                f"soup ingredient {n}: val loss {soup.val_loss[n]:.4f} here, {float(own):.4f} "
                "when it was trained (another feature cache?)"
            )
        runs.append(
            {
                "name": n,
                "path": r,
                "weights_sha256": sha256_file(w),
                "draw_seed": (c.get("extra") or {}).get("draw_seed", c.get("seed")),
                "best_epoch": st.get("best_epoch"),
                "epochs_run": st.get("epochs_run"),
                "train_seconds": st.get("train_seconds"),
                "best_val_loss": own,
            }
        )
    tmp = out / "model.tmp.weights.h5"
    model.save_weights(tmp)
    tmp.replace(out / WEIGHTS_FILE)
    cfg.extra["soup_of"] = run_cfg.extra["soup_of"] = names  # the card is made from cfg
    (out / "config.json").write_text(run_cfg.to_json())
    fit_ood(out, model, feats, idx, kept_splits["train"], log_fn)
    state = {
        "completed": True,
        "soup": {**soup.to_dict(), "ingredients": runs},
        "best_val_loss": soup.soup_val_loss,
        "epochs_run": sum(int(r["epochs_run"] or 0) for r in runs),
        "train_seconds": sum(float(r["train_seconds"] or 0.0) for r in runs),
        "soup_seconds": time.monotonic() - t0,
    }
    write_json(state_path, state)  # last: a soup killed before this is made again
    return state, (model, feats, idx, split_model(model)[2])
