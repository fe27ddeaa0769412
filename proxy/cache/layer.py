"""Everything the cache layer keeps for one app: the store, the flights and their tasks."""

from __future__ import annotations

from dataclasses import dataclass

from proxy import request_log
from proxy.cache.inflight import SharedBodies
from proxy.cache.singleflight import SingleFlight
from proxy.cache.store import CachedObject, ObjectStore, open_store
from proxy.cache.tasks import BackgroundTasks
from proxy.metrics import Metrics
from proxy.settings import CacheSettings

# Unread bytes a spilled (too large to keep) shared body may hold for its slowest reader.
SPILL_WINDOW_BYTES = 4 * 1024 * 1024
# The same for a body spilled because the bodies kept whole hit cache.inflight_bytes: small, as
# there may be hundreds of them (slow viewers, each on a segment of their own). Smaller than a
# chunk, it means one chunk at a time; chunks themselves are small when many bodies arrive at
# once (upstream.receive_budget_bytes), and stay as read when few do (fastest).
PRESSURE_WINDOW_BYTES = 16 * 1024


@dataclass
class CacheLayer:
    """The store, single-flight for playlists, shared bodies for media, background tasks."""

    settings: CacheSettings
    store: ObjectStore
    tasks: BackgroundTasks
    playlists: SingleFlight[CachedObject | None]
    bodies: SharedBodies
    metrics: Metrics

    @classmethod
    def open(cls, settings: CacheSettings, metrics: Metrics | None = None) -> CacheLayer:
        metrics = metrics if metrics is not None else Metrics()
        tasks = BackgroundTasks()
        layer = cls(
            settings=settings,
            store=open_store(settings, metrics),
            tasks=tasks,
            playlists=SingleFlight(tasks, "playlist-fetch"),
            bodies=SharedBodies(
                tasks,
                settings.max_object_bytes,
                SPILL_WINDOW_BYTES,
                held_bytes=settings.inflight_bytes,
                pressure_window_bytes=PRESSURE_WINDOW_BYTES,
                turn_chunks=settings.inflight_turn_chunks,
                turn_cpu_s=settings.inflight_turn_ms / 1000,
            ),
            metrics=metrics,
        )
        metrics.cache_bytes.set_function(lambda: layer.store.bytes)
        metrics.cache_entries.set_function(lambda: layer.store.entries)
        metrics.cache_inflight.set_function(lambda: len(layer.bodies))
        return layer

    def count(self, result: str) -> None:
        """Count a cache result, and note it for the current request's log line."""
        self.metrics.cache_result(result).inc()
        request_log.note_cache(result)

    async def close(self) -> None:
        await self.tasks.close()
        await self.store.close()
