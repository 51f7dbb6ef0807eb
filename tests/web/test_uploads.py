"""Bad uploads to the running console (API and Try it page): empty, huge, text, a
truncated PNG, a DICOM without pixels. Each gets a 4xx with a message and the app keeps
serving; nothing of them is stored."""

from __future__ import annotations

import io
import re

import pytest
from pydicom import dcmread

from tests.conftest import CXR_DATA
from tests.web.conftest import MAX_UPLOAD, NORMAL_PNG, WebStack

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]


def _no_pixels(stack: WebStack) -> bytes:
    ds = dcmread(stack.work / "normal.dcm")
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _cases(stack: WebStack) -> list[tuple[str, bytes, int, str]]:
    png = (CXR_DATA / NORMAL_PNG).read_bytes()
    return [
        ("empty.png", b"", 400, "empty"),
        ("huge.png", png + b"\0" * (MAX_UPLOAD + 1), 413, ""),
        ("notes.txt", b"Patient is fine.\n" * 50, 415, "not a PNG, JPEG or DICOM"),
        ("cut.png", png[: len(png) // 3], 422, "truncated or corrupt"),
        ("nopix.dcm", _no_pixels(stack), 422, "no pixel data"),
        ("tiny.png", png[:8] + b"\0" * 10, 422, "corrupt"),
        ("bomb.png", _bomb(), 422, "image too large"),
    ]


def _bomb() -> bytes:
    """A small file that decodes to 49 M pixels (over CXR_WEB_MAX_PIXELS, 36 M)."""
    import cv2
    import numpy as np

    ok, buf = cv2.imencode(".png", np.zeros((7000, 7000), np.uint8))
    assert ok and len(buf) < MAX_UPLOAD
    return buf.tobytes()


def test_bad_uploads_to_the_api_get_a_4xx_and_a_message(stack: WebStack) -> None:
    with stack.client(auth=stack.admin) as c:
        for name, data, status, words in _cases(stack):
            r = c.post("/api/v1/predict", files={"file": (name, data)})
            assert r.status_code == status, (name, r.status_code, r.text[:200])
            if words:
                assert words in r.json()["detail"], (name, r.text)
        # an anonymous upload is refused before its body is read
        with stack.client() as anon:
            r = anon.post("/api/v1/predict", files={"file": ("x.png", b"1" * 1000)})
            assert r.status_code == 401
            r = anon.post("/try", files={"file": ("x.png", b"1" * 1000)})
            assert r.status_code == 303 and r.headers["location"].startswith("/login")
        # no file at all
        r = c.post("/api/v1/predict", files={"other": ("x", b"1")})
        assert r.status_code == 400 and "multipart field 'file'" in r.json()["detail"]
        # still serving, and a good file still works
        assert c.get("/api/v1/health").status_code == 200
        good = c.post(
            "/api/v1/predict", files={"file": ("ok.png", (CXR_DATA / NORMAL_PNG).read_bytes())}
        )
        assert good.status_code == 200 and good.json()["label"] == "Normal"
    assert stack.proc.poll() is None
    # uploads are not kept (CXR_WEB_KEEP_UPLOADS is off)
    assert not (stack.work / "var" / "uploads").exists()


def test_bad_uploads_on_the_try_page_show_the_message(stack: WebStack) -> None:
    with stack.client() as c:
        tok = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)  # type: ignore[union-attr]
        c.post(
            "/login",
            data={"username": "admin", "password": stack.admin_password, "csrf_token": tok},
        )
        tok = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/try").text).group(1)  # type: ignore[union-attr]
        for name, data, status, words in _cases(stack):
            if status == 413:
                continue  # the limit answers before the page (and the page's script first)
            r = c.post("/try", data={"csrf_token": tok}, files={"file": (name, data)})
            assert r.status_code == status, name
            m = re.search(r'id="upload-error">([^<]*)<', r.text)
            assert m and words in m.group(1), (name, r.text[-800:])
            assert "Try a radiograph" in r.text  # the page itself, ready for another try
        r = c.post(
            "/try",
            data={"csrf_token": tok},
            files={"file": ("huge.png", b"\0" * (MAX_UPLOAD + 1))},
        )
        assert r.status_code == 413
        assert c.get("/try").status_code == 200
