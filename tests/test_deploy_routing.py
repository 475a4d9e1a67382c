"""deploy/ray_serve's routing decisions without a Ray cluster: the affinity key of a request, the
replica ranking of the router, and that the `serve run` config builds the application."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import yaml
from ray.serve import Application

from deploy.ray_serve.affinity import affinity_key
from deploy.ray_serve.app import AppArgs, build_app
from deploy.ray_serve.forwarded import ForwardedRequest
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


def test_no_key_means_every_replica_in_one_rank() -> None:
    three = replicas("a", "b", "c")
    assert rank_replicas(None, three) == [three]
    assert rank_replicas("", three) == [three]


def test_serve_run_config_builds_the_application() -> None:
    config = yaml.safe_load((ROOT / "deploy/ray_serve/serve_config.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "deploy.ray_serve.app:build_app"
    # what makes Ray Serve hand build_app an AppArgs rather than the raw dict
    assert inspect.signature(build_app).parameters["args"].annotation is AppArgs
    assert isinstance(build_app(AppArgs.model_validate(app["args"])), Application)
