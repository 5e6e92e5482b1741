"""gRPC handlers of the state service: proto in, domain call, proto out. Nothing else lives here."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from bulkhead.state.v1 import state_pb2, state_pb2_grpc
from services.state.context_kv import ContextStore
from services.state.records import (
    ContextRecord,
    EventRecord,
    NewEventRecord,
    ScopeKind,
    SnapshotRecord,
    ThreadRecord,
)
from services.state.threads import ThreadLog
from shared.db import Database, answer_with_lsn, reads_after_caller


class StateServicer(state_pb2_grpc.StateServiceServicer):
    """Thin translation between bulkhead.state.v1 messages and ThreadLog / ContextStore.

    ListThreads and ReadEvents may read on a replica; the writes they would show (CreateThread,
    DeleteThread, AppendEvents) answer with their WAL position for read-your-writes (shared.db.replica).
    """

    def __init__(self, threads: ThreadLog, context_store: ContextStore, db: Database | None = None):
        self._threads = threads
        self._context = context_store
        self._db = db

    async def _written(self, context) -> None:
        if self._db is not None:
            await answer_with_lsn(self._db, context)

    async def CreateThread(self, request, context):
        thread = await self._threads.create(
            thread_id=request.thread_id, run_id=request.run_id, agent_id=request.agent_id, labels=dict(request.labels)
        )
        await self._written(context)
        return state_pb2.CreateThreadResponse(thread=_thread(thread))

    async def GetThread(self, request, context):
        return state_pb2.GetThreadResponse(thread=_thread(await self._threads.get(request.thread_id)))

    async def ListThreads(self, request, context):
        with reads_after_caller(context):
            page = await self._threads.list(
                run_id=request.run_id,
                agent_id=request.agent_id,
                labels=dict(request.labels),
                page_size=request.page_size,
                page_token=request.page_token,
            )
        return state_pb2.ListThreadsResponse(
            threads=[_thread(t) for t in page.items], next_page_token=page.next_page_token
        )

    async def DeleteThread(self, request, context):
        expected = request.expected_version if request.HasField("expected_version") else None
        await self._threads.delete(request.thread_id, expected)
        await self._written(context)
        return state_pb2.DeleteThreadResponse()

    async def AppendEvents(self, request, context):
        expected = request.expected_version if request.HasField("expected_version") else None
        events = [NewEventRecord(e.type, e.payload) for e in request.events]
        first, last = await self._threads.append(request.thread_id, events, expected)
        await self._written(context)
        return state_pb2.AppendEventsResponse(version=last, first_version=first)

    async def ReadEvents(self, request, context):
        with reads_after_caller(context):
            page, version = await self._threads.read(
                request.thread_id,
                after_version=request.after_version,
                page_size=request.page_size,
                page_token=request.page_token,
            )
        return state_pb2.ReadEventsResponse(
            events=[_event(e) for e in page.items], next_page_token=page.next_page_token, thread_version=version
        )

    async def Replay(self, request, context):
        items = await self._threads.replay(
            request.thread_id, up_to_version=request.up_to_version, from_snapshot=request.from_snapshot
        )
        async for item in items:
            if isinstance(item, SnapshotRecord):
                yield state_pb2.ReplayResponse(snapshot=_snapshot(item))
            else:
                yield state_pb2.ReplayResponse(event=_event(item))

    async def CreateSnapshot(self, request, context):
        snap = await self._threads.create_snapshot(request.thread_id, request.version, request.state)
        return state_pb2.CreateSnapshotResponse(snapshot=_snapshot(snap))

    async def GetSnapshot(self, request, context):
        snap = await self._threads.get_snapshot(request.thread_id, request.at_or_before_version)
        return state_pb2.GetSnapshotResponse(snapshot=_snapshot(snap))

    async def PutContext(self, request, context):
        expected = request.expected_revision if request.HasField("expected_revision") else None
        ttl = request.ttl.ToMicroseconds() if request.HasField("ttl") else None
        entry = await self._context.put(
            request.scope.kind, request.scope.id, request.key, request.value, expected_revision=expected, ttl_us=ttl
        )
        return state_pb2.PutContextResponse(entry=_entry(entry))

    async def GetContext(self, request, context):
        entry = await self._context.get(request.scope.kind, request.scope.id, request.key)
        return state_pb2.GetContextResponse(entry=_entry(entry))

    async def DeleteContext(self, request, context):
        expected = request.expected_revision if request.HasField("expected_revision") else None
        await self._context.delete(request.scope.kind, request.scope.id, request.key, expected_revision=expected)
        return state_pb2.DeleteContextResponse()


def _ts(micros: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(micros)
    return ts


def _thread(t: ThreadRecord) -> state_pb2.Thread:
    return state_pb2.Thread(
        thread_id=t.thread_id,
        run_id=t.run_id,
        agent_id=t.agent_id,
        labels=t.labels,
        version=t.version,
        create_time=_ts(t.created_at_us),
        update_time=_ts(t.updated_at_us),
    )


def _event(e: EventRecord) -> state_pb2.Event:
    return state_pb2.Event(version=e.version, type=e.type, payload=e.payload, create_time=_ts(e.created_at_us))


def _snapshot(s: SnapshotRecord) -> state_pb2.Snapshot:
    return state_pb2.Snapshot(thread_id=s.thread_id, version=s.version, state=s.state, create_time=_ts(s.created_at_us))


_SCOPE_KIND_PB = {ScopeKind.TEAM: state_pb2.SCOPE_KIND_TEAM, ScopeKind.RUN: state_pb2.SCOPE_KIND_RUN}


def _entry(e: ContextRecord) -> state_pb2.ContextEntry:
    entry = state_pb2.ContextEntry(
        scope=state_pb2.ContextScope(kind=_SCOPE_KIND_PB[e.kind], id=e.scope_id),
        key=e.key,
        value=e.value,
        revision=e.revision,
        update_time=_ts(e.updated_at_us),
    )
    if e.expires_at_us is not None:
        entry.expire_time.CopyFrom(_ts(e.expires_at_us))
    return entry
