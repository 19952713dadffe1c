"""Settings: one frozen object built from defaults <- YAML file <- environment <- flags.

Every setting is declared once in `SETTINGS` with its YAML key, its environment name (the names
of the systems lb replaces, so their users need not relearn) and a parser that turns text or a
YAML value into the typed value, or says precisely what is wrong with it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs
import yaml

from lb.policy.counters import Limits, parse_limits
from lb.routing import resume
from lb.routing.hedge import HedgeAfter, parse_hedge_after
from lb.routing.split import parse_weights
from lb.routing.strategies import STRATEGIES, Strategy, parse_strategy

if TYPE_CHECKING:
    from lb.catalogue import Catalogue


class ConfigError(ValueError):
    """A bad setting; the message names the setting and the value."""


@attrs.frozen
class NodeConfig:
    url: str  # scheme://host:port[/prefix], normalised, without a trailing slash
    maxconn: int | None = None  # None: DEFAULT_MAXCONN / MAXCONN_MAP decide
    weight: float = 1.0
    labels: Mapping[str, str] = attrs.field(factory=dict)
    # How lb speaks to it: "openai" (bytes through untouched), "anthropic" or "ollama".
    dialect: str = "openai"
    api_key: str = attrs.field(default="", repr=False)  # lb's credential for the node
    # Send the client's own Authorization header on (off: a client's key is lb's business).
    forward_auth: bool = False
    # A fixed model list (cloud providers, catalogue deployments): never probed, healthy until
    # its breaker says otherwise. Empty: the scanner asks the node.
    models: tuple[str, ...] = ()
    # The node's own name for a model clients know by another (a catalogue handle).
    model_map: Mapping[str, str] = attrs.field(factory=dict)
    name: str = ""  # overrides host:port as the key (two deployments on one host)
    # Request fields the deployment sets when the client did not (a catalogue's litellm_params).
    params: Mapping[str, Any] = attrs.field(factory=dict)
    max_input_tokens: int | None = None  # the largest prompt it takes (None: unknown)
    # Its own bounds (a catalogue's `timeout`, `stream_timeout`): a whole attempt on it, and the
    # longest gap between two stream chunks (None: the router-wide settings).
    timeout: float | None = None
    stream_timeout: float | None = None
    # The deployment's own limits: requests and tokens per minute (lb.routing.node_rate).
    rpm: int | None = None
    tpm: int | None = None
    # host:port (or `name`), the name a node goes by in headers, MAXCONN_MAP and `?node=`;
    # computed once because the request path reads it several times.
    key: str = attrs.field(init=False, eq=False, repr=False)

    @key.default
    def _key(self) -> str:
        if self.name:
            return self.name
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port}"


# --- parsers: (value from YAML, env or flag) -> typed value, or ValueError with a reason ---


def _text(value: Any) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError("expected text")
    return str(value).strip()


def _label(value: Any) -> str:
    text = _text(value)
    if not text:
        raise ValueError("expected a label name")
    return text


def _int(minimum: int = 0) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError("expected a whole number")
        try:
            number = int(value) if not isinstance(value, str) else int(value.strip(), 10)
        except (TypeError, ValueError):
            raise ValueError("expected a whole number") from None
        if number < minimum:
            raise ValueError(f"must be at least {minimum}")
        return number

    return parse


def _seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number of seconds")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("expected a number of seconds") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError("must be a finite number of seconds >= 0")
    return number


def _ratio(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("expected a number") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError("must be a finite number >= 0")
    return number


def _positive_seconds(value: Any) -> float:
    number = _seconds(value)
    if number <= 0:
        raise ValueError("must be more than 0 seconds")
    return number


def _optional(parse: Callable[[Any], float], value: Any) -> float | None:
    return None if value is None else parse(value)


def _redis_url(value: Any) -> str:
    text = _text(value)
    if text and urlsplit(text).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    return text


def _rate_limits(value: Any) -> Mapping[str, Limits]:
    """`{"*": {rpm: 600}, "llama-3.1-8b": {rpm: 60, tpm: 100000}}` (YAML, or that as JSON/YAML
    text in the environment) -> model ('*': every request) -> Limits."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value.strip() else {}
        except yaml.YAMLError:
            raise ValueError("expected a mapping such as {\"*\": {\"rpm\": 600}}") from None
    if not isinstance(value, Mapping):
        raise ValueError("expected a mapping of model (or '*') to {rpm, tpm, burst, parallel}")
    limits = {}
    for name, spec in value.items():
        try:
            limits[str(name)] = parse_limits(spec)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return limits


