"""Budget: what the session has cost in dollars, and the limit on new responses. Pure.

Rules:
- The model's prices are looked up once, when the core is built: a model missing from
  ``engine/pricing.json`` is a :class:`ConfigError` naming the priced models, never a
  failure in the middle of an answer.
- A response's cost is computed before anything is changed; an unknown usage shape costs 0
  and is reported, never raised.
- At 80 % of ``budget_usd`` one warning is published; at 100 % no new response is requested.
- What was spent and whether the warning went out are part of the state a restarted realtime
  process starts from (:meth:`Budget.state`, :meth:`Budget.restore`): a restart neither resets
  the cost to $0 nor warns again.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from engine.cost import check_priced, is_live_model, model_prices, response_cost_usd, transcription_cost_usd
from engine.errors import ConfigError
from engine.realtime.records import Publish

__all__ = ["Budget", "check_priced"]


class Budget:
    def __init__(self, model: str, budget_usd: float | None) -> None:
        check_priced(model)
        if is_live_model(model):
            raise ConfigError(f"model {model!r} is a GPT-Live model: it speaks the Live protocol "
                              "(engine.realtime.live_core), not Realtime")
        self.model = model
        self.budget_usd = budget_usd
        self.responses_usd = 0.0
        self.transcription_usd = 0.0
        self.warned = False

    def set_model(self, model: str) -> bool:
        """The server names the session's model; False (and unchanged) when it has no price."""
        try:
            model_prices(model)
        except KeyError:
            return False
        self.model = model
        return True

    def response_usd(self, usage: dict[str, Any] | None) -> float:
        return response_cost_usd(self.model, usage)

    def add_response(self, usd: float) -> None:
        self.responses_usd += usd

    def add_transcription(self, model: str, usage: dict[str, Any] | None) -> float:
        usd = transcription_cost_usd(model, usage)
        self.transcription_usd += usd
        return usd

    def total_usd(self) -> float:
        return self.responses_usd + self.transcription_usd

    def session_message(self) -> Publish:
        return Publish("cost.session", {"usd": self.total_usd(), "responses_usd": self.responses_usd,
                                        "transcription_usd": self.transcription_usd})

    def state(self) -> dict[str, Any]:
        """What a successor needs (``conversation.history`` ``cost``)."""
        return {"responses_usd": self.responses_usd, "transcription_usd": self.transcription_usd,
                "budget_warned": self.warned}

    def restore(self, state: Any) -> bool:
        """Take a predecessor's :meth:`state`; each figure only when it is a finite number >= 0 (an odd
        one is left at what it is). True when dollars were restored (a ``cost.session`` is due)."""
        if not isinstance(state, Mapping):
            return False

        def usd(key: str) -> float | None:
            v = state.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
                return float(v)
            return None
        responses, transcription = usd("responses_usd"), usd("transcription_usd")
        if responses is not None:
            self.responses_usd = responses
        if transcription is not None:
            self.transcription_usd = transcription
        if isinstance(state.get("budget_warned"), bool):
            self.warned = state["budget_warned"]
        return bool(responses or transcription)

    def exceeded(self) -> bool:
        return self.budget_usd is not None and self.total_usd() >= self.budget_usd

    def check(self) -> list[Publish]:
        if self.budget_usd is None:
            return []
        spent = self.total_usd()
        if spent >= self.budget_usd:
            return [Publish("engine.budget", {"usd": spent, "budget_usd": self.budget_usd, "exceeded": True,
                                              "message": f"budget of ${self.budget_usd:.4f} reached; no new responses"})]
        if spent >= 0.8 * self.budget_usd and not self.warned:
            self.warned = True
            return [Publish("engine.budget", {"usd": spent, "budget_usd": self.budget_usd, "exceeded": False,
                                              "message": f"80% of the ${self.budget_usd:.4f} budget is spent"})]
        return []
