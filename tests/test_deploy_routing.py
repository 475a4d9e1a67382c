"""deploy/ray_serve's routing decisions without a Ray cluster: the affinity key of a request, the
replica ranking of the router, the relay's hand-over to a (fake) replica handle, and that the
`serve run` config builds the application."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from ray.serve import Application

from deploy.ray_serve.affinity import affinity_key
from deploy.ray_serve.app import AppArgs, build_app
from deploy.ray_serve.forwarded import ForwardedRequest
from deploy.ray_serve.relay import RequestRelay
from deploy.ray_serve.router import rank_replicas

ROOT = Path(__file__).resolve().parent.parent


def request(body: object, headers: tuple[tuple[bytes, bytes], ...] = (), method: str = "POST") -> ForwardedRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return ForwardedRequest(method=method, path="/v1/completions", query_string=b"", headers=headers, body=raw,
                            client=None)


def test_affinity_key_prefers_user_then_session_then_long_prefix() -> None:
    session = ((b"X-Session-Id", b"s1"),)
    assert affinity_key(request({"prompt": "hi", "user": "ann"}, session), 8) == "user:ann"
    assert affinity_key(request({"prompt": "hi"}, session), 8) == "session:s1"
    assert affinity_key(request({"prompt": "hi"}), 8) is None  # shorter than the prefix: least loaded
    shared = "You are a helpful assistant. " * 4
    a = affinity_key(request({"prompt": shared + "What is 2+2?"}), 64)
    b = affinity_key(request({"prompt": shared + "Name a color."}), 64)
    assert a is not None and a == b
    chat = [{"role": "system", "content": shared}, {"role": "user", "content": "Hi"}]
    assert affinity_key(request({"messages": chat}), 64) == affinity_key(
        request({"messages": [*chat[:1], {"role": "user", "content": "Bye"}]}), 64)
    assert affinity_key(request({"prompt": shared}), 0) is None  # prefix affinity off


def test_affinity_key_ignores_what_kvserve_will_reject() -> None:
    assert affinity_key(request(b"{not json"), 8) is None
    assert affinity_key(request([1, 2, 3]), 8) is None
    assert affinity_key(request({"user": 7, "prompt": "x"}), 8) is None
    assert affinity_key(request(b"", method="GET"), 8) is None


def replicas(*names: str) -> list[SimpleNamespace]:
    return [SimpleNamespace(replica_id=SimpleNamespace(unique_id=n)) for n in names]


def test_a_key_has_one_owner_that_survives_other_replicas_leaving() -> None:
    four = replicas("r0", "r1", "r2", "r3")
    owners = {f"user:{i}": rank_replicas(f"user:{i}", four)[0][0] for i in range(200)}
    assert {o.replica_id.unique_id for o in owners.values()} == {"r0", "r1", "r2", "r3"}  # spread
    for key, owner in owners.items():
        ranks = rank_replicas(key, list(reversed(four)))
        assert ranks[0] == [owner] and sorted(r.replica_id.unique_id for r in ranks[1]) == sorted(
            r.replica_id.unique_id for r in four if r is not owner)  # then fall back to the rest
        if owner.replica_id.unique_id != "r3":  # r3 goes away: only r3's keys move
            assert rank_replicas(key, four[:3])[0] == [owner]


def test_no_key_means_every_replica_in_one_shuffled_rank() -> None:
    three = replicas("a", "b", "c")
    for key in (None, ""):
        (rank,) = rank_replicas(key, three)
        assert sorted(r.replica_id.unique_id for r in rank) == ["a", "b", "c"]
    # shuffled, so that idle replicas (equal queues) share key-less traffic
    assert len({rank_replicas(None, three)[0][0].replica_id.unique_id for _ in range(100)}) == 3


def test_serve_run_config_builds_the_application() -> None:
    config = yaml.safe_load((ROOT / "deploy/ray_serve/serve_config.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "deploy.ray_serve.app:build_app"
    # what makes Ray Serve hand build_app an AppArgs rather than the raw dict
    assert inspect.signature(build_app).parameters["args"].annotation is AppArgs
    assert isinstance(build_app(AppArgs.model_validate(app["args"])), Application)


class FakeReplicas:
    """A DeploymentHandle's surface as the relay uses it; answers by echoing, or fails."""

    def __init__(self, fail_after: int | None) -> None:
        self.fail_after = fail_after
        self.options_seen: list[dict[str, Any]] = []

    def options(self, **options: Any) -> FakeReplicas:
        self.options_seen.append(options)
        return self

    def remote(self, request: ForwardedRequest) -> AsyncIterator[dict[str, Any]]:
        async def messages() -> AsyncIterator[dict[str, Any]]:
            replies = [{"type": "http.response.start", "status": 200, "headers": [(b"x-path", request.path.encode())]},
                       {"type": "http.response.body", "body": request.body, "more_body": True},
                       {"type": "http.response.body", "body": b"", "more_body": False}]
            for i, reply in enumerate(replies):
                if i == self.fail_after:
                    raise RuntimeError("the replica died")
                yield reply
        return messages()


def relay(replicas: FakeReplicas, body: bytes) -> list[dict[str, Any]]:
    """Run the relay on one POST whose body arrives in two parts; return what it sent."""
    parts = [body[: len(body) // 2], body[len(body) // 2:]]
    received = iter([{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(received)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"", "headers": [],
             "client": ("10.0.0.1", 5000)}
    asyncio.run(RequestRelay(replicas, 64)(scope, receive, send))  # type: ignore[arg-type]
    return sent


def test_relay_forwards_the_whole_body_with_the_key_and_replays_the_reply() -> None:
    replicas = FakeReplicas(fail_after=None)
    body = json.dumps({"prompt": "hello", "user": "ann"}).encode()
    sent = relay(replicas, body)
    assert replicas.options_seen == [{"method_name": "forward", "stream": True}, {"session_id": "user:ann"}]
    assert sent[0]["headers"] == [(b"x-path", b"/v1/completions")]
    assert b"".join(m.get("body", b"") for m in sent) == body


def test_relay_answers_503_when_no_replica_answers_and_cuts_a_started_stream() -> None:
    sent = relay(FakeReplicas(fail_after=0), b"{}")
    assert sent[0]["status"] == 503
    assert json.loads(sent[1]["body"])["error"]["code"] == "replica_unavailable"
    with pytest.raises(RuntimeError, match="the replica died"):
        relay(FakeReplicas(fail_after=2), b"{}")
