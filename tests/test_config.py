"""Settings: layering, parsing and the messages bad values get."""

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.config import SETTINGS, ConfigError, NodeConfig, Settings, load_settings, node_url

README = Path(__file__).resolve().parent.parent / "README.md"


def test_defaults() -> None:
    settings = load_settings(env={})
    assert settings == Settings()
    assert settings.port == 8000
    assert settings.sentinels == frozenset({"auto", "default"})


def test_layers_yaml_then_env_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "lb.yaml"
    config.write_text("port: 7000\nmax_retries: 5\nrouting_strategy: round_robin\n")
    settings = load_settings(
        config_file=config,
        env={"LOAD_BALANCER_PORT": "7100", "MAX_RETRIES": "4"},
        flags={"port": "7200"},
    )
    assert settings.port == 7200  # flag beats env beats YAML
    assert settings.max_retries == 4  # env beats YAML
    assert settings.routing_strategy == "ROUND_ROBIN"  # YAML, case-insensitive


def test_nodes_from_env_yaml_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "lb.yaml"
    config.write_text(
        "nodes:\n  - localhost:1234\n  - url: http://gpu:8000/v1\n    maxconn: 4\n"
        "    weight: 2\n    labels: {rack: a}\n"
    )
    settings = load_settings(config_file=config, env={})
    assert settings.nodes == (
        NodeConfig("http://localhost:1234"),
        NodeConfig("http://gpu:8000", maxconn=4, weight=2.0, labels={"rack": "a"}),
    )
    assert settings.maxconn_for(settings.nodes[1]) == 4
    env = load_settings(env={"LB_NODES": "a:1,b:2", "MAXCONN_MAP": "a:1=3", "DEFAULT_MAXCONN": "7"})
    assert [node.key for node in env.nodes] == ["a:1", "b:2"]
    assert [env.maxconn_for(node) for node in env.nodes] == [3, 7]
    flags = load_settings(env={"LB_NODES": "a:1"}, flags={"nodes": ["c:3"]})
    assert [node.key for node in flags.nodes] == ["c:3"]


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"LB_MAX_BODY_BYTES": "lots"}, "LB_MAX_BODY_BYTES='lots'"),
        ({"LOAD_BALANCER_PORT": "70000"}, "LOAD_BALANCER_PORT='70000'"),
        ({"ROUTING_STRATEGY": "fastest"}, "ROUTING_STRATEGY='fastest'"),
        ({"LB_NODES": "ftp://x:1"}, "LB_NODES='ftp://x:1'"),
        ({"LB_NODES": "http://x:notaport"}, "LB_NODES='http://x:notaport'"),
        ({"LB_NODES": "a:1,a:1"}, "listed twice"),
        ({"MAXCONN_MAP": "a:1"}, "MAXCONN_MAP='a:1'"),
        ({"REQUEST_TIMEOUT_SECS": "-1"}, "REQUEST_TIMEOUT_SECS='-1'"),
        ({"LB_DRAIN_SECS": "nan"}, "LB_DRAIN_SECS='nan'"),
    ],
)
def test_bad_environment_values_name_the_setting(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        load_settings(env=env)


def test_bad_yaml(tmp_path: Path) -> None:
    config = tmp_path / "lb.yaml"
    config.write_text("prot: 8000\n")
    with pytest.raises(ConfigError, match="unknown setting 'prot'"):
        load_settings(config_file=config, env={})
    config.write_text("port: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(config_file=config, env={})
    config.write_text("- port\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_settings(config_file=config, env={})
    with pytest.raises(ConfigError, match="No such file"):
        load_settings(config_file=tmp_path / "missing.yaml", env={})


@given(st.integers(min_value=0, max_value=2**40))
def test_whole_numbers_round_trip(number: int) -> None:
    assert load_settings(env={"LB_MAX_BODY_BYTES": str(number or 1)}).max_body_bytes == (
        number or 1
    )


@given(st.text(max_size=30))
def test_any_text_either_parses_or_names_the_setting(text: str) -> None:
    for name in ("LB_MAX_BODY_BYTES", "REQUEST_TIMEOUT_SECS", "LB_NODES", "MAXCONN_MAP",
                 "ROUTING_STRATEGY", "LOAD_BALANCER_PORT"):
        try:
            load_settings(env={name: text})
        except ConfigError as exc:
            assert name in str(exc)


@given(
    st.sampled_from(["http", "https"]),
    st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True),
    st.integers(min_value=1, max_value=65535),
    st.sampled_from(["", "/", "/v1", "/v1/", "/api", "/api/v1"]),
)
def test_node_url_normalises(scheme: str, host: str, port: int, path: str) -> None:
    url = node_url(f"{scheme}://{host}:{port}{path}")
    assert url.startswith(f"{scheme}://{host}:{port}")
    assert not url.endswith("/") and not url.endswith("/v1")
    assert node_url(url) == url  # idempotent
    assert NodeConfig(url).key == f"{host}:{port}"


def test_readme_documents_every_setting() -> None:
    text = README.read_text()
    for setting in SETTINGS:
        assert f"`{setting.name}`" in text, setting.name
        if setting.env:
            assert f"`{setting.env}`" in text, setting.env


def test_strategy_settings_take_aliases_and_lists() -> None:
    settings = load_settings(env={"ROUTING_STRATEGY": "latency-based-routing"})
    assert settings.routing_strategy == "LATENCY_OPTIMIZED"
    assert "COST_OPTIMIZED" in settings.allowed_strategies  # default: every strategy
    settings = load_settings(env={"ALLOWED_STRATEGIES": "p2c, Simple-Shuffle,weighted"})
    assert settings.allowed_strategies == ("P2C", "RANDOM")
    assert load_settings(env={"ALLOWED_STRATEGIES": "*"}).allowed_strategies == (
        load_settings().allowed_strategies
    )
    with pytest.raises(ConfigError, match="ALLOWED_STRATEGIES='p2c,fastest'"):
        load_settings(env={"ALLOWED_STRATEGIES": "p2c,fastest"})