def _port(value: Any) -> int:
    number = _int(0)(value)
    if number > 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return number


def _workers(value: Any) -> int:
    """A number of worker processes, or `auto`: one per core."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return os.cpu_count() or 1
    return _int(1)(value)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = _text(value).upper()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return text

    return parse


def _strategy(value: Any) -> str:
    """A strategy name or alias (any case, `-` or space for `_`) -> its canonical name."""
    text = _text(value)
    try:
        return parse_strategy(text).value
    except ValueError:
        raise ValueError(f"expected one of {', '.join(STRATEGIES)}") from None


def _strategies(value: Any) -> tuple[str, ...]:
    """A list of strategy names -> canonical names, in order, once each; empty, `*` or `all`:
    every strategy."""
    names = _names(value)
    if not names or any(name.lower() in ("*", "all") for name in names):
        return tuple(s.value for s in Strategy)
    result: list[str] = []
    for name in names:
        canonical = _strategy(name)
        if canonical not in result:
            result.append(canonical)
    return tuple(result)


def _resume_mode(value: Any) -> str:
    return _choice(*(mode.upper() for mode in resume.MODES))(value).lower()


def _log_level(value: Any) -> str:
    return _choice("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")(value).lower()


def _log_format(value: Any) -> str:
    return _choice("TEXT", "JSON")(value).lower()


def _names(value: Any) -> tuple[str, ...]:
    """A list of names, from a YAML list or a comma/semicolon separated string."""
    if isinstance(value, list | tuple):
        return tuple(_text(item) for item in value if _text(item))
    text = _text(value).replace(";", ",")
    return tuple(part.strip() for part in text.split(",") if part.strip())


def node_url(value: Any) -> str:
    text = _text(value)
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError("malformed URL") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("URL scheme must be http or https")
    if not parts.hostname:
        raise ValueError("URL has no host")
    if parts.query or parts.fragment:
        raise ValueError("URL may not have a query or fragment")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    path = parts.path.rstrip("/")
    # An OpenAI-style base URL ends in /v1; lb adds /v1/... itself.
    path = path.removesuffix("/v1")
    return f"{parts.scheme}://{host}:{port}{path}"


DIALECTS = ("openai", "anthropic", "ollama")
_NODE_FIELDS = {
    "url", "maxconn", "weight", "labels", "dialect", "api_key", "forward_auth", "models",
    "timeout", "stream_timeout",
    "rpm", "tpm",
}


def _node(value: Any) -> NodeConfig:
    if isinstance(value, Mapping):
        unknown = set(value) - _NODE_FIELDS
        if unknown:
            raise ValueError(f"unknown node field {sorted(unknown)[0]!r}")
        if "url" not in value:
            raise ValueError("node needs a url")
        maxconn = value.get("maxconn")
        weight = float(value.get("weight", 1.0))
        if weight <= 0 or not math.isfinite(weight):
            raise ValueError("node weight must be > 0")
        labels = value.get("labels") or {}
        if not isinstance(labels, Mapping):
            raise ValueError("node labels must be a mapping")
        dialect = _text(value.get("dialect", "openai")).lower()
        if dialect not in DIALECTS:
            raise ValueError(f"node dialect must be one of {', '.join(DIALECTS)}")
        return NodeConfig(
            url=node_url(value["url"]),
            maxconn=None if maxconn is None else _int(0)(maxconn),
            weight=weight,
            labels={str(k): str(v) for k, v in labels.items()},
            dialect=dialect,
            api_key=_text(value.get("api_key", "")),
            forward_auth=_bool(value.get("forward_auth", False)),
            models=_names(value.get("models") or ()),
            timeout=_optional(_positive_seconds, value.get("timeout")),
            stream_timeout=_optional(_positive_seconds, value.get("stream_timeout")),
            rpm=_per_minute(value, "rpm"),
            tpm=_per_minute(value, "tpm"),
        )
    return NodeConfig(url=node_url(value))


def _per_minute(node: Mapping[str, Any], field: str) -> int | None:
    value = node.get(field)
    if value is None:
        return None
    try:
        limit = _int(1)(value)
    except ValueError:
        raise ValueError(f"node {field} must be a whole number > 0") from None
    return limit


def _nodes(value: Any) -> tuple[NodeConfig, ...]:
    items = value if isinstance(value, list | tuple) else _names(value)
    nodes = tuple(_node(item) for item in items)
    _check_unique(nodes)
    return nodes


def _maxconn_map(value: Any) -> Mapping[str, int]:
    """`host:port=N,host2:port=M` (or a YAML mapping) -> {host:port: N}."""
    if isinstance(value, Mapping):
        pairs = [(str(k), v) for k, v in value.items()]
    else:
        pairs = []
        for item in _names(value):
            key, sep, number = item.rpartition("=")
            if not sep or not key:
                raise ValueError(f"expected host:port=N, got {item!r}")
            pairs.append((key.strip(), number))
    result = {}
    for key, number in pairs:
        if ":" not in key:
            raise ValueError(f"expected host:port=N, got {key!r}")
        result[key] = _int(0)(number)
    return result


def resolve_aliases(pairs: Mapping[str, str]) -> dict[str, str]:
    """alias -> target, with chains (`main` -> `big` -> `qwen3-32b`) followed to their end;
    ValueError on a cycle."""
    result = {}
    for alias in pairs:
        seen = [alias]
        target = pairs[alias]
        while target in pairs:
            if target in seen:
                raise ValueError(f"aliases form a cycle: {' -> '.join([*seen, target])}")
            seen.append(target)
            target = pairs[target]
        result[alias] = target
    return result


def _aliases(value: Any) -> Mapping[str, str]:
    """`main=qwen3-32b,fast=qwen3-8b` (or a YAML mapping) -> {alias: model}."""
    if isinstance(value, Mapping):
        pairs = {_text(k): _text(v) for k, v in value.items()}
    else:
        pairs = {}
        for item in _names(value):
            alias, sep, target = item.partition("=")
            if not sep or not alias.strip() or not target.strip():
                raise ValueError(f"expected alias=model, got {item!r}")
            pairs[alias.strip()] = target.strip()
    if any(not alias or not target for alias, target in pairs.items()):
        raise ValueError("an alias and its model must be non-empty")
    return resolve_aliases(pairs)


def _fallbacks(value: Any) -> Mapping[str, tuple[str, ...]]:
    """`a=b|c,d=e` (or a YAML mapping of lists, or LiteLLM's list of one-key mappings) ->
    {model: (fallback models, in order)}."""
    pairs: list[tuple[Any, Any]] = []
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, list | tuple):
        for item in value:
            if not isinstance(item, Mapping):
                raise ValueError("expected a list of {model: [fallback, ...]} mappings")
            pairs += list(item.items())
    else:
        for item in _names(value):
            model, sep, rest = item.partition("=")
            if not sep:
                raise ValueError(f"expected model=fallback|fallback, got {item!r}")
            pairs.append((model, rest.split("|")))
    result: dict[str, tuple[str, ...]] = {}
    for model, targets in pairs:
        names = _names(targets)
        if not _text(model) or not names:
            raise ValueError("a fallback needs a model and at least one model to fall back to")
        result[_text(model)] = tuple(name for name in names if name != _text(model))
    return result


def host_port(value: Any) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address -> (host, port or None).

    The host comes back lower-cased, an IPv6 one in brackets, so that `host:port` is a node key.
    """
    text = _text(value)
    if not text:
        raise ValueError("expected host or host:port")
    if any(char in text for char in "/@?#") or any(char.isspace() for char in text):
        raise ValueError(f"expected host or host:port, got {text!r}")
    if text.count(":") > 1 and not text.startswith("["):
        text = f"[{text}]"  # a bare IPv6 address carries no port
    try:
        parts = urlsplit("http://" + text)
        port = parts.port
    except ValueError:
        raise ValueError(f"malformed host:port {text!r}") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in {text!r}")
    if port == 0:
        raise ValueError(f"port 0 in {text!r}")
    if text.endswith(":"):
        raise ValueError(f"empty port in {text!r}")
    return (f"[{host}]" if ":" in host else host), port


def _scan_hosts(value: Any) -> tuple[str, ...]:
    """`host` or `host:port` entries, normalised (`Host:80` -> `host:80`), first one kept."""
    result: list[str] = []
    for item in _names(value):
        host, port = host_port(item)
        entry = host if port is None else f"{host}:{port}"
        if entry not in result:
            result.append(entry)
    return tuple(result)


def _ports(value: Any) -> tuple[int, ...]:
    items = value if isinstance(value, list | tuple) else _names(value)
    result: list[int] = []
    for item in items:
        try:
            port = _port(item)
        except ValueError:
            raise ValueError(f"expected port numbers from 1 to 65535, got {item!r}") from None
        if port == 0:
            raise ValueError("port 0 cannot be scanned")
        if port not in result:
            result.append(port)
    return tuple(result)


@attrs.frozen
class Setting:
    name: str  # attribute and YAML key
    env: str | None
    parse: Callable[[Any], Any]
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "HOST", _text, "Address to listen on"),
    Setting("port", "LOAD_BALANCER_PORT", _port, "Port to listen on"),
    Setting("nodes", "LB_NODES", _nodes, "Upstream node URLs (comma separated)"),
    Setting("log_level", "LB_LOG_LEVEL", _log_level, "debug, info, warning, error"),
    Setting("log_format", "LB_LOG_FORMAT", _log_format,
            "text (readable lines) or json (one object per line)"),
    Setting("max_body_bytes", "LB_MAX_BODY_BYTES", _int(1), "Largest request body (413 above)"),
    Setting("max_header_bytes", "LB_MAX_HEADER_BYTES", _int(1024), "Largest header block (431)"),
    Setting("header_timeout", "LB_HEADER_TIMEOUT_SECS", _seconds, "Time to send a request (408)"),
    Setting("body_timeout", "LB_BODY_TIMEOUT_SECS", _seconds,
            "Total time to send a request body (408)"),
    Setting("send_timeout", "LB_SEND_TIMEOUT_SECS", _seconds,
            "Longest a client may leave a response write blocked"),
    Setting("max_connections", "LB_MAX_CONNECTIONS", _int(0),
            "Client connections served at once (0 = from the file descriptor limit)"),
    Setting("keepalive_timeout", "LB_KEEPALIVE_SECS", _seconds, "Idle keep-alive connection life"),
    Setting("drain_timeout", "LB_DRAIN_SECS", _seconds, "Grace for requests in flight on SIGTERM"),
    Setting("workers", "LB_WORKERS", _workers,
            "Worker processes sharing the port (a number, or auto: one per core)"),
    Setting("routing_strategy", "ROUTING_STRATEGY", _strategy, "How a node is chosen"),
    Setting("allowed_strategies", "ALLOWED_STRATEGIES", _strategies,
            "Strategies a request may choose with x-lb-strategy (comma list; default: all)"),
    Setting("prefix_aware_blocks", "PREFIX_AWARE_BLOCKS", _int(1),
            "PREFIX_AWARE: leading prompt blocks (256 bytes) hashed per request"),
    Setting("prefix_aware_index_size", "PREFIX_AWARE_INDEX_SIZE", _int(1),
            "PREFIX_AWARE: block -> node entries remembered (least recently used go first)"),
    Setting("prefix_aware_balance", "PREFIX_AWARE_BALANCE", _ratio,
            "PREFIX_AWARE: a prefix's node is passed over above (1 + this) x the mean load"),
    Setting("traffic_split", "TRAFFIC_SPLIT", parse_weights,
            "Blue/green: weight per label value, e.g. blue=90,green=10 (empty: no split)"),
    Setting("traffic_split_label", "TRAFFIC_SPLIT_LABEL", _label,
            "The node label TRAFFIC_SPLIT weighs (its values name the groups)"),
    Setting("request_timeout", "REQUEST_TIMEOUT_SECS", _seconds, "One deadline per request (504)"),
    Setting("attempt_timeout", "ATTEMPT_TIMEOUT_SECS", _seconds,
            "Time for a node to send response headers"),
    Setting("stream_idle_timeout", "STREAM_IDLE_TIMEOUT_SECS", _seconds,
            "Longest gap between two stream chunks"),
    Setting("max_retries", "MAX_RETRIES", _int(0), "Retries on other nodes after a failure"),
    Setting("hedge_after_ms", "HEDGE_AFTER_MS", parse_hedge_after,
            "Hedge an attempt with no answer after N ms ('adaptive': p95; 0: off)"),
    Setting("hedge_max", "HEDGE_MAX", _int(1), "Hedges per attempt (HEDGE_AFTER_MS)"),
    Setting("stream_resume", "STREAM_RESUME", _bool,
            "Continue a stream whose node fails mid-answer on another node"),
    Setting("stream_resume_max", "STREAM_RESUME_MAX", _int(0), "Resumes per request at most"),
    Setting("stream_resume_mode", "STREAM_RESUME_MODE", _resume_mode,
            "prefill (trailing assistant message) or instruction; node label resume_mode wins"),
    Setting("stream_resume_prompt", "STREAM_RESUME_PROMPT", _text,
            "The user message that asks to go on, in instruction mode"),
    Setting("breaker_threshold", "CIRCUIT_BREAKER_THRESHOLD", _int(0),
            "Consecutive failures that open a node's breaker (0 = off)"),
    Setting("breaker_ttl", "CIRCUIT_BREAKER_TTL_SECS", _seconds, "How long a breaker stays open"),
    Setting("default_maxconn", "DEFAULT_MAXCONN", _int(0), "Per-node concurrency cap (0 = none)"),
    Setting("maxconn_map", "MAXCONN_MAP", _maxconn_map, "Per-node caps: host:port=N,..."),
    Setting("queue_timeout", "QUEUE_TIMEOUT_SECS", _seconds,
            "Wait for a free node slot before 429"),
    Setting("model_sentinels", "MODEL_SENTINELS", _names, "Model names that mean 'pick one'"),
    Setting("lm_model", "LM_MODEL", _text, "One more sentinel"),
    Setting("preferred_models", "PREFERRED_MODELS", _names, "Priority list for sentinels"),
    Setting("aliases", "MODEL_ALIASES", _aliases,
            "Stable handles for models: alias=model,... (an alias may name another)"),
    Setting("alias_only", "LB_ALIAS_ONLY", _bool, "GET /v1/models lists the aliases only"),
    Setting("fallbacks", "MODEL_FALLBACKS", _fallbacks,
            "Models to try when a model's nodes all fail: model=other|another,..."),
    Setting("scan_hosts", "SCAN_HOSTS", _scan_hosts,
            "Hosts to discover nodes on: host or host:port, comma separated"),
    Setting("scan_ports", "SCAN_PORTS", _ports, "Ports tried on each SCAN_HOSTS host"),
    Setting("scan_interval", "SCAN_INTERVAL", _seconds, "Seconds between two probes of a node"),
    Setting("health_check_timeout", "HEALTH_CHECK_TIMEOUT_SECONDS", _seconds,
            "Time a node has to answer a probe"),
    Setting("health_fail_threshold", "HEALTH_FAIL_THRESHOLD", _int(1),
            "Failed probes in a row that mark a node down"),
    Setting("min_healthy_nodes", "MIN_HEALTHY_NODES", _int(0), "/health is 503 below this"),
    Setting("model_grace", "MODEL_GRACE_SECS", _seconds,
            "How long a model no node serves any more stays listed (503, not 404)"),
    Setting("redis_url", "REDIS_URL", _redis_url, "Redis for a fleet (redis://host:port/db)"),
    Setting("redis_host", "REDIS_HOST", _text, "Redis host, if REDIS_URL is not given"),
    Setting("redis_port", "REDIS_PORT", _port, "Redis port, with REDIS_HOST"),
    Setting("redis_prefix", "REDIS_PREFIX", _text, "Prefix of every key lb writes"),
    Setting("redis_sync_secs", "REDIS_SYNC_SECS", _positive_seconds,
            "How often an instance syncs with the fleet"),
    Setting("admin_key", "LB_ADMIN_KEY", _text, "Bearer key of /v1/admin (empty: disabled)"),
    Setting("master_key", "LB_MASTER_KEY", _text,
            "Turns API keys on: every request needs this key or a virtual key (also "
            "LITELLM_MASTER_KEY, or general_settings.master_key in YAML)"),
    Setting("rate_limits", "LB_RATE_LIMITS", _rate_limits,
            "Limits per model and for all requests ('*'): {model: {rpm, tpm, burst, parallel}}"),
    Setting("data_dir", "LB_DATA_DIR", _text,
            "Folder of lb's SQLite file (keys, spend); default: the user's data folder"),
    Setting("cors_origins", "LB_CORS_ORIGINS", _names,
            "Origins browsers may call lb from: a comma list, or * (empty: no CORS)"),
    Setting("metrics", "LB_METRICS", _bool, "Count requests for /metrics (off: no /metrics)"),
    Setting("metrics_key", "LB_METRICS_KEY", _text,
            "Bearer key /metrics needs (empty: open)"),
    Setting("litellm_metrics", "LB_LITELLM_METRICS", _bool,
            "Also expose the counts under LiteLLM proxy's metric names"),
    Setting("demo", None, _bool, "Start two mock nodes in the same process"),
    # Cloud providers and Ollama's native API, as the AILB guide names them.
    Setting("openai_api_key", "OPENAI_API_KEY", _text,
            "OpenAI's API key: adds OpenAI as a node (empty: no OpenAI node)"),
    Setting("openai_base_url", "OPENAI_BASE_URL", _text, "OpenAI's base URL"),
    Setting("openai_models", "OPENAI_MODELS", _names, "Models served through OpenAI"),
    Setting("anthropic_api_key", "ANTHROPIC_API_KEY", _text,
            "Anthropic's API key: adds Anthropic as a node (empty: no Anthropic node)"),
    Setting("anthropic_base_url", "ANTHROPIC_BASE_URL", _text, "Anthropic's base URL"),
    Setting("anthropic_models", "ANTHROPIC_MODELS", _names, "Models served through Anthropic"),
    Setting("anthropic_max_tokens", "ANTHROPIC_MAX_TOKENS", _int(1),
            "max_tokens sent to Anthropic when the client sent none (Anthropic requires one)"),
    Setting("ollama_base_url", "OLLAMA_BASE_URL", _text,
            "An Ollama server spoken to in its native API (/api/chat)"),
    Setting("drop_params", "LB_DROP_PARAMS", _bool,
            "Drop parameters a translated provider does not accept (off: pass them on)"),
)


