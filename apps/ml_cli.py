"""``cxr train | evaluate | predict | export-onnx``.

Heavy imports (TensorFlow/Keras) happen inside the handlers, so ``cxr --help`` and the
other subcommands stay fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DISCLAIMER = "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE"


def register(subparsers: argparse._SubParsersAction, name: str) -> None:  # type: ignore[type-arg]
    {
        "train": _register_train,
        "evaluate": _register_evaluate,
        "predict": _register_predict,
        "export-onnx": _register_export,
    }[name](subparsers, name)


def _friendly(fn: Any) -> Any:
    """Expected failures (bad artifact, missing folder) -> one line on stderr, exit 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        from ml.artifact import ArtifactError

        try:
            return int(fn(args))
        except (ArtifactError, FileNotFoundError, ValueError) as exc:
            print(f"cxr {getattr(args, 'command', '')}: {exc}", file=sys.stderr)
            return 2

    return wrapper


def _setup_logging(verbose: bool = False) -> None:
    try:
        from cxr.logconfig import configure_logging

        configure_logging("DEBUG" if verbose else "INFO", False)
    except Exception:  # pragma: no cover - logging must not stop the CLI
        logging.basicConfig(level=logging.INFO)


def _default_model_dir() -> Path:
    from cxr.settings import get_settings

    return Path(get_settings().model_dir)


def _settings_engine_cache() -> tuple[str, Path]:
    from cxr.settings import get_settings

    s = get_settings()
    return str(s.inference_engine), Path(s.model_cache_dir)


# --------------------------------------------------------------------------- train


def _register_train(sub: argparse._SubParsersAction, name: str) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        name,
        help="train a model (resumable) and write the model artifact",
        description=(
            "Train the classifier on a folder of class subfolders (COVID/Normal/Other or the "
            "Kaggle layout), resuming from OUT's last checkpoint after an interruption; then "
            "fit the temperature on the validation split, evaluate on the test split and "
            f"write the model artifact (weights + model card). {DISCLAIMER}."
        ),
    )
    p.add_argument("--data", required=True, type=Path, help="labelled image folder")
    p.add_argument("--out", required=True, type=Path, help="model/artifact folder")
    p.add_argument("--manifest", type=Path, help="manifest CSV (default DATA/manifest.csv)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default 256)")
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default 60)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 16)")
    p.add_argument(
        "--weights", default=None, help="backbone init: none (scratch), imagenet or a file"
    )
    p.add_argument("--loss", choices=("focal", "ce"), default=None, help="default focal")
    p.add_argument(
        "--class-weights",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="balanced class weights",
    )
    p.add_argument("--head", choices=("gap", "study"), default=None, help="default gap")
    p.add_argument(
        "--trainable",
        choices=("all", "conv5"),
        default=None,
        help="train everything or only conv5 + head (the study's freezing)",
    )
    p.add_argument("--equalization", choices=("hist", "clahe", "none"), default=None)
    p.add_argument(
        "--square-policy",
        choices=("trim-crop", "lung-box", "pad"),
        default=None,
        help="region the model sees (ml/preprocess.py; default trim-crop)",
    )
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--patience", type=int, default=None, help="early-stopping patience")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget")
    p.add_argument(
        "--backbone", choices=("densenet169", "tiny"), default=None, help=argparse.SUPPRESS
    )
    p.add_argument("--no-augment", action="store_true", help="disable augmentation")
    p.add_argument(
        "--init-from",
        default=None,
        help="whole-model weights to start from; with --trainable conv5 their conv1-conv4 "
        "are the frozen trunk whose features are cached (see ml/frozen.py)",
    )
    p.add_argument(
        "--aug-copies",
        type=int,
        default=None,
        help="--trainable conv5: augmented copies per image in the feature cache (default 3)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="--trainable conv5: feature cache folder, shared by runs (default OUT/features)",
    )
    p.add_argument(
        "--source-balanced",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--trainable conv5: draw every source of a class equally often (default on)",
    )
    p.add_argument(
        "--source-adversary",
        type=float,
        default=None,
        metavar="LAMBDA",
        help="--trainable conv5: weight of a class-conditional source adversary (gradient "
        "reversal on the pooled features, ml/adversary.py); 0 = off (default)",
    )
    p.add_argument(
        "--weight-average",
        type=int,
        default=None,
        metavar="START",
        help="--trainable conv5: from epoch START on, keep the running mean of the weights "
        "and select on it (stochastic weight averaging, ml/swa.py); 0 = off (default)",
    )
    p.add_argument(
        "--feature-mixstyle",
        type=float,
        default=None,
        metavar="P",
        help="--trainable conv5: with probability P mix each training sample's channel "
        "statistics with those of another source's sample (MixStyle on the cached "
        "features, ml/frozen.py); 0 = off (default)",
    )
    p.add_argument(
        "--draw-seed",
        type=int,
        default=None,
        metavar="N",
        help="--trainable conv5: seed of the epochs' draws (order and augmented copy); "
        "default the recipe's seed. Runs that differ only here share one feature cache",
    )
    p.add_argument(
        "--soup-of",
        default=None,
        metavar="DIR,DIR",
        help="--trainable conv5: instead of training, average the weights of these finished "
        "runs of this recipe (a greedy model soup on validation loss, ml/soup.py); with "
        "--leave-out, runs made with the same source left out",
    )
    p.add_argument(
        "--leave-out",
        default=None,
        metavar="SOURCE[:CLASS]",
        help="train without this source (or its CLASS images) and report its cell",
    )
    p.add_argument(
        "--cross-source",
        default=None,
        metavar="ARM,ARM",
        help="after training, run these leave-one-source-out arms (SOURCE[:CLASS], "
        "comma-separated) with the same recipe and put the table in the model card",
    )
    p.add_argument("--model-name", default=None, help="name in the model card")
    p.add_argument("--model-version", default="1", help="version in the model card")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs")
    p.add_argument("--no-finalise", action="store_true", help="train only")
    p.set_defaults(func=cmd_train)


