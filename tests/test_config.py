"""Settings (CONTRACT §1): sources and their order, validation, one-line errors, no secrets."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest
from pydantic import SecretStr

from bridge.config import ENV_NAMES, ConfigError, Settings, load_settings, parse_subscribe

ROOT = Path(__file__).resolve().parents[1]
SECRET = "Zq8SecretToken0xDEADBEEF"


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No bridge variables from the developer's environment, and an empty working directory."""
    for name in list(os.environ):
        if name.upper().startswith(("KITE_", "BRIDGE_")) or name.upper() == "REDIS_URL":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KITE_ENCTOKEN", SECRET)
    monkeypatch.setenv("KITE_USER_ID", "AB1234")


def config_error(config_file: str | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file)
    message = str(caught.value)
    assert "\n" not in message
    assert SECRET not in message
    return message


@pytest.mark.usefixtures("creds")
def test_defaults() -> None:
    settings = load_settings()
    assert settings.kite_api_key == "kitefront"
    assert settings.kite_access_token is None
    assert settings.kite_user_id == "AB1234"
    assert isinstance(settings.kite_enctoken, SecretStr)
    assert settings.kite_enctoken.get_secret_value() == SECRET
    assert settings.kite_ws_url is None
    assert settings.redis_url == "redis://localhost:6379/0"
    assert settings.namespace == "kite"
    assert settings.default_mode == "quote"
    assert settings.subscribe == {}
    assert (settings.max_retries, settings.base_wait, settings.max_wait) == (50, 2.0, 60.0)
    assert (settings.log_level, settings.log_format) == ("info", "auto")
    assert settings.http_port == 9100
    assert settings.http_host == "0.0.0.0"
    assert settings.liveness_timeout == 5.0
    assert settings.config_file is None


def test_env_names() -> None:
    assert ENV_NAMES == {
        "kite_api_key": "KITE_API_KEY",
        "kite_access_token": "KITE_ACCESS_TOKEN",
        "kite_user_id": "KITE_USER_ID",
        "kite_enctoken": "KITE_ENCTOKEN",
        "kite_access_token_file": "KITE_ACCESS_TOKEN_FILE",
        "kite_enctoken_file": "KITE_ENCTOKEN_FILE",
        "kite_ws_url": "KITE_WS_URL",
        "redis_url": "REDIS_URL",
        "namespace": "BRIDGE_NAMESPACE",
        "default_mode": "BRIDGE_DEFAULT_MODE",
        "subscribe": "BRIDGE_SUBSCRIBE",
        "max_retries": "BRIDGE_MAX_RETRIES",
        "base_wait": "BRIDGE_BASE_WAIT",
        "max_wait": "BRIDGE_MAX_WAIT",
        "log_level": "BRIDGE_LOG_LEVEL",
        "log_format": "BRIDGE_LOG_FORMAT",
        "http_port": "BRIDGE_HTTP_PORT",
        "http_host": "BRIDGE_HTTP_HOST",
        "liveness_timeout": "BRIDGE_LIVENESS_TIMEOUT",
        "max_lag": "BRIDGE_MAX_LAG",
    }


@pytest.mark.usefixtures("creds")
@pytest.mark.parametrize(
    ("env", "value", "field", "expected"),
    [
        ("KITE_WS_URL", "ws://127.0.0.1:8765", "kite_ws_url", "ws://127.0.0.1:8765"),
        ("REDIS_URL", "rediss://u:p@h:6380/1", "redis_url", "rediss://u:p@h:6380/1"),
        ("BRIDGE_NAMESPACE", "acct2", "namespace", "acct2"),
        ("BRIDGE_DEFAULT_MODE", "FULL", "default_mode", "full"),
        ("BRIDGE_MAX_RETRIES", "7", "max_retries", 7),
        ("BRIDGE_BASE_WAIT", "0.5", "base_wait", 0.5),
        ("BRIDGE_MAX_WAIT", "9", "max_wait", 9.0),
        ("BRIDGE_LOG_LEVEL", "DEBUG", "log_level", "debug"),
        ("BRIDGE_LOG_FORMAT", "Json", "log_format", "json"),
        ("BRIDGE_HTTP_PORT", "0", "http_port", 0),
        ("BRIDGE_HTTP_HOST", "127.0.0.1", "http_host", "127.0.0.1"),
        ("BRIDGE_LIVENESS_TIMEOUT", "2.5", "liveness_timeout", 2.5),
        ("BRIDGE_MAX_LAG", "1.5", "max_lag", 1.5),
        ("bridge_namespace", "lower", "namespace", "lower"),
    ],
)
def test_each_setting_reads_its_env_var(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, field: str, expected: object
) -> None:
    monkeypatch.setenv(env, value)
    assert getattr(load_settings(), field) == expected


