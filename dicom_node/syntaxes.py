"""Presentation contexts the node accepts: SOP classes and decodable transfer syntaxes."""

from __future__ import annotations

import logging

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AllStoragePresentationContexts, build_context
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

log = logging.getLogger(__name__)

#: always offered (no pixel decoder needed)
UNCOMPRESSED_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
)

#: offered only when an installed decoder can decode it
COMPRESSED_SYNTAXES: tuple[UID, ...] = (
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
)


def can_decode(uid: str) -> bool:
    """True when pydicom has an available pixel decoder plugin for ``uid``."""
    if uid in UNCOMPRESSED_SYNTAXES:
        return True
    try:
        from pydicom.pixels.decoders.base import get_decoder

        return bool(get_decoder(UID(uid)).is_available)
    except Exception:
        return False


def accepted_transfer_syntaxes() -> list[UID]:
    """Uncompressed syntaxes plus every compressed syntax an installed decoder handles."""
    out = list(UNCOMPRESSED_SYNTAXES)
    missing = []
    for uid in COMPRESSED_SYNTAXES:
        if can_decode(uid):
            out.append(uid)
        else:
            missing.append(uid.name)
    if missing:
        log.warning("not offering transfer syntaxes without a decoder: %s", ", ".join(missing))
    return out


def supported_contexts() -> list[PresentationContext]:
    """Verification plus every Storage SOP class pynetdicom knows, each with the accepted
    transfer syntaxes. Non-chest classes are accepted so that routing mistakes are
    acknowledged and recorded as ignored instead of failing in the PACS queue."""
    syntaxes: list[str | UID] = list(accepted_transfer_syntaxes())
    contexts = [build_context(Verification)]
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:
            contexts.append(build_context(cx.abstract_syntax, syntaxes))
    return contexts
