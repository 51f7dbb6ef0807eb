"""``cxr audit``: query the audit trail (list, show, stats, retry, export).

Every subcommand takes ``--database-url`` (default ``CXR_DATABASE_URL``). Times are UTC.
Patient names are never stored; the only patient data shown is the PatientID hash.

Examples::

    cxr audit list --since 2026-11-01 --state delivery_failed --limit 20
    cxr audit list --verdict COVID --calling-ae MODALITY1
    cxr audit show 1.2.826.0.1.3680043.8.498.1234
    cxr audit stats --since 2026-11-26
    cxr audit retry --state delivery_failed
    cxr audit retry 1.2.826.0.1.3680043.8.498.1234
    cxr audit export --csv audit.csv --since 2026-11-01
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import IO, Any, Protocol

from db.models import State

log = logging.getLogger(__name__)

STATES = [s.value for s in State]
LIST_COLUMNS = (
    ("id", "ID"),
    ("received_at", "RECEIVED (UTC)"),
    ("state", "STATE"),
    ("verdict", "VERDICT"),
    ("p_covid", "P(COVID)"),
    ("calling_ae", "CALLING AE"),
    ("modality", "MOD"),
    ("accession_number", "ACCESSION"),
    ("sop_instance_uid", "SOP INSTANCE UID"),
    ("end_to_end_ms", "E2E ms"),
    ("reason", "REASON"),
)
CSV_COLUMNS = (
    "id",
    "received_at",
    "sop_instance_uid",
    "study_instance_uid",
    "accession_number",
    "patient_id_hash",
    "modality",
    "view_position",
    "calling_ae",
    "size_bytes",
    "version",
    "state",
    "reason",
    "attempts",
    "finished_at",
    "verdict",
    "p_covid",
    "p_normal",
    "p_other",
    "model_version",
    "t_decode_ms",
    "t_preprocess_ms",
    "t_forward_ms",
    "t_cam_ms",
    "t_build_ms",
    "t_send_ms",
    "t_total_ms",
    "delivered_at",
    "end_to_end_ms",
)


# ----------------------------------------------------------------------------- parser
def register(subparsers: argparse._SubParsersAction, name: str) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        name,
        help="query the audit trail",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="audit_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda _a: (p.print_help(), 2)[1])

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", help="audit database URL (default CXR_DATABASE_URL)")

    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--since", help="received on/after: YYYY-MM-DD or ISO date-time (UTC)")
    filters.add_argument(
        "--until", help="received before the end of: YYYY-MM-DD, or before an ISO date-time"
    )
    filters.add_argument("--state", action="append", choices=STATES, help="repeatable")
    filters.add_argument("--verdict", action="append", help="COVID, Normal or Other; repeatable")
    filters.add_argument("--calling-ae", action="append", help="sender AE title; repeatable")
    filters.add_argument(
        "--patient-id",
        help="PatientID: hashed with CXR_PATIENT_ID_SALT like the node does, then matched",
    )

    lp = sub.add_parser("list", parents=[common, filters], help="list instances (newest first)")
    lp.add_argument("--limit", type=int, default=50, help="at most N rows (0 = all; default 50)")
    lp.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    lp.set_defaults(func=cmd_list)

    sp = sub.add_parser("show", parents=[common], help="whole history of one instance")
    sp.add_argument("uid", help="SOP Instance UID (or audit row id)")
    sp.add_argument("--json", action="store_true", help="JSON instead of text")
    sp.set_defaults(func=cmd_show)

    stp = sub.add_parser(
        "stats", parents=[common, filters], help="counts per state/verdict, p50/p95 latencies"
    )
    stp.add_argument("--json", action="store_true", help="JSON instead of text")
    stp.set_defaults(func=cmd_stats)

    rp = sub.add_parser(
        "retry",
        parents=[common],
        help="re-send delivery_failed / re-classify failed instances",
        description="Reset failed -> received (classify again) or delivery_failed -> "
        "classified (deliver again), record a 'retry' event and queue the task.",
    )
    target = rp.add_mutually_exclusive_group(required=True)
    target.add_argument("uid", nargs="?", help="SOP Instance UID")
    target.add_argument("--state", choices=["delivery_failed", "failed"], help="all in this state")
    rp.add_argument("--limit", type=int, default=0, help="at most N instances (0 = all)")
    rp.add_argument("--dry-run", action="store_true", help="show what would be retried")
    rp.set_defaults(func=cmd_retry)

    ep = sub.add_parser("export", parents=[common, filters], help="export instances as CSV")
    ep.add_argument("--csv", required=True, metavar="FILE", help="output file, or - for stdout")
    ep.add_argument("--limit", type=int, default=0, help="at most N rows (0 = all)")
    ep.set_defaults(func=cmd_export)


# ---------------------------------------------------------------------------- helpers
def _url(args: argparse.Namespace) -> str:
    if getattr(args, "database_url", None):
        return str(args.database_url)
    from cxr.settings import get_settings

    return get_settings().database_url


def _filter(args: argparse.Namespace) -> Any:
    from db.queries import InstanceFilter, parse_when

    return InstanceFilter(
        since=parse_when(args.since) if getattr(args, "since", None) else None,
        until=parse_when(args.until, end=True) if getattr(args, "until", None) else None,
        states=list(getattr(args, "state", None) or []),
        verdicts=list(getattr(args, "verdict", None) or []),
        calling_aes=list(getattr(args, "calling_ae", None) or []),
        patient_id_hashes=_patient_hashes(getattr(args, "patient_id", None)),
        limit=(getattr(args, "limit", 0) or None),
    )


def _patient_hashes(patient_id: str | None) -> list[str]:
    if not patient_id:
        return []
    from cxr.contracts import hash_patient_id
    from cxr.settings import get_settings

    h = hash_patient_id(get_settings(), patient_id.strip())
    return [h] if h else []


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, float):
        return f"{v:.3f}" if v < 1.0 else f"{v:.0f}"
    return str(v)


class _Writer(Protocol):
    """Where ``table`` writes: a text stream, or ``_Indent`` around one."""

    def write(self, text: str, /) -> object: ...


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str], out: _Writer) -> None:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]
    widths = [min(w, 80) for w in widths]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out.write(line.rstrip() + "\n")
    for r in cells:
        out.write(
            "  ".join(c[:80].ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n"
        )


def _run(args: argparse.Namespace, fn: Any) -> int:
    """Open a session on the audit DB and run ``fn(session)``; DB errors -> exit 1."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from db.session import session_scope

    url = _url(args)
    try:
        with session_scope(url) as s:
            return int(fn(s) or 0)
    except (OperationalError, ProgrammingError) as exc:
        msg = str(exc.orig if getattr(exc, "orig", None) else exc).splitlines()[0]
        print(
            f"cxr audit: database error: {msg} (is the schema there? `cxr db upgrade`)",
            file=sys.stderr,
        )
        return 1


