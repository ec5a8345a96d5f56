"""The `oa-machine` command: start a service, all of them, migrate, process or check sources.

A launcher, not a service: it imports a service's entry point only when asked for it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from shared.config import Settings

SERVICES = ("webhook", "worker", "dequeuer", "scheduler")
SERVICE_SENTENCES = {
    "webhook": "Serve GitHub's webhook deliveries (POST /hook), the results site and its JSON "
               "API, and the health and metrics routes on HTTP_HOST:HTTP_PORT.",
    "worker": "Take run tasks from RabbitMQ, run each in an isolated child process, store its "
              "outputs and report the result.",
    "dequeuer": "Settle the results workers report, post commit statuses to GitHub, queue runs "
                "again whose worker was lost, and feed the batch sets.",
    "scheduler": "Run the schedule (batch sets, collections, clean-up) while leading; other "
                 "schedulers wait to take over.",
}
SERVICE_VARIABLES = {
    "webhook": ("DATABASE_URL", "AMQP_URL", "STORAGE_URL", "GITHUB_API_URL", "GITHUB_TOKEN",
                "WEBHOOK_SECRETS", "PUBLIC_BASE_URL", "HTTP_HOST", "HTTP_PORT"),
    "worker": ("AMQP_URL", "STORAGE_URL", "WORK_DIR", "WORKER_CONCURRENCY", "RUN_TIMEOUT_S",
               "RUN_MEMORY_BYTES", "WORKER_GRACE_S", "METRICS_PORT"),
    "dequeuer": ("DATABASE_URL", "AMQP_URL", "GITHUB_API_URL", "GITHUB_TOKEN",
                 "PUBLIC_BASE_URL", "RUN_LEASE_S", "METRICS_PORT"),
    "scheduler": ("DATABASE_URL", "AMQP_URL", "GITHUB_API_URL", "GITHUB_TOKEN",
                  "SOURCES_REPOSITORY", "SCHEDULE_BATCH", "SCHEDULE_COLLECTIONS",
                  "SCHEDULE_CLEAN_UP", "METRICS_PORT"),
}


#: Printed under every command's options: where the rest of the settings are.
_SETTINGS_NOTE = "every setting, with its default and what it does: .env.example"
_LOGS = ("LOG_FORMAT", "LOG_LEVEL")


def _reads(*variables: str) -> str:
    """The epilog naming the environment variables a command reads (tested against Settings)."""
    return f"environment: {', '.join((*variables, *_LOGS))}; {_SETTINGS_NOTE}"


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every subcommand with a one-sentence description, the
    environment variables it reads, and help for every option."""
    from services.worker.version import CODE_VERSION

    parser = argparse.ArgumentParser(
        prog="oa-machine", description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog=f"Settings are environment variables; {_SETTINGS_NOTE}.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {CODE_VERSION}",
                        help="print the version and exit")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND",
        help="what to do; `oa-machine COMMAND --help` describes each",
    )
    parsers = {
        name: commands.add_parser(
            name, help=f"run the {name} service", description=SERVICE_SENTENCES[name],
            epilog=_reads(*SERVICE_VARIABLES[name]),
        )
        for name in SERVICES
    }
    parsers["worker"].add_argument(
        "--once", action="store_true", help="exit after one run (one run per pod)"
    )
    commands.add_parser(
        "up", help="run every service (demo mode without GITHUB_TOKEN)",
        description="Migrate the database, then run the four services as child processes "
                    "with prefixed logs until Ctrl-C; without GITHUB_TOKEN it plays GitHub "
                    "and a data provider and pushes the demo sources.",
        epilog=_reads("DATABASE_URL", "AMQP_URL", "STORAGE_URL", "GITHUB_TOKEN",
                      "WEBHOOK_SECRETS", "HTTP_HOST", "HTTP_PORT", "METRICS_PORT",
                      "RABBITMQ_MANAGEMENT_URL"),
    )
    commands.add_parser(
        "migrate", help="create the database if needed and apply migrations",
        description="Create the database of DATABASE_URL if it is missing and apply the "
                    "migrations not applied yet.",
        epilog=_reads("DATABASE_URL"),
    )
    dead = commands.add_parser(
        "dead-letters",
        help="count the messages in the dead queue by where they died; --replay puts them back",
        description="Count the messages in the dead queue by the queue they died in, or with "
                    "--replay send each back to where it died from.",
        epilog=_reads("AMQP_URL"),
    )
    dead.add_argument(
        "--replay", action="store_true",
        help="send each dead message back to the exchange and route it died from, retry count "
             "cleared (after fixing what made its handler fail)",
    )
    enqueue = commands.add_parser(
        "enqueue-sources",
        help="make a batch set of every source entry now (as the weekly slot does)",
        description="Make a batch set of every source entry now, as the weekly slot does: "
                    "list sources/**/*.json at the head of SOURCES_REPOSITORY's default "
                    "branch, read the files changed since they were last read, and make one "
                    "run per layer entry, which the dequeuer feeds to the workers; prints the "
                    "set's id and run count.",
        epilog=_reads("DATABASE_URL", "AMQP_URL", "GITHUB_API_URL", "GITHUB_TOKEN",
                      "SOURCES_REPOSITORY", "BATCH_REUSE_DAYS"),
    )
    enqueue.add_argument(
        "--only", metavar="PATH_GLOB", default=None,
        help="only files whose path matches this glob (fnmatch: '*' also matches '/'), e.g. "
             "'sources/us/ca/*'",
    )
    enqueue.add_argument(
        "--no-reuse", action="store_true",
        help="run every entry in full, even one unchanged since a recent good run",
    )
    enqueue.add_argument(
        "--wait", action="store_true",
        help="wait until every run of the set has settled (a dequeuer must be running), then "
             "print its counts as one JSON object on the last line",
    )
    clean = commands.add_parser(
        "clean-up",
        help="apply the retention rules now (as the weekly slot does)",
        description="Apply the retention rules now, as the weekly slot does: delete the "
                    "stored outputs of runs outside them (each entry's latest good run, its "
                    "last RETENTION_RUNS runs and one run per month are kept), storage "
                    "objects no run refers to, and delivery payloads and sent statuses older "
                    "than RETENTION_DAYS; prints what it did as JSON.",
        epilog=_reads("DATABASE_URL", "STORAGE_URL", "S3_ENDPOINT_URL", "RETENTION_RUNS",
                      "RETENTION_DAYS"),
    )
    clean.add_argument(
        "--dry-run", action="store_true", help="say what would be deleted; delete nothing"
    )
    from shared.regions import REGIONS

    gather = commands.add_parser(
        "collect",
        help="build the regional collections now (as their slot does)",
        description="Build one zip per region, licence class and layer from every entry's "
                    "latest good run into STORAGE_URL under collections/, printing each zip's "
                    "storage key, size in bytes and address count on a line.",
        epilog=_reads("DATABASE_URL", "STORAGE_URL", "S3_ENDPOINT_URL"),
    )
    gather.add_argument(
        "--region", action="append", choices=REGIONS, metavar="REGION",
        help=f"only this region (repeatable): {', '.join(REGIONS)}",
    )
    gather.add_argument(
        "--layer", action="append",
        choices=("addresses", "parcels", "buildings", "centerlines"),
        help="only this layer (repeatable)",
    )
    gather.add_argument(
        "--maps", action="store_true", help="draw the coverage maps too and print their keys",
    )
    one = commands.add_parser(
        "process-one", help="process one source entry into a folder",
        description="Process one layer entry of a source file into OUTDIR, as a worker "
                    "would but with no broker or database, and print the path of its "
                    "index.json (exit 1 if the run failed); progress is shown on a terminal.",
        epilog=_reads("RUN_TIMEOUT_S", "RUN_MEMORY_BYTES", "MAX_DOWNLOAD_BYTES",
                      "MAX_UNPACKED_BYTES"),
    )
    one.add_argument("source", help="path of the source JSON file")
    one.add_argument("outdir", help="folder for the outputs")
    one.add_argument("--layer", default="addresses",
                     help="the layer of the entry (default: addresses)")
    one.add_argument("--name", default=None, help="entry name (default: the layer's first)")
    one.add_argument(
        "--data-url", metavar="URL", default=None,
        help="what {data_url} in the source stands for, a folder's URL (default: the "
             "bundled demo data, so that the demo sources run as they are)",
    )
    check = commands.add_parser(
        "check-sources",
        help="check source files as a pull request would be checked (no network); "
             "exit 1 on any problem",
        description="Check source files as a pull request would be checked, without the "
                    "network: parse, upgrade and validate every file given (folders are "
                    "searched for *.json, inside their sources/ folder when they have one), "
                    "compile every conform against the fields it names and run every inline "
                    "acceptance test; prints one line per problem and a summary, and exits 1 "
                    "on any problem.",
        epilog="environment: none (no settings are read)",
    )
    check.add_argument(
        "paths", nargs="+", metavar="PATH",
        help="a source file, or a folder to search (a sources repository checkout works)",
    )
    check.add_argument(
        "--json", action="store_true",
        help="print one JSON document (ok, counts, problems with file, where, message and "
             "code) instead of lines",
    )
    check.add_argument(
        "--jobs", type=int, default=None, metavar="N",
        help="processes to check with (default: one per available core)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "check-sources":
        sys.exit(_check_sources(args.paths, as_json=args.json, jobs=args.jobs))
    if args.command == "process-one":
        # The run's process imports pyarrow and the rest while this one imports pydantic
        # and validates the source: two cores, half the waiting.
        from services.worker.zygote import ZYGOTE

        ZYGOTE.start()
        try:
            _dispatch(args)
        finally:
            ZYGOTE.close()
    else:
        _dispatch(args)


def _dispatch(args: argparse.Namespace) -> None:
    from shared.runner import run_service, start

    if args.command == "worker" and args.once:
        from services.worker.main import run as run_worker

        start("worker", lambda settings: run_worker(settings, once=True))
    elif args.command in SERVICES:
        module = importlib.import_module(f"services.{args.command}.main")
        start(args.command, module.run)
    elif args.command == "up":
        from services.up import up

        start("up", lambda settings: run_service(up(settings)))
    elif args.command == "migrate":
        start("migrate", _migrate)
    elif args.command == "enqueue-sources":
        from services.scheduler.commands import enqueue_sources

        start("enqueue-sources", lambda settings: asyncio_run(enqueue_sources(
            settings, only=args.only, reuse=not args.no_reuse, wait=args.wait)))
    elif args.command == "clean-up":
        from services.scheduler.commands import clean_up_now

        start("clean-up", lambda settings: asyncio_run(clean_up_now(
            settings, dry_run=args.dry_run)))
    elif args.command == "collect":
        from services.scheduler.commands import collect_now

        start("collect", lambda settings: asyncio_run(collect_now(
            settings, regions=args.region, layers=args.layer, maps=args.maps)))
    elif args.command == "dead-letters":
        start("dead-letters", lambda settings: _dead_letters(settings, replay=args.replay))
    else:
        from services.worker.process_one import process_one

        code = 1

        def run(settings: Settings) -> None:
            nonlocal code
            code = process_one(settings, args.source, args.outdir, args.layer, args.name,
                               data_url=args.data_url)

        start("process-one", run)
        sys.exit(code)


def asyncio_run(work: Coroutine[Any, Any, object]) -> None:
    """Run ``work`` to its end (imported late: see ``_migrate``); GitHub or storage refusing
    is one line on stderr and exit 1, not a traceback."""
    import asyncio

    from shared.errors import StorageError
    from shared.github import GitHubError

    try:
        asyncio.run(work)
    except (GitHubError, StorageError) as exc:
        print(f"oa-machine: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _check_sources(paths: list[str], *, as_json: bool, jobs: int | None) -> int:
    # No settings, database or broker: a contributor runs this on a bare checkout.
    import json

    from services.checks import check_sources, default_jobs

    report = check_sources(paths, jobs=jobs if jobs is not None else default_jobs())
    if as_json:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        for problem in report.problems:
            print(problem)
        print(report.summary())
    return 0 if report.ok else 1


def _migrate(settings: Settings) -> None:
    # asyncio here, not at the top: process-one starts its zygote before importing it.
    import asyncio

    from shared.db import migrate

    applied = asyncio.run(migrate(settings.database_url))
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")


def _dead_letters(settings: Settings, *, replay: bool) -> None:
    import asyncio

    from shared.broker import Broker
    from shared.dead_letters import replay as replay_dead
    from shared.dead_letters import summarise

    async def run() -> None:
        broker = Broker(settings.amqp_url)
        try:
            await broker.wait_ready(timeout_s=30)
            if replay:
                replayed, left = await replay_dead(broker)
                print(f"replayed {replayed} message(s); {left} without an origin left in dead")
                return
            counts = await summarise(broker)
            if not counts:
                print("the dead queue is empty")
            for (queue, kind), number in sorted(counts.items()):
                print(f"{number:8d}  {kind} from {queue}")
        finally:
            await broker.close()

    asyncio.run(run())