_CFG_ARGS = {
    "image_size": "image_size",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "weights": "weights",
    "loss": "loss",
    "class_weights": "class_weights",
    "head": "head",
    "trainable": "trainable",
    "equalization": "equalization",
    "learning_rate": "learning_rate",
    "patience": "patience",
    "max_minutes": "max_minutes",
    "backbone": "backbone",
    "init_from": "init_from",
}


def _train_config(args: argparse.Namespace) -> Any:
    from ml.train import TrainConfig

    saved = args.out / "config.json"
    cfg = TrainConfig.from_json(saved.read_text()) if saved.is_file() else TrainConfig()
    if saved.is_file():
        log.info("resuming with the configuration saved in %s", saved)
    for arg, field in _CFG_ARGS.items():
        v = getattr(args, arg, None)
        if v is None:
            continue
        if field == "weights" and str(v).lower() in ("none", "scratch", ""):
            v = None
        if (
            saved.is_file()
            and getattr(cfg, field) != v
            and field not in ("epochs", "patience", "max_minutes", "batch_size")
        ):
            log.warning(
                "--%s %s differs from the saved run's %s: keeping the saved value",
                arg.replace("_", "-"),
                v,
                getattr(cfg, field),
            )
            continue
        setattr(cfg, field, v)
    if args.no_augment:
        cfg.augment = False
    if cfg.trainable == "conv5" and cfg.init_from:
        cfg.extra.setdefault("stage", "conv5 + head on cached pool4 features (ml/frozen.py)")
        if getattr(args, "square_policy", None) is not None:
            cfg.extra["square_policy"] = args.square_policy
        cfg.extra.setdefault("square_policy", "trim-crop")
        if getattr(args, "aug_copies", None) is not None:
            cfg.extra["aug_copies"] = int(args.aug_copies)
        cfg.extra.setdefault("aug_copies", 3)
        if getattr(args, "source_balanced", None) is not None:
            cfg.extra["source_balanced"] = bool(args.source_balanced)
        cfg.extra.setdefault("source_balanced", True)
        if getattr(args, "source_adversary", None) is not None:
            cfg.extra["source_adversary"] = float(args.source_adversary)
        if getattr(args, "weight_average", None) is not None:
            cfg.extra["weight_average"] = int(args.weight_average)
        if getattr(args, "feature_mixstyle", None) is not None:
            cfg.extra["feature_mixstyle"] = float(args.feature_mixstyle)
        if getattr(args, "draw_seed", None) is not None:
            cfg.extra["draw_seed"] = int(args.draw_seed)
    return cfg


