"""The typed Python client: one object holding the channels, token and tenant of a Bulkhead caller.

async with await Client.connect(api_key="bk_...") as bh:
    await bh.identity.GetTenant(identity_pb2.GetTenantRequest())
"""

from bulkhead.client._client import Client, ClientError, describe_error
from bulkhead.client._credentials import RefreshingToken
from bulkhead.client._pages import pages

__all__ = ["Client", "ClientError", "RefreshingToken", "describe_error", "pages"]
