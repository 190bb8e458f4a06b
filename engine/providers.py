"""Where the voice API is, and how to sign in: one place for every provider. Pure (the
environment is passed in).

- ``openai``: ``openai_url`` (``wss://api.openai.com/v1/realtime``), or ``$OPENAI_BASE_URL`` +
  ``/realtime`` when ``openai_url`` is left at its default; ``Authorization: Bearer $OPENAI_API_KEY``
  (or ``auth_header``); the GA dialect.
- ``azure``: ``wss://RESOURCE.openai.azure.com/openai/v1/realtime?model=DEPLOYMENT``, Live at
  ``…/openai/v1/live/sessions``; ``api-key: $AZURE_OPENAI_API_KEY`` or, with ``azure.auth: entra``,
  ``Authorization: Bearer $AZURE_OPENAI_AD_TOKEN``; GA events, the deployment named for the model.
- ``xai``: ``wss://api.x.ai/v1/realtime?model=MODEL``; ``Authorization: Bearer $XAI_API_KEY``; xAI's
  dialect (:mod:`engine.realtime.dialects`).
- ``local``: the engine's own local server; no key.

Any other Realtime-compatible server is ``provider: openai`` with its ``openai_url`` (or
``$OPENAI_BASE_URL``) and, when it wants the key elsewhere, ``auth_header`` (``"X-API-Key: {key}"``).
Rules: the key is read from the environment variable the config names, never from the file; a
missing key or setting is a :class:`ConfigError` (an :class:`EngineError`) naming the provider,
the variable or key, and the fix. REST calls (SIP accept and the rest) go to ``rest_base``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import quote, urlsplit

from engine.cost import is_live_model
from engine.errors import ConfigError

PROVIDERS = ("openai", "azure", "xai", "local")
OPENAI_DEFAULT_URL = "wss://api.openai.com/v1/realtime"
BASE_URL_ENV = "OPENAI_BASE_URL"


@dataclass(frozen=True)
class Target:
    """A remote API: where its socket is, the headers (they hold the key: never log them) and REST base."""
    provider: str
    url: str                                   #: the socket for the model (Realtime ?model=, or Live's path)
    headers: list[str] = field(default_factory=list)   #: "Name: value"
    rest_base: str = ""                        #: https://…/v1 for REST (SIP accept, refer, hangup)
    key_env: str = ""                          #: the variable the key came from (for error messages)
    dialect: str = "openai"
    deployment: str | None = None              #: Azure: the name the model is deployed under

    def header_map(self) -> dict[str, str]:
        return {k.strip(): v.strip() for k, _, v in (h.partition(":") for h in self.headers)}


def provider_of(cfg: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    """``provider`` from config; when it is null, the older ``backend`` decides (auto: openai when the
    key's variable is set, else local)."""
    p = cfg.get("provider")
    if p:
        return str(p)
    backend = cfg.get("backend", "auto")
    if backend == "auto":
        return "openai" if environ.get(cfg.get("api_key_env", "OPENAI_API_KEY")) else "local"
    return "local" if backend == "local" else "openai"


def _ws(url: str) -> str:
    return "wss://" + url[8:] if url.startswith("https://") else "ws://" + url[7:] if url.startswith("http://") else url


def _http(url: str) -> str:
    return "https://" + url[6:] if url.startswith("wss://") else "http://" + url[5:] if url.startswith("ws://") else url


def _socket_url(realtime_url: str, model: str, query_model: str | None = None) -> str:
    base = realtime_url.split("?", 1)[0].rstrip("/")
    if is_live_model(model):
        if base.endswith("/realtime"):
            base = base[: -len("/realtime")]
        return f"{base}/live/sessions"
    return f"{base}?model={quote(query_model or model)}"


def _key(environ: Mapping[str, str], var: str, provider: str, fix: str) -> str:
    key = environ.get(var, "")
    if not key:
        raise ConfigError(f"provider {provider} needs a key in ${var}: {fix}")
    return key


def api_target(cfg: Mapping[str, Any], environ: Mapping[str, str], model: str | None = None) -> Target:
    """Where the remote API for ``model`` (default: config ``model``) is and how to sign in."""
    model = model or cfg["model"]
    provider = provider_of(cfg, environ)
    if provider == "local":
        raise ConfigError("provider local: the engine starts its own local server; api_target is for remote ones")
    if provider == "openai":
        var = cfg.get("api_key_env", "OPENAI_API_KEY")
        key = _key(environ, var, "openai", f"export {var}=sk-… (or set provider: local for the offline server)")
        url = cfg.get("openai_url") or OPENAI_DEFAULT_URL
        base_env = environ.get(BASE_URL_ENV, "").rstrip("/")
        if url == OPENAI_DEFAULT_URL and base_env:
            url = _ws(base_env) + "/realtime"
        template = cfg.get("auth_header") or "Authorization: Bearer {key}"
        rest = base_env or _http(url.split("?", 1)[0].rstrip("/")).removesuffix("/realtime")
        return Target("openai", _socket_url(url, model), [template.replace("{key}", key)], rest, var)
    if provider == "azure":
        az = cfg.get("azure") or {}
        endpoint = (az.get("endpoint") or "").rstrip("/")
        if not endpoint:
            raise ConfigError("provider azure needs azure.endpoint: the resource's endpoint, "
                              "https://RESOURCE.openai.azure.com (Azure portal, Keys and Endpoint)")
        parts = urlsplit(endpoint if "://" in endpoint else "https://" + endpoint)
        host = parts.netloc
        secure = parts.scheme != "http"          # http:// only for a local stand-in (engine serve --dialect azure)
        deployment = az.get("deployment") or model
        if az.get("auth", "api-key") == "entra":
            var = az.get("token_env") or "AZURE_OPENAI_AD_TOKEN"
            token = _key(environ, var, "azure", "a Microsoft Entra access token for scope "
                         "https://cognitiveservices.azure.com/.default (az account get-access-token "
                         "--resource https://cognitiveservices.azure.com)")
            header = f"Authorization: Bearer {token}"
        else:
            var = az.get("api_key_env") or "AZURE_OPENAI_API_KEY"
            header = "api-key: " + _key(environ, var, "azure", "the resource's key (Azure portal, Keys and "
                                        "Endpoint), or set azure.auth: entra")
        url = _socket_url(f"{'wss' if secure else 'ws'}://{host}/openai/v1/realtime", model, deployment)
        return Target("azure", url, [header], f"{'https' if secure else 'http'}://{host}/openai/v1", var, "azure",
                      deployment)
    if provider == "xai":
        if is_live_model(model):
            raise ConfigError(f"provider xai has no GPT-Live: model {model!r} is OpenAI's; use a Grok voice model "
                              "(grok-voice-think-fast-1.0) or provider openai")
        x = cfg.get("xai") or {}
        var = x.get("api_key_env") or "XAI_API_KEY"
        key = _key(environ, var, "xai", "an xAI API key from console.x.ai")
        url = x.get("url") or "wss://api.x.ai/v1/realtime"
        return Target("xai", _socket_url(url, model), [f"Authorization: Bearer {key}"],
                      _http(url.split("?", 1)[0]).removesuffix("/realtime"), var, "xai")
    raise ConfigError(f"provider {provider!r}: use one of {', '.join(PROVIDERS)}")


def refused(target: Target, status: int) -> str:
    """What to say when the provider refuses the key at the handshake (HTTP 401/403)."""
    fixes = {"openai": f"check ${target.key_env} (platform.openai.com, API keys), or use provider: local",
             "azure": f"check ${target.key_env}: an api-key of this resource, or a fresh Entra token "
                      "(they last about an hour); and that the deployment exists",
             "xai": f"check ${target.key_env} (console.x.ai) and that the team has Voice Agent access"}
    return (f"provider {target.provider} refused the key (HTTP {status}): "
            + fixes.get(target.provider, f"check ${target.key_env}"))
