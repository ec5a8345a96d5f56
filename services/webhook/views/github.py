"""Links to GitHub's web pages (commits, source files, pull requests).

The web host follows ``GITHUB_API_URL``: ``https://api.github.com`` → ``https://github.com``,
an Enterprise server's ``https://ghe.example.org/api/v3`` → ``https://ghe.example.org``. In demo
mode there is no GitHub to link to: the links go to ``/demo/github``, which shows what the
stand-in received.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

from shared.config import Settings

DEMO_PAGE = "/demo/github"


def web_base(settings: Settings) -> str | None:
    """GitHub's web address, or None in demo mode."""
    if settings.demo_mode:
        return None
    parts = urlsplit(settings.github_api_url)
    host = parts.netloc.removeprefix("api.")
    path = parts.path.rstrip("/").removesuffix("/api/v3")
    return urlunsplit((parts.scheme, host, path, "", "")).rstrip("/")


def commit_url(base: str | None, repo: str, sha: str) -> str:
    if base is None:
        return DEMO_PAGE
    return f"{base}/{quote(repo)}/commit/{quote(sha)}"


def file_url(base: str | None, repo: str, sha: str | None, path: str) -> str | None:
    if base is None or not sha:
        return None
    return f"{base}/{quote(repo)}/blob/{quote(sha)}/{quote(path)}"


def pull_url(base: str | None, repo: str, number: int | None) -> str | None:
    if number is None:
        return None
    if base is None:
        return DEMO_PAGE
    return f"{base}/{quote(repo)}/pull/{number}"
