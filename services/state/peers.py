"""State's peer: a DataKeyProvider on the credentials service, data keys wrapped by the tenant's own Transit key.

Calls go out on a forwarding channel, so they carry the caller's own token: the credentials
service wraps and unwraps with the key of the tenant in that token and no other, and deleting
the tenant's key there makes everything state stored for it unreadable (crypto-shredding).
The caller's token therefore needs the scopes credentials.keys.encrypt and .decrypt.
"""

from __future__ import annotations

import grpc

from bulkhead.credentials.v1 import credentials_pb2, credentials_pb2_grpc
from services.state.datakeys import DataKey, DataKeyRejected, DataKeyUnavailable
from shared import errors
from shared.errors import peer_call

_TIMEOUT = 5.0


class CredentialsDataKeyProvider:
    """Generates and unwraps data keys through credentials.GenerateDataKey / Decrypt."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float = _TIMEOUT):
        self._stub = credentials_pb2_grpc.CredentialsServiceStub(channel)
        self._timeout = timeout

    async def generate_data_key(self) -> DataKey:
        reply = await self._call(self._stub.GenerateDataKey, credentials_pb2.GenerateDataKeyRequest(bits=256))
        return DataKey(reply.plaintext_key, reply.wrapped_key)

    async def unwrap_data_key(self, wrapped: bytes) -> bytes:
        reply = await self._call(self._stub.Decrypt, credentials_pb2.DecryptRequest(ciphertext=wrapped))
        return reply.plaintext

    async def _call(self, method, request):
        try:
            with peer_call():
                return await method(request, timeout=self._timeout)
        except (errors.PermissionDenied, errors.Unauthenticated):
            raise errors.PermissionDenied(
                "the caller's token may not use the tenant's data key "
                "(needs credentials.keys.encrypt and credentials.keys.decrypt)",
                reason="DATA_KEY_DENIED",
            ) from None
        except (errors.InvalidArgument, errors.NotFound, errors.FailedPrecondition) as exc:
            raise DataKeyRejected(f"the credentials service refused the wrapped key ({exc.code.name})") from None
        except errors.BulkheadError as exc:
            raise DataKeyUnavailable(f"the credentials service failed ({exc.code.name})") from None