def _pcfg(cfg: Any) -> Any:
    from ml.preprocess import PreprocessConfig

    return PreprocessConfig(
        size=cfg.image_size,
        equalization=cfg.equalization,
        square_policy=cfg.extra.get("square_policy", "trim-crop"),
    )


def _train_frozen(
    args: argparse.Namespace, cfg: Any, samples: list[Any], splits: dict[str, list[Any]]
) -> dict[str, Any]:
    """--trainable conv5 with --init-from: cached trunk features, arms (ml/frozen.py)."""
    from ml.data import class_weights
    from ml.frozen import LeaveOut, apply_leave_out, arm_cell, run_training

    out: Path = args.out
    cache = args.cache_dir or out / "features"
    cw = class_weights(splits["train"]) if cfg.class_weights else None
    leave = LeaveOut.parse(args.leave_out) if args.leave_out else None

    def say(msg: str) -> None:
        print(msg, flush=True)

    arms = [LeaveOut.parse(a) for a in (args.cross_source or "").split(",") if a.strip()]
    if args.soup_of:
        from ml.soup import run_soup

        if arms:
            raise ValueError(
                "--soup-of with --cross-source: a soup's arms are soups too; make each with "
                "--leave-out SOURCE --soup-of (runs made with SOURCE left out)"
            )
        folders = [Path(f) for f in args.soup_of.split(",") if f.strip()]
        state, (model, feats, idx, _) = run_soup(
            cfg, out, samples, splits, cache, folders, leave=leave, log_fn=say
        )
    else:
        state, (model, feats, idx, _) = run_training(
            cfg, out, samples, splits, cache, leave=leave, class_weight=cw, log_fn=say
        )
    if leave is not None:
        _, held = apply_leave_out(splits, samples, leave)
        cell = arm_cell(model, feats, idx, held, leave)
        (out / "cross_source_cell.json").write_text(json.dumps(cell, indent=2) + "\n")
        say(f"left out {leave.name}: {cell['metric']} {cell['value']:.3f} (n={cell['n']})")
    if arms:
        import keras

        table = []
        for arm in arms:
            arm_out = out / "arms" / arm.name
            say(f"cross-source arm: {arm.name} left out -> {arm_out}")
            _, (arm_model, _, _, _) = run_training(
                cfg, arm_out, samples, splits, cache, leave=arm, class_weight=cw, log_fn=say
            )
            _, held = apply_leave_out(splits, samples, arm)
            cell = arm_cell(arm_model, feats, idx, held, arm)
            (arm_out / "cross_source_cell.json").write_text(json.dumps(cell, indent=2) + "\n")
            say(f"left out {arm.name}: {cell['metric']} {cell['value']:.3f} (n={cell['n']})")
            table.append(cell)
            del arm_model
            keras.backend.clear_session()
        (out / "cross_source.json").write_text(json.dumps(table, indent=2) + "\n")
    return state


