"""Issue 9, defect 1: one crafted C-STORE must never hang the node.

The crafted data set has a PatientName that decodes as a sequence whose item holds a
person name that is not valid in the data set's character set (UTF-8). Turning that value
into text makes pydicom log a warning (whatever the validation mode).
The PHI registration used to hold its (non-reentrant) lock during that conversion while
the log filter waited for the same lock: from then on no C-STORE answer, no C-ECHO,
SIGTERM ignored, and /healthz still said ``ok``. The test runs the real ``cxr node`` at
INFO and at DEBUG, sends a normal study first (so that PHI is registered and the log
filter is active), then the crafted one, and checks that the node answers, echoes,
reports healthy, exits cleanly on SIGTERM and logs no PHI.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE

from dicom_node.status import SUCCESS
from tests.conftest import free_port, make_chest_dataset
from tests.node.conftest import echo, wait_for
from tests.node.test_policy import _cli_env

EXPLICIT_LE = "1.2.840.10008.1.2.1"
CR = "1.2.840.10008.5.1.4.1.1.1"
SECRET_ID = "PHISECRET4242"


def crafted_dataset(seed: int) -> Dataset:
    ds = make_chest_dataset(seed=seed)
    del ds.PatientName
    ds.SpecificCharacterSet = "ISO_IR 192"
    item = Dataset()
    item.add(DataElement(0x00100010, "PN", SECRET_ID.encode() + b"\xff\xfe^Name"))
    ds.add(DataElement(0x00100010, "SQ", Sequence([item])))
    return ds


def _healthz(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.mark.redis
@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_crafted_patient_name_does_not_hang(tmp_path: Path, node_redis: str, level: str) -> None:
    port, mport = free_port(), free_port()
    env = _cli_env(tmp_path, port, node_redis, CXR_METRICS_PORT=str(mport), CXR_LOG_LEVEL=level)
    proc = subprocess.Popen(
        [sys.executable, "-m", "apps.cli", "node"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = ""
    try:
        assert wait_for(lambda: echo(("127.0.0.1", port)) == SUCCESS, timeout=60)
        ae = AE(ae_title="PACS")
        ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = 20
        ae.add_requested_context(CR, EXPLICIT_LE)
        assoc = ae.associate("127.0.0.1", port, ae_title="CXR_WORKER")
        assert assoc.is_established
        # a normal study first: its PatientName/ID are registered, the log filter is live
        assert assoc.send_c_store(make_chest_dataset(seed=70)).Status == SUCCESS
        rsp = assoc.send_c_store(crafted_dataset(seed=71))
        assert "Status" in rsp, "no C-STORE response to the crafted data set: the node hangs"
        assoc.release()
        # the node still serves: C-ECHO, and /healthz is honest and healthy
        assert echo(("127.0.0.1", port)) == SUCCESS
        code, body = _healthz(mport)
        assert code == 200 and body.get("status") == "ok", body
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            out = (out or "") + (proc.communicate()[0] or "")
    assert SECRET_ID not in out
    assert "Doe^Jane" not in out and "PID-12345" not in out  # make_chest_dataset patient
