"""``cxr send FILE|DIR --to AET@host:port``: a C-STORE SCU for users (pynetdicom).

Reads each file's header (``stop_before_pixels``; files without a Part 10 header too),
proposes one presentation context per (SOP Class, Transfer Syntax) found, sends every file
with a progress bar, then prints a per-file status summary. Exits 1 when any file failed,
2 on usage errors, 0 otherwise (warnings count as sent, as in PS3.4 B.2.3).
"""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# PS3.7 C.4 / PS3.4 Annex B.2.3 C-STORE status categories
STATUS_SUCCESS = 0x0000  # PS3.7 C.1.1 Success
DEFAULT_CALLING_AE = "CXR_SEND"
MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd 1..255

UNCOMPRESSED = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
)
BIG_ENDIAN = "1.2.840.10008.1.2.2"  # Explicit VR Big Endian (retired)


@dataclass
class FileItem:
    path: Path
    sop_class: str = ""
    sop_instance: str = ""
    transfer_syntax: str = ""
    error: str | None = None  # unreadable/not DICOM: not sent


@dataclass
class Outcome:
    path: Path
    category: str  # Success / Warning / Failure / Cancel, or Not sent / Skipped
    code: int | None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.category in ("Success", "Warning", "Skipped")

    def status_text(self) -> str:
        code = f" (0x{self.code:04X})" if self.code is not None else ""
        return f"{self.category}{code}"


# ----------------------------------------------------------------------------- files
def iter_files(paths: Sequence[str | Path]) -> Iterator[tuple[Path, bool]]:
    """(file, named explicitly) for the files named and every file under the folders named
    (sorted, hidden ones skipped)."""
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts):
                    yield f, False
        else:
            yield p, True