@_friendly
def cmd_train(args: argparse.Namespace) -> int:
    _setup_logging()
    from ml.data import class_weights, load_samples, split_samples
    from ml.train import read_state

    out: Path = args.out
    samples = load_samples(args.data, args.manifest)
    splits = split_samples(samples)
    print(
        f"data: {len(samples)} images; split "
        + ", ".join(f"{k} {len(v)}" for k, v in splits.items()),
        flush=True,
    )
    cfg = _train_config(args)
    frozen = cfg.trainable == "conv5" and bool(cfg.init_from)
    for opt, given in (("--soup-of", args.soup_of), ("--draw-seed", args.draw_seed is not None)):
        if given and not frozen:
            raise ValueError(f"{opt} is for --trainable conv5 --init-from WEIGHTS runs")
    state = read_state(out)
    if state.get("completed") and not args.soup_of:
        print(
            f"training in {out} already completed (epochs {state.get('epochs_run')}): finalising",
            flush=True,
        )
    if frozen and (
        not state.get("completed") or args.cross_source or args.leave_out or args.soup_of
    ):  # a completed run still gets the arms it is asked for; a soup checks its ingredients
        state = _train_frozen(args, cfg, samples, splits)
        print(f"training done: {json.dumps(state)}", flush=True)
        if args.leave_out:
            return 0  # an arm measures one cell; it is not an artifact to ship
    elif not state.get("completed"):
        from ml.tfdata import make_dataset
        from ml.train import fit

        out.mkdir(parents=True, exist_ok=True)
        pcfg = _pcfg(cfg)
        train_ds = make_dataset(splits["train"], pcfg, cfg.batch_size, shuffle=True, seed=cfg.seed)
        val_ds = make_dataset(splits["val"], pcfg, cfg.batch_size)
        cw = class_weights(splits["train"]) if cfg.class_weights else None
        if state:
            print(
                f"resuming from the checkpoint in {out} (epochs run: {state.get('epochs_run', 0)})",
                flush=True,
            )
        state = fit(cfg, out, train_ds, val_ds, class_weight=cw, verbose=1)
        print(f"training done: {json.dumps(state)}", flush=True)
    if args.no_finalise:
        return 0
    card = finalise(out, cfg, splits, samples, args)
    test = card["metrics"]["test"]
    from ml.evaluate import format_summary

    print("test split:\n" + format_summary(test))
    print(f"artifact: {out} (sha256 {card['weights_sha256'][:12]}). {DISCLAIMER}")
    return 0


def _source_bias(samples: list[Any]) -> list[str]:
    by_class: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        if s.source:
            by_class[s.label].add(s.source)
    if not by_class:
        return []
    classes = sorted(by_class)
    desc = "; ".join(f"{c}: {', '.join(sorted(by_class[c]))}" for c in classes)
    confounded = [
        c
        for c in classes
        if not by_class[c] & set().union(*(by_class[o] for o in classes if o != c))
    ]
    if len(classes) > 1 and confounded:
        return [
            "SOURCE BIAS: class and image source are confounded in the training data "
            f"({desc}): no {', '.join(confounded)} image shares a source with another class. "
            "The model may recognise the source (scanner, processing, collection, text "
            "markers) rather than the disease, and per-source metrics cannot separate the two. "
            "Validate on local data where all classes come from the same site before any use."
        ]
    return [f"Sources per class: {desc}."]


def _readme_bias(data_root: Path) -> str | None:
    readme = data_root / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8")
    lines = text.splitlines()
    for i, line in enumerate(lines):  # a "## ... bias ..." section: its body, not its title
        if line.startswith("#") and "bias" in line.lower():
            body = []
            for nxt in lines[i + 1 :]:
                if nxt.startswith("#"):
                    break
                body.append(nxt.strip())
            joined = " ".join(x for x in body if x)
            if joined:
                return " ".join(joined.split())
    for block in text.split("\n\n"):
        for para in block.split("\n- "):
            if "bias" in para.lower():
                return " ".join(para.lstrip("- ").split())
    return None