def test_unprefixed_names_do_not_configure_the_bridge(
    monkeypatch: pytest.MonkeyPatch, creds: None
) -> None:
    monkeypatch.setenv("NAMESPACE", "other")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    settings = load_settings()
    assert (settings.namespace, settings.log_level) == ("kite", "info")


@pytest.mark.usefixtures("creds")
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("full:256265,408065;ltp:738561", {256265: "full", 408065: "full", 738561: "ltp"}),
        ("256265, 408065", {256265: "quote", 408065: "quote"}),
        (" FULL : 1 2 ; ;ltp:3;", {1: "full", 2: "full", 3: "ltp"}),
        ("full:1;ltp:1", {1: "ltp"}),
    ],
)
def test_bridge_subscribe(monkeypatch: pytest.MonkeyPatch, value: str, expected: object) -> None:
    monkeypatch.setenv("BRIDGE_SUBSCRIBE", value)
    assert load_settings().subscribe == expected


def test_bare_subscribe_tokens_take_the_default_mode(
    monkeypatch: pytest.MonkeyPatch, creds: None
) -> None:
    monkeypatch.setenv("BRIDGE_SUBSCRIBE", "1,2")
    monkeypatch.setenv("BRIDGE_DEFAULT_MODE", "ltp")
    assert load_settings().subscribe == {1: "ltp", 2: "ltp"}


def test_parse_subscribe_shapes() -> None:
    assert parse_subscribe([1, "2"], "full") == {1: "full", 2: "full"}
    assert parse_subscribe({"full": [1, 2], "ltp": 3}) == {1: "full", 2: "full", 3: "ltp"}
    assert parse_subscribe({5: "LTP", "6": "full"}) == {5: "ltp", 6: "full"}


@pytest.mark.usefixtures("creds")
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("fulll:1", "BRIDGE_SUBSCRIBE: unknown mode 'fulll'"),
        ("full:1,x", "BRIDGE_SUBSCRIBE: bad token 'x'"),
        ("full:0", "BRIDGE_SUBSCRIBE: bad token 0"),
        (",".join(map(str, range(1, 3002))), "BRIDGE_SUBSCRIBE: 3001 tokens, above Kite's limit"),
    ],
)
def test_bad_bridge_subscribe(monkeypatch: pytest.MonkeyPatch, value: str, expected: str) -> None:
    monkeypatch.setenv("BRIDGE_SUBSCRIBE", value)
    assert config_error().startswith(expected)


# -- credentials ---------------------------------------------------------------------------------


def test_no_credentials() -> None:
    assert config_error().startswith("KITE_ACCESS_TOKEN / KITE_ENCTOKEN: no credentials")


def test_blank_credentials_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KITE_ACCESS_TOKEN", "")
    monkeypatch.setenv("KITE_ENCTOKEN", "  ")
    assert "no credentials" in config_error()


def test_enctoken_needs_a_user_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KITE_ENCTOKEN", SECRET)
    assert config_error() == "KITE_USER_ID: required with KITE_ENCTOKEN"


