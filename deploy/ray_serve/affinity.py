"""Which requests belong together, so that they go to the same engine replica.

A replica that served a conversation's earlier turns or a shared long prefix is the best place for
the next request of the same kind (warm caches on the replica, one tenant's load kept together),
so the key is, in order: the OpenAI `user` field; the x-session-id header (Ray Serve's own
session header); a hash of the prompt's first `prefix_chars` characters (chat messages as JSON),
when the prompt is at least that long. No key: the router picks the least loaded replica."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from deploy.ray_serve.forwarded import ForwardedRequest

SESSION_HEADER = b"x-session-id"


def affinity_key(request: ForwardedRequest, prefix_chars: int) -> str | None:
    session = request.header(SESSION_HEADER)
    body = _json_body(request)
    user = body.get("user")
    if isinstance(user, str) and user:
        return f"user:{user}"
    if session:
        return f"session:{session}"
    prompt = body.get("prompt", body.get("messages"))
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True) if prompt else ""
    if prefix_chars > 0 and len(text) >= prefix_chars:
        return "prefix:" + hashlib.sha256(text[:prefix_chars].encode()).hexdigest()[:32]
    return None


def _json_body(request: ForwardedRequest) -> dict[str, Any]:
    """The body as a JSON object, or {} (kvserve itself answers a malformed body with a 400)."""
    if request.method != "POST" or not request.body:
        return {}
    try:
        body = json.loads(request.body)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
