"""``cxr demo``: generated chest CR/DX images with complete headers (checked by dciodvfy)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from apps.demo import chest_phantom, write_demo


def test_cli_writes_valid_chest_images(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "apps.cli",
            "demo",
            str(out),
            "--count",
            "2",
            "--size",
            "256",
            "--with-ignored",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    files = sorted(out.glob("*.dcm"))
    assert [f.name for f in files] == [
        "demo_chest_001.dcm",
        "demo_chest_002.dcm",
        "demo_knee_not_chest.dcm",
    ]
    uids = set()
    for f in files:
        ds = pydicom.dcmread(f)  # a real Part 10 file: no force needed
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.BitsStored == 12 and ds.BitsAllocated == 16 and ds.Rows == 256
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        px = ds.pixel_array
        assert px.dtype == np.uint16 and px.max() < 4096 and px.std() > 100
        assert str(ds.PatientName).startswith("DEMO^")
        uids.add(ds.SOPInstanceUID)
    assert len(uids) == 3
    chest = [pydicom.dcmread(f) for f in files[:2]]
    assert [d.Modality for d in chest] == ["CR", "DX"]
    assert all(d.BodyPartExamined == "CHEST" and d.ViewPosition == "PA" for d in chest)
    assert pydicom.dcmread(files[2]).BodyPartExamined == "KNEE"


@pytest.mark.parametrize("index", [1, 2])  # CR and DX
def test_dciodvfy_finds_no_errors(tmp_path: Path, index: int) -> None:
    exe = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"
    if not Path(exe).exists():
        pytest.skip("dicom3tools not installed (apt-get install dicom3tools; .ci/run does)")
    path = write_demo(tmp_path, count=2, size=128)[index - 1]
    res = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    errors = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]
    assert not errors, errors


def test_phantom_is_deterministic_and_chest_like() -> None:
    a, b = chest_phantom(256, seed=3), chest_phantom(256, seed=3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, chest_phantom(256, seed=4))
    # lungs (darker) beside a brighter mediastinum/spine, air darkest at the corners
    lung = a[120:140, 70:90].mean()
    spine = a[120:140, 124:132].mean()
    corner = a[:10, :10].mean()
    assert corner < lung < spine