def test_access_token_needs_a_real_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KITE_ACCESS_TOKEN", SECRET)
    assert config_error().startswith("KITE_API_KEY: an access token needs your Kite Connect")
    monkeypatch.setenv("KITE_API_KEY", "myapp")
    settings = load_settings()
    assert settings.kite_access_token is not None
    assert settings.kite_access_token.get_secret_value() == SECRET
    assert SECRET not in repr(settings)


# -- validation messages -------------------------------------------------------------------------


@pytest.mark.usefixtures("creds")
@pytest.mark.parametrize(
    ("env", "value", "expected"),
    [
        (
            "BRIDGE_MAX_RETRIES",
            "abc",
            "BRIDGE_MAX_RETRIES: input should be a valid integer, got 'abc'",
        ),
        (
            "BRIDGE_MAX_RETRIES",
            "-1",
            "BRIDGE_MAX_RETRIES: input should be greater than or equal to 0",
        ),
        ("BRIDGE_BASE_WAIT", "0", "BRIDGE_BASE_WAIT: input should be greater than 0, got '0'"),
        ("BRIDGE_MAX_LAG", "-1", "BRIDGE_MAX_LAG: input should be greater than 0, got '-1'"),
        ("BRIDGE_MAX_WAIT", "1", "BRIDGE_MAX_WAIT: must be at least BRIDGE_BASE_WAIT"),
        (
            "BRIDGE_HTTP_PORT",
            "65536",
            "BRIDGE_HTTP_PORT: input should be less than or equal to 65535",
        ),
        ("BRIDGE_NAMESPACE", "a b", "BRIDGE_NAMESPACE: must be non-empty and contain no spaces"),
        ("BRIDGE_DEFAULT_MODE", "all", "BRIDGE_DEFAULT_MODE: unknown mode 'all'"),
        ("BRIDGE_LOG_LEVEL", "loud", "BRIDGE_LOG_LEVEL: expected one of debug, info, warning"),
        (
            "BRIDGE_LOG_FORMAT",
            "xml",
            "BRIDGE_LOG_FORMAT: input should be 'auto', 'json' or 'console'",
        ),
        ("KITE_WS_URL", "http://x", "KITE_WS_URL: expected a URL starting with ws://, wss://"),
        # The feed's own URL rules, checked now rather than when `bridge run` connects.
        ("KITE_WS_URL", "ws://127.0.0.1:99999", "KITE_WS_URL: port out of range 0-65535"),
        ("KITE_WS_URL", "ws://h/?x=1", "KITE_WS_URL: url must not carry a query or fragment"),
        ("KITE_WS_URL", "ws://h/#x", "KITE_WS_URL: url must not carry a query or fragment"),
        ("KITE_WS_URL", "ws://", "KITE_WS_URL: url is not a websocket URL"),
        ("KITE_API_KEY", " ", "KITE_API_KEY: must be non-empty"),
        (
            "BRIDGE_MAX_RETRIES",
            "99999999999999999999999999",
            "BRIDGE_MAX_RETRIES: input should be less than or equal to 1000000",
        ),
        ("BRIDGE_BASE_WAIT", "inf", "BRIDGE_BASE_WAIT: input should be a finite number"),
        ("BRIDGE_BASE_WAIT", "nan", "BRIDGE_BASE_WAIT: input should be a finite number"),
        ("BRIDGE_MAX_WAIT", "inf", "BRIDGE_MAX_WAIT: input should be a finite number"),
        ("BRIDGE_MAX_WAIT", "-inf", "BRIDGE_MAX_WAIT: input should be a finite number"),
        (
            "BRIDGE_LIVENESS_TIMEOUT",
            "inf",
            "BRIDGE_LIVENESS_TIMEOUT: input should be a finite number",
        ),
        ("BRIDGE_MAX_LAG", "NaN", "BRIDGE_MAX_LAG: input should be a finite number"),
        ("BRIDGE_HTTP_HOST", " ", "BRIDGE_HTTP_HOST: must be non-empty and contain no spaces"),
        ("BRIDGE_HTTP_HOST", "a b", "BRIDGE_HTTP_HOST: must be non-empty and contain no spaces"),
        (
            "REDIS_URL",
            "redis://127.0.0.1:6379/xyz",
            "REDIS_URL: the path must be empty or a database number such as /0",
        ),
        ("REDIS_URL", "redis://h/-1", "REDIS_URL: the path must be empty or a database number"),
        ("REDIS_URL", "redis://h/0/1", "REDIS_URL: the path must be empty or a database number"),
        ("BRIDGE_HTTP_PORT", "-1", "BRIDGE_HTTP_PORT: input should be greater than or equal to 0"),
        ("BRIDGE_LIVENESS_TIMEOUT", "0", "BRIDGE_LIVENESS_TIMEOUT: input should be greater than 0"),
    ],
)
def test_invalid_values_give_one_line_naming_the_env_var(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(env, value)
    assert config_error().startswith(expected)


def test_redis_password_never_appears_in_errors(
    monkeypatch: pytest.MonkeyPatch, creds: None
) -> None:
    monkeypatch.setenv("REDIS_URL", f"http://user:{SECRET}@host:6379")
    message = config_error()
    assert message.startswith("REDIS_URL: expected a URL starting with redis://, rediss://")
    assert "user:***@host" in message


@pytest.mark.parametrize(
    ("env", "url", "shown"),
    [
        # redis-py reads the password up to the LAST "@"; a space does not end it either.
        ("REDIS_URL", f"redis://default:p@ss{SECRET}@h:abc/0", "'redis://default:***@h:abc/0'"),
        ("REDIS_URL", f"redis://:pa ss{SECRET}@h:abc/0", "'redis://:***@h:abc/0'"),
        ("REDIS_URL", f"redis://:x@{SECRET}@h/xyz", "'redis://:***@h/xyz'"),
        # An unescaped "/" makes urllib read the password as the port, and quote it.
        ("REDIS_URL", f"redis://u:{SECRET}/x@h/0", "'redis://u:***@h/0'"),
        ("KITE_WS_URL", f"ws://u:{SECRET}/x@h", "'ws://u:***@h'"),
        ("KITE_WS_URL", f"ws://u:p@{SECRET}@h:99999", "'ws://u:***@h:99999'"),
    ],
)
def test_a_url_password_never_appears_in_errors_not_even_in_part(
    monkeypatch: pytest.MonkeyPatch, creds: None, env: str, url: str, shown: str
) -> None:
    monkeypatch.setenv(env, url)
    message = config_error()
    assert message.startswith(f"{env}: ")
    assert message.endswith(f", got {shown}")
    assert SECRET[:6] not in message


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (f"redis://:{SECRET}@host:notaport/0", "port could not be cast to integer"),
        ("redis://host:99999/0", "port out of range"),
        ("redis://host/0?socket_timeout=abc", "invalid value for 'socket_timeout'"),
    ],
)
def test_a_redis_url_redis_py_would_reject_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, creds: None, url: str, problem: str
) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    message = config_error()
    assert message.startswith("REDIS_URL: ")
    assert problem in message
    assert SECRET not in message


