"""Typed keys of the resources the webhook application holds."""

from __future__ import annotations

import asyncpg
import jinja2
from aiohttp import web

from services.webhook.budget import ByteBudget
from services.webhook.deliveries import DeliveryProcessor
from services.webhook.views.cache import SiteCache
from shared.broker import Broker
from shared.config import Settings
from shared.github import GitHub
from shared.storage import Storage

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
BROKER = web.AppKey("broker", Broker)
GITHUB = web.AppKey("github", GitHub)
STORAGE = web.AppKey("storage", Storage)
TEMPLATES = web.AppKey("templates", jinja2.Environment)
#: Room for request bodies whose signature is not checked yet.
BODY_BUDGET = web.AppKey("body_budget", ByteBudget)
#: Makes stored deliveries into jobs, in the background.
PROCESSOR = web.AppKey("processor", DeliveryProcessor)
#: What the site keeps between requests (finished sets' tallies, state.txt).
SITE_CACHE = web.AppKey("site_cache", SiteCache)
