"""Demo mode: stand-ins for GitHub and a data provider, and one signed push of the demo sources.

Everything listens on 127.0.0.1 only. The push is signed with the same secret the webhook is
given, so the real signature check is exercised, not bypassed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from services.demo import DATA_DIR, with_data_url
from services.demo.github import GitHubStandIn

HERE = Path(__file__).parent
DEMO_REPO = "openaddresses/openaddresses-demo"


@dataclass
class DemoStandIns:
    github: GitHubStandIn
    data_runner: web.AppRunner
    data_url: str
    sha: str
    secret: str

    async def stop(self) -> None:
        await self.github.stop()
        await self.data_runner.cleanup()


async def start_data_server(directory: Path) -> tuple[web.AppRunner, str]:
    """Serve the files of ``directory`` over HTTP on a free port of 127.0.0.1."""
    app = web.Application()
    app.router.add_static("/", directory, show_index=False)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def demo_source_paths() -> list[str]:
    """Repository paths of the bundled demo sources (``sources/...json``)."""
    root = HERE / "sources"
    return sorted(f"sources/{p.relative_to(root).as_posix()}" for p in root.rglob("*.json"))


async def start_stand_ins() -> DemoStandIns:
    """Start the data server and GitHub stand-in holding the demo sources at a fresh commit."""
    data_runner, data_url = await start_data_server(DATA_DIR)
    sha = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
    github = GitHubStandIn()
    for path in demo_source_paths():
        github.add_file(DEMO_REPO, path, sha, with_data_url((HERE / path).read_bytes(), data_url))
    await github.start()
    return DemoStandIns(github, data_runner, data_url, sha, secrets.token_hex(20))


def push_payload(repo: str, sha: str, paths: list[str]) -> bytes:
    """A push event body like GitHub's, adding ``paths`` in one commit on ``main``."""
    owner, name = repo.split("/")
    payload = {
        "ref": "refs/heads/main", "before": "0" * 40, "after": sha, "created": False,
        "deleted": False, "forced": False,
        "repository": {"name": name, "full_name": repo, "owner": {"login": owner, "name": owner}},
        "head_commit": {"id": sha, "message": "Add demo sources"},
        "commits": [{"id": sha, "message": "Add demo sources", "added": paths,
                     "modified": [], "removed": []}],
    }
    return json.dumps(payload).encode()


async def deliver(webhook_url: str, event: str, body: bytes, secret: str) -> dict[str, object]:
    """POST a signed delivery as GitHub would; returns the JSON answer."""
    signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    headers = {
        "Content-Type": "application/json", "X-GitHub-Event": event,
        "X-GitHub-Delivery": str(uuid.uuid4()), "X-Hub-Signature-256": signature,
        "User-Agent": "GitHub-Hookshot/oa-machine-demo",
    }
    async with aiohttp.ClientSession() as session, session.post(
        f"{webhook_url.rstrip('/')}/hook", data=body, headers=headers
    ) as response:
        answer: dict[str, object] = await response.json(content_type=None)
        if response.status >= 400:
            raise RuntimeError(f"demo delivery refused: HTTP {response.status}: {answer}")
        return answer


async def wait_for_job(
    webhook_url: str, delivery_id: str, *, timeout_s: float = 60.0
) -> dict[str, object]:
    """What became of a stored delivery, once it is something (``/api/deliveries/{id}``)."""
    url = f"{webhook_url.rstrip('/')}/api/deliveries/{delivery_id}"
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(url) as response:
                if response.status == 200:
                    answer: dict[str, object] = await response.json()
                    if answer.get("state") != "waiting":
                        return answer
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"delivery {delivery_id} made no job in {timeout_s:g} s")
            await asyncio.sleep(0.2)