def test_redis_url_redacted(monkeypatch: pytest.MonkeyPatch, creds: None) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://default:{SECRET}@redis:6379/0")
    settings = load_settings()
    assert settings.redis_url_redacted == "redis://default:***@redis:6379/0"
    assert settings.redis_url.endswith(f"{SECRET}@redis:6379/0")


def test_several_errors_are_counted_on_the_one_line(
    monkeypatch: pytest.MonkeyPatch, creds: None
) -> None:
    monkeypatch.setenv("BRIDGE_MAX_RETRIES", "x")
    monkeypatch.setenv("BRIDGE_HTTP_PORT", "x")
    assert config_error().endswith("(and 1 more)")


def test_near_miss_bridge_variables_are_errors(
    monkeypatch: pytest.MonkeyPatch, creds: None
) -> None:
    monkeypatch.setenv("BRIDGE_MAX_RETRY", "3")
    assert config_error() == "BRIDGE_MAX_RETRY: unknown setting; did you mean BRIDGE_MAX_RETRIES?"
    monkeypatch.delenv("BRIDGE_MAX_RETRY")
    monkeypatch.setenv("BRIDGE_UVLOOP", "1")  # read by the service, a known variable
    assert load_settings().namespace == "kite"
    monkeypatch.setenv("BRIDGE_UVLOP", "1")
    assert config_error() == "BRIDGE_UVLOP: unknown setting; did you mean BRIDGE_UVLOOP?"


