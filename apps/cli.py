"""The ``cxr`` command: one console script, one subcommand per component.

Each subcommand lives in its own module, which exposes ``register(subparsers)``; the
module is imported only when needed so that ``cxr node`` never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cxr import DISCLAIMER, __version__

# subcommand -> module exposing register(subparsers) and the handler it sets as ``func``
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "node": ("apps.node_cli", "run the DICOM Storage SCP (C-STORE/C-ECHO)"),
    "worker": ("apps.worker_cli", "run a Celery worker that classifies queued instances"),
    "run": ("apps.supervisor", "run node + worker(s) together, supervised"),
    "send": ("apps.send", "send DICOM files to an AE (C-STORE SCU)"),
    "train": ("apps.ml_cli", "train a model"),
    "evaluate": ("apps.ml_cli", "evaluate a model on a labelled folder"),
    "predict": ("apps.ml_cli", "classify DICOM/PNG/JPEG files"),
    "export-onnx": ("apps.ml_cli", "export a model artifact to ONNX"),
    "audit": ("apps.audit_cli", "query the audit trail"),
    "db": ("apps.admin_cli", "database administration (upgrade)"),
    "demo": ("apps.demo", "write generated demo DICOM images"),
    "web": ("web.cli", "serve the web console and HTTP API"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr",
        description=f"Chest X-ray triage worker beside the PACS. {DISCLAIMER}.",
    )
    parser.add_argument("--version", action="version", version=f"cxr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text)
            continue
        mod = importlib.import_module(module)
        mod.register(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in SUBCOMMANDS:
        command = None
    parser = build_parser(only=command) if command else build_parser(only="__none__")
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from cxr.settings import SettingsError

    try:
        rc = args.func(args)
    except SettingsError as exc:
        print(f"cxr {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
