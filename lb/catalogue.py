"""The model catalogue: a LiteLLM proxy `config.yaml` read into lb's terms.

An existing LiteLLM file (`model_list`, `router_settings`, `litellm_settings`,
`general_settings`, `environment_variables`) must work with `lb serve --config` unchanged, so
this module reads LiteLLM's schema as LiteLLM documents it and says, once, which keys lb does
not act on (a warning naming each, never fatal). Pure: the only outside input is `env`, the
environment that `os.environ/NAME` values are looked up in, passed in.

Terms: a *deployment* is one `model_list` entry (a model on an endpoint, with credentials); its
`model_name` is the *handle* clients send; deployments sharing a handle are one *group*, that
lb balances over and fails over within, then along `fallbacks` to other groups.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal, cast
from urllib.parse import quote, urlsplit

import attrs

from lb.config import (
    ConfigError,
    NodeConfig,
    _bool,
    _int,
    _ratio,
    _seconds,
    _strategy,
    node_url,
)
from lb.routing.resolve import ModelKind, is_embedding_model

__all__ = [
    "LITELLM_SECTIONS",
    "PROVIDERS",
    "Catalogue",
    "Deployment",
    "Provider",
    "is_catalogue",
    "log_warnings",
    "node_configs",
    "parse_catalogue",
    "resolve_aliases",
]

Provider = Literal["openai", "anthropic", "ollama"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@attrs.frozen
class Deployment:
    """One `model_list` entry, validated, with its credentials resolved."""

    handle: str  # model_name: what clients send (may hold one `*`, a wildcard route)
    provider: Provider  # the dialect lb speaks to it
    model: str  # the provider's own model name (prefix removed; may hold `*`, see model_for)
    api_base: str  # the configured (or provider default) base, normalised, no trailing slash
    # lb's node URL, scheme://host:port[/prefix]: the dialect's paths (/v1/chat/completions,
    # /v1/messages, /api/chat) are appended to it. See `_node_url_for`.
    url: str
    api_key: str | None = attrs.field(default=None, repr=False)
    rpm: int | None = None
    tpm: int | None = None
    timeout: float | None = None  # seconds for a whole (non-stream) answer
    stream_timeout: float | None = None  # seconds between stream chunks
    weight: float = 1.0
    order: int | None = None  # lower first; LiteLLM's priority tiers
    maxconn: int | None = None  # litellm_params.max_parallel_requests
    mode: ModelKind = "chat"
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    input_cost_per_token: float | None = None
    output_cost_per_token: float | None = None
    id: str = ""  # model_info.id, or a stable hash of what the deployment is (unique)
    labels: Mapping[str, str] = attrs.field(factory=dict)
    # OpenAI request fields the deployment sets when the client did not (LiteLLM merges
    # litellm_params such as temperature or max_tokens into the call; the client's win).
    params: Mapping[str, Any] = attrs.field(factory=dict)
    litellm_provider: str = ""  # the prefix as written: "openai", "ollama_chat", "hosted_vllm"
    source: str = ""  # "model_list[2]", for messages

    @property
    def wildcard(self) -> bool:
        return "*" in self.handle

    def model_for(self, requested: str) -> str:
        """The provider's model name for a client's `requested` name: a wildcard route
        (`mlx-*` -> `openai/mlx-*`) passes the part the `*` matched through."""
        if not self.wildcard or "*" not in self.model:
            return self.model
        head, _, tail = self.handle.partition("*")
        middle = requested[len(head): len(requested) - len(tail)]
        return self.model.replace("*", middle, 1)


@attrs.frozen
class Catalogue:
    deployments: tuple[Deployment, ...] = ()
    # alias -> the name it finally means (chains resolved; never itself an alias): a handle of
    # `model_list`, or a model some discovered node serves.
    aliases: Mapping[str, str] = attrs.field(factory=dict)
    hidden_aliases: frozenset[str] = frozenset()  # model_group_alias {model:, hidden: true}
    fallbacks: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)  # "*": the default
    context_window_fallbacks: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    alias_only: bool = False  # /v1/models lists the catalogue's handles and aliases only
    drop_params: bool = False
    master_key: str | None = attrs.field(default=None, repr=False)
    settings: Mapping[str, Any] = attrs.field(factory=dict)  # lb setting name -> parsed value
    environment: Mapping[str, str] = attrs.field(factory=dict, repr=False)  # environment_variables
    warnings: tuple[str, ...] = ()
    # Derived once: handle -> its deployments (file order); handles with a context limit.
    groups: Mapping[str, tuple[Deployment, ...]] = attrs.field(init=False, eq=False, repr=False)
    limited: frozenset[str] = attrs.field(init=False, eq=False, repr=False)
    _wildcards: tuple[str, ...] = attrs.field(init=False, eq=False, repr=False)

    @groups.default
    def _groups(self) -> Mapping[str, tuple[Deployment, ...]]:
        groups: dict[str, list[Deployment]] = {}
        for deployment in self.deployments:
            groups.setdefault(deployment.handle, []).append(deployment)
        return MappingProxyType({handle: tuple(group) for handle, group in groups.items()})

    @limited.default
    def _limited(self) -> frozenset[str]:
        return frozenset(h for h in self.groups if self.max_input_tokens(h) is not None)

    @_wildcards.default
    def _wildcard_handles(self) -> tuple[str, ...]:
        return tuple(sorted((h for h in self.groups if "*" in h), key=len, reverse=True))

    @property
    def handles(self) -> tuple[str, ...]:
        return tuple(self.groups)

    def resolve(self, name: str) -> str:
        """An alias -> what it means; any other name -> itself."""
        return self.aliases.get(name, name)

    def group_for(self, name: str) -> str | None:
        """The handle whose group serves `name` (an alias, a handle, or a name a wildcard
        handle matches; the longest pattern wins); None: the catalogue does not serve it."""
        name = self.resolve(name)
        if name in self.groups and "*" not in name:
            return name
        return next((h for h in self._wildcards if _wildcard_match(h, name)), None)

    def listed(self) -> tuple[str, ...]:
        """What `/v1/models` lists from the catalogue: handles (not wildcard routes) and
        visible aliases. With `alias_only`, this is all it lists."""
        names = [h for h in self.groups if "*" not in h]
        names += [a for a in self.aliases if a not in self.hidden_aliases]
        return tuple(dict.fromkeys(names))

    def max_input_tokens(self, handle: str) -> int | None:
        """The largest prompt the group takes: a request fits if it fits one deployment
        (dispatch then keeps to the deployments it fits). None: some deployment has no limit."""
        group = self.groups.get(handle, ())
        limits = [d.max_input_tokens for d in group]
        if not limits or any(limit is None for limit in limits):
            return None
        return max(cast(list[int], limits))


def node_configs(catalogue: Catalogue, taken: Collection[str] = ()) -> tuple[NodeConfig, ...]:
    """One node per deployment, in `order` (LiteLLM's priority tiers; FAILOVER keeps it), each
    serving its handle under the provider's own model name. A deployment is a node of its own
    even when it shares a server with others (its own cap, weight, prices and window); then
    its key is `host:port/handle`. A wildcard route (`mlx-*`) serves its pattern; dispatch
    fills in the part of the requested name the `*` matched."""
    deployments = sorted(
        catalogue.deployments,
        key=lambda d: math.inf if d.order is None else d.order,
    )
    plain = [NodeConfig(d.url).key for d in deployments]
    used = set(taken)
    nodes = []
    for deployment, key in zip(deployments, plain, strict=True):
        name = key if plain.count(key) == 1 and key not in used else f"{key}/{deployment.handle}"
        suffix = 2
        while name in used:  # the same handle twice on one server: two deployments all the same
            name, suffix = f"{key}/{deployment.handle}#{suffix}", suffix + 1
        used.add(name)
        labels = dict(deployment.labels)
        for label, value in (
            ("price_in", deployment.input_cost_per_token),
            ("price_out", deployment.output_cost_per_token),
            ("order", deployment.order), ("rpm", deployment.rpm), ("tpm", deployment.tpm),
        ):
            if value is not None:
                labels[label] = str(value)
        nodes.append(NodeConfig(
            url=deployment.url, maxconn=deployment.maxconn, weight=deployment.weight,
            labels=labels, dialect=deployment.provider, api_key=deployment.api_key or "",
            models=(deployment.handle,),
            model_map={deployment.handle: deployment.model}
            if deployment.model != deployment.handle else {},
            name=name, params=dict(deployment.params),
            max_input_tokens=deployment.max_input_tokens,
            timeout=deployment.timeout, stream_timeout=deployment.stream_timeout,
            rpm=deployment.rpm or None, tpm=deployment.tpm or None,
        ))
    return tuple(nodes)


def is_catalogue(doc: Mapping[str, Any]) -> bool:
    """Whether a YAML document carries anything the catalogue reads."""
    return any(key in doc for key in (*LITELLM_SECTIONS, *_LB_KEYS))


def log_warnings(catalogue: Catalogue, logger: logging.Logger | None = None) -> None:
    """Log each warning once (at start; `lb serve` calls this after configuring logging)."""
    log = logger or logging.getLogger("lb.catalogue")
    for warning in catalogue.warnings:
        log.warning("config: %s", warning)


# --- parsing ---

#: LiteLLM's top-level sections. In a file that has one, other unknown top-level keys are
#: LiteLLM's too (guardrails, mcp_servers, ...): warned, not fatal.
LITELLM_SECTIONS = (
    "model_list", "router_settings", "litellm_settings", "general_settings",
    "environment_variables",
)
# lb's own catalogue keys, at the top level of the same file.
_LB_KEYS = ("aliases", "alias_only")


@attrs.frozen
class _ProviderSpec:
    provider: Provider
    base_env: tuple[str, ...] = ()  # environment variables naming the endpoint, in order
    default_base: str | None = None  # None: api_base is required
    key_env: tuple[str, ...] = ()  # ... and carrying its key (used only for that endpoint)


_OPENAI = _ProviderSpec(
    "openai", ("OPENAI_BASE_URL", "OPENAI_API_BASE"), "https://api.openai.com/v1",
    ("OPENAI_API_KEY",),
)
_OLLAMA = _ProviderSpec(
    "ollama", ("OLLAMA_BASE_URL", "OLLAMA_API_BASE"), "http://localhost:11434",
    ("OLLAMA_API_KEY",),
)

#: LiteLLM provider prefixes lb speaks. The OpenAI-compatible ones are all "openai".
PROVIDERS: Mapping[str, _ProviderSpec] = MappingProxyType({
    "openai": _OPENAI,
    "text-completion-openai": _OPENAI,
    "custom_openai": _ProviderSpec("openai"),
    "hosted_vllm": _ProviderSpec("openai", ("HOSTED_VLLM_API_BASE",), None,
                                 ("HOSTED_VLLM_API_KEY",)),
    "lm_studio": _ProviderSpec("openai", ("LM_STUDIO_API_BASE",), None, ("LM_STUDIO_API_KEY",)),
    "llamafile": _ProviderSpec("openai", ("LLAMAFILE_API_BASE",), "http://127.0.0.1:8080/v1"),
    "groq": _ProviderSpec("openai", ("GROQ_API_BASE",), "https://api.groq.com/openai/v1",
                          ("GROQ_API_KEY",)),
    "together_ai": _ProviderSpec("openai", ("TOGETHERAI_API_BASE",), "https://api.together.xyz/v1",
                                 ("TOGETHERAI_API_KEY", "TOGETHER_AI_API_KEY")),
    "deepseek": _ProviderSpec("openai", ("DEEPSEEK_API_BASE",), "https://api.deepseek.com/v1",
                              ("DEEPSEEK_API_KEY",)),
    "mistral": _ProviderSpec("openai", ("MISTRAL_API_BASE",), "https://api.mistral.ai/v1",
                             ("MISTRAL_API_KEY",)),
    "openrouter": _ProviderSpec("openai", ("OPENROUTER_API_BASE",), "https://openrouter.ai/api/v1",
                                ("OPENROUTER_API_KEY",)),
    "fireworks_ai": _ProviderSpec("openai", ("FIREWORKS_API_BASE",),
                                  "https://api.fireworks.ai/inference/v1",
                                  ("FIREWORKS_AI_API_KEY", "FIREWORKS_API_KEY")),
    "xai": _ProviderSpec("openai", ("XAI_API_BASE",), "https://api.x.ai/v1", ("XAI_API_KEY",)),
    "anthropic": _ProviderSpec(
        "anthropic", ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_BASE"), "https://api.anthropic.com",
        ("ANTHROPIC_API_KEY",),
    ),
    "ollama": _OLLAMA,
    "ollama_chat": _OLLAMA,
})

# Model names LiteLLM recognises without a prefix.
_BARE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("gpt-", "openai"), ("chatgpt-", "openai"), ("o1", "openai"), ("o3", "openai"),
    ("o4", "openai"), ("text-embedding-", "openai"), ("ft:gpt-", "openai"),
    ("claude-", "anthropic"),
)

# OpenAI request fields a deployment may set (LiteLLM passes litellm_params into the call).
_REQUEST_PARAMS = frozenset({
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "presence_penalty",
    "frequency_penalty", "seed", "n", "response_format", "logit_bias", "user",
    "reasoning_effort", "logprobs", "top_logprobs", "parallel_tool_calls",
})
_PARAM_KEYS = frozenset({
    "model", "api_base", "api_key", "rpm", "tpm", "timeout", "stream_timeout", "weight",
    "order", "max_parallel_requests", "input_cost_per_token", "output_cost_per_token",
    "custom_llm_provider", "extra_body",
}) | _REQUEST_PARAMS
_INFO_KEYS = frozenset({
    "id", "mode", "max_input_tokens", "max_output_tokens", "input_cost_per_token",
    "output_cost_per_token",
})
_MODES: frozenset[str] = frozenset({"chat", "completion", "embedding"})

_ROUTER_KEYS = frozenset({
    "routing_strategy", "num_retries", "timeout", "stream_timeout", "allowed_fails",
    "cooldown_time", "disable_cooldowns", "fallbacks", "default_fallbacks",
    "context_window_fallbacks", "model_group_alias", "redis_host", "redis_port",
    "redis_password", "redis_url",
    "enable_pre_call_checks",  # lb always checks a known context window before the call
})
_LITELLM_KEYS = frozenset({
    "drop_params", "num_retries", "request_timeout", "fallbacks", "default_fallbacks",
    "context_window_fallbacks", "callbacks", "success_callback", "failure_callback",
    "json_logs", "set_verbose",
})
_GENERAL_KEYS = frozenset({"master_key"})
# Callbacks lb has built in: its /metrics serves LiteLLM's metric names too.
_BUILTIN_CALLBACKS = frozenset({"prometheus"})


class _Reader:
    """What one parse collects besides the result: the environment and the warnings."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.warnings: list[str] = []
        # A key not supported in several deployments is one warning naming them all.
        self.unsupported: dict[str, list[str]] = {}

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def unsupported_key(self, path: str, owner: str | None = None) -> None:
        owners = self.unsupported.setdefault(path, [])
        if owner is not None and owner not in owners:
            owners.append(owner)

    def finish(self) -> tuple[str, ...]:
        for path, owners in self.unsupported.items():
            where = f" (in {', '.join(owners)})" if owners else ""
            self.warn(f"{path}{where} is not supported; ignored")
        return tuple(self.warnings)

    def value(self, path: str, raw: Any) -> Any:
        """`os.environ/NAME` -> the variable's value (ConfigError naming both if unset)."""
        if isinstance(raw, str) and raw.startswith("os.environ/"):
            name = raw.removeprefix("os.environ/").strip()
            if name not in self.env:
                raise ConfigError(f"{path}: environment variable {name} ({raw}) is not set")
            return self.env[name]
        return raw

    def parsed(self, path: str, raw: Any, parse: Callable[[Any], Any]) -> Any:
        value = self.value(path, raw)
        try:
            return parse(value)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}={value!r}: {exc}") from None


