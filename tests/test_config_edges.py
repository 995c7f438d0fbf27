"""Settings rules the mutation audit found unpinned: boundaries, URL forms, sources, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError
from test_config import SECRET, config_error, creds, isolated, write

from bridge import config
from bridge.commands import CommandError
from bridge.config import Settings, load_settings, parse_subscribe

__all__ = ["creds", "isolated"]  # the fixtures of test_config, used here too


@pytest.mark.usefixtures("creds")
def test_default_max_lag_is_a_quarter_second() -> None:
    assert load_settings().max_lag == 0.25


@pytest.mark.usefixtures("creds")
@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("BRIDGE_HTTP_PORT", "0"),  # 0 disables the HTTP server
        ("BRIDGE_HTTP_PORT", "65535"),
        ("BRIDGE_LIVENESS_TIMEOUT", "0.5"),
        ("BRIDGE_MAX_LAG", "0.001"),
        ("REDIS_URL", "redis://redis:6379"),
        ("REDIS_URL", "redis://redis:6379/"),
        ("REDIS_URL", "rediss://u:p@redis:6380/15"),
        ("REDIS_URL", "unix:///run/redis/redis.sock"),
        ("REDIS_URL", "unix:///run/redis/redis.sock?db=2"),
    ],
)
def test_boundary_and_common_values_are_accepted(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str
) -> None:
    monkeypatch.setenv(env, value)
    load_settings()


@pytest.mark.usefixtures("creds")
def test_max_wait_equal_to_base_wait_is_a_constant_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_BASE_WAIT", "5")
    monkeypatch.setenv("BRIDGE_MAX_WAIT", "5")
    settings = load_settings()
    assert (settings.base_wait, settings.max_wait) == (5.0, 5.0)


def test_subscribe_takes_up_to_3000_tokens() -> None:
    assert len(parse_subscribe(list(range(1, 3001)))) == 3000
    with pytest.raises(CommandError, match="3001 tokens, above Kite's limit of 3000"):
        parse_subscribe(list(range(1, 3002)))


def test_subscribe_of_another_shape_is_refused() -> None:
    for value in (256265, 2.5, None, True):
        with pytest.raises(CommandError, match="expected a string such as"):
            parse_subscribe(value)


@pytest.mark.usefixtures("creds")
def test_toml_subscribe_as_a_bare_number_is_an_error_not_an_empty_set(isolated: Path) -> None:
    write(isolated / "config/bridge.toml", "subscribe = 256265\n")
    message = config_error()
    assert message.startswith("subscribe (config/bridge.toml): expected a string such as")


@pytest.mark.usefixtures("creds")
def test_near_miss_bridge_variables_in_dotenv_are_errors(isolated: Path) -> None:
    write(isolated / ".env", "BRIDGE_MAX_RETRY=3\n")
    assert config_error() == "BRIDGE_MAX_RETRY: unknown setting; did you mean BRIDGE_MAX_RETRIES?"


@pytest.mark.usefixtures("creds")
def test_an_unreadable_dotenv_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, isolated: Path
) -> None:
    write(isolated / ".env", "BRIDGE_NAMESPACE=x\n")

    def unreadable(path: Path) -> dict[str, str | None]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(config, "dotenv_values", unreadable)
    assert config_error().startswith(".env (working directory): cannot read it:")


@pytest.mark.parametrize("field", ["kite_access_token", "kite_enctoken"])
def test_a_secret_of_the_wrong_type_never_appears_in_errors(isolated: Path, field: str) -> None:
    write(isolated / "config/bridge.toml", f'{field} = ["{SECRET}"]\n')
    assert config_error().startswith(f"{field} (config/bridge.toml): input should be")


@pytest.mark.usefixtures("creds")
def test_an_error_names_the_env_var_when_the_env_overrides_the_toml(
    monkeypatch: pytest.MonkeyPatch, isolated: Path
) -> None:
    write(isolated / "config/bridge.toml", "max_retries = 5\n")
    monkeypatch.setenv("BRIDGE_MAX_RETRIES", "abc")
    assert config_error().startswith("BRIDGE_MAX_RETRIES: input should be a valid integer")


def test_load_settings_leaves_no_toml_or_credential_rule_behind(isolated: Path) -> None:
    toml = write(isolated / "elsewhere/bridge.toml", 'namespace = "fromtoml"\n')
    assert load_settings(toml, require_credentials=False).namespace == "fromtoml"
    # Built directly afterwards: no TOML named, and the credential rules apply again.
    with pytest.raises(ValidationError, match="no credentials"):
        Settings()
    assert Settings(kite_enctoken=SecretStr(SECRET), kite_user_id="AB1234").namespace == "kite"
