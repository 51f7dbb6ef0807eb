"""``cxr node``: run the Storage SCP in the foreground until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
from typing import Any

log = logging.getLogger(__name__)


def register(subparsers: Any, name: str) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help="run the DICOM Storage SCP (C-STORE/C-ECHO)",
        description="Run the DICOM Storage SCP in the foreground. Settings come from CXR_* "
        "variables (or .env); the options below override them. SIGTERM/SIGINT stop "
        "accepting associations, let those in flight finish, and exit 0.",
    )
    p.add_argument("--host", help="bind address (CXR_DICOM_HOST)")
    p.add_argument("--port", type=int, help="port (CXR_DICOM_PORT)")
    p.add_argument("--ae-title", help="our AE title (CXR_AE_TITLE)")
    p.add_argument(
        "--no-sweep",
        action="store_true",
        help="do not run the re-queue sweep here (the node owns it by default; then run "
        "it in a worker: cxr worker --sweep)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cxr.logconfig import configure_logging
    from cxr.settings import load_settings

    overrides: dict[str, object] = {}
    if getattr(args, "host", None):
        overrides["dicom_host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides["dicom_port"] = args.port
    if getattr(args, "ae_title", None):
        overrides["ae_title"] = args.ae_title
    settings = load_settings(**overrides)  # SettingsError: one line naming the variable
    configure_logging(settings.log_level, settings.log_json)

    from dicom_node.node import StorageNode

    node = StorageNode(settings, sweep=not getattr(args, "no_sweep", False))

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping (associations in flight finish first)", signum)
        node.request_stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        node.start(block=True)
    except OSError as exc:
        log.error("cannot start the node: %s", exc)
        return 1
    return 0
