"""Every page of a List or Query RPC, following its next_page_token (the tokens are opaque: only passed back)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar


class Page(Protocol):
    """A reply of a paging RPC."""

    @property
    def next_page_token(self) -> str:
        """Empty on the last page."""
        ...


P = TypeVar("P", bound=Page)


async def pages(fetch: Callable[[str], Awaitable[P]]) -> AsyncIterator[P]:
    """Each page in turn: fetch(page_token) makes one call ("" for the first page); stops after the last.

    async for page in pages(lambda token: bh.credentials.ListSecrets(ListSecretsRequest(page_token=token))):
        names += [s.name for s in page.secrets]
    """
    token = ""
    while True:
        page = await fetch(token)
        yield page
        token = page.next_page_token
        if not token:
            return
