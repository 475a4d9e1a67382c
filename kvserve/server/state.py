"""What every request handler shares: the engine and the server's bookkeeping around it."""

from __future__ import annotations

from dataclasses import dataclass

from kvserve.engine.async_engine import AsyncEngine
from kvserve.policies.base import PolicyParams
from kvserve.server.admission import Admission
from kvserve.server.errors import APIError
from kvserve.server.metrics import ServerMetrics


@dataclass
class ServerState:
    engine: AsyncEngine
    admission: Admission
    metrics: ServerMetrics
    model_name: str  # what clients put in `model`
    model_root: str  # where the weights came from
    default_policy: PolicyParams
    log_prompts: bool = False

    def check_model(self, model: str | None) -> None:
        """A 404 unless `model` is absent or the served model's name."""
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")

    def abort_all(self) -> None:
        """End every request in the engine now; each still gets its response (finish_reason "abort")."""
        self.engine.abort_all()
