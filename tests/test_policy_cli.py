"""`lb keys` against a running `lb serve`, and spend surviving kill -9: real processes."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
from test_cli import ENV, LB, free_port

MASTER = "sk-master-cli"
MODEL = "cli-model"


@contextmanager
def process(*args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """A `lb ...` subprocess that prints where it listens; killed (SIGKILL) at the end."""
    proc = subprocess.Popen([*LB, *args], env={**ENV, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on http://" in line, line + (proc.stderr.read() if proc.stderr else "")
        yield line.split("listening on ")[1].strip()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def keys(url: str, *args: str, master: str = MASTER) -> Any:
    done = subprocess.run([*LB, "keys", "--url", url, *args], capture_output=True, text=True,
                          env={**ENV, "LB_MASTER_KEY": master}, timeout=30)
    if done.returncode != 0:
        return done
    return json.loads(done.stdout)


def chat(url: str, key: str) -> Any:
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    return sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello there"}]
    )


def test_keys_cli_and_spend_survive_kill_9(tmp_path: Path) -> None:
    with process("mock", "--port", "0", "--model", MODEL, "--tokens", "5") as node:
        config = tmp_path / "lb.yaml"
        # A LiteLLM-style config's master key turns keys on.
        config.write_text(
            f"nodes:\n  - url: {node}\n    labels: {{price_in: '0.001', price_out: '0.002'}}\n"
            f"general_settings:\n  master_key: {MASTER}\n"
        )
        env = {"LB_DATA_DIR": str(tmp_path / "data")}
        port = str(free_port())
        serve = ("serve", "--host", "127.0.0.1", "--port", port, "--config", str(config))
        with process(*serve, env=env) as url:
            created = keys(url, "create", "--alias", "ci", "--rpm", "100", "--models", MODEL)
            key = created["key"]
            assert created["rpm_limit"] == 100 and created["models"] == [MODEL]
            listed = keys(url, "list")["keys"]
            assert [k["key_alias"] for k in listed] == ["ci"]
            assert key not in json.dumps(listed)
            spent = 0.0
            for _ in range(3):
                usage = chat(url, key).usage
                spent += usage.prompt_tokens * 0.001 + usage.completion_tokens * 0.002
            time.sleep(1.6)  # the spend is flushed every second
            assert keys(url, "info", "ci")["info"]["spend"] == pytest.approx(spent)
            wrong = keys(url, "list", master="sk-not-it")
            assert wrong.returncode == 1 and "401" in wrong.stderr
        # the process above was killed with SIGKILL: no shutdown, no last flush
        with process(*serve, env=env) as url:
            assert keys(url, "info", "ci")["info"]["spend"] == pytest.approx(spent)
            chat(url, key)
            assert keys(url, "revoke", "ci")["deleted_keys"] == [created["token"]]
            with pytest.raises(openai.AuthenticationError):
                chat(url, key)
            missing = keys(url, "info", "ci")
            assert missing.returncode == 1 and "404" in missing.stderr
        assert (tmp_path / "data" / "lb.sqlite3").exists()
        assert key.encode() not in (tmp_path / "data" / "lb.sqlite3").read_bytes()


def test_keys_cli_needs_the_master_key() -> None:
    done = subprocess.run([*LB, "keys", "list"], capture_output=True, text=True,
                          env={k: v for k, v in ENV.items()
                               if k not in ("LB_MASTER_KEY", "LITELLM_MASTER_KEY")})
    assert done.returncode == 2 and "master key" in done.stderr