def test_unrelated_bridge_variables_are_ignored(
    monkeypatch: pytest.MonkeyPatch, creds: None
) -> None:
    monkeypatch.setenv("BRIDGE_TEST_TIME_SCALE", "3")
    assert load_settings().namespace == "kite"


# -- sources and their order ---------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.usefixtures("creds")
def test_default_toml_file_is_read_when_present(isolated: Path) -> None:
    write(isolated / "config/bridge.toml", 'namespace = "fromtoml"\nmax_retries = 3\n')
    settings = load_settings()
    assert (settings.namespace, settings.max_retries) == ("fromtoml", 3)
    assert settings.config_file == Path("config/bridge.toml")


def test_env_beats_dotenv_beats_toml_beats_defaults(
    monkeypatch: pytest.MonkeyPatch, isolated: Path
) -> None:
    write(
        isolated / "config/bridge.toml",
        'namespace = "toml"\nmax_retries = 3\nbase_wait = 0.5\nkite_enctoken = "x"\n',
    )
    write(isolated / ".env", "BRIDGE_MAX_RETRIES=4\nBRIDGE_BASE_WAIT=0.25\nKITE_USER_ID=U1\n")
    monkeypatch.setenv("BRIDGE_BASE_WAIT", "0.125")
    settings = load_settings()
    assert settings.namespace == "toml"  # TOML beats the default
    assert settings.max_retries == 4  # .env beats TOML
    assert settings.base_wait == 0.125  # environment beats .env
    assert settings.http_port == 9100  # default
    assert settings.kite_user_id == "U1"


@pytest.mark.usefixtures("creds")
def test_overrides_beat_everything_and_none_means_not_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BRIDGE_LOG_LEVEL", "warning")
    assert load_settings(log_level="debug").log_level == "debug"
    assert load_settings(log_level=None).log_level == "warning"


def test_dotenv_alone_can_hold_everything(isolated: Path) -> None:
    write(
        isolated / ".env", f"KITE_ENCTOKEN={SECRET}\nKITE_USER_ID=AB1\nBRIDGE_NAMESPACE=envfile\n"
    )
    settings = load_settings()
    assert settings.namespace == "envfile"
    assert settings.kite_enctoken is not None


