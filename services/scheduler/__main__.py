from services.scheduler.main import run
from shared.runner import start

start("scheduler", run)
