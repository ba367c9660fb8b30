"""Outbox delivery: sends queued result files to the destination, retrying with backoff.

Delivery is at-least-once per file and idempotent at the PACS: a file re-sent after a crash (sent,
but not yet marked ``sent``) carries the same SOP Instance UID, which the PACS stores once.
Rows are never dropped: a destination that is down or refuses is retried (exponential backoff,
capped at ``retry_max_s``) until it accepts, across restarts.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from pipeline.pacs.config import Destination, PacsConfig
from pipeline.pacs.queue import JobQueue
from pipeline.pacs.sender import SendResult, send_files

log = logging.getLogger("osteoplan.pacs.outbox")

SendFn = Callable[[Destination, list[Path]], list[SendResult]]


class OutboxSender:
    def __init__(self, queue: JobQueue, cfg: PacsConfig, stop: threading.Event, wake: threading.Event,
                 send: SendFn | None = None) -> None:
        self.queue, self.cfg, self.stop, self.wake = queue, cfg, stop, wake
        self.destination = cfg.destination
        self._send = send or (lambda dest, paths: send_files(
            dest, paths, cfg.ae_title, cfg.acse_timeout_s, cfg.dimse_timeout_s, cfg.network_timeout_s))

    def deliver_due(self) -> int:
        """Try every due outbox row once (one association per batch). Returns how many were sent."""
        if self.destination is None:
            return 0
        items = self.queue.due_sends()
        if not items:
            return 0
        results = self._send(self.destination, [Path(i.path) for i in items])
        by_path = {str(r.path): r for r in results}
        sent = 0
        for item in items:
            r = by_path.get(item.path)
            if r is not None and r.ok:
                self.queue.mark_sent(item.id, str(self.destination))
                sent += 1
            else:
                why = r.detail if r is not None else "not attempted"
                delay = self.queue.mark_send_failed(item.id, why, self.cfg.outbox.retry_base_s,
                                                    self.cfg.outbox.retry_max_s)
                log.warning("send of job %s result to %s failed (%s); retry in %.0f s", item.job_id,
                            self.destination.ae_title, why, delay)
        return sent

    def run_forever(self) -> None:
        while not self.stop.is_set():
            try:
                self.deliver_due()
                nxt = self.queue.next_send_time() if self.destination is not None else None
                wait = 5.0 if nxt is None else min(5.0, max(0.05, nxt - time.time()))
            except Exception:  # noqa: BLE001 - keep delivering whatever goes wrong once
                log.error("outbox loop error\n%s", traceback.format_exc())
                wait = 5.0
            self.wake.wait(wait)
            self.wake.clear()
