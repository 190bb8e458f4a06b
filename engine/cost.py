"""Dollar cost of realtime usage, from engine/pricing.json (one entry per model, with
source and date). Pure functions."""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from engine.errors import ConfigError

PRICING_FILE = Path(__file__).with_name("pricing.json")


@lru_cache(maxsize=1)
def pricing() -> dict[str, Any]:
    return json.loads(PRICING_FILE.read_text())


def model_prices(model: str) -> dict[str, Any]:
    """Prices of ``model``; dated snapshots (``-2025-08-28``) fall back to their family."""
    table = pricing()["realtime"]
    if model in table:
        return table[model]
    base = re.sub(r"-\d{4}-\d{2}-\d{2}$", "", model)
    if base in table:
        return table[base]
    raise KeyError(f"no price for model {model!r}; add it to {PRICING_FILE}")


LIVE_MODEL_PREFIX = "gpt-live-"


def is_live_model(model: str) -> bool:
    """GPT-Live models (``/v1/live/sessions``) speak another protocol than the Realtime ones."""
    return model.startswith(LIVE_MODEL_PREFIX)


def check_priced(model: str) -> None:
    """Raise :class:`ConfigError` unless ``model`` has prices (a Realtime or a GPT-Live model)."""
    try:
        live_prices(model) if is_live_model(model) else model_prices(model)
    except KeyError:
        table = pricing()
        raise ConfigError(f"model {model!r} has no price in engine/pricing.json, so its cost cannot be counted; "
                          f"priced Realtime models: {', '.join(sorted(table['realtime']))}; GPT-Live models: "
                          f"{', '.join(sorted(table['live']))}. Set 'model' to one of them or add its prices.") from None


def live_prices(model: str) -> dict[str, Any]:
    """Per-minute prices of a GPT-Live ``model`` (``per_minute``, ``standby_per_minute``); KeyError if none."""
    table = pricing()["live"]
    if model in table:
        return table[model]
    raise KeyError(f"no price for GPT-Live model {model!r}; add it to {PRICING_FILE}")


def live_cost_usd(model: str, usage: dict[str, Any] | None) -> float:
    """USD of a GPT-Live session's cumulative ``usage``: active seconds at the active rate, paused
    seconds at the standby rate (``seconds`` is all active when the split is absent)."""
    if not usage:
        return 0.0
    p = live_prices(model)
    seconds = float(usage.get("seconds") or 0)
    paused = float(usage.get("paused_seconds") or 0)
    active = float(usage.get("active_seconds", seconds - paused) or 0)
    standby = p.get("standby_per_minute")
    return (active * p["per_minute"] + paused * (standby if standby is not None else p["per_minute"])) / 60.0


def response_cost_usd(model: str, usage: dict[str, Any] | None) -> float:
    """USD of one ``response.done`` usage: uncached and cached input per modality, plus output."""
    if not usage:
        return 0.0
    p = model_prices(model)
    if "per_minute" in p:   # billed by the minute (xAI): the dialect puts the connection time on each response.done
        return float(usage.get("billed_seconds") or 0) / 60.0 * float(p["per_minute"])
    ind = usage.get("input_token_details") or {}
    cached = ind.get("cached_tokens_details") or {}
    outd = usage.get("output_token_details") or {}
    usd = 0.0
    for modality in ("text", "audio", "image"):
        rates = p.get(modality) or {}
        total_in = ind.get(f"{modality}_tokens", 0) or 0
        cached_in = min(cached.get(f"{modality}_tokens", 0) or 0, total_in)
        usd += (total_in - cached_in) * rates.get("in", 0.0) + cached_in * rates.get("cached", 0.0)
        usd += (outd.get(f"{modality}_tokens", 0) or 0) * rates.get("out", 0.0)
    return usd / 1_000_000


def transcription_cost_usd(model: str, usage: dict[str, Any] | None) -> float:
    """USD of one input transcription (``...input_audio_transcription.completed.usage``)."""
    if not usage:
        return 0.0
    p = pricing()["transcription"].get(model)
    if p is None:
        return 0.0
    if usage.get("type") == "duration":
        return float(usage.get("seconds", 0)) / 60.0 * p.get("per_minute", 0.0)
    details = usage.get("input_token_details") or {}
    audio_in = details.get("audio_tokens", usage.get("input_tokens", 0)) or 0
    text_in = details.get("text_tokens", 0) or 0
    out = usage.get("output_tokens", 0) or 0
    return (audio_in * p.get("audio_in", 0.0) + text_in * p.get("text_in", 0.0) + out * p.get("out", 0.0)) / 1_000_000
