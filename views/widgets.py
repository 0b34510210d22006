"""Small HTML blocks shared by the tabs (styled by assets/style.css, colours from the theme)."""

from __future__ import annotations

import html


def tile(value: str, label: str) -> str:
    """One number with its label; both are escaped."""
    return (
        f'<div class="moe-tile"><div class="moe-num">{html.escape(value)}</div>'
        f'<div class="moe-lbl">{html.escape(label)}</div></div>'
    )


def card(title_html: str, tiles: list[str], footer_html: str = "") -> str:
    """A bordered card: a title line, a grid of tiles, then an optional footer (already safe HTML)."""
    return (
        f'<div class="moe-card"><div class="moe-card-title">{title_html}</div>'
        f'<div class="moe-tiles">{"".join(tiles)}</div>{footer_html}</div>'
    )


def empty(message_html: str) -> str:
    return f'<div class="moe-empty">{message_html}</div>'
