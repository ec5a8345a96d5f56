from services.dequeuer.main import run
from shared.runner import start

start("dequeuer", run)
