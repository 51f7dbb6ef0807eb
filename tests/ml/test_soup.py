"""Model soups of frozen-trunk runs (``cxr train --soup-of``) and the draw seed that makes
their ingredients (``--draw-seed``): the greedy recipe, the recomputed batch-norm
statistics, the refusals, and a soup made and finalised through the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from apps.cli import main
from ml.artifact import load_card
from ml.frozen import HeadData, epoch_draw
from ml.soup import (
    Ingredient,
    apply_mean,
    greedy_soup,
    load_ingredients,
    mean_weights,
    trunk_digest,
)

from .test_frozen import three_source_folder, tiny_frozen_args  # noqa: F401  # fixtures


def _dense_bn_model() -> tuple[object, object, object]:
    """(model, head, trunk layer): Dense trunk (frozen) -> Dense + BN head."""
    import keras

    keras.backend.clear_session()
    inp = keras.Input((3,))
    t = keras.layers.Dense(3, name="trunk")(inp)
    head_in = keras.Input((3,))
    h = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(2, name="fc")(head_in))
    head = keras.Model(head_in, h, name="head")
    model = keras.Model(inp, head(t))
    return model, head, model.get_layer("trunk")


def _set(head: object, value: float) -> None:
    fc = head.get_layer("fc")  # type: ignore[attr-defined]
    fc.kernel.assign(np.full((3, 2), value, np.float32))
    fc.bias.assign(np.full((2,), value, np.float32))


def test_epoch_draws_depend_on_the_draw_seed_and_the_epoch_only() -> None:
    train = HeadData(
        index=np.arange(100, 160),
        labels=np.asarray([0] * 30 + [1] * 30),
        sources=["a"] * 20 + ["b"] * 10 + ["c"] * 30,
    )
    _, p1, c1 = epoch_draw(train, 4, draw_seed=1, epoch=3)
    _, p1b, c1b = epoch_draw(train, 4, draw_seed=1, epoch=3)
    _, p2, c2 = epoch_draw(train, 4, draw_seed=2, epoch=3)
    _, p3, _ = epoch_draw(train, 4, draw_seed=1, epoch=4)
    np.testing.assert_array_equal(p1, p1b)  # what a resumed run draws again
    np.testing.assert_array_equal(c1, c1b)
    assert not np.array_equal(p1, p2) and not np.array_equal(p1, p3)
    assert not np.array_equal(c1, c2)
    assert set(np.unique(c1)) <= {0, 1, 2, 3}
    # source-balanced either way: the two COVID sources drawn alike
    drawn = [train.sources[i] for i in p2]
    assert abs(drawn.count("a") - drawn.count("b")) <= 1


def test_greedy_soup_keeps_what_lowers_the_validation_loss_and_recomputes_bn() -> None:
    model, head, _ = _dense_bn_model()
    bn = head.get_layer("bn")  # type: ignore[attr-defined]
    target = 1.0
    paths = []
    states = {}
    for name, value, bn_mean in (("good-", 0.5, 7.0), ("good+", 1.5, -7.0), ("far", 9.0, 3.0)):
        _set(head, value)
        bn.moving_mean.assign(np.full((2,), bn_mean, np.float32))
        states[name] = [np.asarray(v) for v in model.weights]  # type: ignore[attr-defined]
        paths.append(name)

    def ingredient(name: str) -> Ingredient:
        for v, s in zip(model.weights, states[name], strict=True):  # type: ignore[attr-defined]
            v.assign(s)
        fc = head.get_layer("fc")  # type: ignore[attr-defined]
        return Ingredient(
            name,
            [np.asarray(fc.kernel, np.float64), np.asarray(fc.bias, np.float64)]
            + [np.asarray(v, np.float64) for v in (bn.gamma, bn.beta)],
            [np.asarray(v) for v in model.weights],  # type: ignore[attr-defined]
        )

    ings = [ingredient(n) for n in reversed(paths)]  # not in validation-loss order
    np.testing.assert_allclose(mean_weights(ings[1:])[0], np.full((3, 2), 1.0))
    kernels = [np.full((3, 2), v, np.float32) for v in (0.5, 1.5, 9.0)]  # the ingredients
    x = np.random.default_rng(0).normal(2.0, 1.0, (64, 3)).astype(np.float32)

    def val_loss() -> float:
        """Distance of the fc weights to the best point (1.0); a mean whose BN statistics
        are not its own (recomputed before it is measured) loses by 100."""
        fc = head.get_layer("fc")  # type: ignore[attr-defined]
        k, b = np.asarray(fc.kernel), np.asarray(fc.bias)
        loss = float(np.mean((k - target) ** 2))
        if not any(np.allclose(k, kk) for kk in kernels):
            out = x @ k + b
            own = np.mean([out[:32].mean(0), out[32:].mean(0)], axis=0)
            if not np.allclose(np.asarray(bn.moving_mean), own, rtol=1e-4):
                loss += 100.0
        return loss

    calls = []

    def batches() -> list[np.ndarray]:
        calls.append(1)
        return [x[:32], x[32:]]

    lines: list[str] = []
    soup = greedy_soup(model, head, ings, val_loss, batches, log_fn=lines.append)
    assert soup.val_loss == {"good-": 0.25, "good+": 0.25, "far": 64.0}
    assert soup.order[2] == "far"
    assert sorted(soup.kept) == ["good+", "good-"]  # the far one would raise the loss
    assert [s["kept"] for s in soup.greedy_steps] == [True, False]
    assert soup.soup_val_loss == pytest.approx(0.0) and soup.uniform_val_loss > 0.0
    np.testing.assert_allclose(np.asarray(head.get_layer("fc").kernel), 1.0)  # type: ignore[attr-defined]
    # the soup's BN statistics are its own, recomputed on the batches: not any ingredient's
    fc_out = x @ np.full((3, 2), 1.0) + 1.0
    want = np.mean([fc_out[:32].mean(0), fc_out[32:].mean(0)], axis=0)
    np.testing.assert_allclose(np.asarray(bn.moving_mean), want, rtol=1e-4)
    assert calls  # the means were recomputed
    # a single ingredient is restored exactly as trained, its statistics included
    apply_mean(model, head, [ings[0]], batches)
    np.testing.assert_allclose(np.asarray(bn.moving_mean), 3.0)
    assert any("left out" in ln for ln in lines)
    # an ingredient whose validation loss is not finite takes no part
    lines.clear()
    fc = head.get_layer("fc")  # type: ignore[attr-defined]

    def nan_for_far() -> float:
        return float("nan") if np.allclose(np.asarray(fc.kernel), 9.0) else val_loss()

    soup = greedy_soup(model, head, ings, nan_for_far, batches, lines.append)
    assert "far" not in soup.order and sorted(soup.kept) == ["good+", "good-"]
    assert any("far left out: its validation loss is not finite" in ln for ln in lines)


def test_ingredients_with_another_frozen_trunk_are_refused(tmp_path: Path) -> None:
    model, head, trunk = _dense_bn_model()
    files = []
    for i in range(2):
        _set(head, float(i))
        trunk.kernel.assign(np.full((3, 3), float(i), np.float32))  # type: ignore[attr-defined]
        f = tmp_path / f"r{i}.weights.h5"
        model.save_weights(f)  # type: ignore[attr-defined]
        files.append((f"r{i}", f))
    with pytest.raises(ValueError, match="another frozen trunk"):
        load_ingredients(model, head, files)
    with pytest.raises(ValueError, match="at least two"):
        load_ingredients(model, head, files[:1])
    # both alike, but not the trunk the features come from (--init-from's)
    trunk.kernel.assign(np.full((3, 3), 5.0, np.float32))  # type: ignore[attr-defined]
    ref = trunk_digest(model, head)
    with pytest.raises(ValueError, match="another frozen trunk than --init-from"):
        load_ingredients(model, head, [files[0], ("r0b", files[0])], reference=ref)


def test_a_soup_of_two_draw_seeds_is_made_finalised_and_recorded(
    workdir: Path,
    tiny_frozen_args: Callable[..., list[str]],  # noqa: F811  # the imported fixture
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ml.runtime import Classifier

    runs, metas = [], []
    for seed in (1, 2):
        out = workdir / f"run{seed}"
        args = tiny_frozen_args(
            "--out", str(out), "--draw-seed", str(seed), "--epochs", "3", "--no-finalise",
            "--learning-rate", "0.01", "--patience", "10",
        )  # fmt: skip
        assert main(args) == 0
        assert json.loads((out / "config.json").read_text())["extra"]["draw_seed"] == seed
        runs.append(out)
        metas.append(json.loads((workdir / "features" / "meta.json").read_text()))
    # one feature cache serves both runs: the second run made no trunk pass
    assert metas[0] == metas[1]
    # the draw seed changed what the runs learnt, nothing else
    assert (runs[0] / "model.weights.h5").read_bytes() != (
        runs[1] / "model.weights.h5"
    ).read_bytes()
    assert metas[0]["key"]["seed"] == 42  # the cache keeps the recipe's seed
    capsys.readouterr()
    soup_dir = workdir / "model"
    soup_args = tiny_frozen_args("--soup-of", ",".join(str(r) for r in runs))
    assert main(soup_args) == 0
    text = capsys.readouterr().out
    assert "soup ingredient run1" in text and "uniform soup of 2" in text
    card = load_card(soup_dir)
    soup = card["training"]["soup"]
    assert soup["kept"][0] in ("run1", "run2") and set(soup["order"]) == {"run1", "run2"}
    assert soup["soup_val_loss"] <= min(soup["ingredient_val_loss"].values()) + 1e-9
    assert [r["draw_seed"] for r in soup["ingredients"]] == [1, 2]
    assert card["training"]["extra"]["soup_of"] == ["run1", "run2"]
    assert card["metrics"]["test"]["n"] > 0 and (soup_dir / "ood.npz").is_file()
    # the cost of a soup is the cost of its ingredients
    st = [json.loads((r / "train_state.json").read_text()) for r in runs]
    assert card["training_cost"]["head training (s)"] == pytest.approx(
        sum(s["train_seconds"] for s in st), abs=0.1
    )
    assert Classifier.load(soup_dir, engine="keras") is not None
    # made once: a second call loads the soup and finalises the same weights again
    before = (soup_dir / "model.weights.h5").read_bytes()
    capsys.readouterr()
    assert main(soup_args) == 0
    assert "already made: loaded" in capsys.readouterr().out
    assert (soup_dir / "model.weights.h5").read_bytes() == before


def _two_draw_seed_runs(args: Callable[..., list[str]], workdir: Path, *extra: str) -> list[Path]:
    """Two one-epoch runs of the tiny recipe, draw seeds 1 and 2, in WORKDIR/run1, run2."""
    runs = []
    for seed in (1, 2):
        out = workdir / f"run{seed}"
        assert main(args("--out", str(out), "--epochs", "1", "--draw-seed", str(seed), *extra)) == 0
        runs.append(out)
    return runs


def _refused(capsys: pytest.CaptureFixture[str], args: list[str], why: str) -> None:
    capsys.readouterr()
    assert main(args) == 2
    assert why in capsys.readouterr().err


def test_soups_refuse_ingredients_that_would_leak_or_do_not_fit(
    workdir: Path,
    tiny_frozen_args: Callable[..., list[str]],  # noqa: F811  # the imported fixture
    capsys: pytest.CaptureFixture[str],
) -> None:
    import shutil

    runs = _two_draw_seed_runs(tiny_frozen_args, workdir, "--no-finalise")
    joined = ",".join(map(str, runs))
    # runs that saw srcC cannot make a srcC cell, and a finished run cannot become one
    _refused(capsys, tiny_frozen_args("--soup-of", joined, "--leave-out", "srcC"),
             "trained with nothing left out, this soup with srcC")  # fmt: skip
    before = (runs[0] / "model.weights.h5").read_bytes()
    _refused(capsys, tiny_frozen_args("--out", str(runs[0]), "--leave-out", "srcC"),
             "holds a run trained with nothing left out; this run leaves srcC out")  # fmt: skip
    assert (runs[0] / "model.weights.h5").read_bytes() == before
    assert not (runs[0] / "cross_source_cell.json").exists()
    # only finished runs of the same recipe, each once, and not into one of them
    _refused(capsys, tiny_frozen_args("--soup-of", f"{runs[0]},{runs[0] / 'model.weights.h5'}"),
             "not a training run")  # fmt: skip
    _refused(capsys, tiny_frozen_args("--soup-of", f"{runs[0]},{runs[0]}"), "twice")
    _refused(capsys, tiny_frozen_args("--out", str(runs[0]), "--soup-of", joined),
             "is one of the soup's ingredients")  # fmt: skip
    other = workdir / "run2-dropout"
    shutil.copytree(runs[1], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["dropout"] = 0.9
    (other / "config.json").write_text(json.dumps(cfg))
    _refused(capsys, tiny_frozen_args("--soup-of", f"{runs[0]},{other}"), "dropout 0.9")
    # an --out that holds a training run, or another soup, is not overwritten
    _refused(capsys, tiny_frozen_args("--out", str(other), "--soup-of",
                                      f"{runs[0]},{workdir / 'nothing'}"),
             "holds another run than this soup")  # fmt: skip
    assert main(tiny_frozen_args("--soup-of", joined, "--no-finalise")) == 0
    copy = workdir / "run2-copy"
    shutil.copytree(runs[1], copy)
    _refused(capsys, tiny_frozen_args("--soup-of", f"{runs[0]},{copy}"),
             "holds another run than this soup")  # fmt: skip
    # runs in folders of one name are told apart by their paths
    same_name = workdir / "elsewhere" / runs[0].name
    shutil.copytree(runs[1], same_name)
    named = workdir / "named"
    assert main(tiny_frozen_args("--out", str(named), "--soup-of", f"{runs[0]},{same_name}",
                                 "--no-finalise")) == 0  # fmt: skip
    soup = json.loads((named / "train_state.json").read_text())["soup"]
    want = {str(runs[0].resolve()), str(same_name.resolve())}
    assert set(soup["order"]) == set(soup["ingredient_val_loss"]) == want
    # the soup and the draw seed are options of the frozen-trunk stage only
    full = tiny_frozen_args(
        "--out", str(workdir / "full"), "--soup-of", joined, "--trainable", "all"
    )
    _refused(capsys, full, "--soup-of is for --trainable conv5")


def test_a_soup_of_left_out_runs_measures_its_cell_and_refuses_mismatches(
    workdir: Path,
    tiny_frozen_args: Callable[..., list[str]],  # noqa: F811  # the imported fixture
    capsys: pytest.CaptureFixture[str],
) -> None:
    runs = [str(r) for r in _two_draw_seed_runs(tiny_frozen_args, workdir, "--leave-out", "srcC")]
    for r in runs:  # each run records the source it was trained without
        assert json.loads((Path(r) / "config.json").read_text())["extra"]["leave_out"] == "srcC"
    capsys.readouterr()
    joined = ",".join(runs)
    assert main(tiny_frozen_args("--soup-of", joined)) == 2
    err = capsys.readouterr().err
    assert "trained with srcC left out, this soup with nothing" in err
    assert not (workdir / "model" / "model.weights.h5").exists()
    assert main(tiny_frozen_args("--soup-of", joined, "--cross-source", "srcC")) == 2
    assert "a soup's arms are soups too" in capsys.readouterr().err
    assert main(tiny_frozen_args("--soup-of", joined, "--leave-out", "srcC")) == 0
    cell = json.loads((workdir / "model" / "cross_source_cell.json").read_text())
    assert cell["left_out"] == "srcC" and cell["n"] > 0
    assert "left out srcC: Normal recall" in capsys.readouterr().out
    assert not (workdir / "model" / "model_card.json").exists()  # a cell, not an artifact