def _transfer_syntax_of(ds: Any) -> str:
    """The file's transfer syntax, inferred from its encoding when there is no file meta."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if ts:
        return str(ts)
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if not little:
        return BIG_ENDIAN
    return str(ImplicitVRLittleEndian if implicit or implicit is None else ExplicitVRLittleEndian)


def inspect_file(path: Path) -> FileItem:
    """Read the header only; mark files that are not DICOM instances."""
    import pydicom

    item = FileItem(path)
    try:
        with warnings.catch_warnings():  # force=True on non-DICOM files warns about VRs
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        item.sop_class = str(ds.SOPClassUID)
        item.sop_instance = str(ds.SOPInstanceUID)
        item.transfer_syntax = _transfer_syntax_of(ds)
    except Exception as exc:
        item.error = f"not a DICOM instance ({type(exc).__name__})"
    return item


def contexts_for(items: Iterable[FileItem]) -> list[tuple[str, list[str]]]:
    """(abstract syntax, transfer syntaxes) pairs to propose, in first-seen order.

    Uncompressed files may be re-encoded by pynetdicom between the little endian syntaxes,
    so those contexts also offer the other uncompressed syntax.
    """
    seen: dict[tuple[str, str], list[str]] = {}
    for it in items:
        if it.error:
            continue
        key = (it.sop_class, it.transfer_syntax)
        if key in seen:
            continue
        ts = [it.transfer_syntax]
        if it.transfer_syntax in UNCOMPRESSED:
            ts += [t for t in UNCOMPRESSED if t != it.transfer_syntax]
        seen[key] = ts
    return [(sop, ts) for (sop, _), ts in seen.items()]


def batches(items: list[FileItem], limit: int = MAX_CONTEXTS) -> Iterator[list[FileItem]]:
    """Split files so that no association needs more than ``limit`` contexts."""
    batch: list[FileItem] = []
    keys: set[tuple[str, str]] = set()
    for it in items:
        key = (it.sop_class, it.transfer_syntax)
        if key not in keys and len(keys) >= limit:
            yield batch
            batch, keys = [], set()
        keys.add(key)
        batch.append(it)
    if batch:
        yield batch


# ----------------------------------------------------------------------------- network
def parse_target(text: str) -> tuple[str, str, int]:
    from cxr.settings import Destination

    d = Destination.parse(text)
    return d.ae_title, d.host, d.port


def make_tls_context(
    ca: str | None, cert: str | None, key: str | None, insecure: bool
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def _read_full(path: Path, transfer_syntax: str) -> Any:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID

    ds = pydicom.dcmread(path, force=True)
    if not getattr(ds, "file_meta", None):
        ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    return ds


def send_batch(
    batch: list[FileItem],
    ae_title: str,
    host: str,
    port: int,
    calling_ae: str,
    tls: tuple[ssl.SSLContext, str] | None,
    timeout: float,
    on_done: Any,
) -> list[Outcome]:
    """One association for ``batch`` (the shared loop in :mod:`cxr.scu`); an outcome for
    every file of it."""
    from pynetdicom import AE
    from pynetdicom.status import code_to_category

    from cxr.scu import store_each

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop, ts in contexts_for(batch):
        ae.add_requested_context(sop, ts)
    results = store_each(
        ae,
        host,
        port,
        ae_title,
        batch,
        load=lambda it: _read_full(it.path, it.transfer_syntax),
        tls_args=tls,
        on_done=lambda _it, _res: on_done(),
    )
    outcomes: list[Outcome] = []
    for it, res in results:
        if res.kind == "status" and res.status is not None:
            outcomes.append(Outcome(it.path, code_to_category(res.status), res.status, res.comment))
        elif res.kind == "unreachable":  # name the peer: the user may have several
            outcomes.append(
                Outcome(it.path, "Failure", None, f"{res.comment} ({ae_title}@{host}:{port})")
            )
        else:
            outcomes.append(Outcome(it.path, "Failure", None, res.comment))
    return outcomes


def send_files(
    paths: Sequence[str | Path],
    target: str,
    calling_ae: str = DEFAULT_CALLING_AE,
    tls: tuple[ssl.SSLContext, str] | None = None,
    timeout: float = 30.0,
    progress: bool = True,
) -> list[Outcome]:
    """Send files/folders to ``AET@host:port``; one :class:`Outcome` per file."""
    from tqdm import tqdm

    ae_title, host, port = parse_target(target)
    found = list(iter_files(paths))
    items = [inspect_file(p) for p, _ in found]
    # a non-DICOM file found in a folder is skipped; one named on the command line fails
    outcomes = [
        Outcome(it.path, "Not sent" if named else "Skipped", None, it.error)
        for it, (_, named) in zip(items, found, strict=True)
        if it.error
    ]
    good = [it for it in items if not it.error]
    bar = tqdm(total=len(good), unit="file", disable=not progress, file=sys.stderr)
    try:
        for batch in batches(good):
            outcomes += send_batch(
                batch, ae_title, host, port, calling_ae, tls, timeout, lambda: bar.update(1)
            )
    finally:
        bar.close()
    order = {it.path: i for i, it in enumerate(items)}
    outcomes.sort(key=lambda o: order.get(o.path, 0))
    return outcomes


def print_summary(outcomes: Sequence[Outcome], out: Any = None) -> None:
    out = out or sys.stdout
    width = max((len(str(o.path)) for o in outcomes), default=4)
    for o in outcomes:
        detail = f"  {o.detail}" if o.detail else ""
        print(f"{str(o.path):<{width}}  {o.status_text()}{detail}", file=out)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.category] = counts.get(o.category, 0) + 1
    summary = ", ".join(f"{n} {cat}" for cat, n in counts.items()) or "no files"
    print(f"{len(outcomes)} file(s): {summary}", file=out)


# ----------------------------------------------------------------------------- CLI
def register(subparsers: argparse._SubParsersAction, name: str) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        name,
        help="send DICOM files to an AE (C-STORE SCU)",
        description="Send DICOM files (and every file under folders) with C-STORE. "
        "Exit status: 0 all sent (Success/Warning), 1 some failed, 2 usage error.",
    )
    p.add_argument("paths", nargs="+", metavar="FILE|DIR")
    p.add_argument("--to", required=True, metavar="AET@host:port", help="destination")
    p.add_argument("--calling-ae", default=DEFAULT_CALLING_AE, help="our AE title (CXR_SEND)")
    p.add_argument("--timeout", type=float, default=30.0, help="network timeouts, s (30)")
    p.add_argument("--tls", action="store_true", help="use DICOM TLS")
    p.add_argument("--tls-ca", metavar="PEM", help="CA bundle that signed the peer's certificate")
    p.add_argument("--tls-cert", metavar="PEM", help="our client certificate")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    p.add_argument(
        "--tls-insecure", action="store_true", help="do not verify the peer's certificate"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from cxr.logconfig import configure_logging

    configure_logging("WARNING")
    try:
        _, host, _ = parse_target(args.to)
    except ValueError as exc:
        print(f"cxr send: --to: {exc}", file=sys.stderr)
        return 2
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        print(f"cxr send: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    tls = None
    if args.tls or args.tls_ca or args.tls_cert:
        try:
            ctx = make_tls_context(args.tls_ca, args.tls_cert, args.tls_key, args.tls_insecure)
        except (OSError, ssl.SSLError) as exc:
            print(f"cxr send: TLS set-up failed: {exc}", file=sys.stderr)
            return 2
        tls = (ctx, host)
    outcomes = send_files(
        args.paths,
        args.to,
        calling_ae=args.calling_ae,
        tls=tls,
        timeout=args.timeout,
        progress=not args.no_progress,
    )
    print_summary(outcomes)
    if not outcomes:
        print("cxr send: no files found", file=sys.stderr)
        return 1
    return 0 if all(o.ok for o in outcomes) else 1
