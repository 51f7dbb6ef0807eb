"""The Model page: the artifact's MODEL_CARD.md rendered to HTML, with its plots.

Markdown is rendered with raw HTML escaped (the card is text written by ``cxr train``,
but a page must not run what a file says). Plots are served only from the model folder,
by a name that is checked against the files actually there (no path traversal).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from fastapi import HTTPException

PLOT_SUFFIXES = {".png": "image/png"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+){0,2}$")


def plots(model_dir: Path) -> list[str]:
    """Relative paths of the card's plots (learning curves, confusion matrices...)."""
    out = []
    for p in sorted(model_dir.rglob("*")):
        if p.is_file() and p.suffix.lower() in PLOT_SUFFIXES:
            rel = p.relative_to(model_dir).as_posix()
            if _NAME_RE.match(rel) and not rel.startswith("arms/"):
                out.append(rel)
    return out


def render_card(model_dir: Path) -> tuple[str, list[str]]:
    import markdown

    card = model_dir / "MODEL_CARD.md"
    if not card.is_file():
        return "<p>This model artifact has no MODEL_CARD.md.</p>", plots(model_dir)
    text = card.read_text(encoding="utf-8", errors="replace")
    body = markdown.markdown(html.escape(text, quote=False), extensions=["tables", "sane_lists"])
    return _safe_links(body), plots(model_dir)


_LINK_RE = re.compile(r'(href|src)="([^"]*)"')


def _safe_links(body: str) -> str:
    """Only http(s), relative and fragment links survive (no javascript: or data:)."""

    def fix(m: re.Match[str]) -> str:
        url = html.unescape(m.group(2)).strip().lower()
        ok = url.startswith(("http://", "https://", "/", "#", "./")) or ":" not in url
        return m.group(0) if ok else f'{m.group(1)}="#"'

    return _LINK_RE.sub(fix, body)


def model_file_bytes(model_dir: Path, name: str) -> tuple[bytes, str]:
    if not _NAME_RE.match(name) or name not in plots(model_dir):
        raise HTTPException(404, "no such model file")
    path = (model_dir / name).resolve()
    if model_dir.resolve() not in path.parents:
        raise HTTPException(404, "no such model file")
    return path.read_bytes(), PLOT_SUFFIXES[path.suffix.lower()]
