"""An HTTP request in picklable form, as the ingress received it, to be replayed on a replica.

Ray moves it between processes, so it holds bytes and tuples only, and it rebuilds the ASGI scope
on the other side; the ASGI `receive`/`send` callables cannot cross a process boundary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ForwardedRequest:
    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    client: tuple[str, int] | None

    @classmethod
    def from_scope(cls, scope: dict[str, Any], body: bytes) -> ForwardedRequest:
        client = scope.get("client")
        return cls(method=scope["method"], path=scope["path"], query_string=scope.get("query_string", b""),
                   headers=tuple((bytes(k), bytes(v)) for k, v in scope["headers"]), body=body,
                   client=tuple(client) if client else None)

    def header(self, name: bytes) -> str | None:
        """The first value of header `name` (lower case), decoded."""
        for key, value in self.headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return None

    def scope(self) -> dict[str, Any]:
        """An ASGI HTTP scope for this request. No spec_version: ASGI 2.0 semantics, under which a
        streaming response listens for http.disconnect, which is how a cancelled forward reaches
        kvserve's handler (and aborts the sequence)."""
        return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": self.method,
                "scheme": "http", "path": self.path, "raw_path": self.path.encode(), "root_path": "",
                "query_string": self.query_string, "headers": list(self.headers), "client": self.client,
                "server": None, "state": {}}
