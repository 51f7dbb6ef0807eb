"""How many principal axes should the OOD detector keep? A sweep, in one run.

The shipped detector (``ml/ood.py``) keeps 1,024 axes of the pooled features; that number
was chosen after looking at the out-of-scope inputs it has to flag (128 axes missed two of
them), so its test is not blind to it. This sweep shows the whole trade-off instead: for
each number of axes, the detector is fitted on the training split's pooled features (the
shipped model's, through the serving runtime), its threshold set on the validation split
(95% pass), and then:

* the **test-split pass rate** (in distribution; the issue asks >= 0.90);
* how many of the 11 **out-of-scope inputs** it flags (3 ``cxr demo`` phantoms, CT, MR,
  CT-RLE, a deflated RGB image, a dental panoramic, a lateral thorax, two photographs),
  and the lowest score / threshold ratio among them (the margin of the weakest catch).

Last line: each setting against the shipped 1,024.

    python benchmarks/ood_axes.py [--axes 32,64,128,256,512,1024]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
OUT_OF_SCOPE = [
    "not-chest/ct.dcm",
    "not-chest/mr.dcm",
    "not-chest/ct_rle_fragments.dcm",
    "not-chest/deflated.dcm",
    "chest/cr_jpeg_lossless_modality_lut_sequence.dcm",  # a dental panoramic
    "chest/dx_thorax_monochrome1.dcm",  # a lateral thorax (veterinary)
]


def out_of_scope_pooled(clf: object) -> tuple[list[str], np.ndarray]:
    from sklearn.datasets import load_sample_image

    from apps.demo import demo_dataset
    from ml.preprocess import dicom_to_display, grey_to_input, load_display

    cases: dict[str, np.ndarray] = {}
    for i in range(3):
        cases[f"demo phantom {i}"] = dicom_to_display(demo_dataset(i))
    for name in OUT_OF_SCOPE:
        cases[name] = load_display(SHARED / "dicom-samples" / name)
    for photo in ("china.jpg", "flower.jpg"):
        rgb = load_sample_image(photo)
        cases[photo] = (rgb.astype(np.float32) @ [0.299, 0.587, 0.114]).astype(np.uint8)
    x = np.stack([grey_to_input(clf.preprocess(d)) for d in cases.values()])  # type: ignore[attr-defined]
    feats, _ = clf.forward(x)  # type: ignore[attr-defined]
    return list(cases), np.asarray(feats).mean(axis=(1, 2))


def main() -> int:
    from cxr.settings import load_settings
    from ml.data import load_samples, split_samples
    from ml.evaluate import predict_samples_pooled
    from ml.labels import CLASSES
    from ml.ood import MahalanobisOOD, threshold_for
    from ml.runtime import get_classifier

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--axes", default="32,64,128,256,512,1024")
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "cxr")
    args = ap.parse_args()
    axes = [int(a) for a in args.axes.split(",")]
    clf = get_classifier(load_settings())
    splits = split_samples(load_samples(args.data))
    pooled = {}
    labels = {}
    for split in ("train", "val", "test"):
        _, pooled[split] = predict_samples_pooled(clf, splits[split])
        labels[split] = np.array([CLASSES.index(s.label) for s in splits[split]])
    names, oos = out_of_scope_pooled(clf)
    print(
        f"model {clf.name} {clf.version}; train {len(pooled['train'])}, val "
        f"{len(pooled['val'])}, test {len(pooled['test'])}; {len(names)} out-of-scope inputs"
    )
    print(
        "| axes | threshold | test pass rate | out-of-scope flagged | weakest catch (score/thr) | missed |"
    )
    print("|---|---|---|---|---|---|")
    rows = {}
    for k in axes:
        det = MahalanobisOOD.fit(pooled["train"], labels["train"], n_components=k)
        thr = threshold_for(det.score(pooled["val"]))
        test_pass = float((det.score(pooled["test"]) <= thr).mean())
        s = det.score(oos) / thr
        flagged = s > 1.0
        missed = [n for n, f in zip(names, flagged, strict=True) if not f]
        weakest = float(s[flagged].min()) if flagged.any() else float("nan")
        rows[k] = (test_pass, int(flagged.sum()), weakest)
        print(
            f"| {k} | {thr:.2f} | {test_pass:.3f} | {int(flagged.sum())}/{len(names)} | "
            f"{weakest:.2f} | {', '.join(missed) or '-'} |"
        )
    if 1024 in rows:
        base = rows[1024]
        print(
            "ratios vs 1024 axes (test pass, flagged): "
            + ", ".join(
                f"{k}: {r[0] / base[0]:.3f} {r[1] / max(1, base[1]):.2f}" for k, r in rows.items()
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
