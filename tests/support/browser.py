"""A real headless browser (Debian's Chromium) for page tests.

`.ci/run` installs Chromium; the flags keep it from reaching for the network, which this
machine does not have, and give it a fresh profile every time.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--virtual-time-budget=3000",
)


async def _chromium(*args: str) -> bytes:
    if CHROMIUM is None:
        raise RuntimeError("Chromium is not installed: run .ci/run or apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="oa-chromium-") as profile:
        process = await asyncio.create_subprocess_exec(
            CHROMIUM, *_FLAGS, f"--user-data-dir={profile}", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    if process.returncode != 0:
        raise RuntimeError(f"chromium failed ({process.returncode}): {stderr.decode()[-2000:]}")
    return stdout


async def dump_dom(url: str) -> str:
    """The page's DOM after its scripts ran, as Chromium serialises it."""
    return (await _chromium("--dump-dom", url)).decode()


async def screenshot(url: str, path: Path, *, width: int = 1200, height: int = 800) -> Path:
    """A PNG of the page as a person would see it."""
    await _chromium(f"--screenshot={path}", f"--window-size={width},{height}", url)
    return path
