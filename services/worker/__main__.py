from services.worker.main import run
from shared.runner import start

start("worker", run)