@pytest.mark.usefixtures("creds")
def test_bridge_config_names_the_toml_file(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    write(isolated / "config/bridge.toml", 'namespace = "default-file"\n')
    other = write(isolated / "elsewhere.toml", 'namespace = "named"\n')
    monkeypatch.setenv("BRIDGE_CONFIG", str(other))
    assert load_settings().namespace == "named"
    explicit = write(isolated / "explicit.toml", 'namespace = "explicit"\n')
    assert load_settings(explicit).namespace == "explicit"  # --config beats BRIDGE_CONFIG


@pytest.mark.usefixtures("creds")
def test_bridge_config_in_dotenv(isolated: Path) -> None:
    write(isolated / "x.toml", 'namespace = "via-dotenv"\n')
    write(isolated / ".env", "BRIDGE_CONFIG=x.toml\n")
    assert load_settings().namespace == "via-dotenv"


@pytest.mark.usefixtures("creds")
def test_a_named_config_file_that_is_missing_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_CONFIG", "nope.toml")
    assert config_error() == "BRIDGE_CONFIG: config file 'nope.toml' does not exist"
    monkeypatch.delenv("BRIDGE_CONFIG")
    # The file given to load_settings is the one `--config` names.
    assert config_error(config_file="missing.toml") == (
        "--config: config file 'missing.toml' does not exist"
    )


@pytest.mark.usefixtures("creds")
def test_a_named_config_file_that_is_a_directory_is_not_a_file(
    monkeypatch: pytest.MonkeyPatch, isolated: Path
) -> None:
    (isolated / "conf.d").mkdir()
    monkeypatch.setenv("BRIDGE_CONFIG", "conf.d")
    assert config_error() == "BRIDGE_CONFIG: config file 'conf.d' is not a file"
    assert config_error(config_file="conf.d") == "--config: config file 'conf.d' is not a file"


@pytest.mark.usefixtures("creds")
def test_a_toml_file_that_is_not_utf8_is_a_config_error(isolated: Path) -> None:
    (isolated / "bad.toml").write_bytes(b'namespace = "caf\xe9"\n')
    assert config_error(config_file="bad.toml") == (
        "--config: cannot read 'bad.toml': not UTF-8 text (byte 0xe9 at offset 16)"
    )


@pytest.mark.usefixtures("creds")
def test_a_dotenv_file_that_is_not_utf8_is_a_config_error(isolated: Path) -> None:
    (isolated / ".env").write_bytes(b"BRIDGE_NAMESPACE=\xff\n")
    assert config_error() == ".env (working directory): not UTF-8 text (byte 0xff at offset 17)"


@pytest.mark.usefixtures("creds")
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'namespce = "x"\n',
            "namespce (config/bridge.toml): unknown setting; did you mean 'namespace'?",
        ),
        (
            '[bridge]\nnamespace = "x"\n',
            "bridge (config/bridge.toml): unknown setting; settings are top-level",
        ),
        ("wibble = 1\n", "wibble (config/bridge.toml): unknown setting; see docs/configuration.md"),
        (
            'BRIDGE_NAMESPACE = "x"\n',
            "BRIDGE_NAMESPACE (config/bridge.toml): unknown setting; TOML keys are the setting"
            " names, not the variables: namespace = ...",
        ),
        (
            'KITE_API_KEY = "x"\n',
            "KITE_API_KEY (config/bridge.toml): unknown setting; TOML keys are the setting"
            " names, not the variables: kite_api_key = ...",
        ),
        ("namespace = \n", "BRIDGE_CONFIG: cannot read 'config/bridge.toml': invalid value"),
        (
            'max_retries = "abc"\n',
            "max_retries (config/bridge.toml): input should be a valid integer, got 'abc'",
        ),
        ('subscribe = {full = ["x"]}\n', "subscribe (config/bridge.toml): bad token 'x'"),
        (
            "http_port = true\n",
            "http_port (config/bridge.toml): expected a number, got True",
        ),
    ],
)
def test_toml_errors_name_the_key_and_file(isolated: Path, text: str, expected: str) -> None:
    write(isolated / "config/bridge.toml", text)
    assert config_error().lower().startswith(expected.lower())


@pytest.mark.usefixtures("creds")
def test_toml_subscribe_as_a_table(isolated: Path) -> None:
    write(isolated / "config/bridge.toml", "[subscribe]\nfull = [256265, 408065]\nltp = [738561]\n")
    assert load_settings().subscribe == {256265: "full", 408065: "full", 738561: "ltp"}


def test_an_env_value_fixing_a_bad_toml_value_is_used(
    monkeypatch: pytest.MonkeyPatch, isolated: Path, creds: None
) -> None:
    write(isolated / "config/bridge.toml", 'max_retries = "abc"\n')
    monkeypatch.setenv("BRIDGE_MAX_RETRIES", "5")
    assert load_settings().max_retries == 5


def test_secret_from_toml_never_appears_in_errors(isolated: Path) -> None:
    write(isolated / "config/bridge.toml", f'kite_access_token = "{SECRET}"\n')
    assert config_error().startswith("KITE_API_KEY: an access token needs")


