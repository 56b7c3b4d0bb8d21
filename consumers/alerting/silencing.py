"""The silences as the alert consumer sees them: read from the store again every `silence_refresh_seconds`, each
one that ran out noted in the audit log as it is read. A store that cannot be read keeps the last silences known
(an expiry is judged by the clock, so it still ends on time) and is logged once until it answers again.

Also the hosts of runs, for silences that match a host and for pages grouped by host: the alerts do not carry it,
the store's runs do.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timezone

from trainwire.infra.config import Settings
from trainwire.infra.store import connect_store, migrate
from trainwire.infra.store.read import StoreReader
from trainwire.infra.store.silences import Silence, SilenceBook

log = logging.getLogger(__name__)
EXPIRY_ACTOR = "trainwire-alerts"


class SilenceWatch:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic, max_hosts: int = 100_000):
        self._settings = settings
        self._every = settings.alerting.silence_refresh_seconds
        self._clock = clock
        self._client = None
        self._next_read = 0.0
        self._failing = False
        self._hosts: OrderedDict[str, str] = OrderedDict()
        self._max_hosts = max_hosts
        self.silences: list[Silence] = []

    def _open(self):
        if self._client is None:
            client = connect_store(self._settings.store_dsn)
            try:
                migrate(client, cluster=self._settings.store_cluster)  # a store from before migration 008
            except Exception:
                client.close()
                raise
            self._client = client
        return self._client

    def refresh(self, force: bool = False) -> bool:
        """Read the silences again if it is time (or `force`); returns whether they were read."""
        if not force and self._clock() < self._next_read:
            return False
        self._next_read = self._clock() + self._every
        try:
            client = self._open()
            for silence in SilenceBook(client).note_expired(EXPIRY_ACTOR):
                log.warning("alerting: silence %s (%s) expired", silence.silence_id, silence.describe_matchers())
            self.silences = [Silence.from_row(row) for row in StoreReader(client).silences()]
        except Exception as err:  # the store is down or locked by another process: page with what is known
            if not self._failing:
                log.warning("alerting: cannot read the silences (%s); using the %d known", err, len(self.silences))
            self._failing = True
            self.close()
            return False
        if self._failing:
            log.warning("alerting: silences readable again (%d active)", len(self.active()))
        self._failing = False
        return True

    def active(self) -> list[Silence]:
        now = datetime.now(timezone.utc)
        return [s for s in self.silences if s.active(now)]

    def hosts(self, run_ids: list[str], needed: bool) -> dict[str, str]:
        """Each run's host, when something needs it (`needed`, or an active silence matching a host); a run not
        stored yet has none and is asked for again next time."""
        if not needed and not any(s.needs_host for s in self.active()):
            return {}
        missing = [r for r in dict.fromkeys(run_ids) if r not in self._hosts]
        if missing:
            try:
                self._hosts.update(StoreReader(self._open()).run_hosts(missing))
            except Exception as err:
                log.warning("alerting: cannot read the hosts of %d runs: %s", len(missing), err)
                self.close()
            while len(self._hosts) > self._max_hosts:
                self._hosts.popitem(last=False)
        return {r: self._hosts[r] for r in run_ids if r in self._hosts}

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()  # chdb serves one data directory per process: let go of it
            finally:
                self._client = None
