"""JetStream -> index: durable pull consumers, sequence tracking, dead letters, resyncs.

One `PartitionConsumer` per owned partition fetches up to `fetch_batch` messages, decodes
them, classifies each batch against the `SequenceTracker` (duplicate, stale, gap), applies
the rest to the index in chunks and acks the fetch with one AckAll ack, only after the index
has everything. Poison messages are acked, copied to the dead-letter stream with the
reason, and counted. A backend failure keeps the fetched messages and retries them (telling
JetStream the work is in progress), so nothing is acked before it is indexed. Deliveries
that never reached this process (a NATS node lost, a connection dropped) re-create the
durable consumer from the last acknowledged sequence, rather than wait out the ack wait or
be acknowledged unread by the next AckAll.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Final, Protocol

import msgspec
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from indexer.errors import BackendError
from indexer.index.pools import refuse_undeclared
from indexer.index.protocol import ApplyOutcome, Index, ResyncRequest
from indexer.ingest.activity import EventActivity
from indexer.ingest.recovery import SnapshotStore, partition_ranks
from kvcore.bus import (
    DEAD_LETTER_SUBJECT,
    STREAM_NAME,
    BusError,
    EventBatch,
    UnsupportedSchemaError,
    block_count,
    decode_batch,
)
from kvcore.topology import (
    consumer_name,
    partition_filter,
    resync_subject,
    server_max_payload,
    stored_subject_identity,
)

__all__ = [
    "ConsumerSettings",
    "ConsumerStats",
    "Observer",
    "PartitionConsumer",
    "ResyncRequester",
    "marker_is_rebuilding",
    "marker_name",
]

log = structlog.get_logger("indexer.ingest.consumer")

_RETRY_BACKOFF_S: Final = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_REBUILDING_PREFIX: Final = "rebuilding-"
_HEADER_ROOM: Final = 256  # the header block's framing, Nats-Msg-Id and such, with margin
SLOW_REBUILD_S: Final = 1.0  # a partition rebuild that took longer is logged at info


class ConsumerSettings(msgspec.Struct, frozen=True, kw_only=True):
    fetch_batch: int = 512
    fetch_timeout_s: float = 0.25
    apply_chunk: int = 256
    ack_wait_s: float = 30.0
    resync_min_interval_s: float = 5.0
    snapshot_every_batches: int = 100_000
    snapshot_every_s: float = 300.0
    purge_after_snapshot: bool = True
    marker_check_s: float = 1.0
    # An idle partition asks JetStream this often whether its durable consumer holds work
    # it is not delivering (see PartitionConsumer._stalled).
    stall_check_s: float = 1.0
    max_epoch_skew_s: float = 300.0  # epochs further in the future are refused
    # The in-memory index is empty at every start: its first rebuild is routine (debug).
    quiet_first_rebuild: bool = False


class Observer(Protocol):
    """Where a duration goes (a prometheus_client Histogram, or its labelled child)."""

    def observe(self, amount: float) -> None: ...


class ConsumerStats(msgspec.Struct):
    messages: int = 0
    batches_applied: int = 0
    gaps: int = 0
    resyncs_requested: int = 0
    resync_retries: int = 0  # requests sent again because nobody answered
    resyncs_unanswered: int = 0  # given up after every retry (the worker stays as it is)
    dead_letters: dict[str, int] = msgspec.field(default_factory=dict)
    backend_retries: int = 0
    rebuilds: int = 0
    snapshots: int = 0
    consumer_restarts: int = 0
    # durable consumers re-created because deliveries were stranded (a NATS node lost)
    consumer_resets: int = 0
    # the event stream found missing and the topology made again (NATS lost its data)
    topology_restores: int = 0
    task_failures: dict[str, int] = msgspec.field(default_factory=dict)  # by task name
    blocks_seen: int = 0  # blocks named by the events of applied batches
    last_applied_ts: float = 0.0  # engine timestamp of the newest batch applied
    last_applied_at: float = 0.0  # wall clock when it was applied
    # seconds from a batch's timestamp to its application, most recent last (bounded)
    lag_samples: deque[float] = msgspec.field(default_factory=lambda: deque(maxlen=100_000))
    # the engine timestamps of those batches, index for index
    lag_sample_ts: deque[float] = msgspec.field(default_factory=lambda: deque(maxlen=100_000))
    # events left out before the index saw them, by reason (pool_not_declared)
    dropped: dict[str, int] = msgspec.field(default_factory=dict)


    def task_failed(self, name: str) -> None:
        self.task_failures[name] = self.task_failures.get(name, 0) + 1


RankKey = tuple[str, str, int]  # model, worker id, dp rank
# Times a fetch is applied again when the backend failed while it was being applied.
_REAPPLY_ROUNDS: Final = 3
# Waits before each repeat of an unanswered resync request (about 5 minutes in all).
RESYNC_RETRY_DELAYS_S: Final = (2.0, 5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0)
PoolGrants = Callable[[str, str], Collection[str] | None]


class _GiveUpFetchError(Exception):
    """Stop waiting for the index backend and give the fetch up unacked."""


class _StoppedWhileWaitingError(_GiveUpFetchError):
    """Asked to stop while waiting for the index backend."""


class _LostWhileWaitingError(_GiveUpFetchError):
    """The index lost its marker while this consumer waited for it (its data deleted:
    `kv-indexer migrate-layout`, a flush): the partition is rebuilt instead of the fetch
    being applied onto what is left."""


class ResyncRequester:
    """Asks a worker's publisher to re-send its state, at most once per interval per rank.

    A request nobody answers (the publisher reconnecting, or not yet subscribed) is sent
    again after each of `retry_delays_s`: a rank waiting for its resync is otherwise
    frozen until the worker happens to publish again, which an idle worker does not."""

    def __init__(self, nc: NatsClient, min_interval_s: float, stats: ConsumerStats,
                 retry_delays_s: Sequence[float] = RESYNC_RETRY_DELAYS_S,
                 timeout_s: float = 2.0) -> None:
        self._nc = nc
        self._min_interval_s = min_interval_s
        self._stats = stats
        self._retry_delays_s = tuple(retry_delays_s)
        self._timeout_s = timeout_s
        self._last: dict[RankKey, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def request(self, request: ResyncRequest) -> None:
        key = (request.model, request.worker_id, request.dp_rank)
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self._min_interval_s:
            return
        self._last[key] = now
        self._stats.resyncs_requested += 1
        task = asyncio.get_running_loop().create_task(self._send(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, request: ResyncRequest) -> None:
        payload = msgspec.json.encode({"dp_rank": request.dp_rank, "epoch": request.epoch,
                                       "reason": request.reason})
        subject = resync_subject(request.model, request.worker_id)
        key = (request.model, request.worker_id, request.dp_rank)
        for attempt, delay in enumerate((0.0, *self._retry_delays_s)):
            if delay:
                await asyncio.sleep(delay)
                self._last[key] = time.monotonic()  # a retry is a request too
                self._stats.resync_retries += 1
            try:
                await self._nc.request(subject, payload, timeout=self._timeout_s)
            except Exception as exc:  # noqa: BLE001 - a missing publisher must not stop ingest
                log.warning("resync_unanswered", model=request.model, worker=request.worker_id,
                            dp_rank=request.dp_rank, reason=request.reason, attempt=attempt,
                            error=repr(exc))
                continue
            log.info("resync_requested", model=request.model, worker=request.worker_id,
                     dp_rank=request.dp_rank, reason=request.reason, attempt=attempt)
            return
        self._stats.resyncs_unanswered += 1


def marker_name(partition: int) -> str:
    """The index marker a partition's consumer trusts; "rebuilding-..." while it rebuilds."""
    return f"partition.{partition}"


