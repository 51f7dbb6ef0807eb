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
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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


def load_ingredients(model: Any, head: Any, paths: Sequence[tuple[str, Path]]) -> list[Ingredient]:
    """Each weights file into ``model`` in turn; refused when the frozen trunks differ."""
    if len(paths) < 2:
        raise ValueError("a soup needs at least two ingredients")
    averaged, trunk = soup_variables(model, head)
    out: list[Ingredient] = []
    first_trunk: str | None = None
    for name, path in paths:
        model.load_weights(path)
        digest = _digest(trunk)
        if first_trunk is None:
            first_trunk = digest
        elif digest != first_trunk:
            raise ValueError(
                f"ingredient {name} has another frozen trunk than {out[0].name}: a soup "
                "averages runs over one trunk (the same --init-from)"
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
    ranked = sorted(ingredients, key=lambda i: i.val_loss)
    soup = Soup(
        order=[i.name for i in ranked],
        kept=[ranked[0].name],
        val_loss={i.name: i.val_loss for i in ingredients},
    )
    apply_mean(model, head, ingredients, batches)
    soup.uniform_val_loss = val_loss()
    log_fn(f"uniform soup of {len(ingredients)}: val loss {soup.uniform_val_loss:.4f}")
    kept = [ranked[0]]
    best = ranked[0].val_loss
    for ing in ranked[1:]:
        apply_mean(model, head, [*kept, ing], batches)
        loss = val_loss()
        take = loss <= best
        soup.greedy_steps.append({"add": ing.name, "val_loss": loss, "kept": take})
        log_fn(f"greedy soup + {ing.name}: val loss {loss:.4f} ({'kept' if take else 'left out'})")
        if take:
            kept.append(ing)
            best = loss
    soup.kept = [i.name for i in kept]
    apply_mean(model, head, kept, batches)
    soup.soup_val_loss = val_loss()
    return soup


def ingredient_path(folder: Path) -> Path:
    """The best weights of a finished run (``cxr train`` OUT) or a weights file itself."""
    if folder.is_file():
        return folder
    from ml.train import STATE_FILE, WEIGHTS_FILE

    path = folder / WEIGHTS_FILE
    state = folder / STATE_FILE
    if not path.is_file():
        raise ValueError(f"soup ingredient {folder}: no {WEIGHTS_FILE} (not a training run)")
    if state.is_file() and not json.loads(state.read_text()).get("completed"):
        raise ValueError(f"soup ingredient {folder}: its training has not completed")
    return path


def _left_out(folder: Path) -> str | None:
    cell = folder / "cross_source_cell.json"
    return json.loads(cell.read_text()).get("left_out") if cell.is_file() else None


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
        head_logits,
        prepare_features,
        split_data,
        split_model,
    )
    from ml.train import STATE_FILE, WEIGHTS_FILE, make_loss, one_hot

    want = leave.name if leave is not None else None
    for f in folders:
        if f.is_dir() and _left_out(f) != want:
            raise ValueError(
                f"soup ingredient {f} was trained with {_left_out(f) or 'nothing'} left out, "
                f"this soup with {want or 'nothing'}"
            )
    model, feats, idx = prepare_features(cfg, samples, cache_dir, log_fn)
    kept_splits, _ = apply_leave_out(splits, samples, leave)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state.get("completed"):
        model.load_weights(out / WEIGHTS_FILE)
        log_fn(f"soup in {out} already made: loaded")
        return state, (model, feats, idx, split_model(model)[2])
    t0 = time.monotonic()
    _, head, _ = split_model(model)
    names = [f.name if f.is_dir() else str(f) for f in folders]
    ingredients = load_ingredients(
        model, head, [(n, ingredient_path(f)) for n, f in zip(names, folders, strict=True)]
    )
    train = split_data(idx, kept_splits["train"])
    val = split_data(idx, kept_splits["val"])
    loss_fn = make_loss(cfg)
    yv = one_hot(val.labels)
    xv = np.asarray(feats[0][val.index], np.float32)
    _, pick, copy = epoch_draw(
        train,
        len(feats),
        int(cfg.extra.get("draw_seed", cfg.seed)),
        0,
        bool(cfg.extra.get("source_balanced", True)),
    )
    rows = train.index[pick]

    def batches() -> Iterable[np.ndarray]:  # one source-balanced epoch of training features
        for i in range(0, len(rows), cfg.batch_size):
            sl = slice(i, i + cfg.batch_size)
            yield np.stack([feats[int(c)][r] for r, c in zip(rows[sl], copy[sl], strict=True)])

    def val_loss() -> float:
        return float(np.mean(np.asarray(loss_fn(yv, head_logits(head, xv, np.arange(len(xv)))))))

    soup = greedy_soup(model, head, ingredients, val_loss, batches, log_fn)
    tmp = out / "model.tmp.weights.h5"
    model.save_weights(tmp)
    tmp.replace(out / WEIGHTS_FILE)
    cfg.extra["soup_of"] = names
    (out / "config.json").write_text(cfg.to_json())
    runs = []
    for n, f in zip(names, folders, strict=True):
        st = json.loads((f / STATE_FILE).read_text()) if (f / STATE_FILE).is_file() else {}
        c = json.loads((f / "config.json").read_text()) if (f / "config.json").is_file() else {}
        runs.append(
            {
                "name": n,
                "draw_seed": (c.get("extra") or {}).get("draw_seed", c.get("seed")),
                "best_epoch": st.get("best_epoch"),
                "epochs_run": st.get("epochs_run"),
                "train_seconds": st.get("train_seconds"),
            }
        )
    state = {
        "completed": True,
        "soup": {**soup.to_dict(), "ingredients": runs},
        "best_val_loss": soup.soup_val_loss,
        "epochs_run": sum(int(r["epochs_run"] or 0) for r in runs),
        "train_seconds": sum(float(r["train_seconds"] or 0.0) for r in runs),
        "soup_seconds": time.monotonic() - t0,
    }
    state_path.write_text(json.dumps(state, indent=2))
    fit_ood(out, model, feats, idx, kept_splits["train"], log_fn)
    return state, (model, feats, idx, split_model(model)[2])
