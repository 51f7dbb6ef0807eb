"""Server-rendered SVG charts (no JavaScript library, no CDN)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from html import escape

from markupsafe import Markup

# colour per series; COVID stands out, "-" (no verdict yet) is grey
COLOURS = {
    "COVID": "#d62728",
    "Normal": "#2ca02c",
    "Other": "#ff7f0e",
    "-": "#9e9e9e",
    "received": "#9e9e9e",
    "queued": "#bdbdbd",
    "processing": "#7f7f7f",
    "classified": "#17becf",
    "delivered": "#2ca02c",
    "delivered_with_warning": "#bcbd22",
    "delivery_failed": "#d62728",
    "failed": "#8c1c13",
    "ignored": "#c5b0d5",
    "duplicate": "#aec7e8",
}


def stacked_bars(
    starts: Sequence[datetime],
    counts: Sequence[Mapping[str, int]],
    keys: Sequence[str],
    width: int = 720,
    height: int = 180,
) -> Markup:
    """A stacked bar chart (one bar per time bucket) with a legend, as inline SVG."""
    n = max(1, len(starts))
    top = max([sum(c.values()) for c in counts] + [1])
    pad_l, pad_b, pad_t = 36, 22, 8
    plot_w, plot_h = width - pad_l - 4, height - pad_b - pad_t
    bw = plot_w / n
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height + 24}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg">',
        f'<text x="2" y="{pad_t + 8}" class="axis">{top}</text>',
        f'<text x="2" y="{pad_t + plot_h}" class="axis">0</text>',
        f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{width - 4}" y2="{pad_t + plot_h}" '
        'stroke="#888"/>',
    ]
    for i, (start, c) in enumerate(zip(starts, counts, strict=True)):
        y: float = pad_t + plot_h
        for k in keys:
            v = int(c.get(k, 0))
            if not v:
                continue
            h = plot_h * v / top
            y -= h
            parts.append(
                f'<rect x="{pad_l + i * bw + 1:.1f}" y="{y:.1f}" width="{max(1.0, bw - 2):.1f}" '
                f'height="{h:.1f}" fill="{COLOURS.get(k, "#555")}">'
                f"<title>{escape(start.strftime('%Y-%m-%d %H:%M'))} UTC: {escape(k)} {v}</title>"
                "</rect>"
            )
        if i % max(1, n // 6) == 0:
            parts.append(
                f'<text x="{pad_l + i * bw:.1f}" y="{height - 6}" class="axis">'
                f"{escape(start.strftime('%d %H:%M'))}</text>"
            )
    x = pad_l
    present = [k for k in keys if any(c.get(k) for c in counts)] or list(keys)[:1]
    for k in present:
        parts.append(
            f'<rect x="{x}" y="{height + 8}" width="10" height="10" fill="{COLOURS.get(k, "#555")}"/>'
            f'<text x="{x + 14}" y="{height + 17}" class="axis">{escape(k)}</text>'
        )
        x += 24 + 7 * len(k)
    parts.append("</svg>")
    return Markup("".join(parts))
