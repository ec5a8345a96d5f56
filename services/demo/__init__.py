"""Demo mode's stand-ins (``demo.py``, ``github.py``) and the bundled demo sources and data.

The demo sources name their data as ``{data_url}/FILE``: the demo fills in its data server's
address, and ``oa-machine process-one`` the bundled data folder (or ``--data-url``). Kept here,
free of imports, so that process-one pays nothing for it.
"""

from __future__ import annotations

from pathlib import Path

#: The bundled demo data: CSV files the demo sources read.
DATA_DIR = Path(__file__).parent / "data"
#: What a demo source writes where its data's folder URL goes.
DATA_URL_PLACEHOLDER = "{data_url}"


def with_data_url(source: bytes, data_url: str) -> bytes:
    """A source file's bytes with its data folder's URL filled in."""
    return source.replace(DATA_URL_PLACEHOLDER.encode(), data_url.rstrip("/").encode())