def _json_default(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat()
    return str(v)


# ---------------------------------------------------------------------------- commands
def cmd_list(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    from db.queries import list_instances

    out = out or sys.stdout
    try:
        flt = _filter(args)
    except ValueError as exc:
        print(f"cxr audit list: {exc}", file=sys.stderr)
        return 2

    def go(s: Any) -> int:
        rows = list_instances(s, flt)
        if args.json:
            for r in rows:
                out.write(json.dumps(r.as_dict(), default=_json_default) + "\n")
        else:
            table(
                [[getattr(r, k) for k, _ in LIST_COLUMNS] for r in rows],
                [h for _, h in LIST_COLUMNS],
                out,
            )
            out.write(f"({len(rows)} instance(s))\n")
        return 0

    return _run(args, go)


def cmd_show(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    from db.queries import instance_history

    out = out or sys.stdout

    def go(s: Any) -> int:
        hist = instance_history(s, args.uid)
        if not hist:
            print(f"cxr audit show: no instance {args.uid}", file=sys.stderr)
            return 1
        if args.json:
            out.write(
                json.dumps([h.as_dict() for h in hist], default=_json_default, indent=2) + "\n"
            )
            return 0
        for h in hist:
            i = h.instance
            out.write(f"== instance {i.id} (version {i.version}) ==\n")
            for k in (
                "sop_instance_uid",
                "study_instance_uid",
                "accession_number",
                "patient_id_hash",
                "modality",
                "view_position",
                "size_bytes",
                "calling_ae",
                "received_at",
                "state",
                "reason",
                "attempts",
                "finished_at",
                "delivered_at",
                "end_to_end_ms",
            ):
                out.write(f"  {k:<20} {_fmt(getattr(i, k))}\n")
            if h.association:
                a = h.association
                out.write(
                    f"  association          #{a['id']} {a['calling_ae']} -> {a['called_ae']} "
                    f"from {a['peer_host']}:{a['peer_port']} tls={a['tls']} {a['outcome']}\n"
                )
            out.write("  -- events --\n")
            table(
                [[e["at"], e["kind"], e["detail"]] for e in h.events],
                ["AT", "KIND", "DETAIL"],
                _Indent(out),
            )
            out.write("  -- inferences --\n")
            for inf in h.inferences:
                timings = "  ".join(
                    f"{k[2:-3]}={inf[k]:.1f}"
                    for k in inf
                    if k.startswith("t_") and inf[k] is not None
                )
                out.write(
                    f"    #{inf['id']} {inf['created_at']} model {inf['model_version']} "
                    f"({inf['engine'] or '-'}) verdict {inf['verdict']} "
                    f"COVID={inf['p_covid']:.3f} Normal={inf['p_normal']:.3f} Other={inf['p_other']:.3f}\n"
                    f"       timings ms: {timings or '-'}\n"
                    f"       SC {inf['sc_sop_instance_uid'] or '-'}  SR {inf['sr_sop_instance_uid'] or '-'}"
                    f"  HM {inf.get('hm_sop_instance_uid') or '-'}\n"
                )
            out.write("  -- deliveries --\n")
            table(
                [
                    [
                        d["destination"],
                        d["kind"],
                        d["state"],
                        d["attempts"],
                        d["last_status"],
                        d["delivered_at"],
                        d["last_error"],
                    ]
                    for d in h.deliveries
                ],
                ["DESTINATION", "KIND", "STATE", "ATTEMPTS", "STATUS", "DELIVERED AT", "ERROR"],
                _Indent(out),
            )
        return 0

    return _run(args, go)


class _Indent:
    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def write(self, text: str) -> None:
        self.out.write("    " + text)


def cmd_stats(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    from db.queries import compute_stats

    out = out or sys.stdout
    try:
        flt = _filter(args)
    except ValueError as exc:
        print(f"cxr audit stats: {exc}", file=sys.stderr)
        return 2

    def go(s: Any) -> int:
        st = compute_stats(s, flt)
        if args.json:
            out.write(json.dumps(st.as_dict(), default=_json_default, indent=2) + "\n")
            return 0
        out.write(f"instances: {st.total}\n\nper state:\n")
        table([[k, v] for k, v in st.per_state.items()], ["STATE", "COUNT"], _Indent(out))
        out.write("\nper verdict:\n")
        table([[k, v] for k, v in st.per_verdict.items()], ["VERDICT", "COUNT"], _Indent(out))
        out.write("\nlatency (ms):\n")
        table(
            [[k, v.n, v.p50_ms, v.p95_ms, v.max_ms] for k, v in st.latency.items()],
            ["STAGE", "N", "P50", "P95", "MAX"],
            _Indent(out),
        )
        return 0

    return _run(args, go)


def cmd_retry(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    from db.queries import prepare_retry
    from db.session import session_scope

    out = out or sys.stdout
    url = _url(args)
    if args.dry_run:
        from db.queries import retry_candidates

        with session_scope(url) as s:
            for iid, uid, state in retry_candidates(s, uid=args.uid, state=args.state):
                out.write(f"would retry instance {iid} {uid} ({state})\n")
        return 0
    try:
        with session_scope(url) as s:
            actions, notes = prepare_retry(
                s, uid=args.uid, state=args.state, limit=args.limit or None
            )
    except ValueError as exc:
        print(f"cxr audit retry: {exc}", file=sys.stderr)
        return 2
    for n in notes:
        print(f"cxr audit retry: {n}", file=sys.stderr)
    if not actions:
        out.write("nothing to retry\n")
        return 1 if args.uid else 0
    from cxr.settings import get_settings

    settings = get_settings()
    if args.database_url:  # enqueue_instance records received -> queued in this DB
        settings = settings.model_copy(update={"database_url": url})
    sent, pending = _send_tasks(settings, actions)
    for a in actions:
        how = (
            "queued"
            if a.instance_id in sent
            else "reset (broker unavailable: the sweep will queue it)"
        )
        out.write(
            f"instance {a.instance_id} {a.sop_instance_uid}: {a.from_state} -> {a.to_state}, {a.task} {how}\n"
        )
    out.write(f"{len(actions)} instance(s) reset, {len(sent)} task(s) sent\n")
    return 0 if not pending else 3


def _send_tasks(settings: Any, actions: Sequence[Any]) -> tuple[set[int], set[int]]:
    """Send the task of every retried instance; returns (sent ids, not sent ids)."""
    from db.lifecycle import send_retries

    return send_retries(settings, actions)


def cmd_export(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    from db.queries import list_instances

    try:
        flt = _filter(args)
    except ValueError as exc:
        print(f"cxr audit export: {exc}", file=sys.stderr)
        return 2

    def go(s: Any) -> int:
        rows = list_instances(s, flt)
        if args.csv == "-":
            _write_csv(rows, out or sys.stdout)
        else:
            with open(args.csv, "w", newline="", encoding="utf-8") as f:
                _write_csv(rows, f)
            print(f"wrote {len(rows)} row(s) to {args.csv}", file=sys.stderr)
        return 0

    return _run(args, go)


def _write_csv(rows: Sequence[Any], f: IO[str]) -> None:
    w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.as_dict().items()})
