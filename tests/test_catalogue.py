"""The model catalogue: LiteLLM config files read into lb's terms (lb.catalogue)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from lb.catalogue import Catalogue, Deployment, parse_catalogue, resolve_aliases
from lb.config import ConfigError, Settings, load_settings

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HOMELAB = FIXTURES / "homelab-litellm.yaml"
AILB = FIXTURES / "ailb-litellm.yaml"
HOMELAB_ENV = {
    "MLX_API_KEY": "mlx-key",
    "OPTILLM_API_BASE": "http://192.168.1.72:4020/v1",
    "OPTILLM_API_KEY": "optillm-key",
    "LITELLM_MASTER_KEY": "sk-homelab",
}
AILB_ENV = {"OPENAI_API_KEY": "sk-openai", "ANTHROPIC_API_KEY": "sk-ant"}


def parse(doc: dict[str, Any], env: dict[str, str] | None = None) -> Catalogue:
    return parse_catalogue(doc, env or {})


def deployment(handle: str, model: str, **fields: Any) -> dict[str, Any]:
    return {"model_name": handle, "litellm_params": {"model": model, **fields}}


def test_homelab_config_parses_to_exactly_its_deployments() -> None:
    catalogue = parse_catalogue(yaml.safe_load(HOMELAB.read_text()), HOMELAB_ENV)
    mlx: dict[str, Any] = {
        "provider": "openai", "api_base": "http://192.168.1.72:8100/v1",
        "url": "http://192.168.1.72:8100", "api_key": "mlx-key", "litellm_provider": "openai",
        "labels": {"provider": "openai"}, "max_output_tokens": 65536,
    }
    expected = [
        Deployment(handle="main", model="mlx-gpt-oss-20b-mxfp4-q4", max_input_tokens=131072,
                   source="model_list[0]", **mlx),
        Deployment(handle="deep", model="mlx-gpt-oss-120b-mxfp4-q4", max_input_tokens=131072,
                   source="model_list[1]", **mlx),
        Deployment(handle="fast", model="mlx-qwen3-4b-q4-instruct", max_input_tokens=32768,
                   source="model_list[2]", **mlx),
        Deployment(handle="swap", model="mlx-qwen3-30b-a3b-q4-instruct", max_input_tokens=65536,
                   source="model_list[3]", **mlx),
        Deployment(handle="boost", model="mlx-gpt-oss-120b-mxfp4-q4", provider="openai",
                   api_base="http://192.168.1.72:4020/v1", url="http://192.168.1.72:4020",
                   api_key="optillm-key", litellm_provider="openai",
                   labels={"provider": "openai"}, source="model_list[4]"),
        Deployment(handle="mlx-*", model="mlx-*", source="model_list[5]",
                   **{**mlx, "max_output_tokens": None}),
    ]
    # Ids are generated (no model_info.id): stable, distinct, compared apart.
    assert [attrs_without_id(d) for d in catalogue.deployments] == [
        attrs_without_id(d) for d in expected
    ]
    ids = [d.id for d in catalogue.deployments]
    assert len(set(ids)) == len(ids)
    assert ids == [d.id for d in parse_catalogue(yaml.safe_load(HOMELAB.read_text()),
                                                 HOMELAB_ENV).deployments]
    assert catalogue.handles == ("main", "deep", "fast", "swap", "boost", "mlx-*")
    assert catalogue.aliases == {}
    assert catalogue.fallbacks == {"deep": ("main",), "swap": ("main",), "main": ("fast",)}
    assert catalogue.context_window_fallbacks == {"fast": ("main",)}
    assert catalogue.drop_params is False
    assert catalogue.master_key == "sk-homelab"
    assert dict(catalogue.settings) == {
        "routing_strategy": "RANDOM",  # simple-shuffle
        "max_retries": 2,
        "request_timeout": 600.0,
        "breaker_threshold": 4,  # allowed_fails 3: cooled down at the 4th failure
        "breaker_ttl": 30.0,
        "log_format": "text",  # json_logs: false
        "metrics": True,  # callbacks: [prometheus]
        "litellm_metrics": True,
    }
    assert catalogue.warnings == ()
    # The handles, not the canonical mlx-* route, are what /v1/models lists.
    assert catalogue.listed() == ("main", "deep", "fast", "swap", "boost")
    assert catalogue.limited == {"main", "deep", "fast", "swap"}
    assert catalogue.group_for("mlx-gemma3-27b-q4") == "mlx-*"
    assert catalogue.groups["mlx-*"][0].model_for("mlx-gemma3-27b-q4") == "mlx-gemma3-27b-q4"
    assert catalogue.group_for("gpt-4") is None


def attrs_without_id(d: Deployment) -> tuple[Any, ...]:
    return (d.handle, d.provider, d.model, d.api_base, d.url, d.api_key, d.rpm, d.tpm, d.timeout,
            d.stream_timeout, d.weight, d.order, d.maxconn, d.mode, d.max_input_tokens,
            d.max_output_tokens, d.input_cost_per_token, d.output_cost_per_token,
            dict(d.labels), dict(d.params), d.litellm_provider, d.source)


def test_multi_provider_config_parses() -> None:
    catalogue = parse_catalogue(yaml.safe_load(AILB.read_text()), AILB_ENV)
    by_id = {d.source: d for d in catalogue.deployments}
    gpt4 = by_id["model_list[0]"]
    assert (gpt4.provider, gpt4.model, gpt4.url, gpt4.api_key) == (
        "openai", "gpt-4", "https://api.openai.com:443", "sk-openai"
    )
    assert (gpt4.rpm, gpt4.tpm, gpt4.max_input_tokens) == (500, 300000, 8192)
    assert gpt4.labels == {"provider": "openai", "price_in": "3e-05", "price_out": "6e-05"}
    opus = by_id["model_list[3]"]
    assert (opus.provider, opus.model, opus.url, opus.api_key) == (
        "anthropic", "claude-3-opus-20240229", "https://api.anthropic.com:443", "sk-ant"
    )
    assert opus.params == {"max_tokens": 4096}  # a request default, the client's value wins
    mistral = catalogue.groups["mistral"]
    assert [(d.provider, d.litellm_provider, d.url, d.weight) for d in mistral] == [
        ("ollama", "ollama_chat", "http://ollama:11434", 2.0),
        ("ollama", "ollama", "http://ollama-2:11434", 1.0),
    ]
    assert all(d.api_key is None for d in mistral)
    assert catalogue.groups["nomic-embed-text"][0].mode == "embedding"
    assert catalogue.aliases == {"claude": "claude-3-opus", "gpt-4o": "gpt-4-turbo"}
    assert catalogue.hidden_aliases == {"gpt-4o"}
    assert catalogue.group_for("claude") == "claude-3-opus"
    assert catalogue.group_for("gpt-4o") == "gpt-4-turbo"
    assert "gpt-4o" not in catalogue.listed() and "claude" in catalogue.listed()
    assert catalogue.fallbacks == {
        "gpt-4": ("claude-3-opus", "gpt-3.5-turbo"), "claude-3-opus": ("gpt-4",)
    }
    assert catalogue.drop_params is True
    assert catalogue.master_key is None
    assert dict(catalogue.settings) == {
        "routing_strategy": "COST_OPTIMIZED", "max_retries": 3, "request_timeout": 120.0
    }
    assert catalogue.warnings == ()


def test_lb_serve_config_loads_a_litellm_file(tmp_path: Path) -> None:
    settings = load_settings(config_file=HOMELAB, env=HOMELAB_ENV)
    assert settings.catalogue is not None
    assert len(settings.catalogue.deployments) == 6
    assert (settings.routing_strategy, settings.max_retries, settings.breaker_threshold) == (
        "RANDOM", 2, 4
    )
    assert settings.nodes == ()  # discovery and --node work as before, beside the catalogue
    # lb's own keys in the same file win over LiteLLM's; the environment wins over both.
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(AILB.read_text() + "max_retries: 5\nrequest_timeout: 30\nport: 4000\n")
    settings = load_settings(config_file=mixed, env={**AILB_ENV, "REQUEST_TIMEOUT_SECS": "9"})
    assert (settings.max_retries, settings.request_timeout, settings.port) == (5, 9.0, 4000)
    assert settings.routing_strategy == "COST_OPTIMIZED"
    # A plain lb file has no catalogue, as before.
    plain = tmp_path / "lb.yaml"
    plain.write_text("port: 7000\n")
    assert load_settings(config_file=plain, env={}).catalogue is None
    assert Settings().catalogue is None


def test_a_missing_environment_variable_is_named(tmp_path: Path) -> None:
    env = {k: v for k, v in HOMELAB_ENV.items() if k != "MLX_API_KEY"}
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=HOMELAB, env=env)
    message = str(info.value)
    assert str(HOMELAB) in message
    assert "model_list[0].litellm_params.api_key" in message
    assert "MLX_API_KEY" in message


def test_environment_variables_section_fills_in_the_environment() -> None:
    doc = {
        "model_list": [deployment("main", "openai/m", api_base="http://box:1234/v1",
                                  api_key="os.environ/BOX_KEY")],
        "environment_variables": {"BOX_KEY": "from-file", "REDIS_HOST": "redis-box"},
    }
    assert parse(doc).deployments[0].api_key == "from-file"
    assert parse(doc, {"BOX_KEY": "from-env"}).deployments[0].api_key == "from-env"


def test_environment_variables_reach_lb_settings(tmp_path: Path) -> None:
    config = tmp_path / "litellm.yaml"
    config.write_text(yaml.safe_dump({
        "model_list": [deployment("main", "openai/m", api_base="http://box:1234/v1")],
        "environment_variables": {"REDIS_HOST": "redis-box", "MAX_RETRIES": "7"},
    }))
    settings = load_settings(config_file=config, env={"MAX_RETRIES": "1"})
    assert settings.redis_host == "redis-box"
    assert settings.max_retries == 1  # the real environment wins


def test_every_unsupported_key_is_warned_once_and_named() -> None:
    doc = {
        "model_list": [
            {**deployment("a", "openai/x", api_base="http://h:1/v1", temperature=0.2,
                          max_retries=4, vertex_project="p"),
             "model_info": {"supports_vision": True, "base_model": "gpt-4"}},
            {**deployment("b", "openai/y", api_base="http://h:1/v1", max_retries=1),
             "model_info": {"supports_vision": True}},
        ],
        "router_settings": {"retry_policy": {"RateLimitErrorRetries": 3}, "num_retries": 1,
                            "enable_pre_call_checks": True},
        "litellm_settings": {"cache": True, "callbacks": ["prometheus", "langfuse"],
                             "success_callback": ["s3"]},
        "general_settings": {"database_url": "postgresql://x", "alerting": ["slack"]},
        "guardrails": [{"guardrail_name": "g"}],
        "include": ["other.yaml"],
    }
    warnings = parse_catalogue(doc, {}, own_keys=("port",)).warnings
    assert sorted(warnings) == sorted([
        "model_list[].litellm_params.max_retries (in a, b) is not supported; ignored",
        "model_list[].litellm_params.vertex_project (in a) is not supported; ignored",
        "model_list[].model_info.supports_vision (in a, b) is not supported; ignored",
        "model_list[].model_info.base_model (in a) is not supported; ignored",
        "router_settings.retry_policy is not supported; ignored",
        "litellm_settings.cache is not supported; ignored",
        "litellm_settings.callbacks: 'langfuse' is not supported; ignored",
        "litellm_settings.success_callback: 's3' is not supported; ignored",
        "general_settings.database_url is not supported; ignored",
        "general_settings.alerting is not supported; ignored",
        "guardrails is not supported; ignored",
        "include is not supported; ignored",
    ])
    assert len(set(warnings)) == len(warnings)


def test_the_warnings_are_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from lb.catalogue import log_warnings

    catalogue = parse({"litellm_settings": {"cache": True}})
    log_warnings(catalogue)
    assert [r.getMessage() for r in caplog.records] == [
        "config: litellm_settings.cache is not supported; ignored"
    ]


def test_an_unknown_key_in_an_lb_file_is_still_a_mistake(tmp_path: Path) -> None:
    config = tmp_path / "lb.yaml"
    config.write_text("aliases: {main: qwen3-8b}\nrouting_stratgy: p2c\n")
    with pytest.raises(ConfigError, match="unknown setting 'routing_stratgy'"):
        load_settings(config_file=config, env={})


@pytest.mark.parametrize(
    ("doc", "named"),
    [
        ({"model_list": [deployment("a", "openai/x"), deployment("b", "openai/y"),
                         deployment("c", "openai/z", rpm="lots")]},
         "model_list[2].litellm_params.rpm='lots': expected a whole number"),
        ({"model_list": [deployment("a", "openai/x", weight=-1)]},
         "model_list[0].litellm_params.weight=-1"),
        ({"model_list": [deployment("a", "openai/x", timeout=0)]},
         "model_list[0].litellm_params.timeout=0"),
        ({"model_list": [deployment("a", "openai/x", order=0)]},
         "model_list[0].litellm_params.order=0: must be at least 1"),
        ({"model_list": [{**deployment("a", "openai/x"),
                          "model_info": {"max_input_tokens": "big"}}]},
         "model_list[0].model_info.max_input_tokens='big'"),
        ({"model_list": [{**deployment("a", "openai/x"),
                          "model_info": {"input_cost_per_token": -1}}]},
         "model_list[0].model_info.input_cost_per_token=-1"),
        ({"model_list": [deployment("a", "azure/gpt-4", api_base="https://x.azure.com")]},
         "model_list[0].litellm_params.model='azure/gpt-4': provider 'azure' is not supported"),
        ({"model_list": [deployment("a", "mistral-7b")]},
         "model_list[0].litellm_params.model='mistral-7b': no provider; write openai/mistral-7b"),
        ({"model_list": [deployment("a", "hosted_vllm/m")]},
         "model_list[0].litellm_params.api_base: hosted_vllm/ needs an api_base"),
        ({"model_list": [deployment("a", "openai/x", api_base="ftp://x/v1")]},
         "model_list[0].litellm_params.api_base='ftp://x/v1': URL scheme must be http or https"),
        ({"model_list": [deployment("a", "openai/x", api_key="os.environ/NOPE")]},
         "model_list[0].litellm_params.api_key: environment variable NOPE (os.environ/NOPE)"),
        ({"model_list": [{"litellm_params": {"model": "openai/x"}}]},
         "model_list[0]: a deployment needs a model_name"),
        ({"model_list": [{"model_name": "a"}]},
         "model_list[0].litellm_params: a deployment needs a model"),
        ({"model_list": "gpt-4"}, "model_list: expected a list of deployments"),
        ({"model_list": [{**deployment("a", "openai/x"), "model_info": {"id": "d1"}},
                         {**deployment("b", "openai/y"), "model_info": {"id": "d1"}}]},
         "model_list[1].model_info.id: 'd1' is used twice"),
        ({"router_settings": {"num_retries": -1}},
         "router_settings.num_retries=-1: must be at least 0"),
        ({"router_settings": {"routing_strategy": "fastest-please"}},
         "router_settings.routing_strategy='fastest-please': expected one of"),
        ({"litellm_settings": {"drop_params": "sometimes"}},
         "litellm_settings.drop_params='sometimes': expected true or false"),
        ({"router_settings": {"fallbacks": ["gpt-4"]}},
         "router_settings.fallbacks[0]: expected {group: [fallback groups]}"),
        ({"router_settings": {"fallbacks": [{"gpt-4": 3}]}},
         "router_settings.fallbacks[0].gpt-4: expected a list of model groups"),
        ({"router_settings": {"model_group_alias": {"a": "b", "b": "c", "c": "a"}}},
         "aliases: a -> b -> c -> a is a cycle"),
        ({"model_list": [deployment("main", "openai/x")], "aliases": {"main": "other"}},
         "aliases.main: 'main' is also a model_name in model_list"),
        ({"aliases": {"x": "a"}, "router_settings": {"model_group_alias": {"x": "b"}}},
         "aliases.x: 'x' is already an alias of 'b'"),
        ({"router_settings": "fast"}, "router_settings: expected a mapping"),
        ({"general_settings": {"master_key": "os.environ/MASTER"}},
         "general_settings.master_key: environment variable MASTER"),
    ],
)
def test_bad_values_are_refused_with_their_path(doc: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(doc)
    assert named in str(info.value)


def test_api_base_becomes_the_node_url_the_dialect_paths_go_after() -> None:
    doc = {"model_list": [
        deployment("a", "openai/m", api_base="http://box:8000/v1/"),
        deployment("b", "anthropic/claude", api_base="https://proxy.example/v1/messages"),
        deployment("c", "anthropic/claude", api_base="https://proxy.example"),
        deployment("d", "ollama/llama3", api_base="http://gpu:11434"),
        deployment("e", "ollama_chat/llama3", api_base="http://gpu:11434/v1"),
        deployment("f", "hosted_vllm/m", api_base="http://gpu/prefix/v1"),
        deployment("g", "groq/llama3-70b"),
    ]}
    catalogue = parse(doc, {"GROQ_API_KEY": "gsk"})
    assert [d.url for d in catalogue.deployments] == [
        "http://box:8000", "https://proxy.example:443", "https://proxy.example:443",
        "http://gpu:11434", "http://gpu:11434", "http://gpu:80/prefix",
        "https://api.groq.com:443/openai",
    ]
    assert catalogue.deployments[-1].api_key == "gsk"
    assert catalogue.warnings == ()


def test_an_openai_api_base_without_v1_is_warned() -> None:
    catalogue = parse({"model_list": [deployment("a", "openai/m", api_base="http://box:8000")]})
    assert catalogue.deployments[0].url == "http://box:8000"
    assert catalogue.warnings == (
        "model_list[0].litellm_params.api_base='http://box:8000' does not end in /v1: lb sends "
        "http://box:8000/v1/chat/completions (LiteLLM would send "
        "http://box:8000/chat/completions)",
    )


def test_provider_keys_from_the_environment_go_only_to_the_provider() -> None:
    env = {"OPENAI_API_KEY": "sk-openai", "OPENAI_BASE_URL": "https://gateway.example/v1",
           "ANTHROPIC_API_KEY": "sk-ant"}
    catalogue = parse({"model_list": [
        deployment("cloud", "openai/gpt-4o"),
        deployment("local", "openai/qwen", api_base="http://box:1234/v1"),
        deployment("claude", "claude-3-haiku"),  # a bare name LiteLLM knows
        deployment("pinned", "openai/gpt-4o", api_key="sk-pinned"),
    ]}, env)
    cloud, local, claude, pinned = catalogue.deployments
    assert (cloud.url, cloud.api_key) == ("https://gateway.example:443", "sk-openai")
    assert local.api_key is None  # the cloud key never goes to a box the file names
    assert (claude.provider, claude.api_key) == ("anthropic", "sk-ant")
    assert pinned.api_key == "sk-pinned"


def test_a_cloud_deployment_without_a_key_is_warned() -> None:
    catalogue = parse({"model_list": [deployment("gpt", "openai/gpt-4o")]})
    assert catalogue.warnings == (
        "model_list[0].litellm_params: no api_key and OPENAI_API_KEY is not set; "
        "api.openai.com will refuse the requests",
    )


def test_deployment_fields() -> None:
    doc = {"model_list": [
        {"model_name": "m", "rpm": 10,
         "litellm_params": {"model": "openai/x", "api_base": "http://h:1/v1", "tpm": "2000",
                            "timeout": 30, "stream_timeout": 5, "weight": 3, "order": 2,
                            "max_parallel_requests": 4, "temperature": 0.2,
                            "extra_body": {"optillm_approach": "moa"},
                            "input_cost_per_token": 1e-6},
         "model_info": {"id": "dep-1", "max_output_tokens": 512}},
        deployment("e", "openai/text-embedding-3-small", api_base="http://h:1/v1"),
        {**deployment("c", "text-completion-openai/gpt-3.5-turbo-instruct",
                      api_base="http://h:1/v1"), "model_info": {"mode": "completion"}},
        {**deployment("img", "openai/dall-e-3"), "model_info": {"mode": "image_generation"}},
    ]}
    catalogue = parse(doc, {"OPENAI_API_KEY": "k"})
    m, e, c = catalogue.deployments
    assert (m.rpm, m.tpm, m.timeout, m.stream_timeout, m.weight, m.order, m.maxconn) == (
        10, 2000, 30.0, 5.0, 3.0, 2, 4
    )
    assert (m.id, m.max_output_tokens, m.input_cost_per_token) == ("dep-1", 512, 1e-6)
    assert m.params == {"temperature": 0.2, "optillm_approach": "moa"}
    assert m.labels == {"provider": "openai", "price_in": "1e-06"}
    assert (e.mode, c.mode) == ("embedding", "completion")
    assert catalogue.warnings == (
        "model_list[3].model_info.mode='image_generation' (img): lb serves chat, completion and "
        "embedding; deployment ignored",
    )


def test_settings_mapping() -> None:
    catalogue = parse({
        "router_settings": {"routing_strategy": "usage-based-routing-v2", "timeout": 45,
                            "stream_timeout": 20, "disable_cooldowns": True,
                            "redis_host": "r", "redis_port": 6380, "redis_password": "p@ss"},
        "litellm_settings": {"num_retries": 5, "request_timeout": 99, "set_verbose": True,
                             "json_logs": True},
    })
    assert dict(catalogue.settings) == {
        "routing_strategy": "LEAST_LOADED", "max_retries": 5, "request_timeout": 45.0,
        "stream_idle_timeout": 20.0, "breaker_threshold": 0,
        "redis_url": "redis://:p%40ss@r:6380/0", "log_format": "json", "log_level": "debug",
    }
    host_only = parse({"router_settings": {"redis_host": "r", "redis_port": "6380"}})
    assert dict(host_only.settings) == {"redis_host": "r", "redis_port": 6380}


def test_fallbacks_forms_and_defaults() -> None:
    catalogue = parse({
        "litellm_settings": {"fallbacks": [{"a": ["b"]}, {"c": "d"}], "default_fallbacks": ["z"]},
        "router_settings": {"fallbacks": {"a": ["e", "a", "e"]}},
    })
    # router_settings win per group; a group never falls back to itself; no duplicates.
    assert catalogue.fallbacks == {"a": ("e",), "c": ("d",), "*": ("z",)}


def test_alias_only_and_plain_aliases() -> None:
    catalogue = parse({
        "model_list": [deployment("qwen3-8b", "openai/qwen3-8b", api_base="http://h:1/v1")],
        "aliases": {"main": "fast", "fast": "qwen3-8b", "big": "llama-70b"},
        "alias_only": True,
    })
    assert catalogue.alias_only is True
    assert catalogue.aliases == {"main": "qwen3-8b", "fast": "qwen3-8b", "big": "llama-70b"}
    assert catalogue.group_for("main") == "qwen3-8b"
    # An alias may name a model a discovered node serves: the catalogue does not serve it.
    assert catalogue.resolve("big") == "llama-70b" and catalogue.group_for("big") is None
    assert catalogue.listed() == ("qwen3-8b", "main", "fast", "big")


def test_wildcards_longest_pattern_wins() -> None:
    catalogue = parse({"model_list": [
        deployment("*", "openai/*", api_base="http://any:1/v1"),
        deployment("mlx-*", "openai/mlx-*", api_base="http://mlx:1/v1"),
        deployment("mlx-qwen-*-q4", "openai/qwen-*", api_base="http://q:1/v1"),
    ]})
    assert catalogue.group_for("gpt-4") == "*"
    assert catalogue.group_for("mlx-gemma") == "mlx-*"
    assert catalogue.group_for("mlx-qwen-8b-q4") == "mlx-qwen-*-q4"
    assert catalogue.groups["mlx-qwen-*-q4"][0].model_for("mlx-qwen-8b-q4") == "qwen-8b"
    assert catalogue.groups["*"][0].model_for("anything/at-all") == "anything/at-all"
    assert catalogue.listed() == ()


def test_group_window_is_the_largest_when_every_deployment_has_one() -> None:
    catalogue = parse({"model_list": [
        {**deployment("m", "openai/a", api_base="http://a:1/v1"),
         "model_info": {"max_input_tokens": 4096}},
        {**deployment("m", "openai/b", api_base="http://b:1/v1"),
         "model_info": {"max_input_tokens": 8192}},
        {**deployment("n", "openai/a", api_base="http://a:1/v1"),
         "model_info": {"max_input_tokens": 4096}},
        deployment("n", "openai/c", api_base="http://c:1/v1"),
    ]})
    assert catalogue.max_input_tokens("m") == 8192
    assert catalogue.max_input_tokens("n") is None  # one deployment takes any length
    assert catalogue.limited == {"m"}


def test_generated_ids_of_identical_deployments_differ() -> None:
    same = deployment("m", "openai/a", api_base="http://a:1/v1")
    ids = [d.id for d in parse({"model_list": [same, same]}).deployments]
    assert len(set(ids)) == 2


# --- alias resolution, as a property ---

names = st.sampled_from([f"n{i}" for i in range(8)])


@given(st.dictionaries(names, names, max_size=8))
def test_alias_resolution_ends_at_a_non_alias_or_finds_the_cycle(direct: dict[str, str]) -> None:
    def has_cycle() -> bool:
        for start in direct:
            seen = {start}
            name = direct[start]
            while name in direct:
                if name in seen:
                    return True
                seen.add(name)
                name = direct[name]
        return False

    if has_cycle():
        with pytest.raises(ConfigError, match="is a cycle"):
            resolve_aliases(direct)
        return
    resolved = resolve_aliases(direct)
    assert resolved.keys() == direct.keys()
    for alias, target in resolved.items():
        assert target not in direct  # every alias ends at a handle (or a served model)
        name = alias
        while name in direct:
            name = direct[name]
        assert name == target


# --- `lb serve --config` with a LiteLLM file, as a user runs it ---


def test_litellm_master_key_from_the_environment_counts_as_set() -> None:
    doc = {"model_list": [deployment("a", "openai/x", api_base="http://h:1/v1")]}
    assert parse(doc, {"LITELLM_MASTER_KEY": "sk-env"}).master_key == "sk-env"
    assert parse({"aliases": {"a": "b"}}, {"LITELLM_MASTER_KEY": "sk-env"}).master_key is None


def test_lb_serve_refuses_a_master_key_it_cannot_check_yet() -> None:
    from test_cli import run_lb

    result = run_lb("serve", "--config", str(HOMELAB), env=HOMELAB_ENV)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "lb: general_settings.master_key is set, but lb does not check client keys yet: "
        "refusing to serve without the authentication the file asks for"
    )


def test_lb_serve_runs_the_homelab_file_and_warns_once(tmp_path: Path) -> None:
    from test_cli import free_port, lb_serve

    doc = yaml.safe_load(HOMELAB.read_text())
    del doc["general_settings"]  # until client keys land (see the test above)
    doc["litellm_settings"]["cache"] = True
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(doc))
    env = {k: v for k, v in HOMELAB_ENV.items() if k != "LITELLM_MASTER_KEY"}
    env.update(SCAN_PORTS=str(free_port()), MIN_HEALTHY_NODES="0")
    with lb_serve("--config", str(config), env=env) as (process, url):
        import httpx

        assert httpx.get(f"{url}/health").status_code == 200
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    assert stderr.count("litellm_settings.cache is not supported; ignored") == 1, stderr


def test_the_readme_example_parses() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## The model catalogue (LiteLLM config)"):]
    example = section[section.index("```yaml\n") + 8: section.index("```\n", 8)]
    catalogue = parse_catalogue(
        yaml.safe_load(example), {"MLX_API_KEY": "k", "ANTHROPIC_API_KEY": "a"}
    )
    assert [d.provider for d in catalogue.groups["main"]] == ["openai", "ollama"]
    assert catalogue.aliases == {"gpt-4o": "main", "sonnet": "claude", "deep": "main"}
    assert catalogue.listed() == ("main", "claude", "gpt-4o", "deep")
    assert catalogue.warnings == ()
