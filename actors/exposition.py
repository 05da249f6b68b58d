"""Dramatiq's Prometheus middleware on memsync's settings, counting memsync's messages as well.

Dramatiq's module reads its port, host and directory from the environment when it is imported, so
this module is imported only by `actors.metrics.middleware`, once it has set them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import dramatiq
from dramatiq.middleware.prometheus import DB_PATH, Prometheus

from actors import metrics

__all__ = ["Exposition"]


class Exposition(Prometheus):
    """Dramatiq's series and memsync's, served by the worker's main process (`actors.metrics.serve`).

    It must come before the retry middleware in the broker's list: Dramatiq runs after-hooks in
    reverse order, so it then sees whether a failure was final. Where no worker process boots (an
    app that only sends, `memsync dlq replay`), it records nothing rather than fail; a worker
    started in-process boots it when the worker starts.
    """

    def __init__(self) -> None:
        super().__init__()
        self.booted = False

    @property
    def forks(self) -> list[Callable[[], int]]:
        return [metrics.serve]

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        metrics.forget_dead_processes(Path(DB_PATH))
        super().after_process_boot(broker)  # type: ignore[no-untyped-call]
        self.booted = True

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if not self.booted:
            super().after_process_boot(broker)  # type: ignore[no-untyped-call]
            self.booted = True

    def after_enqueue(self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int) -> None:
        if self.booted:
            super().after_enqueue(broker, message, delay)  # type: ignore[no-untyped-call]

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        super().after_process_message(  # type: ignore[no-untyped-call]
            broker, message, result=result, exception=exception
        )
        if exception is None or message.failed:  # a failure to be retried counts when its retry ends
            metrics.shared().message_finished(message, result, message.failed)