def test_settings_constructed_directly_use_field_names(creds: None) -> None:
    settings = Settings(namespace="direct", kite_access_token=SecretStr("t"), kite_api_key="k")
    assert settings.namespace == "direct"
    assert settings.kite_user_id == "AB1234"  # still read from the environment


# -- the shipped example and the docs --------------------------------------------------------------


@pytest.mark.usefixtures("creds")
def test_shipped_example_is_all_defaults() -> None:
    example = ROOT / "config/bridge.toml"
    assert tomllib.loads(example.read_text()) == {}
    settings = load_settings(example)
    assert settings.config_file == example
    assert settings.model_dump(exclude={"kite_enctoken", "kite_user_id"}) == Settings(
        kite_enctoken=SecretStr("x"), kite_user_id="u"
    ).model_dump(exclude={"kite_enctoken", "kite_user_id"})


@pytest.mark.parametrize("field", sorted(ENV_NAMES))
def test_every_setting_is_documented(field: str) -> None:
    example = (ROOT / "config/bridge.toml").read_text()
    assert re.search(rf"^# {field} = ", example, re.MULTILINE), f"{field} not in bridge.toml"
    assert ENV_NAMES[field] in example
    docs = (ROOT / "docs/configuration.md").read_text()
    assert re.search(rf"\| `{ENV_NAMES[field]}` \| `{field}` \|", docs), f"{field} not in docs"


# -- secrets from files (Docker/Compose secrets) ---------------------------------------------------


def test_secret_files_replace_the_secret_variables(
    monkeypatch: pytest.MonkeyPatch, isolated: Path
) -> None:
    (isolated / "token").write_text(f"  {SECRET}\n")  # an editor's newline is not the token
    monkeypatch.setenv("KITE_USER_ID", "AB1234")
    monkeypatch.setenv("KITE_ENCTOKEN_FILE", "token")  # relative to the working directory
    settings = load_settings()
    assert settings.kite_enctoken == SecretStr(SECRET)
    assert settings.feed_credentials()["enctoken"] == SECRET
    assert settings.kite_enctoken_file == Path("token")
    assert SECRET not in repr(settings)


def test_access_token_file_from_toml(isolated: Path) -> None:
    secret = isolated / "secrets" / "kite_access_token"
    secret.parent.mkdir()
    secret.write_text(SECRET)
    (isolated / "bridge.toml").write_text(
        f'kite_api_key = "key"\nkite_access_token_file = "{secret}"\n'
    )
    settings = load_settings("bridge.toml")
    assert settings.kite_access_token == SecretStr(SECRET)


@pytest.mark.parametrize(
    ("content", "value", "expected"),
    [
        (None, None, "KITE_ENCTOKEN_FILE: cannot read missing: No such file or directory"),
        (b"", None, "KITE_ENCTOKEN_FILE: missing is empty"),
        (b" \n", None, "KITE_ENCTOKEN_FILE: missing is empty"),
        (b"\xff" + SECRET.encode(), None, "KITE_ENCTOKEN_FILE: missing: not UTF-8 text"),
        (SECRET.encode(), "other", "KITE_ENCTOKEN_FILE: KITE_ENCTOKEN is set too"),
    ],
)
def test_secret_file_errors_name_the_setting_not_the_secret(
    monkeypatch: pytest.MonkeyPatch,
    isolated: Path,
    content: bytes | None,
    value: str | None,
    expected: str,
) -> None:
    if content is not None:
        (isolated / "missing").write_bytes(content)
    monkeypatch.setenv("KITE_USER_ID", "AB1234")
    monkeypatch.setenv("KITE_ENCTOKEN_FILE", "missing")
    if value is not None:
        monkeypatch.setenv("KITE_ENCTOKEN", value)
    assert config_error().startswith(expected)


def test_a_directory_is_not_a_secret_file(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    monkeypatch.setenv("KITE_API_KEY", "key")
    monkeypatch.setenv("KITE_ACCESS_TOKEN_FILE", str(isolated))
    assert config_error() == f"KITE_ACCESS_TOKEN_FILE: cannot read {isolated}: Is a directory"
