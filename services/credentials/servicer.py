"""CredentialsService RPC handlers: proto in, domain call, proto out. No rules live here."""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2

from bulkhead.credentials.v1 import credentials_pb2 as pb
from bulkhead.credentials.v1 import credentials_pb2_grpc
from services.credentials import store
from services.credentials.audit import AuditLog
from services.credentials.key_manager import KeyManager
from services.credentials.secret_manager import SecretInfo, SecretManager
from shared import paging
from shared.errors import InvalidArgument

_STATES = {
    "current": pb.SECRET_VERSION_STATE_CURRENT,
    "previous": pb.SECRET_VERSION_STATE_PREVIOUS,
    "deleted": pb.SECRET_VERSION_STATE_DELETED,
    "destroyed": pb.SECRET_VERSION_STATE_DESTROYED,
}
_ACTIONS = {
    "put": pb.ACCESS_ACTION_PUT,
    "get": pb.ACCESS_ACTION_GET,
    "describe": pb.ACCESS_ACTION_DESCRIBE,
    "rotate": pb.ACCESS_ACTION_ROTATE,
    "delete": pb.ACCESS_ACTION_DELETE,
    "destroy": pb.ACCESS_ACTION_DESTROY,
    "expire": pb.ACCESS_ACTION_EXPIRE,
    "encrypt": pb.ACCESS_ACTION_ENCRYPT,
    "decrypt": pb.ACCESS_ACTION_DECRYPT,
    "generate_data_key": pb.ACCESS_ACTION_GENERATE_DATA_KEY,
    "rotate_key": pb.ACCESS_ACTION_ROTATE_KEY,
    "rewrap": pb.ACCESS_ACTION_REWRAP,
    "list": pb.ACCESS_ACTION_LIST,
}
_OUTCOMES = {
    "allowed": pb.ACCESS_OUTCOME_ALLOWED,
    "denied": pb.ACCESS_OUTCOME_DENIED,
    "not_found": pb.ACCESS_OUTCOME_NOT_FOUND,
    "conflict": pb.ACCESS_OUTCOME_CONFLICT,
    "invalid": pb.ACCESS_OUTCOME_INVALID,
    "failed": pb.ACCESS_OUTCOME_FAILED,
}


def _ts(us: int | None) -> timestamp_pb2.Timestamp | None:
    if us is None:
        return None
    out = timestamp_pb2.Timestamp()
    out.FromMicroseconds(us)
    return out


def _dur(seconds: int | None) -> duration_pb2.Duration | None:
    return None if seconds is None else duration_pb2.Duration(seconds=seconds)


def _seconds(msg, field: str) -> int | None:
    """A Duration field as whole seconds; None when unset."""
    if not msg.HasField(field):
        return None
    value = getattr(msg, field)
    if value.seconds < 0 or value.nanos < 0:
        raise InvalidArgument(
            f"{field} must not be negative", reason="DURATION_INVALID", violations={field: "must not be negative"}
        )
    return value.seconds


def secret_proto(info: SecretInfo) -> pb.Secret:
    """A Secret message from the domain's snapshot."""
    return pb.Secret(
        name=info.name,
        description=info.description,
        current_version=info.current_version,
        rotation_period=_dur(info.rotation_period_s),
        rotator=info.rotator,
        next_rotation_time=_ts(info.next_rotation_us),
        grace_period=_dur(info.grace_period_s),
        create_time=_ts(info.created_us),
        update_time=_ts(info.updated_us),
        last_access_time=_ts(info.last_access_us),
        delete_time=_ts(info.deleted_us),
        versions=[
            pb.SecretVersion(
                version=v.version,
                state=_STATES[v.state],
                create_time=_ts(v.created_us),
                expire_time=_ts(v.expire_us),
                created_by=v.created_by,
                origin=v.origin,
            )
            for v in info.versions
        ],
    )


def event_proto(row: store.AuditRow) -> pb.AccessEvent:
    """An AccessEvent message from an audit row."""
    return pb.AccessEvent(
        sequence=row.seq,
        time=_ts(row.time_us),
        principal_id=row.principal_id,
        actor_id=row.actor_id,
        agent_id=row.agent_id,
        run_id=row.run_id,
        request_id=row.request_id,
        secret_name=row.secret_name,
        version=row.version,
        action=_ACTIONS.get(row.action, pb.ACCESS_ACTION_UNSPECIFIED),
        outcome=_OUTCOMES.get(row.outcome, pb.ACCESS_OUTCOME_UNSPECIFIED),
        reason=row.reason,
        hash=row.hash,
    )


