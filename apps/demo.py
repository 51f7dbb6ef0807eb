"""``cxr demo DIR``: write generated demo chest radiographs (DICOM CR, 12-bit) to try the
pipeline without patient data.

The images are synthetic phantoms (body outline, lungs, mediastinum, spine, ribs,
clavicles) with complete Patient/Study/Series/Equipment/CR Image headers and obviously fake
demographics. Nothing is copied from real data. They are not diagnostic images; whatever
the model says about them is meaningless.

Then: ``cxr send DIR --to CXR_WORKER@127.0.0.1:11112``.
"""

from __future__ import annotations

import argparse
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # PS3.4 B.5 Computed Radiography Image Storage
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray For Presentation
BITS = 12
# PS3.16 CID 4031 (Common Anatomic Regions): BodyPartExamined -> (SCT code, meaning)
ANATOMY = {"CHEST": ("43799004", "Chest"), "KNEE": ("72696002", "Knee")}


def chest_phantom(size: int = 512, seed: int = 0) -> np.ndarray:
    """A chest-radiograph-like phantom, MONOCHROME2 (air dark, bone bright), 0..4095."""
    rng = np.random.default_rng(seed)
    grid: np.ndarray = np.mgrid[0:size, 0:size].astype(np.float32) / size
    yy, xx = grid
    img: np.ndarray = np.full((size, size), 0.08, np.float32)  # air

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        inside: np.ndarray = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
        return inside

    jitter = rng.normal(0, 0.01, 8)
    body = ellipse(0.5, 0.62, 0.46 + jitter[0], 0.55)
    img[body] = 0.55
    lung_r = ellipse(0.33 + jitter[1], 0.50, 0.13, 0.30 + jitter[2])
    lung_l = ellipse(0.67 + jitter[3], 0.50, 0.13, 0.30 + jitter[4])
    img[lung_r | lung_l] = 0.22
    heart = ellipse(0.56 + jitter[5], 0.66, 0.14, 0.13)
    img[heart & body] = 0.60
    spine = (np.abs(xx - 0.5) < 0.035) & (yy > 0.15) & body
    img[spine] = 0.75
    for k in range(9):  # ribs: bright arcs over the lungs
        y0 = 0.27 + 0.065 * k
        arc = np.abs(yy - (y0 + 0.09 * (xx - 0.5) ** 2 * 4)) < 0.008
        img[arc & (lung_r | lung_l)] += 0.18
    for side in (-1, 1):  # clavicles
        cl = np.abs(yy - (0.2 + 0.05 * np.abs(xx - 0.5))) < 0.012
        img[cl & (np.sign(xx - 0.5) == side) & (np.abs(xx - 0.5) < 0.3)] = 0.8
    if seed % 3 == 1:  # patchy bilateral opacities, for variety
        for _ in range(6):
            cx, cy = rng.uniform(0.25, 0.75), rng.uniform(0.45, 0.75)
            blob = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / 0.003))
            img += 0.15 * blob * (lung_r | lung_l)
    img += rng.normal(0, 0.015, img.shape).astype(np.float32)
    try:
        import cv2

        img = cv2.GaussianBlur(img, (0, 0), size / 256)
    except ImportError:  # pragma: no cover - opencv is a dependency
        pass
    out: np.ndarray = (np.clip(img, 0, 1) * (2**BITS - 1)).astype(np.uint16)
    return out


def demo_dataset(
    index: int,
    size: int = 512,
    body_part: str = "CHEST",
    view: str = "PA",
    modality: str = "CR",
    study_uid: str | None = None,
) -> Any:
    """A complete CR (or DX) instance with fake demographics."""
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

    now = datetime.now(UTC)
    sop_class = UID(CR_IMAGE_STORAGE if modality == "CR" else DX_PRESENTATION_STORAGE)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "CXR_DEMO"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    # Patient (fake)
    ds.PatientName = f"DEMO^PATIENT^{index:03d}"
    ds.PatientID = f"DEMO-{index:06d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    # General Study
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = f"DEMO{index:06d}"
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{index}"
    ds.StudyDescription = f"XR {body_part} {view} (synthetic demo)"
    # General Series / Equipment
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"{body_part} {view}"
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view
    if body_part == "KNEE":  # a paired body part: PS3.3 C.7.3.1 Laterality is required
        ds.Laterality = "R"
    ds.Manufacturer = "cxr-triage demo generator"
    ds.InstitutionName = "Demo"
    ds.StationName = "CXRDEMO"
    # General Image / CR Image / Image Pixel
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [0.7, 0.7]
    ds.PixelSpacing = [0.7, 0.7]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.BurnedInAnnotation = "NO"
        ds.DetectorType = "DIRECT"
        ds.ImageLaterality = "U"
        ds.PresentationLUTShape = "IDENTITY"
        ds.PositionerType = ""
        ds.AcquisitionContextSequence = []
        region = Dataset()
        region.CodeValue, region.CodeMeaning = ANATOMY.get(body_part, ANATOMY["CHEST"])
        region.CodingSchemeDesignator = "SCT"
        ds.AnatomicRegionSequence = [region]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = BITS
    ds.HighBit = BITS - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.LossyImageCompression = "00"
    ds.PixelData = chest_phantom(size, seed=index).tobytes()
    return ds


def write_demo(
    out_dir: str | Path, count: int = 3, size: int = 512, with_ignored: bool = False
) -> list[Path]:
    """Write ``count`` chest images (and, optionally, one knee image the node ignores)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(1, count + 1):
        ds = demo_dataset(i, size=size, modality="CR" if i % 2 else "DX")
        path = out / f"demo_chest_{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    if with_ignored:
        ds = demo_dataset(count + 1, size=size, body_part="KNEE", view="AP")
        path = out / "demo_knee_not_chest.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def register(subparsers: argparse._SubParsersAction, name: str) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        name,
        help="write generated demo DICOM images",
        description="Write synthetic chest radiographs (CR/DX, 12-bit, fake demographics) "
        "to try the pipeline: cxr demo ./demo && cxr send ./demo --to CXR_WORKER@127.0.0.1:11112",
    )
    p.add_argument("out_dir", nargs="?", default="demo-images", metavar="DIR")
    p.add_argument("--count", type=int, default=3, help="chest images to write (3)")
    p.add_argument("--size", type=int, default=512, help="rows = columns (512)")
    p.add_argument(
        "--with-ignored", action="store_true", help="also write a knee image the node ignores"
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.count < 0 or not 64 <= args.size <= 4096:
        print("cxr demo: --count >= 0 and 64 <= --size <= 4096", flush=True)
        return 2
    paths = write_demo(args.out_dir, args.count, args.size, args.with_ignored)
    for p in paths:
        print(p)
    print(f"wrote {len(paths)} synthetic image(s); research use only, not for diagnostic use")
    return 0