# LM Studio, Ollama, llama.cpp's server, vLLM.
DEFAULT_SCAN_PORTS: tuple[int, ...] = (1234, 11434, 8080, 8000)


@attrs.frozen
class Settings:
    host: str = "0.0.0.0"
    port: int = 8000
    nodes: tuple[NodeConfig, ...] = ()
    log_level: str = "info"
    log_format: str = "text"
    max_body_bytes: int = 16 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    send_timeout: float = 60.0
    max_connections: int = 0
    keepalive_timeout: float = 30.0
    drain_timeout: float = 30.0
    workers: int = 1
    routing_strategy: str = "LEAST_LOADED"
    allowed_strategies: tuple[str, ...] = tuple(s.value for s in Strategy)
    prefix_aware_blocks: int = 16
    prefix_aware_index_size: int = 100_000
    prefix_aware_balance: float = 0.25
    traffic_split: Mapping[str, float] = attrs.field(factory=dict)
    traffic_split_label: str = "version"
    request_timeout: float = 600.0
    attempt_timeout: float = 60.0
    stream_idle_timeout: float = 120.0
    max_retries: int = 2
    hedge_after_ms: HedgeAfter = None
    hedge_max: int = 1
    stream_resume: bool = False
    stream_resume_max: int = 1
    stream_resume_mode: str = resume.PREFILL
    stream_resume_prompt: str = resume.DEFAULT_PROMPT
    breaker_threshold: int = 3
    breaker_ttl: float = 30.0
    default_maxconn: int = 0
    maxconn_map: Mapping[str, int] = attrs.field(factory=dict)
    queue_timeout: float = 0.0
    model_sentinels: tuple[str, ...] = ("auto", "default")
    lm_model: str = ""
    preferred_models: tuple[str, ...] = ()
    aliases: Mapping[str, str] = attrs.field(factory=dict)
    alias_only: bool = False
    fallbacks: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    scan_hosts: tuple[str, ...] = ()
    scan_ports: tuple[int, ...] = DEFAULT_SCAN_PORTS
    scan_interval: float = 10.0
    health_check_timeout: float = 5.0
    health_fail_threshold: int = 2
    min_healthy_nodes: int = 1
    model_grace: float = 600.0
    redis_url: str = ""
    redis_host: str = ""
    redis_port: int = 6379
    redis_prefix: str = "lb:"
    redis_sync_secs: float = 0.5
    admin_key: str = ""
    master_key: str = ""
    rate_limits: Mapping[str, Limits] = attrs.field(factory=dict)
    data_dir: str = ""
    cors_origins: tuple[str, ...] = ()
    metrics: bool = True
    metrics_key: str = ""
    litellm_metrics: bool = True
    demo: bool = False
    openai_api_key: str = attrs.field(default="", repr=False)
    openai_base_url: str = "https://api.openai.com/v1"
    openai_models: tuple[str, ...] = ("gpt-4", "gpt-3.5-turbo")
    anthropic_api_key: str = attrs.field(default="", repr=False)
    anthropic_base_url: str = "https://api.anthropic.com"
    anthropic_models: tuple[str, ...] = ("claude-3-opus-20240229", "claude-3-sonnet-20240229")
    anthropic_max_tokens: int = 4096
    ollama_base_url: str = ""
    drop_params: bool = True
    # The model catalogue (a LiteLLM `model_list` & co. in the config file); not a setting of
    # its own: read from the file only, see `lb.catalogue`.
    catalogue: Catalogue | None = None

    @property
    def redis_address(self) -> str | None:
        """Where the fleet's Redis is; None: no fleet, everything in process."""
        if self.redis_url:
            return self.redis_url
        if self.redis_host:
            return f"redis://{self.redis_host}:{self.redis_port}/0"
        return None

    @property
    def sentinels(self) -> frozenset[str]:
        names = {name.lower() for name in self.model_sentinels}
        if self.lm_model:
            names.add(self.lm_model.lower())
        return frozenset(names)

    def provider_nodes(self) -> tuple[NodeConfig, ...]:
        """The nodes the provider settings describe (OPENAI_API_KEY, ANTHROPIC_API_KEY,
        OLLAMA_BASE_URL)."""
        nodes = []
        if self.openai_api_key:
            nodes.append(NodeConfig(
                url=node_url(self.openai_base_url), api_key=self.openai_api_key,
                models=self.openai_models,
            ))
        if self.anthropic_api_key:
            nodes.append(NodeConfig(
                url=node_url(self.anthropic_base_url), dialect="anthropic",
                api_key=self.anthropic_api_key, models=self.anthropic_models,
            ))
        if self.ollama_base_url:
            nodes.append(NodeConfig(url=node_url(self.ollama_base_url), dialect="ollama"))
        return tuple(nodes)

    def all_nodes(self) -> tuple[NodeConfig, ...]:
        """Configured nodes, the providers', then the catalogue's deployments."""
        nodes = self.nodes + self.provider_nodes()
        if self.catalogue is not None:
            from lb.catalogue import node_configs

            nodes += node_configs(self.catalogue, taken={node.key for node in nodes})
        return nodes

    def maxconn_for(self, node: NodeConfig) -> int:
        if node.maxconn is not None:
            return node.maxconn
        return self.maxconn_map.get(node.key, self.default_maxconn)