def finalise(
    out: Path, cfg: Any, splits: dict[str, list[Any]], samples: list[Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Temperature on val, metrics on val/test, model card + reports, learning curves."""
    from ml.artifact import load_card, save_artifact
    from ml.calibration import ece, fit_temperature, softmax
    from ml.evaluate import compute_metrics, json_clean, targets, write_report
    from ml.labels import CLASSES
    from ml.runtime import Classifier
    from ml.train import HISTORY_FILE, plot_learning_curves, read_state

    state = read_state(out)
    pcfg = _pcfg(cfg)
    arch = {
        "backbone": cfg.backbone,
        "head": cfg.head,
        "dropout": cfg.dropout,
        "trainable": cfg.trainable,
        "init_weights": cfg.weights
        or (
            f"{Path(cfg.init_from).name} (conv1-conv4 frozen)"
            if cfg.trainable == "conv5" and cfg.init_from
            else "scratch"
        ),
    }
    name = args.model_name or f"cxr-{cfg.backbone}"
    fields: dict[str, Any] = {
        "name": name,
        "version": str(args.model_version),
        "image_size": cfg.image_size,
        "preprocessing": pcfg.to_dict(),
        "architecture": arch,
        "temperature": 1.0,
    }
    save_artifact(None, out, fields)  # provisional card (T=1) to load the runtime
    clf = Classifier.load(out, engine="keras")
    from ml.evaluate import predict_samples_pooled

    t0 = time.monotonic()
    val_logits, val_pooled = predict_samples_pooled(clf, splits["val"])
    y_val = [CLASSES.index(s.label) for s in splits["val"]]
    temperature = fit_temperature(val_logits, y_val)
    test_logits, test_pooled = predict_samples_pooled(clf, splits["test"])
    y_test = [CLASSES.index(s.label) for s in splits["test"]]
    import numpy as np

    cross_source: list[dict[str, Any]] = []
    if (out / "cross_source.json").is_file():
        cross_source = json.loads((out / "cross_source.json").read_text())
    ood_card = _finalise_ood(out, val_pooled, test_pooled)

    reports = out / "reports"
    metrics = {}
    for split, logits, y in (("val", val_logits, y_val), ("test", test_logits, y_test)):
        probs = softmax(logits, temperature)
        y_arr = np.asarray(y)
        m = compute_metrics(
            probs, y_arr, CLASSES, [s.source for s in splits[split]], n_boot=args.bootstrap
        )
        m["ece_uncalibrated"] = ece(softmax(logits, 1.0), y_arr)
        if ood_card:
            m["ood"] = {
                "threshold": ood_card["threshold"],
                "pass_rate": ood_card[f"{split}_pass_rate"],
            }
        if split == "test":
            m["targets"] = targets(m, cross_source)
        write_report(m, probs, y_arr, reports / split, title=f"{name} {split} split")
        metrics[split] = json_clean(m)
    log.info("finalise inference took %.0f s", time.monotonic() - t0)
    if (out / HISTORY_FILE).is_file():
        try:
            plot_learning_curves(out / HISTORY_FILE, out / "learning_curves.png")
        except Exception:
            log.exception("could not plot learning curves")

    sources: dict[str, dict[str, Any]] = {}
    for s in samples:
        info = sources.setdefault(
            s.source or "unknown", {"n": 0, "licence": s.licence, "classes": Counter()}
        )
        info["n"] += 1
        info["classes"][s.label] += 1
    for info in sources.values():
        info["classes"] = dict(info["classes"])
    by_group = all(s.group for s in samples)
    limitations = _source_bias(samples)
    readme = _readme_bias(Path(args.data))
    if readme:
        limitations.append("Data README: " + readme)
    limitations += [
        "Trained on public, mostly downscaled (<=384 px) 8-bit PNG radiographs; images from "
        "a new site, modality or post-processing may be out of distribution.",
        "Three classes only (COVID-19 / normal / other lung disease): any other finding is "
        "forced into one of them; lateral views, children and non-chest images are out of "
        "scope (the worker filters by modality, body part and view).",
        "Grad-CAM maps are coarse (DenseNet169's last conv block is 1/32 of the input) and show "
        "evidence the model used, which need not be pathology.",
        f"Test split of {len(splits['test'])} images: see the confidence intervals.",
    ]
    if ood_card:
        fields["ood"] = ood_card
    fields["training_cost"] = _training_cost(out, args, state)
    if cross_source:
        fields["cross_source"] = cross_source
    fields.update(
        temperature=temperature,
        metrics=metrics,
        limitations=limitations,
        training={
            **{k: v for k, v in json.loads(cfg.to_json()).items() if k != "extra"},
            **{k: v for k, v in state.items() if k != "completed"},
            **({"extra": cfg.extra} if cfg.extra else {}),
        },
        data={
            "root": Path(args.data).name,
            "split": "by manifest group (no patient/duplicate crosses splits)"
            if by_group
            else "stratified by image 70/10/20, seed 42",
            "split_counts": {k: dict(Counter(s.label for s in v)) for k, v in splits.items()},
            "sources": sources,
        },
        reports={k: f"reports/{k}" for k in ("val", "test")},
    )
    old = load_card(out)
    if old.get("engine_benchmark"):
        fields["engine_benchmark"] = old["engine_benchmark"]
    save_artifact(None, out, fields)
    backup = out / "backup"
    if state.get("completed") and backup.is_dir():  # resume state of a finished run
        import shutil

        shutil.rmtree(backup, ignore_errors=True)
    return load_card(out)


def _training_cost(out: Path, args: argparse.Namespace, state: dict[str, Any]) -> dict[str, Any]:
    """What the training cost, measured: wall-clock seconds of each stage, where."""
    import os

    cost: dict[str, Any] = {
        "hardware": f"{os.cpu_count()} CPU cores, no GPU (TensorFlow CPU)",
        "head training (s)": round(float(state.get("train_seconds", 0.0)), 1),
        "epochs": state.get("epochs_run"),
    }
    cache = getattr(args, "cache_dir", None) or out / "features"
    meta = Path(cache) / "meta.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        n = sum(m.get("done", []))
        secs = float(m.get("seconds", 0.0))
        cost["trunk feature cache (s)"] = round(secs, 1)
        cost["trunk forward passes"] = n
        if secs:
            cost["trunk throughput (img/s)"] = round(n / secs, 2)
    arms = sorted((out / "arms").glob("*/train_state.json")) if (out / "arms").is_dir() else []
    for f in arms:
        st = json.loads(f.read_text())
        cost[f"arm {f.parent.name} head training (s)"] = round(float(st.get("train_seconds", 0)), 1)
    return cost


def _finalise_ood(out: Path, val_pooled: Any, test_pooled: Any) -> dict[str, Any] | None:
    """Set the OOD threshold on val (95% pass) and record it, with the test pass rate."""
    import numpy as np

    from ml.artifact import sha256_file
    from ml.ood import DEFAULT_COVERAGE, OOD_FILE, OOD_MESSAGE, MahalanobisOOD, threshold_for

    path = out / OOD_FILE
    if not path.is_file():
        return None
    det = MahalanobisOOD.load(path)
    det.threshold = threshold_for(det.score(val_pooled), DEFAULT_COVERAGE)
    det.save(path)
    return {
        "file": OOD_FILE,
        "sha256": sha256_file(path),
        "method": (
            "Mahalanobis distance of global-average-pooled last-conv features to the nearest "
            f"class mean (shared covariance, {det.components.shape[1]} principal components "
            "of the training features)"
        ),
        "threshold": det.threshold,
        "coverage_target": DEFAULT_COVERAGE,
        "val_pass_rate": float(np.mean(det.score(val_pooled) <= det.threshold)),
        "test_pass_rate": float(np.mean(det.score(test_pooled) <= det.threshold)),
        "message": OOD_MESSAGE,
    }


# --------------------------------------------------------------------------- evaluate


def _register_evaluate(sub: argparse._SubParsersAction, name: str) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        name,
        help="evaluate a model artifact on a labelled folder",
        description=f"Metrics with bootstrap 95%% CIs, plots and a per-source breakdown. {DISCLAIMER}.",
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model artifact (default: CXR_MODEL_DIR / the shipped model)",
    )
    p.add_argument("--data", required=True, type=Path, help="labelled image folder")
    p.add_argument("--manifest", type=Path, help="manifest CSV (default DATA/manifest.csv)")
    p.add_argument(
        "--split",
        choices=("all", "train", "val", "test"),
        default="all",
        help="evaluate on this split of DATA (the same group-aware split as cxr train; use "
        "'test' for the model's own training data). Default: all images",
    )
    p.add_argument("--json", dest="json_out", type=Path, help="write the metrics JSON here")
    p.add_argument("--report-dir", type=Path, help="write PNG plots + metrics.json here")
    p.add_argument("--engine", choices=("auto", "onnx", "keras"), default=None)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.set_defaults(func=cmd_evaluate)


@_friendly
def cmd_evaluate(args: argparse.Namespace) -> int:
    _setup_logging()
    import numpy as np

    from ml.calibration import softmax
    from ml.data import load_samples, split_samples
    from ml.evaluate import (
        compute_metrics,
        format_summary,
        json_clean,
        predict_samples_pooled,
        write_report,
    )
    from ml.runtime import Classifier

    engine, cache = _settings_engine_cache()
    model_dir = args.model or _default_model_dir()
    clf = Classifier.load(model_dir, engine=args.engine or engine, cache_dir=cache)  # type: ignore[arg-type]
    samples = load_samples(args.data, args.manifest)
    if args.split != "all":
        samples = split_samples(samples)[args.split]
    missing = sorted({s.label for s in samples} - set(clf.classes))
    if missing:
        print(f"cxr evaluate: labels {missing} are not classes of the model", file=sys.stderr)
        return 2
    logits, pooled = predict_samples_pooled(clf, samples)
    probs = softmax(logits, clf.temperature)
    labels = np.asarray([clf.classes.index(s.label) for s in samples])
    m = compute_metrics(probs, labels, clf.classes, [s.source for s in samples], args.bootstrap)
    if clf.ood_detector is not None:
        scores = clf.ood_detector.score(pooled)
        flagged = scores > clf.ood_detector.threshold
        m["ood"] = {
            "threshold": clf.ood_detector.threshold,
            "pass_rate": float(np.mean(~flagged)),
            "n_flagged": int(flagged.sum()),
            "per_source_pass_rate": {
                src: float(np.mean(~flagged[[s.source == src for s in samples]]))
                for src in sorted({s.source for s in samples})
            },
        }
    if clf.card.get("cross_source"):
        m["cross_source"] = clf.card["cross_source"]  # measured at training (leave-one-out)
    m["model"] = clf.info()
    m["split"] = args.split
    m = json_clean(m)
    print(format_summary(m))
    if m.get("ood"):
        print(
            f"out-of-distribution: {m['ood']['n_flagged']} of {m['n']} flagged "
            f"(threshold {m['ood']['threshold']:.2f}, pass rate {m['ood']['pass_rate']:.3f})"
        )
    for cell in m.get("cross_source") or []:
        print(
            f"cross-source (measured at training): left out {cell['left_out']}: "
            f"{cell['metric']} {cell['value']:.3f} (n={cell['n']})"
        )
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(m, indent=2) + "\n")
    if args.report_dir:
        files = write_report(m, probs, labels, args.report_dir, title=f"{clf.name} {args.split}")
        print("report: " + ", ".join(files.values()))
    print(DISCLAIMER)
    return 0


# --------------------------------------------------------------------------- predict


def _register_predict(sub: argparse._SubParsersAction, name: str) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        name,
        help="classify DICOM/PNG/JPEG files",
        description=f"Verdict, calibrated probabilities and a Grad-CAM overlay. {DISCLAIMER}.",
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model artifact (default: CXR_MODEL_DIR / the shipped model)",
    )
    p.add_argument("--json", action="store_true", help="JSON lines: file, label, probabilities")
    p.add_argument("--cam-dir", type=Path, help="write a Grad-CAM overlay PNG per file here")
    p.add_argument("--engine", choices=("auto", "onnx", "keras"), default=None)
    p.set_defaults(func=cmd_predict)


@_friendly
def cmd_predict(args: argparse.Namespace) -> int:
    _setup_logging()
    import cv2

    from ml.gradcam import overlay
    from ml.preprocess import load_display
    from ml.runtime import Classifier

    engine, cache = _settings_engine_cache()
    clf = Classifier.load(
        args.model or _default_model_dir(),
        engine=args.engine or engine,  # type: ignore[arg-type]
        cache_dir=cache,
    )
    if args.cam_dir:
        args.cam_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    detector = getattr(clf, "ood_detector", None)
    ood_threshold = None if detector is None else float(detector.threshold)
    if ood_threshold is not None and not math.isfinite(ood_threshold):
        ood_threshold = None  # no threshold fitted: JSON has no Infinity
    if not args.json:
        print(f"model {clf.name} {clf.version} ({clf.engine}). {DISCLAIMER}")
    for i, path in enumerate(args.files):
        try:
            display = load_display(path)
            p = clf.predict_display(display)
        except Exception as exc:
            failed += 1
            msg = f"{type(exc).__name__}: {exc}"
            if args.json:
                print(json.dumps({"file": str(path), "error": msg}), flush=True)
            else:
                print(f"{path}: ERROR {msg}", file=sys.stderr, flush=True)
            continue
        cam_file = None
        if args.cam_dir:
            cam_file = args.cam_dir / f"{i:03d}_{path.stem}.cam.png"
            rgb = overlay(display, p.cam, text=DISCLAIMER, box=p.frame_box)
            cv2.imwrite(str(cam_file), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if args.json:
            rec: dict[str, Any] = {
                "file": str(path),
                "label": p.label,
                "probabilities": p.probabilities,
                "ood_score": p.ood_score,
                "ood": p.ood,
                "ood_threshold": ood_threshold,
                "model": clf.name,
                "model_version": clf.version,
                "disclaimer": DISCLAIMER,
            }
            if p.ood:
                rec["warning"] = p.ood_message
            if cam_file:
                rec["cam"] = str(cam_file)
            print(json.dumps(rec), flush=True)
        else:
            probs = ", ".join(f"{c} {v:.3f}" for c, v in p.probabilities.items())
            ood = ""
            if p.ood_score is not None:
                limit = f"/{ood_threshold:.1f}" if ood_threshold is not None else ""
                ood = f" ood_score={p.ood_score:.1f}{limit}" + (
                    f" [{p.ood_message}]" if p.ood else ""
                )
            print(
                f"{path}: {p.label} ({probs}){ood}" + (f" cam={cam_file}" if cam_file else ""),
                flush=True,
            )
    return 1 if failed else 0


# --------------------------------------------------------------------------- export-onnx


def _register_export(sub: argparse._SubParsersAction, name: str) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        name,
        help="export a model artifact to ONNX (features + logits)",
        description=(
            "Export with Keras' ONNX export (TensorFlow backend). --out writes a standalone "
            "file; --warm-cache fills the runtime's cache (CXR_MODEL_CACHE_DIR) so that "
            "workers start without TensorFlow (run it once at install time: the export "
            "of DenseNet169 needs about 3 GB of memory and a minute)."
        ),
    )
    p.add_argument("--model", type=Path, default=None, help="model artifact")
    p.add_argument("--out", type=Path, default=None, help="output .onnx file")
    p.add_argument("--warm-cache", action="store_true", help="fill the runtime's ONNX cache")
    p.set_defaults(func=cmd_export)


@_friendly
def cmd_export(args: argparse.Namespace) -> int:
    _setup_logging()
    from ml.artifact import ArtifactError, build_model_from_card, load_card, verify_sha
    from ml.runtime import export_onnx

    model_dir = args.model or _default_model_dir()
    if not args.out and not args.warm_cache:
        print("cxr export-onnx: give --out FILE and/or --warm-cache", file=sys.stderr)
        return 2
    if not verify_sha(model_dir):
        raise ArtifactError(f"{model_dir}: weights missing or sha256 differs from the card")
    card = load_card(model_dir)
    if args.out:
        export_onnx(build_model_from_card(card, model_dir), args.out)
        print(
            f"wrote {args.out} (outputs: last-conv features, logits; apply softmax(logits / "
            f"{float(card.get('temperature', 1.0)):.4f}))"
        )
    if args.warm_cache:
        from ml.runtime import Classifier, onnx_cache_paths

        _, cache = _settings_engine_cache()
        clf = Classifier.load(model_dir, engine="onnx", cache_dir=cache)
        print(f"runtime cache ready: {onnx_cache_paths(cache, clf.sha256)[0]}")
    return 0
