from services.webhook.main import run
from shared.runner import start

start("webhook", run)
