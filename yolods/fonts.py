"""Adapter for Ultralytics' font lookup: plots and annotated images with local fonts only, never a download.

Ultralytics' `check_font` fetches Arial.ttf (Arial.Unicode.ttf for non-ASCII class names) from its asset server
when the font is not already on disk; `check_det_dataset` asks for it up front, and PIL drawing (validation
plots, and annotated images of non-ASCII class names) opens it. `local_fonts()` swaps in a lookup that keeps
Ultralytics' own search order (its config directory, then the fonts matplotlib knows) and falls back to the
DejaVu Sans that matplotlib ships: Latin, Greek and Cyrillic glyphs; CJK labels would draw as boxes unless
Arial.Unicode.ttf is put into Ultralytics' config directory by hand. ASCII labels on predicted images are drawn
by OpenCV's built-in Hershey font and need no file at all.

Examples:
    >>> with local_fonts():
    ...     data = check_det_dataset("data.yaml")  # no network request for Arial.ttf
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

# The modules that imported `check_font` by name, each holding its own reference to it.
_CALLERS = ("ultralytics.data.utils", "ultralytics.utils.plotting")


def local_font(name: str = "Arial.ttf") -> Path:
    """The font file Ultralytics would use for `name`, searched on disk only; DejaVu Sans when it has none."""
    from matplotlib import font_manager
    from ultralytics.utils import USER_CONFIG_DIR

    in_config_dir = USER_CONFIG_DIR / Path(name).name
    if in_config_dir.exists():
        return in_config_dir
    known = [font.fname for font in font_manager.fontManager.ttflist if name in font.fname]
    if known:
        return Path(known[0])
    return Path(font_manager.findfont("DejaVu Sans", fallback_to_default=True))


@contextlib.contextmanager
def local_fonts() -> Iterator[None]:
    """Within the block, Ultralytics resolves fonts with `local_font` instead of downloading them."""
    import importlib

    modules = [importlib.import_module(name) for name in _CALLERS]
    originals = [module.check_font for module in modules]
    for module in modules:
        module.check_font = local_font
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            module.check_font = original
