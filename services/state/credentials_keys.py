"""DataKeyProvider backed by the credentials service: data keys wrapped by the tenant's own Transit key.

Calls go out on a forwarding channel, so they carry the caller's own token: the credentials
service wraps and unwraps with the key of the tenant in that token and no other, and deleting
the tenant's key there makes everything state stored for it unreadable (crypto-shredding).
The caller's token therefore needs the scopes credentials.keys.encrypt and .decrypt.
"""

from __future__ import annotations

import grpc

from bulkhead.credentials.v1 import credentials_pb2, credentials_pb2_grpc
from services.state.datakeys import DataKey, DataKeyRejected, DataKeyUnavailable
from shared.errors import PermissionDenied

_TIMEOUT = 5.0


class CredentialsDataKeyProvider:
    """Generates and unwraps data keys through credentials.GenerateDataKey / Decrypt."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float = _TIMEOUT):
        self._stub = credentials_pb2_grpc.CredentialsServiceStub(channel)
        self._timeout = timeout

    async def generate_data_key(self) -> DataKey:
        try:
            reply = await self._stub.GenerateDataKey(
                credentials_pb2.GenerateDataKeyRequest(bits=256), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from None
        return DataKey(reply.plaintext_key, reply.wrapped_key)

    async def unwrap_data_key(self, wrapped: bytes) -> bytes:
        try:
            reply = await self._stub.Decrypt(credentials_pb2.DecryptRequest(ciphertext=wrapped), timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from None
        return reply.plaintext


def _translate(exc: grpc.aio.AioRpcError) -> Exception:
    code = exc.code()
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return PermissionDenied(
            "the caller's token may not use the tenant's data key "
            "(needs credentials.keys.encrypt and credentials.keys.decrypt)",
            reason="DATA_KEY_DENIED",
        )
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
        return DataKeyRejected(f"the credentials service refused the wrapped key ({code.name})")
    return DataKeyUnavailable(f"the credentials service failed ({code.name})")
