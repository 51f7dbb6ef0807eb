"""End to end against real services: Orthanc (the PACS) pushes the shared samples to a
`cxr node` subprocess, `cxr worker` subprocesses (Celery prefork) classify them with the
tiny test model and send the SC, the SR and the heat map (Segmentation) back to Orthanc;
the audit DB tells the story.

Runs with Redis + PostgreSQL, and once with the embedded defaults (SQLite broker + SQLite
audit DB, no server). One test uses the shipped model when present."""

from __future__ import annotations

import io
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from db.models import Delivery, Event, Inference, State
from db.session import session_scope
from tests.conftest import free_port
from tests.worker.conftest import Stack, wait_for
from tests.worker.result_refs import check_references

pytestmark = [pytest.mark.slow, pytest.mark.orthanc, pytest.mark.timeout(300)]

RESULT_PREFIX = "AI TRIAGE"


def upload_samples(orthanc, folder: Path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Upload every file of ``folder``; returns {SOP Instance UID: Orthanc ID} of what
    Orthanc holds (two samples share a SOP Instance UID: Orthanc keeps the first; one
    not-chest sample has no Study Instance UID: Orthanc refuses it)."""
    held: dict[str, str] = {}
    for f in sorted(folder.glob("*.dcm")):
        try:
            ans = orthanc.upload(f)
        except urllib.error.HTTPError as exc:
            # e.g. multiframe.dcm has no StudyInstanceUID: a PACS cannot hold it
            assert exc.code == 400 and "not-chest" in str(folder), f.name
            continue
        uid = orthanc.tags(ans["ID"])["SOPInstanceUID"]
        held.setdefault(uid, ans["ID"])
    return held


def walk_uids(ds: pydicom.Dataset, keyword: str = "ReferencedSOPInstanceUID") -> set[str]:
    found: set[str] = set()
    for elem in ds.iterall():
        if elem.keyword == keyword:
            found.add(str(elem.value))
    return found


def check_pacs_holds_results(stack: Stack, sources: dict[str, str]) -> None:
    """Every source has exactly one SC, one SR and one heat map in Orthanc, in its own
    study, referencing it; the SR also references the heat map (and the SC); the heat map
    has the source's pixel grid; Orthanc holds no other result."""
    o = stack.orthanc

    def ours() -> list[dict]:  # type: ignore[type-arg]
        held = o.all_instance_tags()
        mine = [t for t in held if str(t.get("SeriesDescription", "")).startswith(RESULT_PREFIX)]
        return held if len(mine) >= 3 * len(sources) else []

    # SC, SR and heat map of every source, all in the PACS
    by_uid = {t["SOPInstanceUID"]: t for t in wait_for(ours, 30, what="SC+SR+heat map")}
    results = {
        u: t
        for u, t in by_uid.items()
        if str(t.get("SeriesDescription", "")).startswith(RESULT_PREFIX)
    }
    with session_scope(stack.db_url) as s:
        infs = s.execute(select(Inference)).scalars().all()
        inst_by_id = {i.id: i for i in stack.instances()}
        expected: set[str] = set()
        for inf in infs:
            src_uid = inst_by_id[inf.instance_id].sop_instance_uid
            if src_uid not in sources:
                continue
            src = by_uid[src_uid]
            outputs = (
                (inf.sc_sop_instance_uid, "OT"),
                (inf.sr_sop_instance_uid, "SR"),
                (inf.hm_sop_instance_uid, "SEG"),
            )
            files: dict[str, pydicom.Dataset] = {}
            for uid, modality in outputs:
                assert uid in results, f"{modality} result {uid} of {src_uid} not in the PACS"
                r = results[uid]
                assert r["StudyInstanceUID"] == src["StudyInstanceUID"]
                assert r["SeriesInstanceUID"] != src["SeriesInstanceUID"]
                assert r["Modality"] == modality
                ds = pydicom.dcmread(io.BytesIO(o.file(r["_id"])))
                assert src_uid in walk_uids(ds), f"{uid} does not reference its source"
                files[modality] = ds
                expected.add(uid)
            assert {inf.hm_sop_instance_uid, inf.sc_sop_instance_uid} <= walk_uids(files["SR"])
            # and each where it belongs (Source Image / Referenced Series Sequence, SR
            # evidence, the heat map's frame as the verdict's region)
            check_references({"SC": files["OT"], "SR": files["SR"], "HM": files["SEG"]}, src)
            hm = files["SEG"]
            assert hm.SegmentationType == "FRACTIONAL" and hm.SeriesNumber == 9903
            assert (hm.Rows, hm.Columns) == (int(src["Rows"]), int(src["Columns"]))
    # one SC + one SR + one heat map per distinct source SOP Instance UID, nothing else
    assert set(results) == expected
    assert len(expected) == 3 * len(sources)
    series = {t["SeriesInstanceUID"] for t in results.values()}
    assert len(series) == 3 * len(sources), "one SC, one SR and one heat-map series per source"


def check_audit_story(stack: Stack, chest_uids: set[str]) -> None:
    rows = stack.instances()
    chest = [r for r in rows if r.sop_instance_uid in chest_uids]
    assert chest, "no chest instance was received"
    for r in chest:
        assert r.state == State.DELIVERED.value, (r.sop_instance_uid, r.state, r.reason)
    with session_scope(stack.db_url) as s:
        for r in chest:
            infs = s.execute(select(Inference).where(Inference.instance_id == r.id)).scalars().all()
            assert len(infs) == 1
            inf = infs[0]
            assert inf.p_covid + inf.p_normal + inf.p_other == pytest.approx(1.0, abs=1e-4)
            assert inf.verdict in ("COVID", "Normal", "Other")
            assert inf.t_forward_ms is not None and inf.t_send_ms is not None
            dels = s.execute(select(Delivery).where(Delivery.instance_id == r.id)).scalars().all()
            assert sorted(d.kind for d in dels) == ["HM", "SC", "SR"]
            assert all(d.state == "delivered" and d.delivered_at for d in dels)
            kinds = [
                e.kind
                for e in s.execute(
                    select(Event).where(Event.instance_id == r.id).order_by(Event.id)
                ).scalars()
            ]
            for k in ("received", "processing", "classified", "delivered"):
                assert k in kinds, (k, kinds)
            assert kinds.index("processing") < kinds.index("classified") < kinds.index("delivered")


def run_flow(
    stack: Stack, dicom_samples: Path, with_not_chest: bool = True, timeout: float = 120
) -> None:
    o = stack.orthanc
    chest = upload_samples(o, dicom_samples / "chest")
    others = upload_samples(o, dicom_samples / "not-chest") if with_not_chest else {}
    o.push("cxr", list(chest.values()))
    for oid in others.values():  # one by one: a refusal must not stop the others
        try:
            o.push("cxr", [oid])
        except Exception:
            pass
    # the pushes are synchronous: every row the node writes exists by now
    rows = stack.wait_all_final(len(chest), timeout)
    assert {r.sop_instance_uid for r in rows} >= set(chest)
    by_uid = {r.sop_instance_uid: r for r in rows}
    for uid in others:
        r = by_uid.get(uid)
        if r is not None:  # the node may also refuse a broken one outright
            assert r.state in (State.IGNORED.value, State.FAILED.value), (uid, r.state)
            assert r.state == State.IGNORED.value or r.reason
    assert (
        any(by_uid.get(u) and by_uid[u].state == State.IGNORED.value for u in others) or not others
    )
    check_audit_story(stack, set(chest))
    check_pacs_holds_results(stack, chest)
    # nothing came back for the not-chest samples
    with session_scope(stack.db_url) as s:
        ignored_ids = {r.id for r in rows if r.sop_instance_uid in others}
        assert not s.execute(
            select(Inference).where(Inference.instance_id.in_(ignored_ids))
        ).first()


@pytest.fixture
def make_stack(tmp_path, orthanc, tiny_model_dir, model_cache_dir):  # type: ignore[no-untyped-def]
    stacks: list[Stack] = []

    def _make(
        db_url: str, broker_url: str = "", model_dir: Path | None = None, **env: object
    ) -> Stack:
        st = Stack(
            tmp_path,
            orthanc,
            db_url,
            model_dir or tiny_model_dir,
            model_cache_dir,
            broker_url,
            **env,
        )
        stacks.append(st)
        return st

    yield _make
    for st in stacks:
        st.close()


@pytest.mark.redis
@pytest.mark.postgres
def test_e2e_redis_postgres(pg_url, private_redis, make_stack, dicom_samples):  # type: ignore[no-untyped-def]
    stack = make_stack(pg_url, private_redis.url)
    stack.start_worker(concurrency=2)
    stack.start_node()
    run_flow(stack, dicom_samples)


def test_e2e_embedded_defaults(make_stack, tmp_path, dicom_samples):  # type: ignore[no-untyped-def]
    """No CXR_BROKER_URL (embedded SQLite broker), SQLite audit DB: still real Celery."""
    stack = make_stack(f"sqlite:///{tmp_path / 'audit.db'}")
    assert "CXR_BROKER_URL" not in stack.env
    metrics_port = free_port()
    stack.start_worker(concurrency=1, CXR_METRICS_PORT=metrics_port)
    stack.start_node()
    run_flow(stack, dicom_samples, timeout=150)
    assert (tmp_path / "broker.sqlite").is_file()
    # the pool process's counters reach the worker's /metrics (multiprocess mode)
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    n_chest = len(
        {r.sop_instance_uid for r in stack.instances() if r.state == State.DELIVERED.value}
    )
    inferred = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("cxr_inferences_total{")
    )
    assert inferred == n_chest, text[:2000]
    assert 'cxr_deliveries_total{status="success"} ' + f"{3 * n_chest}.0" in text


def test_e2e_shipped_model(make_stack, tmp_path, dicom_samples):  # type: ignore[no-untyped-def]
    from cxr.settings import default_model_dir

    shipped = default_model_dir()
    if not (shipped / "model_card.json").is_file():
        pytest.skip(f"the shipped model {shipped} is not in this checkout")
    stack = make_stack(f"sqlite:///{tmp_path / 'audit.db'}", model_dir=shipped)
    stack.start_worker(concurrency=1, timeout=360)  # exports the shipped model to ONNX
    stack.start_node()
    o = stack.orthanc
    ans = o.upload(dicom_samples / "chest" / "dx_thorax_monochrome1.dcm")
    o.push("cxr", [ans["ID"]])
    rows = stack.wait_all_final(1, 180)
    assert rows[0].state == State.DELIVERED.value
    with session_scope(stack.db_url) as s:
        inf = s.execute(select(Inference)).scalar_one()
    import json

    card = json.loads((shipped / "model_card.json").read_text())
    assert inf.model_version == str(card.get("version"))
    wait_for(lambda: len(o.instances()) == 4, 10, what="SC+SR+heat map in Orthanc")
