"""The headers every answer carries, and how a run's files are served.

Source JSON, file names, entry names and error messages are written by anyone who opens a pull
request, so pages escape everything (jinja2's autoescape) and, should something slip through,
the Content-Security-Policy lets a page run no script and load nothing from anywhere but this
site: the pages need no JavaScript at all, and their CSS is a file of ours.

A run's files are data, never pages: each is served with a type from a short list of names we
write (anything else is ``application/octet-stream``), ``nosniff``, and a policy that forbids
it everything should a browser render it anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

#: Pages: our own stylesheet and images, inline SVG, no scripts, no frames, no plugins.
PAGE_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
#: Files of runs, JSON and text: nothing may run or load, even if opened in a tab.
FILE_POLICY = "default-src 'none'; img-src 'self'; sandbox; frame-ancestors 'none'"


async def secure(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the same three headers on every answer of the service."""
    headers = response.headers
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "same-origin")
    content_type = headers.get("Content-Type", "")
    policy = PAGE_POLICY if content_type.startswith("text/html") else FILE_POLICY
    headers.setdefault("Content-Security-Policy", policy)


@dataclass(frozen=True)
class FileType:
    content_type: str
    #: Shown in the browser (a picture, a log) rather than saved.
    inline: bool


#: The types of what a run writes (README "Outputs of a run"), by name or extension.
_BY_NAME: dict[str, FileType] = {
    "output.txt": FileType("text/plain; charset=utf-8", True),
    "index.json": FileType("application/json", True),
    "sample.json": FileType("application/json", True),
    "preview.png": FileType("image/png", True),
    "out.csv": FileType("text/csv; charset=utf-8", False),
    "out.geojson": FileType("application/geo+json", False),
    "processed.zip": FileType("application/zip", False),
}
_BY_EXTENSION: dict[str, FileType] = {
    ".zip": FileType("application/zip", False),
    ".csv": FileType("text/csv; charset=utf-8", False),
    ".json": FileType("application/json", False),
    ".geojson": FileType("application/geo+json", False),
    ".gz": FileType("application/gzip", False),
}
_OTHER = FileType("application/octet-stream", False)


def file_type(name: str) -> FileType:
    """How the run file ``name`` is served; a cache (``cache.<ext>``, its extension from the
    provider's URL) is always a download."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    extension = name[name.rfind("."):].lower() if "." in name else ""
    return _BY_EXTENSION.get(extension, _OTHER)


def disposition(run_id: int, name: str, file: FileType) -> str:
    """``Content-Disposition``: the saved file is named after the run (``run-12-out.csv``);
    the name is reduced to safe characters, so no quoting trick can reach the header."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in name)
    kind = "inline" if file.inline else "attachment"
    return f'{kind}; filename="run-{run_id}-{safe}"'
