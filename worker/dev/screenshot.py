"""Render an HTML file in headless Chromium and save a PNG: proof the report's charts read well.

Usage: ``python -m worker.dev.screenshot report.html report.png [--width 900] [--height 1400]``.
Uses the system's Chromium (Debian: ``apt-get install chromium``; also ``chromium-browser``,
``google-chrome`` or ``$CHROMIUM``). Nothing is fetched: the report is self-contained.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class ScreenshotError(RuntimeError):
    """No browser, or the browser did not write the PNG; the message says which and why."""


def find_browser() -> str:
    """The Chromium binary: ``$CHROMIUM`` or the first known name on PATH."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit
    for name in _CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    raise ScreenshotError(
        "no Chromium found (tried $CHROMIUM, " + ", ".join(_CANDIDATES) + "); on Debian: "
        "apt-get install chromium"
    )


def screenshot(
    html_path: str, png_path: str, *, width: int = 900, height: int = 1400, timeout_s: float = 60
) -> Path:
    """Render ``html_path`` at ``width`` x ``height`` CSS pixels and write ``png_path``."""
    source = Path(html_path).resolve()
    if not source.is_file():
        raise ScreenshotError(f"no such file: {source}")
    target = Path(png_path).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="coalesce-chromium-") as profile:
        argv = [
            find_browser(),
            "--headless",
            "--no-sandbox",  # containers run as root, where the sandbox cannot start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={target}",
            source.as_uri(),
        ]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ScreenshotError(f"Chromium took more than {timeout_s:.0f} s") from None
    if not target.is_file() or target.stat().st_size == 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise ScreenshotError(f"Chromium wrote no PNG (exit {done.returncode}): {tail}")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html")
    parser.add_argument("png")
    parser.add_argument("--width", type=int, default=900)
    parser.add_argument("--height", type=int, default=1400)
    args = parser.parse_args(argv)
    path = screenshot(args.html, args.png, width=args.width, height=args.height)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
