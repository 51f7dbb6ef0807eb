"""The web process's classifier: the shipped model from its ONNX cache (no TensorFlow in
this process), uploads kept only when CXR_WEB_KEEP_UPLOADS says so."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cxr.settings import load_settings
from tests.conftest import CXR_DATA
from tests.web.conftest import NORMAL_PNG
from web.inference import UploadError, WebClassifier


@pytest.mark.parametrize("keep", [False, True])
def test_uploads_are_kept_only_when_the_setting_says_so(
    tmp_path: Path, shipped_model_cache: Path, keep: bool
) -> None:
    settings = load_settings(
        model_cache_dir=shipped_model_cache,
        web_keep_uploads=keep,
        web_upload_dir=tmp_path / "uploads",
    )
    clf = WebClassifier(settings)
    data = (CXR_DATA / NORMAL_PNG).read_bytes()
    pred = clf.predict_bytes(data, "chest.png", with_image=False)
    assert pred.label == "Normal" and pred.image_png is None
    assert pred.overlay_png.startswith(b"\x89PNG")
    kept = list((tmp_path / "uploads").glob("*")) if (tmp_path / "uploads").exists() else []
    if keep:
        assert [p.name for p in kept] == [hashlib.sha256(data).hexdigest() + ".png"]
        assert kept[0].read_bytes() == data
    else:
        assert kept == []
    with pytest.raises(UploadError) as e:
        clf.predict_bytes(b"GIF89a" + b"\0" * 100)
    assert e.value.status == 415
