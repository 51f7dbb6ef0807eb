"""Crop/region policy comparison on the cross-source table (issue #8, point 1).

For each square policy (``ml/preprocess.py``: ``trim-crop``, ``lung-box``, ...) it runs the
leave-one-source-out arms through ``cxr train --leave-out`` with the same frozen trunk and
recipe, at a size that fits the CPU, and prints the cells side by side. The policy to keep
is the one with the better *worst* cell (not pooled accuracy).

    python benchmarks/crop_policy.py --init-from V1_WEIGHTS --work /work/ckpt/crop \\
        [--policies trim-crop,lung-box] [--arms jsrt,hannover,cohen:Other] [--size 160]

Everything it writes (feature caches, arm folders) goes under ``--work``, outside the work
tree, and a rerun resumes where it stopped (``cxr train`` checkpoints). It also reports how
often :func:`ml.preprocess.lung_fields` finds no lung fields (the policy then falls back to
the centre square), per source.

The last line: ``ratios: <policy>/<baseline policy> worst cell X ...``. RESEARCH USE ONLY.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def lung_detection_rate(data: Path) -> dict[str, tuple[int, int]]:
    """source -> (images, lung fields not found)."""
    from ml.data import load_samples
    from ml.preprocess import load_display, lung_fields, trim_borders

    tot: Counter[str] = Counter()
    miss: Counter[str] = Counter()
    for s in load_samples(data):
        d = load_display(s.path)
        tot[s.source] += 1
        if lung_fields(d, trim_borders(d)) is None:
            miss[s.source] += 1
    return {k: (tot[k], miss[k]) for k in sorted(tot)}


def run_arm(args: argparse.Namespace, policy: str, arm: str) -> dict[str, object]:
    out = args.work / policy / arm.replace(":", "-")
    cell_file = out / "cross_source_cell.json"
    if not cell_file.is_file():
        cmd = [
            sys.executable,
            "-m",
            "apps.cli",
            "train",
            "--data",
            str(args.data),
            "--out",
            str(out),
            "--image-size",
            str(args.size),
            "--trainable",
            "conv5",
            "--init-from",
            str(args.init_from),
            "--aug-copies",
            str(args.aug_copies),
            "--cache-dir",
            str(args.work / policy / "features"),
            "--batch-size",
            "32",
            "--epochs",
            str(args.epochs),
            "--patience",
            str(args.patience),
            "--learning-rate",
            "3e-4",
            "--square-policy",
            policy,
            "--leave-out",
            arm,
        ]
        print("$ " + " ".join(cmd), flush=True)
        t0 = time.monotonic()
        subprocess.run(cmd, check=True, cwd=REPO)
        print(f"{policy} {arm}: {time.monotonic() - t0:.0f} s", flush=True)
    return json.loads(cell_file.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init-from", required=True, type=Path, help="frozen trunk weights")
    ap.add_argument("--work", required=True, type=Path, help="caches and arms (outside the tree)")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cxr")
    ap.add_argument("--policies", default="trim-crop,lung-box")
    ap.add_argument("--arms", default="jsrt,hannover,cohen:Other")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--aug-copies", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--patience", type=int, default=4)
    args = ap.parse_args()
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]

    if "lung-box" in policies:
        rates = lung_detection_rate(args.data)
        n = sum(t for t, _ in rates.values())
        m = sum(x for _, x in rates.values())
        print(f"lung fields not found (centre-square fallback): {m}/{n} = {m / n:.3f}")
        for src, (t, x) in rates.items():
            print(f"  {src:20s} {x:4d}/{t:4d}")

    table: dict[str, dict[str, dict[str, object]]] = {}
    for policy in policies:
        table[policy] = {arm: run_arm(args, policy, arm) for arm in arms}

    print(f"\ncross-source cells at {args.size} px (left out -> recall of its class):")
    print(f"{'policy':12s} " + " ".join(f"{a:>14s}" for a in arms) + f" {'worst':>8s}")
    worst: dict[str, float] = {}
    for policy, cells in table.items():
        vals = [float(cells[a]["value"]) for a in arms]  # type: ignore[arg-type]
        worst[policy] = min(vals)
        print(f"{policy:12s} " + " ".join(f"{v:14.3f}" for v in vals) + f" {worst[policy]:8.3f}")
    (args.work / "crop_policy.json").write_text(
        json.dumps({"size": args.size, "arms": arms, "table": table}, indent=2) + "\n"
    )
    base = policies[0]
    parts = []
    for policy in policies[1:]:
        parts.append(
            f"{policy}/{base} worst cell {worst[policy] / max(worst[base], 1e-9):.2f}"
            + "".join(
                f" {a} {float(table[policy][a]['value']) / max(float(table[base][a]['value']), 1e-9):.2f}"  # type: ignore[arg-type]
                for a in arms
            )
        )
    print("ratios: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