def position_marker_name(partition: int) -> str:
    """The index marker holding the last stream sequence applied for a partition."""
    return f"position.{partition}"


def marker_is_rebuilding(marker: str | None) -> bool:
    return marker is None or marker.startswith(_REBUILDING_PREFIX)


class PartitionConsumer:
    """The durable pull consumer of one stream partition, feeding the index.

    At start it resumes where its durable consumer stopped if the index's marker for the
    partition matches the recorded one; otherwise it rebuilds the partition (newest valid
    snapshot, then the stream from the sequence after it). It re-checks the marker while
    running, so an index that lost its data (Redis flushed or restarted) is rebuilt in
    place, and it snapshots the partition every `snapshot_every_batches` batches or
    `snapshot_every_s` seconds.
    """

    def __init__(
        self,
        js: JetStreamContext,
        index: Index,
        partition: int,
        *,
        resync: ResyncRequester,
        stats: ConsumerStats,
        settings: ConsumerSettings,
        snapshots: SnapshotStore | None = None,
        lag_seconds: Observer | None = None,
        apply_seconds: Observer | None = None,
        activity: EventActivity | None = None,
        pool_grants: PoolGrants | None = None,
    ) -> None:
        self.partition = partition
        self._activity = activity  # per rank counters for Diagnose (indexer/serve/diagnose.py)
        # (model, worker) -> the shared storage pools its registry entry declares (None:
        # no entry seen yet); None here: pool writes are not checked (tests, tools).
        self._pool_grants = pool_grants
        # Histograms (when metrics are on): batch timestamp to applied, per applied batch;
        # the duration of each index.apply call.
        self._lag_seconds = lag_seconds
        self._apply_seconds = apply_seconds
        self.rebuilding = False
        self._js = js
        self._index = index
        self._resync = resync
        self._stats = stats
        self._settings = settings
        self._snapshots = snapshots
        self._marker: str | None = None
        self._marker_checked = 0.0
        self._last_stream_seq = 0
        self._stopping: asyncio.Event | None = None  # run()'s stop
        self._acked_seq = 0  # the last stream sequence this consumer acknowledged
        self._position_suspect = False  # a backend call failed since the last position write
        self.last_progress = time.monotonic()  # when a fetch was last applied and acked
        self._batches_since_snapshot = 0
        self._last_snapshot = time.monotonic()
        self._rebuild_started = 0.0
        # (when, ack floor) of the last idle look at the durable consumer that found work
        # it was not delivering; None when the last look found none
        self._stall_seen: tuple[float, int] | None = None
        self._stall_checked = time.monotonic()
        # The consumer's delivery sequence of the last message this subscription got, and
        # the stream sequence a re-created consumer would start from without a hole.
        self._last_delivery: int | None = None
        self._replay_from = 1
        self._log = log.bind(partition=partition)

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch, apply and ack until `stop` is set; the batch in hand is finished first,
        unless the backend is away: then it is left unacknowledged (redelivered to whoever
        consumes the partition next) rather than holding up the stop."""
        self._stopping = stop
        try:
            await self._run(stop)
        except _StoppedWhileWaitingError:
            self._log.info("partition_consumer_stopped_unacked")

    async def _run(self, stop: asyncio.Event) -> None:
        sub = await self._subscribe(await self._start_seq())
        # One line per partition would be most of a quiet start: the service logs one
        # `consumers_started` for all of them (indexer.app), the lease holder its own.
        self._log.debug("partition_consumer_started", rebuilding=self.rebuilding)
        try:
            while not stop.is_set():
                if await self._lost_marker():
                    sub = await self._rebuilt(sub)
                msgs = await self._fetch(sub)
                if msgs and (lost := self._deliveries_lost(msgs)):
                    # AckAll on these would acknowledge the lost ones unread: start over
                    # from the last sequence acknowledged, these messages unacked.
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                    sub = await self._subscribe(await self._reset_consumer(
                        self._replay_from - 1, "deliveries lost in transit", lost))
                elif msgs:
                    self._stall_seen = None
                    try:
                        await self.process(msgs, stop)
                    except _LostWhileWaitingError:
                        sub = await self._rebuilt(sub)  # the fetch unacked: replayed
                elif self.rebuilding and not await self._finish_rebuild():
                    sub = await self._rebuilt(sub)
                elif (reset := await self._stalled()) is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                    sub = await self._subscribe(reset)
                await self._maybe_snapshot()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            self._log.debug("partition_consumer_stopped")

    # --- start, rebuild ----------------------------------------------------------------

    async def _rebuilt(self, sub: JetStreamContext.PullSubscription,
                       ) -> JetStreamContext.PullSubscription:
        """The index lost its data: the partition rebuilt, and a new subscription."""
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        return await self._subscribe(await self._rebuild("index lost its data"))

    async def _start_seq(self) -> int | None:
        """None: resume the durable consumer; else the stream sequence to replay from."""
        if self._snapshots is None:
            return await self._unstranded_start()
        expected = await self._snapshots.expected_marker(self.partition)
        current = await self._index.get_marker(self._marker_name)
        if expected is not None and current == expected:
            position, floor = await self._position(), await self._ack_floor()
            if position >= floor or not await self._stored_between(position, floor):
                self._marker = current
                # the index's own position when the floor only scanned past it: the
                # running check compares that position with this
                self._acked_seq = min(position, floor)
                self._replay_from = floor + 1
                return await self._unstranded_start()
            # Restored from an older dump, or a lagging replica promoted: the marker
            # matches but writes the stream saw acknowledged are missing.
            return await self._rebuild(f"index behind the stream (reflects {position}, "
                                       f"acknowledged {floor})")
        return await self._rebuild("no marker" if current is None else "marker mismatch")

    @property
    def _marker_name(self) -> str:
        return marker_name(self.partition)

    async def _record_position(self) -> None:
        if self._position_suspect and self._marker is not None:
            # The backend failed since the last write: it may have come back from an older
            # dump, which a fresh position would hide. Never record one over lost writes:
            # leave the older one, which the next marker check turns into a rebuild.
            if await self._position() < self._acked_seq:
                self._marker_checked = 0.0
                return
            self._position_suspect = False
        await self._index.set_marker(position_marker_name(self.partition),
                                     str(self._last_stream_seq))

    async def _position(self) -> int:
        """The stream sequence the index says it reflects for this partition."""
        raw = await self._index.get_marker(position_marker_name(self.partition))
        return int(raw) if raw and raw.isdigit() else 0

    async def _stored_between(self, position: int, floor: int) -> bool:
        """Whether the stream holds a message of this partition after `position` and up
        to `floor`. A filtered consumer's ack floor follows its scan of the whole stream
        (with nothing pending it is the last stream sequence looked at), so a floor
        above the index's position means acknowledged writes are missing only if one of
        this partition's messages lies between them."""
        try:
            msg = await self._js.get_msg(STREAM_NAME, seq=position + 1, next=True,
                                         subject=partition_filter(self.partition))
        except NotFoundError:
            return False
        return msg.seq is not None and msg.seq <= floor

    async def _ack_floor(self) -> int:
        try:
            info = await self._js.consumer_info(STREAM_NAME, consumer_name(self.partition))
        except NotFoundError:
            return 0
        return _floor_of(info)

    async def _unstranded_start(self) -> int | None:
        """None: resume the durable consumer as it is. A start holds no message yet, so
        deliveries the consumer awaits acks for went to a subscription that is gone (this
        process's before a restart, or one whose NATS node died): JetStream would give
        them again only after the ack wait, and in a trickle. Then the consumer is
        re-created from its ack floor, and the sequence to replay from is returned."""
        try:
            info = await self._js.consumer_info(STREAM_NAME, consumer_name(self.partition))
        except NotFoundError:
            return None
        if not info.num_ack_pending:
            return None
        return await self._reset_consumer(_floor_of(info), "stranded deliveries at start",
                                           int(info.num_ack_pending))

    def _deliveries_lost(self, msgs: Sequence[Msg]) -> int:
        """How many deliveries the consumer made between the last message this
        subscription got and these, or among these (each delivery, a redelivery too, takes
        the next delivery sequence): sent to a pull request whose reply never came back
        (a NATS node lost with it, a reconnect), they await an ack this process cannot
        give, and JetStream would send them again only after the ack wait."""
        previous = self._last_delivery
        lost = 0
        for msg in msgs:
            delivery = msg.metadata.sequence.consumer
            if previous is not None and delivery > previous + 1:
                lost += delivery - previous - 1
            previous = delivery
        return lost

    async def _stalled(self) -> int | None:
        """After an empty fetch, at most every `stall_check_s`: whether the durable
        consumer holds work it is not delivering. Every fetch this process makes is acked
        before the next, so two looks in a row (with no message fetched between them)
        that find messages awaiting an ack at an unmoved ack floor mean deliveries were
        stranded (sent to a subscription, or through a NATS node, that is gone); and
        messages pending while fetches come back empty mean this subscription no longer
        reaches the consumer. Returns the sequence to re-create the consumer from (the
        stranded case), or 0 to subscribe again as it is; None when all is well."""
        now = time.monotonic()
        if now - self._stall_checked < self._settings.stall_check_s:
            return None
        self._stall_checked = now
        info = await self._js.consumer_info(STREAM_NAME, consumer_name(self.partition))
        ack_pending, waiting = int(info.num_ack_pending or 0), int(info.num_pending or 0)
        if not ack_pending and not waiting:
            self._stall_seen = None
            return None
        floor = _floor_of(info)
        seen, self._stall_seen = self._stall_seen, (now, floor)
        if seen is None or seen[1] != floor:
            return None  # first sight, or the floor moves: an ack was on its way
        self._stall_seen = None
        if ack_pending:
            return await self._reset_consumer(floor, "stranded deliveries", ack_pending)
        self._stats.consumer_resets += 1
        self._log.warning("partition_consumer_resubscribed", pending=waiting,
                          idle_s=round(now - seen[0], 1))
        return 0

    async def _reset_consumer(self, floor: int, reason: str, stranded: int) -> int:
        """Delete the durable consumer; the next subscription re-creates it from the
        sequence after its ack floor (what follows is replayed: the index counts what it
        already has as duplicates, so nothing is applied twice and nothing is skipped)."""
        self._stats.consumer_resets += 1
        self._log.warning("partition_consumer_reset", reason=reason, stranded=stranded,
                          from_seq=floor + 1)
        with contextlib.suppress(NotFoundError):
            await self._js.delete_consumer(STREAM_NAME, consumer_name(self.partition))
        return floor + 1

    async def pending(self) -> int:
        """Messages of the partition not yet applied and acked (JetStream's count)."""
        info = await self._js.consumer_info(STREAM_NAME, consumer_name(self.partition))
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def _rebuild(self, reason: str) -> int:
        """Rebuild the partition (retrying while the backend is unavailable). A consumer
        asked to stop (its lease lost, the process ending) never starts an attempt: the
        partition's next owner may be applying into the index already."""
        if self._stop_requested():
            raise _StoppedWhileWaitingError
        self.rebuilding = True
        self._stats.rebuilds += 1
        attempt = 0
        while True:
            try:
                return await self._rebuild_once(reason)
            except BackendError as exc:
                if self._stop_requested():
                    raise _StoppedWhileWaitingError from exc
                self._position_suspect = True
                attempt += 1
                delay = _RETRY_BACKOFF_S[min(attempt, len(_RETRY_BACKOFF_S)) - 1]
                self._log.warning("partition_rebuild_failed", error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                if self._stop_requested():
                    raise _StoppedWhileWaitingError from exc

    async def _rebuild_once(self, reason: str) -> int:
        assert self._snapshots is not None
        started = time.monotonic()
        self._acked_seq = 0  # the replay acknowledges afresh
        await self._index.reset_caches()
        # A provisional marker: if the index loses its data again while we rebuild, the
        # marker goes with it and the rebuild starts over instead of trusting a hole.
        self._marker = f"{_REBUILDING_PREFIX}{uuid.uuid4().hex}"
        await self._index.set_marker(self._marker_name, self._marker)
        partitions = self._snapshots.partitions
        for model, ref in await partition_ranks(self._index, self.partition, partitions):
            await self._index.remove_worker(model, ref.worker_id)
        snapshot = await self._snapshots.load_newest(self.partition)
        start = 1
        if snapshot is not None:
            await self._index.import_ranks(snapshot.ranks)
            start = snapshot.stream_seq + 1
        with contextlib.suppress(NotFoundError):
            await self._js.delete_consumer(STREAM_NAME, consumer_name(self.partition))
        self._rebuild_started = started
        # A first start has no marker: routine, not a warning; in memory, at every start.
        if reason != "no marker":
            emit = self._log.warning
        else:
            emit = self._log.debug if self._settings.quiet_first_rebuild else self._log.info
        emit("partition_rebuild", reason=reason, from_seq=start,
             snapshot_ranks=len(snapshot.ranks) if snapshot else 0,
             load_s=round(time.monotonic() - started, 3))
        return start

    async def _finish_rebuild(self) -> bool:
        """Caught up with the stream: record the marker; the partition is trusted again.

        False if the index lost its data during the rebuild (then it starts over)."""
        assert self._snapshots is not None
        if await self._index.get_marker(self._marker_name) != self._marker:
            return False
        self._marker = await self._snapshots.new_marker(self.partition)
        await self._index.set_marker(self._marker_name, self._marker)
        self.rebuilding = False
        self._marker_checked = time.monotonic()
        seconds = time.monotonic() - self._rebuild_started
        # Only a rebuild long enough to be felt (replaying a large retained stream).
        emit = self._log.info if seconds >= SLOW_REBUILD_S else self._log.debug
        emit("partition_rebuilt", seconds=round(seconds, 3))
        gc.collect()
        gc.freeze()  # the rebuilt ledgers are long-lived: keep them out of GC passes
        return True

    def _stop_requested(self) -> bool:
        return self._stopping is not None and self._stopping.is_set()

    async def _marker_gone(self) -> bool:
        """The index answers, without this consumer's marker (False when it cannot say):
        asked at once, of the marker only (`_lost_marker` is the loop's throttled check,
        which also compares positions and the recorded marker)."""
        if self._snapshots is None or self._marker is None:
            return False
        try:
            return await self._index.get_marker(self._marker_name) != self._marker
        except BackendError:
            return False

    async def _lost_marker(self) -> bool:
        if self._snapshots is None or self._marker is None:
            return False
        now = time.monotonic()
        if now - self._marker_checked < self._settings.marker_check_s:
            return False
        self._marker_checked = now
        assert self._snapshots is not None
        try:
            if await self._index.get_marker(self._marker_name) != self._marker:
                return True  # the index lost its data (Redis flushed, restarted, replaced)
            if not self.rebuilding and await self._position() < self._acked_seq:
                return True  # it came back with older data: acknowledged writes are gone
        except BackendError:
            return False  # the apply path retries; check again later
        expected = await self._snapshots.expected_marker(self.partition)
        # A rebuild in progress owns no recorded marker yet; `kv-indexer rebuild` changes it.
        return not self.rebuilding and expected != self._marker

    async def _subscribe(self, start_seq: int | None) -> JetStreamContext.PullSubscription:
        """The pull subscription of the durable consumer; a missing consumer is created
        to deliver from `start_seq` (None or 0: where an existing one stands)."""
        config = js_api.ConsumerConfig(
            ack_policy=js_api.AckPolicy.ALL, ack_wait=self._settings.ack_wait_s,
            max_ack_pending=self._settings.fetch_batch * 4,
            filter_subject=partition_filter(self.partition))
        if start_seq:
            config.deliver_policy = js_api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = start_seq
            self._replay_from = start_seq
        self._last_delivery = None
        return await self._js.pull_subscribe(
            partition_filter(self.partition), durable=consumer_name(self.partition),
            stream=STREAM_NAME, config=config)

    # --- snapshots ---------------------------------------------------------------------

    async def _maybe_snapshot(self) -> None:
        if self._snapshots is None or self.rebuilding:
            return
        due_batches = self._batches_since_snapshot >= self._settings.snapshot_every_batches
        due_time = time.monotonic() - self._last_snapshot >= self._settings.snapshot_every_s
        if not (due_batches or due_time) or self._batches_since_snapshot == 0:
            return
        try:
            await self.snapshot()
        except BackendError as exc:
            self._log.warning("snapshot_failed", error=str(exc))  # the next one will do

    async def snapshot(self) -> int:
        """Snapshot the partition now; returns the snapshot's size in bytes."""
        assert self._snapshots is not None
        ranks = await partition_ranks(self._index, self.partition, self._snapshots.partitions)
        states = await self._index.export_ranks(ranks)
        if await self._index.get_marker(self._marker_name) != self._marker:
            self._log.warning("snapshot_skipped", reason="index lost its data")
            return 0  # what we exported may be a hole: never store it (or purge for it)
        size = await self._snapshots.save(self.partition, self._last_stream_seq, states)
        self._stats.snapshots += 1
        self._batches_since_snapshot = 0
        self._last_snapshot = time.monotonic()
        if self._settings.purge_after_snapshot:
            oldest = await self._snapshots.oldest_kept_seq(self.partition)
            if oldest is not None:
                await self._snapshots.purge_below(self.partition, oldest)
        return size

    async def _fetch(self, sub: JetStreamContext.PullSubscription) -> list[Msg]:
        """What is there now (up to a batch), else wait for the next message only.

        A `fetch(n)` that finds fewer than n messages lingers until n arrive or it times
        out, which would add up to the timeout to every event's lag on a quiet stream.
        """
        try:
            return await sub.fetch(self._settings.fetch_batch, timeout=0.002)
        except (NatsTimeoutError, TimeoutError):
            pass
        try:
            return await sub.fetch(1, timeout=self._settings.fetch_timeout_s)
        except (NatsTimeoutError, TimeoutError):
            return []

    async def process(self, msgs: Sequence[Msg], stop: asyncio.Event | None = None) -> None:
        """Handle one fetch; returns once the index has it and JetStream has the ack."""
        self._stats.messages += len(msgs)
        self._batches_since_snapshot += len(msgs)
        decoded: list[tuple[Msg, EventBatch]] = []
        for msg in msgs:
            batch = await self._decode(msg)
            if batch is not None:
                decoded.append((msg, batch))
        failures = self._stats.backend_retries
        await self._apply_all(decoded, msgs)
        if msgs:
            self._last_stream_seq = msgs[-1].metadata.sequence.stream
            # Recorded before the ack: an index that holds every acked message always
            # reflects a position >= the ack floor, so one found below it lost writes.
            await self._with_backend_retry(self._record_position, msgs)
            for _ in range(_REAPPLY_ROUNDS):
                if self._stats.backend_retries == failures:
                    break
                failures = self._stats.backend_retries
                await self._reapply(decoded, msgs)
            await msgs[-1].ack()  # AckAll: acknowledges the whole fetch
            self._acked_seq = self._last_stream_seq
            self._replay_from = self._last_stream_seq + 1
            self._last_delivery = msgs[-1].metadata.sequence.consumer
            self.last_progress = time.monotonic()

    async def _reapply(self, decoded: list[tuple[Msg, EventBatch]],
                       msgs: Sequence[Msg]) -> None:
        """The backend failed during this fetch: it may have come back from a dump taken
        after the last position write and before this fetch's apply, which the position
        cannot show. Apply the fetch again onto what the backend holds (ledgers read
        afresh): batches it kept are duplicates, lost ones are applied."""
        self._log.warning("fetch_reapplied", batches=len(decoded),
                          reason="backend failed during the fetch")
        await self._with_backend_retry(self._index.reset_caches, msgs)
        await self._apply_all(decoded, msgs)

    async def _decode(self, msg: Msg) -> EventBatch | None:
        """The batch, if it is well formed and may be trusted; else dead-lettered."""
        try:
            batch = decode_batch(msg.data)
        except UnsupportedSchemaError as exc:
            await self._dead_letter(msg, "unsupported_schema", exc)
            return None
        except BusError as exc:
            await self._dead_letter(msg, "undecodable", exc)
            return None
        # The subject is the identity (NATS permissions decide who may publish on it);
        # the payload's own claim is only believed when it agrees.
        if stored_subject_identity(msg.subject) != (batch.model, batch.worker_id):
            await self._dead_letter(msg, "identity_mismatch", ValueError(
                f"payload names {batch.model!r} / {batch.worker_id!r}"))
            return None
        # Epochs are publish-time nanoseconds: one from the future would make every real
        # batch of the rank stale.
        if batch.epoch > time.time_ns() + int(self._settings.max_epoch_skew_s * 1e9):
            await self._dead_letter(msg, "epoch_in_future", ValueError(
                f"epoch {batch.epoch} is more than {self._settings.max_epoch_skew_s:g} s "
                "ahead of this clock"))
            return None
        # Batch times order shared pools' writes (the newest wins: one from the future
        # would outlive every real removal) and are a model's freshness.
        if batch.ts > time.time() + self._settings.max_epoch_skew_s:
            await self._dead_letter(msg, "ts_in_future", ValueError(
                f"ts {batch.ts!r} is more than {self._settings.max_epoch_skew_s:g} s "
                "ahead of this clock"))
            return None
        if self._pool_grants is not None and any(e.pool is not None for e in batch.events):
            batch, refused = refuse_undeclared(
                batch, self._pool_grants(batch.model, batch.worker_id))
            if refused:
                dropped = self._stats.dropped
                count = dropped["pool_not_declared"] = dropped.get("pool_not_declared", 0) + 1
                if count & (count - 1) == 0:  # the 1st, 2nd, 4th ... refused batch
                    self._log.warning("pool_write_refused", model=batch.model,
                                      worker=batch.worker_id, events=refused, batches=count)
        return batch

    async def _apply_all(self, decoded: list[tuple[Msg, EventBatch]],
                         msgs: Sequence[Msg]) -> None:
        """Apply every batch, chunk by chunk, before the fetch is acked (AckAll). A chunk
        the index raises on (anything but a backend outage, which is retried) is applied
        again batch by batch, and only the batches that raise again are dead-lettered: one
        bad batch never costs other workers theirs."""
        chunk = self._settings.apply_chunk
        for start in range(0, len(decoded), chunk):
            part = decoded[start : start + chunk]
            try:
                await self._apply_with_retry([batch for _, batch in part], msgs)
            except _GiveUpFetchError:
                raise
            except Exception as exc:  # noqa: BLE001 - find the batch, keep the others
                self._log.error("index_apply_raised", error=repr(exc)[:300], batches=len(part))
                await self._apply_one_by_one(part, msgs)
            await asyncio.sleep(0)  # let Score calls in between big fetches

    async def _apply_one_by_one(self, part: list[tuple[Msg, EventBatch]],
                                msgs: Sequence[Msg]) -> None:
        # What the failed call left in memory (a ledger ahead of its backend) goes; each
        # rank is read afresh from the backend, so nothing applies twice. A batch that
        # applies leaves the cache true to the backend; only one that raises dirties it.
        await self._with_backend_retry(self._index.reset_caches, msgs)
        for msg, batch in part:
            try:
                await self._apply_with_retry([batch], msgs)
            except _GiveUpFetchError:
                raise
            except Exception as exc:  # noqa: BLE001 - this batch, and only it, is refused
                await self._with_backend_retry(self._index.reset_caches, msgs)
                await self._dead_letter(msg, "apply_failed", exc)
                self._on_gap(batch)  # the rank misses this batch: its publisher re-sends
            if msgs:  # a long pass must not outlast the fetch's ack wait
                with contextlib.suppress(Exception):
                    await msgs[-1].in_progress()

    async def _apply_with_retry(self, batches: list[EventBatch], msgs: Sequence[Msg]) -> None:
        async def apply() -> None:
            if self._apply_seconds is None:
                self._record(batches, await self._index.apply(batches, validated=True))
                return
            started = time.perf_counter()
            try:
                outcomes = await self._index.apply(batches, validated=True)
            finally:
                self._apply_seconds.observe(time.perf_counter() - started)
            self._record(batches, outcomes)

        await self._with_backend_retry(apply, msgs)

    async def _with_backend_retry(self, call: Callable[[], Awaitable[None]],
                                  msgs: Sequence[Msg]) -> None:
        """`call()`, again and again while the index backend is unavailable."""
        attempt = 0
        while True:
            try:
                await call()
                return
            except BackendError as exc:
                if self._stop_requested():
                    raise _StoppedWhileWaitingError from exc
                self._position_suspect = True
                attempt += 1
                self._stats.backend_retries += 1
                delay = _RETRY_BACKOFF_S[min(attempt, len(_RETRY_BACKOFF_S)) - 1]
                self._log.warning("index_apply_failed", error=str(exc), attempt=attempt,
                                  retry_in_s=delay)
                if msgs:
                    with contextlib.suppress(Exception):
                        await msgs[-1].in_progress()
                await asyncio.sleep(delay)
                if self._stop_requested():
                    raise _StoppedWhileWaitingError from exc
                if await self._marker_gone():  # checked last: the next try would apply
                    raise _LostWhileWaitingError from exc

    def _record(self, batches: list[EventBatch], outcomes: list[ApplyOutcome]) -> None:
        """Count what the index did with each batch; a gap asks the worker for a resync."""
        stats = self._stats
        now = time.time()
        lags, lag_ts = stats.lag_samples, stats.lag_sample_ts
        observe_lag = self._lag_seconds.observe if self._lag_seconds is not None else None
        for batch, outcome in zip(batches, outcomes, strict=True):
            if outcome is ApplyOutcome.SEQ_JUMP:  # not applied: a resync restores the rank
                self._on_gap(batch)
                continue
            if not outcome.applied:  # duplicate or stale: the index counted it
                continue
            if outcome is ApplyOutcome.APPLIED_AFTER_GAP:
                self._on_gap(batch)
            stats.batches_applied += 1
            stats.last_applied_ts = batch.ts
            stats.last_applied_at = now
            lag = now - batch.ts
            lags.append(lag)
            lag_ts.append(batch.ts)
            if observe_lag is not None:
                observe_lag(lag)
            stats.blocks_seen += block_count(batch)
            if self._activity is not None:
                self._activity.observe(batch, now, timed=not self.rebuilding)

    def _on_gap(self, batch: EventBatch) -> None:
        self._stats.gaps += 1
        if self._activity is not None:
            self._activity.gap(batch)
        self._log.warning("sequence_gap", model=batch.model, worker=batch.worker_id,
                          dp_rank=batch.dp_rank, epoch=batch.epoch, seq=batch.seq)
        self._resync.request(ResyncRequest(batch.model, batch.worker_id, batch.dp_rank,
                                           batch.epoch, "sequence_gap"))

    async def _dead_letter(self, msg: Msg, reason: str, exc: Exception) -> None:
        self._stats.dead_letters[reason] = self._stats.dead_letters.get(reason, 0) + 1
        meta = msg.metadata
        self._log.warning("dead_letter", reason=reason, subject=msg.subject,
                          stream_seq=meta.sequence.stream, error=str(exc)[:200])
        headers = {"Kv-Reason": reason,
                   "Kv-Error": str(exc).encode()[:500].decode(errors="ignore"),
                   "Kv-Subject": msg.subject, "Kv-Stream-Seq": str(meta.sequence.stream)}
        data = msg.data
        # The copy must fit the server's limit with its headers: a message that barely fit
        # would otherwise make the server close this connection.
        room = server_max_payload(self._js) - _HEADER_ROOM - sum(
            len(k) + len(v.encode()) + 4 for k, v in headers.items())
        if len(data) > room:
            headers["Kv-Truncated-From"] = str(len(data))
            data = data[: max(room, 0)]
        try:
            await self._js.publish(f"{DEAD_LETTER_SUBJECT}.{reason}", data, headers=headers)
        except Exception as pub_exc:  # noqa: BLE001 - counting and logging is the floor
            self._log.error("dead_letter_publish_failed", reason=reason, error=repr(pub_exc))


def _floor_of(info: js_api.ConsumerInfo) -> int:
    """The stream sequence a consumer's acknowledgements cover up to."""
    return int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0