_BY_NAME = {setting.name: setting for setting in SETTINGS}


def _parse(setting: Setting, value: Any, source: str) -> Any:
    try:
        return setting.parse(value)
    except (ValueError, TypeError) as exc:
        label = setting.env if source == "environment" and setting.env else setting.name
        raise ConfigError(f"{source}: {label}={value!r}: {exc}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of settings at the top")
    return data


def load_settings(
    *,
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Defaults <- YAML <- environment <- flags; flags that are None are not given."""
    values: dict[str, Any] = {}
    env = env or {}
    catalogue = None
    if config_file:
        doc = read_yaml(config_file)
        catalogue = _catalogue(doc, env, config_file)
        if catalogue is not None:
            # LiteLLM's router settings sit under lb's own keys; its environment_variables
            # under the real environment.
            values.update(catalogue.settings, catalogue=catalogue)
            if catalogue.master_key:  # general_settings.master_key (os.environ/ resolved)
                values["master_key"] = catalogue.master_key
            env = {**catalogue.environment, **env}
        for key, value in doc.items():
            setting = _BY_NAME.get(str(key))
            if setting is None:
                if catalogue is not None:
                    continue  # the catalogue's, or warned by it
                raise ConfigError(f"config file {config_file}: unknown setting {key!r}")
            values[setting.name] = _parse(setting, value, f"config file {config_file}")
    if env and env.get("LITELLM_MASTER_KEY") and not env.get("LB_MASTER_KEY"):
        values["master_key"] = _parse(
            _BY_NAME["master_key"], env["LITELLM_MASTER_KEY"], "environment"
        )
    for setting in SETTINGS:
        if setting.env and env.get(setting.env) not in (None, ""):
            values[setting.name] = _parse(setting, env[setting.env], "environment")
    for name, value in (flags or {}).items():
        if value is not None:
            values[name] = _parse(_BY_NAME[name], value, "flag")
    if catalogue is not None:
        _layer_catalogue(values, catalogue, env)
    settings = Settings(**values)
    try:
        _check_unique(settings.all_nodes())
    except ValueError as exc:
        raise ConfigError(f"nodes: {exc}") from None
    return settings


def _layer_catalogue(values: dict[str, Any], catalogue: Catalogue, env: Mapping[str, str]) -> None:
    """The catalogue's aliases, fallbacks and switches, under what the file's own keys, the
    environment and flags said."""
    try:
        values["aliases"] = resolve_aliases({**catalogue.aliases, **values.get("aliases", {})})
    except ValueError as exc:
        raise ConfigError(f"aliases: {exc}") from None
    values["fallbacks"] = {**catalogue.fallbacks, **values.get("fallbacks", {})}
    values.setdefault("alias_only", catalogue.alias_only)
    if "drop_params" not in values:  # LiteLLM's default: pass unknown fields on
        values["drop_params"] = catalogue.drop_params


def _check_unique(nodes: tuple[NodeConfig, ...]) -> None:
    keys = [node.key for node in nodes]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"node {duplicates[0]} is listed twice")


def _catalogue(
    doc: Mapping[str, Any], env: Mapping[str, str], path: str | Path
) -> Catalogue | None:
    """The file's model catalogue (LiteLLM's sections, lb's `aliases`), or None if it has none."""
    from lb.catalogue import is_catalogue, parse_catalogue

    if not is_catalogue(doc):
        return None
    try:
        return parse_catalogue(doc, env, own_keys=_BY_NAME)
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