class CredentialsServicer(credentials_pb2_grpc.CredentialsServiceServicer):
    """The gRPC face of SecretManager, KeyManager and AuditLog."""

    def __init__(self, secrets: SecretManager, keys: KeyManager, audit: AuditLog) -> None:
        self._secrets, self._keys, self._audit = secrets, keys, audit

    async def PutSecret(self, request: pb.PutSecretRequest, context) -> pb.PutSecretResponse:
        info = await self._secrets.put(
            request.name,
            request.value,
            cas=request.cas if request.HasField("cas") else None,
            description=request.description,
            rotation_period_s=_seconds(request, "rotation_period"),
            rotator=request.rotator,
            grace_period_s=_seconds(request, "grace_period"),
        )
        return pb.PutSecretResponse(secret=secret_proto(info))

    async def GetSecret(self, request: pb.GetSecretRequest, context) -> pb.GetSecretResponse:
        version, value = await self._secrets.get(request.name, request.version)
        return pb.GetSecretResponse(name=request.name, version=version, value=value)

    async def ListSecrets(self, request: pb.ListSecretsRequest, context) -> pb.ListSecretsResponse:
        size = paging.page_size(request.page_size)
        filters = bool(request.show_deleted)
        after = paging.decode(request.page_token, filters=filters) or ""
        if not isinstance(after, str):
            raise paging.invalid_token()
        infos = await self._secrets.list(after=after, limit=size + 1, show_deleted=request.show_deleted)
        page = paging.keyset(infos, size, lambda i: i.name, filters=filters)
        return pb.ListSecretsResponse(
            secrets=[secret_proto(i) for i in page.items], next_page_token=page.next_page_token
        )

    async def DescribeSecret(self, request: pb.DescribeSecretRequest, context) -> pb.DescribeSecretResponse:
        return pb.DescribeSecretResponse(secret=secret_proto(await self._secrets.describe(request.name)))

    async def RotateSecret(self, request: pb.RotateSecretRequest, context) -> pb.RotateSecretResponse:
        return pb.RotateSecretResponse(secret=secret_proto(await self._secrets.rotate(request.name)))

    async def DeleteSecret(self, request: pb.DeleteSecretRequest, context) -> pb.DeleteSecretResponse:
        return pb.DeleteSecretResponse(secret=secret_proto(await self._secrets.delete(request.name)))

    async def DestroySecret(self, request: pb.DestroySecretRequest, context) -> pb.DestroySecretResponse:
        return pb.DestroySecretResponse(destroyed_versions=await self._secrets.destroy(request.name))

    async def ListAccessEvents(self, request: pb.ListAccessEventsRequest, context) -> pb.ListAccessEventsResponse:
        size = paging.page_size(request.page_size, default=100, maximum=1000)
        after = paging.decode(request.page_token, filters=request.secret_name) or 0
        if type(after) is not int:
            raise paging.invalid_token()
        rows = await self._audit.page(after_seq=after, limit=size + 1, secret_name=request.secret_name)
        page = paging.keyset(rows, size, lambda r: r.seq, filters=request.secret_name)
        return pb.ListAccessEventsResponse(
            events=[event_proto(r) for r in page.items],
            next_page_token=page.next_page_token,
            anchor=(await self._audit.anchor()).as_pb(),
        )

    async def VerifyAccessEvents(self, request: pb.VerifyAccessEventsRequest, context) -> pb.VerifyAccessEventsResponse:
        report, anchor = await self._audit.verify_anchored()
        return pb.VerifyAccessEventsResponse(
            intact=report.intact,
            events_checked=report.checked,
            first_bad_sequence=report.first_bad_sequence,
            problem=report.problem,
            anchor=anchor.as_pb(),
        )

    async def Encrypt(self, request: pb.EncryptRequest, context) -> pb.EncryptResponse:
        ciphertext, version = await self._keys.encrypt(request.plaintext)
        return pb.EncryptResponse(ciphertext=ciphertext, key_version=version)

    async def Decrypt(self, request: pb.DecryptRequest, context) -> pb.DecryptResponse:
        return pb.DecryptResponse(plaintext=await self._keys.decrypt(request.ciphertext))

    async def GenerateDataKey(self, request: pb.GenerateDataKeyRequest, context) -> pb.GenerateDataKeyResponse:
        key = await self._keys.generate_data_key(request.bits)
        return pb.GenerateDataKeyResponse(
            plaintext_key=key.plaintext, wrapped_key=key.wrapped, key_version=key.key_version
        )

    async def RotateKey(self, request: pb.RotateKeyRequest, context) -> pb.RotateKeyResponse:
        return pb.RotateKeyResponse(key_version=await self._keys.rotate_key())

    async def Rewrap(self, request: pb.RewrapRequest, context) -> pb.RewrapResponse:
        ciphertext, version = await self._keys.rewrap(request.ciphertext)
        return pb.RewrapResponse(ciphertext=ciphertext, key_version=version)