def _mapping(path: str, raw: Any) -> Mapping[str, Any]:
    if raw is None:
        return _EMPTY
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {type(raw).__name__}")
    return cast(Mapping[str, Any], raw)


def _name(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("expected a name")
    if not str(value).strip():
        raise ValueError("expected a name")
    return str(value).strip()


def _positive(parse: Callable[[Any], float]) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        number = parse(value)
        if number <= 0:
            raise ValueError("must be more than 0")
        return number

    return check


def parse_catalogue(
    yaml_doc: Mapping[str, Any], env: Mapping[str, str], *,
    own_keys: Collection[str] | None = None,
) -> Catalogue:
    """A LiteLLM config document (plus lb's `aliases` / `alias_only`) -> a `Catalogue`.

    `env` is the process environment; `environment_variables` of the document fill in names it
    does not have (the process environment wins, as everywhere in lb). Raises `ConfigError`
    naming the key path (`model_list[2].litellm_params.rpm`) for a bad value.
    `own_keys`: the top-level keys the caller reads (lb's settings); any other top-level key is
    LiteLLM's (warned) in a LiteLLM file and a mistake (ConfigError) in an lb file. None: the
    top level is not checked.
    """
    if not isinstance(yaml_doc, Mapping):
        raise ConfigError("expected a mapping at the top of the config file")
    environment = {
        str(k): "" if v is None else str(v)
        for k, v in _mapping("environment_variables", yaml_doc.get("environment_variables")).items()
    }
    reader = _Reader({**environment, **env})
    litellm_file = any(key in yaml_doc for key in LITELLM_SECTIONS)
    if own_keys is not None:
        for key in yaml_doc:
            if key in own_keys or key in LITELLM_SECTIONS or key in _LB_KEYS:
                continue
            if not litellm_file:
                raise ConfigError(f"unknown setting {key!r}")
            reader.unsupported_key(str(key))  # one of LiteLLM's (guardrails, include, ...)
    router = _mapping("router_settings", yaml_doc.get("router_settings"))
    module = _mapping("litellm_settings", yaml_doc.get("litellm_settings"))
    general = _mapping("general_settings", yaml_doc.get("general_settings"))
    for section, known in (
        ("router_settings", _ROUTER_KEYS), ("litellm_settings", _LITELLM_KEYS),
        ("general_settings", _GENERAL_KEYS),
    ):
        for key in _mapping(section, yaml_doc.get(section)):
            if key not in known:
                reader.unsupported_key(f"{section}.{key}")

    deployments = _deployments(reader, yaml_doc.get("model_list"))
    handles = {d.handle for d in deployments}
    aliases, hidden = _aliases(reader, router.get("model_group_alias"), yaml_doc.get("aliases"),
                               handles)
    # router_settings override litellm_settings (LiteLLM passes them to its Router).
    fallbacks = {
        **_fallbacks(reader, "litellm_settings.fallbacks", module.get("fallbacks")),
        **_fallbacks(reader, "router_settings.fallbacks", router.get("fallbacks")),
    }
    for section, values in (("litellm_settings", module), ("router_settings", router)):
        if values.get("default_fallbacks") is not None:
            fallbacks["*"] = _groups_list(
                reader, f"{section}.default_fallbacks", values["default_fallbacks"]
            )
    context_fallbacks = {
        **_fallbacks(reader, "litellm_settings.context_window_fallbacks",
                     module.get("context_window_fallbacks")),
        **_fallbacks(reader, "router_settings.context_window_fallbacks",
                     router.get("context_window_fallbacks")),
    }
    master_key = None
    if general.get("master_key") not in (None, ""):
        master_key = reader.parsed("general_settings.master_key", general["master_key"], _name)
    elif litellm_file and reader.env.get("LITELLM_MASTER_KEY"):
        master_key = reader.env["LITELLM_MASTER_KEY"]  # LiteLLM's proxy reads it as well
    drop_params = False
    if module.get("drop_params") is not None:
        drop_params = reader.parsed("litellm_settings.drop_params", module["drop_params"], _bool)
    alias_only = False
    if yaml_doc.get("alias_only") is not None:
        alias_only = reader.parsed("alias_only", yaml_doc["alias_only"], _bool)
    settings = _settings(reader, router, module)
    return Catalogue(
        deployments=deployments,
        aliases=MappingProxyType(aliases),
        hidden_aliases=frozenset(hidden),
        fallbacks=MappingProxyType(fallbacks),
        context_window_fallbacks=MappingProxyType(context_fallbacks),
        alias_only=alias_only,
        drop_params=drop_params,
        master_key=master_key,
        settings=MappingProxyType(settings),
        environment=MappingProxyType(environment),
        warnings=reader.finish(),
    )


def _deployments(reader: _Reader, raw: Any) -> tuple[Deployment, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("model_list: expected a list of deployments")
    result: list[Deployment] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        deployment = _deployment(reader, f"model_list[{index}]", item)
        if deployment is None:
            continue
        if deployment.id:
            if deployment.id in seen:
                raise ConfigError(
                    f"{deployment.source}.model_info.id: {deployment.id!r} is used twice"
                )
        else:
            # Stable across restarts: a hash of what the deployment is (its place breaks ties
            # between identical entries, which LiteLLM allows to weight a route).
            generated = hashlib.blake2b(
                "\0".join((deployment.handle, deployment.litellm_provider, deployment.model,
                           deployment.url)).encode(), digest_size=8,
            ).hexdigest()
            if generated in seen:
                generated = f"{generated}-{index}"
            deployment = attrs.evolve(deployment, id=generated)
        seen.add(deployment.id)
        result.append(deployment)
    return tuple(result)


def _deployment(reader: _Reader, path: str, raw: Any) -> Deployment | None:
    entry = _mapping(path, raw)
    if "model_name" not in entry:
        raise ConfigError(f"{path}: a deployment needs a model_name")
    handle = reader.parsed(f"{path}.model_name", entry["model_name"], _name)
    if handle.count("*") > 1:
        raise ConfigError(f"{path}.model_name={handle!r}: at most one * in a wildcard route")
    params = _mapping(f"{path}.litellm_params", entry.get("litellm_params"))
    info = _mapping(f"{path}.model_info", entry.get("model_info"))
    for key in entry:
        if key not in ("model_name", "litellm_params", "model_info", "rpm", "tpm"):
            reader.unsupported_key(f"model_list[].{key}", handle)
    for key in params:
        if key not in _PARAM_KEYS:
            reader.unsupported_key(f"model_list[].litellm_params.{key}", handle)
    for key in info:
        if key not in _INFO_KEYS:
            reader.unsupported_key(f"model_list[].model_info.{key}", handle)

    p = f"{path}.litellm_params"
    if "model" not in params:
        raise ConfigError(f"{p}: a deployment needs a model (e.g. openai/<model>)")
    written = reader.parsed(f"{p}.model", params["model"], _name)
    prefix, model = _split_provider(reader, p, written, params.get("custom_llm_provider"))
    spec = PROVIDERS[prefix]

    def get(key: str, parse: Callable[[Any], Any], where: Mapping[str, Any] = params,
            base: str = p) -> Any:
        raw_value = where.get(key)
        return None if raw_value is None else reader.parsed(f"{base}.{key}", raw_value, parse)

    api_base = get("api_base", _name)
    from_env = False
    if api_base is None:
        api_base = next((reader.env[n] for n in spec.base_env if reader.env.get(n)), None)
        api_base = api_base or spec.default_base
        from_env = True
    if api_base is None:
        names = " or ".join(spec.base_env) or "nothing"
        raise ConfigError(f"{p}.api_base: {prefix}/ needs an api_base (or {names} set)")
    url = _node_url_for(reader, f"{p}.api_base", spec.provider, api_base)

    api_key = get("api_key", lambda v: "" if v is None else str(v).strip())
    if api_key is None and from_env:
        # A key from the environment goes only to the endpoint the environment (or LiteLLM's
        # default) names, never to an api_base the file points elsewhere.
        api_key = next((reader.env[n] for n in spec.key_env if reader.env.get(n)), None)
        if api_key is None and spec.key_env and spec.default_base and api_base == spec.default_base:
            reader.warn(f"{p}: no api_key and {spec.key_env[0]} is not set; "
                        f"{urlsplit(api_base).hostname} will refuse the requests")

    mode_raw = get("mode", _name, info, f"{path}.model_info")
    if mode_raw is None:
        mode: ModelKind = "embedding" if is_embedding_model(model) else "chat"
    elif mode_raw in _MODES:
        mode = cast(ModelKind, mode_raw)
    else:
        reader.warn(f"{path}.model_info.mode={mode_raw!r} ({handle}): lb serves chat, completion "
                    "and embedding; deployment ignored")
        return None

    costs = {
        key: get(key, _ratio, info, f"{path}.model_info")
        if info.get(key) is not None else get(key, _ratio)
        for key in ("input_cost_per_token", "output_cost_per_token")
    }
    labels: dict[str, str] = {"provider": spec.provider}
    if costs["input_cost_per_token"] is not None:
        labels["price_in"] = repr(costs["input_cost_per_token"])
    if costs["output_cost_per_token"] is not None:
        labels["price_out"] = repr(costs["output_cost_per_token"])

    request_params = {k: reader.value(f"{p}.{k}", v) for k, v in params.items()
                      if k in _REQUEST_PARAMS}
    extra = _mapping(f"{p}.extra_body", params.get("extra_body"))
    request_params.update({str(k): v for k, v in extra.items()})

    rpm = get("rpm", _int(0))
    tpm = get("tpm", _int(0))
    deployment = Deployment(
        handle=handle,
        provider=spec.provider,
        model=model,
        api_base=api_base.rstrip("/"),
        url=url,
        api_key=api_key or None,
        rpm=rpm if rpm is not None else get("rpm", _int(0), entry, path),
        tpm=tpm if tpm is not None else get("tpm", _int(0), entry, path),
        timeout=get("timeout", _positive(_seconds)),
        stream_timeout=get("stream_timeout", _positive(_seconds)),
        weight=get("weight", _positive(_ratio)) or 1.0,
        order=get("order", _int(1)),
        maxconn=get("max_parallel_requests", _int(1)),
        mode=mode,
        max_input_tokens=get("max_input_tokens", _int(1), info, f"{path}.model_info"),
        max_output_tokens=get("max_output_tokens", _int(1), info, f"{path}.model_info"),
        input_cost_per_token=costs["input_cost_per_token"],
        output_cost_per_token=costs["output_cost_per_token"],
        id=get("id", _name, info, f"{path}.model_info") or "",
        labels=MappingProxyType(labels),
        params=MappingProxyType(request_params),
        litellm_provider=prefix,
        source=path,
    )
    return deployment


def _split_provider(reader: _Reader, path: str, written: str, custom: Any) -> tuple[str, str]:
    """`openai/gpt-4o` -> ("openai", "gpt-4o"); the provider is the text before the first
    slash, or `custom_llm_provider`, or known from a bare OpenAI/Anthropic model name."""
    if custom is not None:
        prefix = reader.parsed(f"{path}.custom_llm_provider", custom, _name)
        model = written.removeprefix(f"{prefix}/")
    elif "/" in written:
        prefix, _, model = written.partition("/")
    else:
        prefix = next((p for start, p in _BARE_PREFIXES if written.startswith(start)), "")
        model = written
        if not prefix:
            raise ConfigError(
                f"{path}.model={written!r}: no provider; write openai/{written} (any "
                f"OpenAI-compatible server), anthropic/{written} or ollama/{written}"
            )
    if prefix not in PROVIDERS:
        raise ConfigError(
            f"{path}.model={written!r}: provider {prefix!r} is not supported; lb speaks "
            f"{', '.join(PROVIDERS)}"
        )
    if not model:
        raise ConfigError(f"{path}.model={written!r}: no model name after the provider")
    return prefix, model


def _node_url_for(reader: _Reader, path: str, provider: Provider, api_base: str) -> str:
    """lb's node URL for an api_base: the dialect appends its own versioned path.

    LiteLLM appends `/chat/completions` to an OpenAI api_base (so it ends in `/v1`),
    `/v1/messages` to an Anthropic one (with or without `/v1`; a full `/v1/messages` URL is
    taken too) and `/api/chat` to an Ollama one. lb's node URLs carry no `/v1` (dispatch adds
    `/v1/chat/completions`), so a trailing `/v1` is cut. An OpenAI api_base without `/v1` is
    taken as the server's root (lb calls `<root>/v1/chat/completions`, where LiteLLM would call
    `<root>/chat/completions`): warned, because the two differ.
    """
    base = api_base.rstrip("/")
    if provider == "anthropic":
        base = base.removesuffix("/messages")
    try:
        url = node_url(base)
    except ValueError as exc:
        raise ConfigError(f"{path}={api_base!r}: {exc}") from None
    if provider == "openai" and not urlsplit(base).path.endswith("/v1"):
        reader.warn(
            f"{path}={api_base!r} does not end in /v1: lb sends {url}/v1/chat/completions "
            f"(LiteLLM would send {base}/chat/completions)"
        )
    return url


def _alias_target(reader: _Reader, path: str, raw: Any) -> tuple[str, bool]:
    if isinstance(raw, Mapping):
        if "model" not in raw:
            raise ConfigError(f"{path}: expected {{model: <group>, hidden: true|false}}")
        hidden = raw.get("hidden")
        return (
            reader.parsed(f"{path}.model", raw["model"], _name),
            False if hidden is None else reader.parsed(f"{path}.hidden", hidden, _bool),
        )
    return reader.parsed(path, raw, _name), False


def _aliases(
    reader: _Reader, group_alias: Any, plain: Any, handles: set[str]
) -> tuple[dict[str, str], set[str]]:
    direct: dict[str, str] = {}
    hidden: set[str] = set()
    for section, raw in (("router_settings.model_group_alias", group_alias), ("aliases", plain)):
        for alias, target_raw in _mapping(section, raw).items():
            path = f"{section}.{alias}"
            alias = reader.parsed(section, alias, _name)
            target, is_hidden = _alias_target(reader, path, target_raw)
            if alias in handles:
                raise ConfigError(f"{path}: {alias!r} is also a model_name in model_list")
            if alias in direct and direct[alias] != target:
                raise ConfigError(f"{path}: {alias!r} is already an alias of {direct[alias]!r}")
            direct[alias] = target
            if is_hidden:
                hidden.add(alias)
    return resolve_aliases(direct), hidden


def resolve_aliases(direct: Mapping[str, str]) -> dict[str, str]:
    """alias -> target (possibly another alias) -> alias -> final name; ConfigError on a
    cycle (naming it)."""
    resolved: dict[str, str] = {}
    for alias in direct:
        chain = [alias]
        target = direct[alias]
        while target in direct:
            if target in chain:
                cycle = " -> ".join([*chain[chain.index(target):], target])
                raise ConfigError(f"aliases: {cycle} is a cycle")
            chain.append(target)
            target = direct[target]
        resolved[alias] = target
    return resolved


def _groups_list(reader: _Reader, path: str, raw: Any) -> tuple[str, ...]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected a list of model groups")
    names = (reader.parsed(f"{path}[{i}]", item, _name) for i, item in enumerate(items))
    return tuple(dict.fromkeys(names))


def _fallbacks(reader: _Reader, path: str, raw: Any) -> dict[str, tuple[str, ...]]:
    """LiteLLM's `[{group: [fallback, ...]}, ...]` (or lb's plain `{group: [...]}`)."""
    if raw is None:
        return {}
    entries: Sequence[tuple[str, Any, str]]
    if isinstance(raw, Mapping):
        entries = [(str(k), v, f"{path}.{k}") for k, v in raw.items()]
    elif isinstance(raw, list):
        entries = []
        for index, item in enumerate(raw):
            if not isinstance(item, Mapping) or not item:
                raise ConfigError(f"{path}[{index}]: expected {{group: [fallback groups]}}")
            entries = [*entries, *((str(k), v, f"{path}[{index}].{k}") for k, v in item.items())]
    else:
        raise ConfigError(f"{path}: expected a list of {{group: [fallback groups]}}")
    result: dict[str, tuple[str, ...]] = {}
    for group, targets, where in entries:
        chosen = tuple(t for t in _groups_list(reader, where, targets) if t != group)
        result[group] = chosen
    return result


def _settings(
    reader: _Reader, router: Mapping[str, Any], module: Mapping[str, Any]
) -> dict[str, Any]:
    """LiteLLM's router/module settings -> lb settings (name -> parsed value)."""
    settings: dict[str, Any] = {}

    def take(name: str, section: str, values: Mapping[str, Any], key: str,
             parse: Callable[[Any], Any]) -> None:
        if values.get(key) is not None:
            settings[name] = reader.parsed(f"{section}.{key}", values[key], parse)

    # litellm_settings first: router_settings override them.
    take("max_retries", "litellm_settings", module, "num_retries", _int(0))
    take("request_timeout", "litellm_settings", module, "request_timeout", _positive(_seconds))
    take("routing_strategy", "router_settings", router, "routing_strategy", _strategy)
    take("max_retries", "router_settings", router, "num_retries", _int(0))
    take("request_timeout", "router_settings", router, "timeout", _positive(_seconds))
    take("stream_idle_timeout", "router_settings", router, "stream_timeout", _positive(_seconds))
    # LiteLLM cools a deployment down when its failures exceed allowed_fails; lb's breaker
    # opens at `threshold` consecutive failures, so allowed_fails + 1.
    take("breaker_threshold", "router_settings", router, "allowed_fails", lambda v: _int(0)(v) + 1)
    take("breaker_ttl", "router_settings", router, "cooldown_time", _seconds)
    if router.get("disable_cooldowns") is not None and reader.parsed(
        "router_settings.disable_cooldowns", router["disable_cooldowns"], _bool
    ):
        settings["breaker_threshold"] = 0
    _redis(reader, router, settings)
    if module.get("json_logs") is not None:
        json_logs = reader.parsed("litellm_settings.json_logs", module["json_logs"], _bool)
        settings["log_format"] = "json" if json_logs else "text"
    if module.get("set_verbose") is not None and reader.parsed(
        "litellm_settings.set_verbose", module["set_verbose"], _bool
    ):
        settings["log_level"] = "debug"
    for key in ("callbacks", "success_callback", "failure_callback"):
        if module.get(key) is None:
            continue
        names = module[key] if isinstance(module[key], list) else [module[key]]
        for name in names:
            if str(name) in _BUILTIN_CALLBACKS:
                settings["metrics"] = True
                settings["litellm_metrics"] = True
            else:
                reader.warn(f"litellm_settings.{key}: {name!r} is not supported; ignored")
    return settings


def _redis(reader: _Reader, router: Mapping[str, Any], settings: dict[str, Any]) -> None:
    """LiteLLM's router Redis (shared usage between proxies) is lb's fleet Redis."""
    def text(key: str) -> str | None:
        raw = router.get(key)
        return None if raw is None else str(reader.value(f"router_settings.{key}", raw))

    url, host, port, password = (text(k) for k in
                                 ("redis_url", "redis_host", "redis_port", "redis_password"))
    if url:
        settings["redis_url"] = url
    elif host and password:
        port_number = reader.parsed("router_settings.redis_port", port or 6379, _int(1))
        settings["redis_url"] = f"redis://:{quote(password, safe='')}@{host}:{port_number}/0"
    elif host:
        settings["redis_host"] = host
        if port:
            settings["redis_port"] = reader.parsed("router_settings.redis_port", port, _int(1))


def _wildcard_match(pattern: str, name: str) -> bool:
    head, _, tail = pattern.partition("*")
    return len(name) >= len(head) + len(tail) and name.startswith(head) and name.endswith(tail)
