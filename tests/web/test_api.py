"""The REST API of ``cxr web`` against a real running ``cxr run`` stack (httpx): the audit
DB was filled by real C-STOREs (DCMTK dcmsend) through the node, classified by the worker
with the shipped model and delivered to a real SCP (tests/web/conftest.py)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import cv2
import numpy as np
import pytest

from tests.conftest import CXR_DATA
from tests.web.conftest import COVID_PNG, NORMAL_PNG, PHI_ID, PHI_NAME, WebStack

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]


def test_health_needs_no_login_and_names_every_part(stack: WebStack) -> None:
    with stack.client() as c:
        r = c.get("/api/v1/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] in ("ok", "degraded")
    checks = body["checks"]
    assert checks["database"]["ok"] is True
    assert checks["node"]["ok"] is True
    # no hosts, paths or error texts without a login
    assert all(set(c) == {"ok"} for c in checks.values()), checks
    assert checks["broker"]["ok"] is True
    assert checks["model"]["ok"] is True
    assert checks["workers"]["ok"] is True  # as `cxr run` sees its worker processes


@pytest.mark.parametrize(
    "path",
    ["/api/v1/instances", "/api/v1/stats", "/openapi.json", "/api/v1/instances/1.2.3"],
)
def test_everything_else_needs_a_login(stack: WebStack, path: str) -> None:
    with stack.client() as c:
        r = c.get(path)
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Basic")
        assert c.get(path, auth=("admin", "wrong-password")).status_code == 401
        # a page redirects to the login page instead
        p = c.get("/worklist")
        assert p.status_code == 303 and p.headers["location"].startswith("/login")
        # static files need none
        assert c.get("/static/app.css").status_code == 200


def test_instances_newest_first_with_filters_and_paging(stack: WebStack) -> None:
    with stack.client(auth=stack.admin) as c:
        body = c.get("/api/v1/instances").json()
        items = body["items"]
        assert body["total"] == 4 and len(items) == 4
        ids = [i["id"] for i in items]
        assert ids == sorted(ids, reverse=True)  # newest first
        by_sop = {i["sop_instance_uid"]: i for i in items}
        covid = by_sop[stack.sops["covid"]]
        assert covid["verdict"] == "COVID" and covid["state"] == "delivered"
        assert covid["p_covid"] > 0.5 and covid["calling_ae"] == "MODALITY1"
        assert by_sop[stack.sops["refused"]]["state"] == "delivery_failed"

        def sops(**params: object) -> set[str]:
            r = c.get("/api/v1/instances", params=params)
            assert r.status_code == 200, r.text
            return {i["sop_instance_uid"] for i in r.json()["items"]}

        refused = {stack.sops["refused"], stack.sops["refused2"]}
        assert sops(state="delivery_failed") >= {stack.sops["refused"]}  # until retried
        assert sops(state="delivered") >= {stack.sops["covid"], stack.sops["normal"]}
        assert sops(state=["delivered", "delivery_failed"]) == set(stack.sops.values())
        assert refused <= set(stack.sops.values())
        assert sops(verdict="COVID") == {stack.sops["covid"]}
        assert sops(calling_ae="MODALITY1") == set(stack.sops.values())
        assert sops(calling_ae="OTHER_AE") == set()
        today = datetime.now(UTC).date()
        assert sops(since=str(today), until=str(today)) == set(stack.sops.values())
        assert sops(since=str(today + timedelta(days=1))) == set()
        assert sops(until=str(today - timedelta(days=1))) == set()
        page1 = c.get("/api/v1/instances", params={"limit": 3}).json()
        page2 = c.get("/api/v1/instances", params={"limit": 3, "offset": 3}).json()
        assert page1["total"] == page2["total"] == 4
        assert len(page1["items"]) == 3 and len(page2["items"]) == 1
        assert [i["id"] for i in page1["items"] + page2["items"]] == ids
        assert c.get("/api/v1/instances", params={"since": "yesterday"}).status_code == 422
        assert c.get("/api/v1/instances", params={"offset": 10**23}).status_code == 422
        assert c.get("/api/v1/instances/1.2.3%0A").status_code == 422  # fullmatch, no "$"


def test_instance_history_has_events_inference_and_deliveries(stack: WebStack) -> None:
    with stack.client(auth=stack.admin) as c:
        r = c.get(f"/api/v1/instances/{stack.sops['covid']}")
        assert r.status_code == 200
        (v,) = r.json()["versions"]
        kinds = [e["kind"] for e in v["events"]]
        assert kinds[0] == "received" and "delivered" in kinds
        (inf,) = v["inferences"]
        assert inf["verdict"] == "COVID" and inf["model_version"] == "2.0.0"
        assert abs(inf["p_covid"] + inf["p_normal"] + inf["p_other"] - 1) < 1e-6
        assert inf["t_forward_ms"] > 0 and inf["ood"] is False
        assert {d["state"] for d in v["deliveries"]} == {"delivered"}
        assert {d["kind"] for d in v["deliveries"]} >= {"SC", "SR"}
        assert c.get("/api/v1/instances/1.2.3.4.5").status_code == 404
        assert c.get("/api/v1/instances/not-a-uid").status_code == 422


def test_stats_are_those_of_cxr_audit_stats(stack: WebStack) -> None:
    import subprocess
    import sys

    with stack.client(auth=stack.viewer) as c:
        api = c.get("/api/v1/stats").json()
    assert api["total"] == 4 and api["queue_depth"] == 0
    assert api["per_verdict"]["COVID"] == 1
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "apps.cli",
            "audit",
            "stats",
            "--database-url",
            f"sqlite:///{stack.work / 'audit.db'}",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    cli_stats = json.loads(cli.stdout)
    assert cli_stats["per_state"] == api["per_state"]
    assert cli_stats["per_verdict"] == api["per_verdict"]
    assert cli_stats["latency_ms"]["forward"] == api["latency_ms"]["forward"]


def _decode_png(b64: str) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None
    return img


@pytest.mark.parametrize("rel, label", [(COVID_PNG, "COVID"), (NORMAL_PNG, "Normal")])
def test_predict_a_real_radiograph(stack: WebStack, rel: str, label: str) -> None:
    data = (CXR_DATA / rel).read_bytes()
    with stack.client(auth=stack.admin) as c:
        r = c.post(
            "/api/v1/predict",
            params={"image": "true"},
            files={"file": (rel.split("/")[-1], data, "image/png")},
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] == label
    assert set(body["probabilities"]) == {"COVID", "Normal", "Other"}
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-4
    assert body["model"] == {"name": "cxr-densenet169", "version": "2.0.0"}
    assert body["ood"] is False and body["ood_score"] > 0
    assert "not for diagnostic use" in body["disclaimer"]
    overlay = _decode_png(body["overlay_png_base64"])
    plain = _decode_png(body["image_png_base64"])
    grey = cv2.imread(str(CXR_DATA / rel), cv2.IMREAD_GRAYSCALE)
    assert overlay.shape[:2] == plain.shape[:2]
    # the preview keeps the radiograph's aspect ratio (at most 1024 px on the long side)
    assert abs(overlay.shape[0] / overlay.shape[1] - grey.shape[0] / grey.shape[1]) < 0.02
    assert overlay.ndim == 3 and not np.array_equal(overlay[..., 0], overlay[..., 2])  # coloured


def test_predict_a_dicom_upload_and_a_phantom_is_flagged(stack: WebStack) -> None:
    """A DICOM file classifies as its PNG does; an out-of-scope image is flagged."""
    ds_path = stack.work / "covid.dcm"
    with stack.client(auth=stack.admin) as c:
        r = c.post("/api/v1/predict", files={"file": ("x.dcm", ds_path.read_bytes())})
        assert r.status_code == 200, r.text
        assert r.json()["label"] == "COVID"
        assert r.json()["image_png_base64"] is None  # only the overlay unless ?image=true
        # a smooth gradient phantom is nothing like a radiograph
        yy, xx = np.mgrid[0:256, 0:256]
        ok, buf = cv2.imencode(".png", ((xx + yy) / 2).astype(np.uint8))
        r = c.post("/api/v1/predict", files={"file": ("p.png", buf.tobytes())})
        assert r.status_code == 200
        assert r.json()["ood"] is True
        assert "outside the model's training distribution" in r.json()["ood_message"]


def test_no_patient_name_in_any_answer(stack: WebStack) -> None:
    uid = stack.sops["covid"]
    with stack.client(auth=stack.admin) as c:
        texts = [
            c.get("/api/v1/instances").text,
            c.get(f"/api/v1/instances/{uid}").text,
            c.get("/api/v1/stats").text,
        ]
    for t in texts:
        assert "Zyxquor" not in t and PHI_NAME not in t and PHI_ID not in t


def test_retry_needs_admin_and_redelivers(stack: WebStack) -> None:
    uid = stack.sops["refused"]
    with stack.client(auth=stack.viewer) as c:
        assert c.post(f"/api/v1/instances/{uid}/retry").status_code == 403
    with stack.client(auth=stack.admin) as c:
        # a Basic-authenticated POST from another origin is refused (CSRF)
        r = c.post(f"/api/v1/instances/{uid}/retry", headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
        # a delivered instance is not retriable
        r = c.post(f"/api/v1/instances/{stack.sops['normal']}/retry")
        assert r.status_code == 409 and "not retriable" in r.json()["message"]
        assert c.post("/api/v1/instances/1.2.3.4.5/retry").status_code == 404
        # the PACS takes the study now: the retry delivers it
        with stack.pacs.lock:
            stack.pacs.refuse.discard(stack.studies["refused"])
        r = c.post(f"/api/v1/instances/{uid}/retry")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["reset"][0]["from"] == "delivery_failed"
        assert body["reset"][0]["to"] == "classified"
    stack.wait_states({uid: {"delivered"}})
    with stack.client(auth=stack.admin) as c:
        (v,) = c.get(f"/api/v1/instances/{uid}").json()["versions"]
    retry_events = [e for e in v["events"] if e["kind"] == "retry"]
    assert retry_events and "web:admin retry" in retry_events[0]["detail"]
    with stack.pacs.lock:
        got = [s for s, _ in stack.pacs.received if s == stack.studies["refused"]]
    assert len(got) >= 2  # SC and SR of the retried instance reached the PACS


def test_openapi_page_documents_the_api(stack: WebStack) -> None:
    with stack.client(auth=stack.admin) as c:
        spec = c.get("/openapi.json").json()
    paths = spec["paths"]
    for p in (
        "/api/v1/predict",
        "/api/v1/instances",
        "/api/v1/instances/{sop_instance_uid}",
        "/api/v1/instances/{sop_instance_uid}/retry",
        "/api/v1/stats",
        "/api/v1/health",
    ):
        assert p in paths, p
    assert "multipart/form-data" in json.dumps(paths["/api/v1/predict"]["post"]["requestBody"])
    assert "not for diagnostic use" in spec["info"]["description"].lower()
