"""Settings (CONTRACT §1): init overrides > environment > ``.env`` > TOML file > defaults.

Environment names are exact: ``KITE_*`` and ``REDIS_URL`` as the Kite and Redis ecosystems
spell them, every other setting ``BRIDGE_<FIELD>``. TOML keys are the field names, at the top
level of the file (no ``[bridge]`` table).

The environment and ``.env`` are read by a small source of our own rather than through
validation aliases: with aliases, pydantic-settings either ignores field names in the TOML file
and init kwargs, or (``validate_by_name``) also reads bare ``LOG_LEVEL``/``NAMESPACE`` from the
environment, which would let unrelated variables of a container configure the bridge.

Unknown keys in the TOML file are errors. Unknown ``BRIDGE_*`` variables are errors only when
they look like a typo of a real one (``BRIDGE_MAX_RETRY``); others are left alone, since tools
around the bridge may use the prefix too. Every error becomes one :class:`ConfigError` line
naming the setting; secret values never appear in it.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Final, Literal, TypedDict, cast
from urllib.parse import urlsplit

from dotenv import dotenv_values
from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)
from redis.connection import parse_url

from bridge.commands import MAX_TOKENS, CommandError, parse_mode, parse_token
from bridge.kite.endpoint import check_url
from bridge.kite.records import Mode
from bridge.logs import LOG_LEVELS, MASK, redact_text

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_FILE",
    "ENV_NAMES",
    "ConfigError",
    "FeedLogin",
    "Settings",
    "load_settings",
    "parse_subscribe",
]

#: Environment variable naming the TOML file.
CONFIG_ENV: Final = "BRIDGE_CONFIG"
#: The command-line option naming the TOML file (``bridge run --config``), which wins over
#: ``BRIDGE_CONFIG``; errors about a file named by it name it.
CONFIG_OPTION: Final = "--config"
#: Upper bound of ``max_retries``: enough for weeks of retrying, and it keeps the value a sane
#: integer (JSON, metrics) rather than an arbitrarily large one.
MAX_RETRIES_LIMIT: Final = 1_000_000
#: Read when it exists and nothing else names a file; relative to the working directory.
DEFAULT_CONFIG_FILE: Final = Path("config/bridge.toml")
DOTENV_FILE: Final = Path(".env")
_SECRET_FIELDS: Final = frozenset({"kite_access_token", "kite_enctoken"})
_URL_SCHEMES: Final = {
    "redis_url": ("redis", "rediss", "unix"),
    "kite_ws_url": ("ws", "wss"),
}


class FeedLogin(TypedDict):
    """The ``KiteFeed`` arguments that say where and as whom to log in."""

    api_key: str
    user_id: str | None
    enctoken: str | None
    access_token: str | None
    url: str | None


class ConfigError(Exception):
    """Invalid configuration. ``str()`` is one line naming the setting and what is wrong."""


class Settings(BaseSettings):
    """The bridge's settings; build them with :func:`load_settings`.

    ``Settings(**fields)`` works too (tests do it); it reads the same sources.
    """

    model_config = SettingsConfigDict(extra="forbid", validate_default=True)

    # Kite credentials (CONTRACT §1).
    kite_api_key: str = "kitefront"
    kite_access_token: SecretStr | None = None
    kite_user_id: str | None = None
    kite_enctoken: SecretStr | None = None
    #: Files holding those secrets instead (Docker/Compose secrets under ``/run/secrets``):
    #: out of the environment, which ``docker inspect`` and ``/proc/<pid>/environ`` show.
    kite_access_token_file: Path | None = None
    kite_enctoken_file: Path | None = None
    #: ``None``: the feed picks ``wss://ws.kite.trade`` or ``wss://ws.zerodha.com`` by flavour.
    kite_ws_url: str | None = None
    redis_url: str = "redis://localhost:6379/0"
    namespace: str = "kite"
    default_mode: Mode = "quote"
    #: token -> mode, merged into the stored set at start-up.
    subscribe: dict[int, Mode] = Field(default_factory=dict)
    max_retries: int = Field(default=50, ge=0, le=MAX_RETRIES_LIMIT)
    # Floats are finite: inf would disable a timeout silently, nan compares false to everything.
    base_wait: float = Field(default=2.0, gt=0, allow_inf_nan=False)
    max_wait: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    log_level: str = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    #: ``/healthz``, ``/readyz``, ``/metrics``; 0 disables the HTTP server.
    http_port: int = Field(default=9100, ge=0, le=65535)
    #: Address the HTTP endpoint binds: all interfaces (containers) by default.
    http_host: str = Field(default="0.0.0.0", min_length=1)
    #: Seconds without any frame (ticks or heartbeats) before a connected feed is declared dead.
    liveness_timeout: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    #: Seconds the oldest unpublished frame may wait while the bridge paces itself to Redis
    #: (completeness); past it, the newest tick per instrument wins (freshness). publisher.py.
    max_lag: float = Field(default=0.25, gt=0, allow_inf_nan=False)

    _config_file: Path | None = PrivateAttr(default=None)

    @property
    def config_file(self) -> Path | None:
        """The TOML file :func:`load_settings` read, if any."""
        return self._config_file

    @property
    def redis_url_redacted(self) -> str:
        """``redis_url`` with any password masked: the only form fit for logs and events."""
        return redact_text(self.redis_url)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment, then ``.env``, then TOML (CONTRACT §1), all through one reader.

        pydantic's own env and dotenv sources are not used: the same names, blank-is-unset and
        "did you mean" rules must apply to every source, and the TOML file's path itself can
        come from the environment or ``.env``.
        """
        dotenv = _read_dotenv()
        toml = _LOADED_TOML.get()
        if toml is None:  # constructed directly rather than by load_settings
            path, name = _config_path(None, dotenv)
            toml = _read_toml(path, name) if path else {}
        return (
            init_settings,
            _MappingSource(settings_cls, _env_values(os.environ)),
            _MappingSource(settings_cls, _env_values(dotenv)),
            _MappingSource(settings_cls, toml),
        )

    @field_validator("kite_api_key", "namespace", "http_host")
    @classmethod
    def _no_spaces(cls, value: str) -> str:
        value = value.strip()
        if not value or any(char.isspace() for char in value):
            raise ValueError("must be non-empty and contain no spaces")
        return value

    @field_validator(
        "kite_access_token",
        "kite_enctoken",
        "kite_user_id",
        "kite_access_token_file",
        "kite_enctoken_file",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            return value or None
        return value

    @field_validator("kite_ws_url", "redis_url")
    @classmethod
    def _url_scheme(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        schemes = _URL_SCHEMES[cast(str, info.field_name)]
        if urlsplit(value).scheme.lower() not in schemes:
            expected = ", ".join(f"{scheme}://" for scheme in schemes)
            raise ValueError(f"expected a URL starting with {expected}")
        if info.field_name == "redis_url":
            _check_redis_url(value)
        else:
            check_url(value)  # the feed's own check (host, port, no query), now not at run
        return value

    @field_validator(
        "max_retries",
        "base_wait",
        "max_wait",
        "http_port",
        "liveness_timeout",
        "max_lag",
        mode="before",
    )
    @classmethod
    def _not_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # pydantic would read TOML's true as 1
            raise ValueError("expected a number")
        return value

    @field_validator("default_mode", mode="before")
    @classmethod
    def _mode(cls, value: Any) -> Mode:
        return parse_mode(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: Any) -> str:
        if isinstance(value, str) and value.strip().lower() in LOG_LEVELS:
            return value.strip().lower()
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("subscribe", mode="before")
    @classmethod
    def _subscribe(cls, value: Any, info: ValidationInfo) -> dict[int, Mode]:
        default_mode = info.data.get("default_mode", "quote")
        try:
            return parse_subscribe(value, default_mode)
        except CommandError as exc:
            raise ValueError(exc.reason) from None

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_wait < self.base_wait:
            raise ValueError("BRIDGE_MAX_WAIT: must be at least BRIDGE_BASE_WAIT")
        if self.kite_access_token_file is not None:
            self.kite_access_token = _read_secret("kite_access_token", self)
        if self.kite_enctoken_file is not None:
            self.kite_enctoken = _read_secret("kite_enctoken", self)
        if _REQUIRE_CREDENTIALS.get():
            problem = self.credentials_problem()
            if problem is not None:
                raise ValueError(problem)
        return self

    def feed_credentials(self) -> FeedLogin:
        """``KiteFeed`` keyword arguments for the endpoint and credentials, secrets revealed.

        One place turns settings into a login, so ``run`` and ``check-config --connect`` can
        never present Kite with different credentials.
        """
        return FeedLogin(
            api_key=self.kite_api_key,
            user_id=self.kite_user_id,
            enctoken=_reveal(self.kite_enctoken),
            access_token=_reveal(self.kite_access_token),
            url=self.kite_ws_url,
        )

    def credentials_problem(self) -> str | None:
        """The reference ``KiteFeed``'s rules (CONTRACT §1), so a bad start fails with exit 2.

        Only commands that talk to Kite need them: ``bridge health`` reads Redis alone and must
        work in a container whatever its credentials.
        """
        if self.kite_access_token is None and self.kite_enctoken is None:
            return (
                "KITE_ACCESS_TOKEN / KITE_ENCTOKEN: no credentials; set KITE_ACCESS_TOKEN "
                "(with KITE_API_KEY) or KITE_ENCTOKEN (with KITE_USER_ID), or its _FILE"
            )
        if self.kite_enctoken is not None and self.kite_user_id is None:
            return "KITE_USER_ID: required with KITE_ENCTOKEN"
        if self.kite_access_token is not None and self.kite_api_key == "kitefront":
            return (
                "KITE_API_KEY: an access token needs your Kite Connect api key; "
                "'kitefront' is the Kite Web login, which uses KITE_ENCTOKEN"
            )
        return None


def _read_secret(field: str, settings: Settings) -> SecretStr:
    """The secret in the file ``<field>_file`` names; its errors name the setting, never the
    content. Surrounding whitespace (the newline an editor adds) is not part of a token."""
    value_name, file_name = field.upper(), f"{field}_file".upper()
    if getattr(settings, field) is not None:
        raise ValueError(f"{file_name}: {value_name} is set too; set one of them")
    path: Path = getattr(settings, f"{field}_file")
    try:
        content = path.read_bytes().decode("utf-8").strip()
    except OSError as exc:
        raise ValueError(f"{file_name}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file_name}: {path}: {_not_utf8(exc)}") from None
    if not content:
        raise ValueError(f"{file_name}: {path} is empty")
    return SecretStr(content)


def _reveal(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()


#: Environment variable of every field.
ENV_NAMES: Final[Mapping[str, str]] = {
    name: (
        name.upper()
        if name.startswith("kite_") or name == "redis_url"
        else f"BRIDGE_{name}".upper()
    )
    for name in Settings.model_fields
}
_FIELD_OF_ENV: Final = {env: field for field, env in ENV_NAMES.items()}
#: Set to 1/true to run on uvloop (if installed); read by the service at start, not a setting of
#: its own because the loop exists before the settings are loaded.
UVLOOP_ENV: Final = "BRIDGE_UVLOOP"
_KNOWN_BRIDGE_VARS: Final = [
    *(e for e in _FIELD_OF_ENV if e.startswith("BRIDGE_")),
    CONFIG_ENV,
    UVLOOP_ENV,
]

#: What load_settings read from the TOML file, handed to settings_customise_sources, a
#: classmethod that cannot be given arguments.
_LOADED_TOML: ContextVar[dict[str, Any] | None] = ContextVar("_LOADED_TOML", default=None)
#: Whether the settings being built must carry valid Kite credentials (see ``load_settings``).
_REQUIRE_CREDENTIALS: ContextVar[bool] = ContextVar("_REQUIRE_CREDENTIALS", default=True)


class _MappingSource(PydanticBaseSettingsSource):
    """Field values already keyed by field name; raw strings are left to the validators."""

    def __init__(self, settings_cls: type[BaseSettings], values: Mapping[str, Any]) -> None:
        super().__init__(settings_cls)
        self._values = dict(values)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


def _env_values(environ: Mapping[str, str | None]) -> dict[str, str]:
    """Field values from variables named as in ``ENV_NAMES``; empty means unset."""
    upper = {key.upper(): value for key, value in environ.items()}
    return {field: value for env, field in _FIELD_OF_ENV.items() if (value := upper.get(env))}


def _check_redis_url(url: str) -> None:
    """redis-py's own check (port, options), now rather than at run, and the database number.

    redis-py ignores a path that is not a number (``/xyz`` means db 0), so that is checked here.
    """
    parse_url(url)  # type: ignore[no-untyped-call]  # redis-py has no annotations
    parts = urlsplit(url)
    if parts.scheme.lower() != "unix" and not re.fullmatch(r"/?|/[0-9]+", parts.path):
        raise ValueError("the path must be empty or a database number such as /0")


def _not_utf8(exc: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"


def _read_dotenv() -> dict[str, str | None]:
    if not DOTENV_FILE.is_file():
        return {}
    try:
        return dotenv_values(DOTENV_FILE)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{DOTENV_FILE} (working directory): {_not_utf8(exc)}") from None
    except OSError as exc:
        raise ConfigError(f"{DOTENV_FILE} (working directory): cannot read it: {exc}") from None


def _config_path(
    explicit: str | Path | None, dotenv: Mapping[str, str | None]
) -> tuple[Path | None, str]:
    """The TOML file to read (``explicit``, else ``BRIDGE_CONFIG``, else the default if present)
    and the name errors about it give: ``--config`` for ``explicit``, else ``BRIDGE_CONFIG``."""
    name = CONFIG_OPTION if explicit else CONFIG_ENV
    named = explicit or os.environ.get(CONFIG_ENV) or dotenv.get(CONFIG_ENV)
    if not named:
        return (DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None), name
    path = Path(named)
    if not path.exists():
        raise ConfigError(f"{name}: config file {str(path)!r} does not exist")
    if not path.is_file():
        raise ConfigError(f"{name}: config file {str(path)!r} is not a file")
    return path, name


def _read_toml(path: Path, name: str = CONFIG_ENV) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: cannot read {str(path)!r}: {_not_utf8(exc)}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{name}: cannot read {str(path)!r}: {exc}") from None
    by_variable = {variable: field for field, variable in ENV_NAMES.items()}
    for key in data:
        if key not in Settings.model_fields:
            hint = difflib.get_close_matches(key, Settings.model_fields, n=1)
            field = by_variable.get(key.upper())
            why = (
                f"TOML keys are the setting names, not the variables: {field} = ..."
                if field is not None
                else f"did you mean {hint[0]!r}?"
                if hint
                else "settings are top-level keys, not under [bridge]"
                if key == "bridge"
                else "see docs/configuration.md"
            )
            raise ConfigError(f"{key} ({path}): unknown setting; {why}")
    return data


def _check_bridge_vars(environ: Mapping[str, str | None]) -> None:
    """Reject a ``BRIDGE_*`` variable that is a near miss of a real one."""
    for name in environ:
        upper = name.upper()
        if upper.startswith("BRIDGE_") and upper not in _KNOWN_BRIDGE_VARS:
            hint = difflib.get_close_matches(upper, _KNOWN_BRIDGE_VARS, n=1, cutoff=0.85)
            if hint:
                raise ConfigError(f"{name}: unknown setting; did you mean {hint[0]}?")


def parse_subscribe(value: Any, default_mode: Mode = "quote") -> dict[int, Mode]:
    """``BRIDGE_SUBSCRIBE`` / TOML ``subscribe`` -> ``{token: mode}``.

    Accepts ``"full:256265,408065;ltp:738561"``, a bare token list ``"256265 408065"`` (default
    mode), a list of tokens, a table of mode -> tokens (``full = [256265]``), or a mapping of
    token -> mode. Raises ``CommandError`` (a ``ValueError``) with the reason.
    """
    result: dict[int, Mode] = {}
    if isinstance(value, str):
        for group in filter(None, (part.strip() for part in value.split(";"))):
            mode_text, colon, tokens = group.rpartition(":")
            mode = parse_mode(mode_text) if colon else default_mode
            result.update(dict.fromkeys(_token_list(tokens), mode))
    elif isinstance(value, list | tuple):
        result.update(dict.fromkeys(_token_list(value), default_mode))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str) and not key.strip().isdigit():
                result.update(dict.fromkeys(_token_list(item), parse_mode(key)))
            else:
                result[parse_token(key.strip() if isinstance(key, str) else key)] = parse_mode(item)
    else:
        raise CommandError("expected a string such as 'full:256265,408065;ltp:738561'")
    if len(result) > MAX_TOKENS:
        raise CommandError(f"{len(result)} tokens, above Kite's limit of {MAX_TOKENS}")
    return result


def _token_list(value: Any) -> list[int]:
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    elif not isinstance(value, list | tuple):
        value = [value]
    return [parse_token(item) for item in value]


#: A quoted fragment of an error message: 'x', not the apostrophe of "isn't".
_QUOTED: Final = re.compile(r"(?<!\w)'([^']*)'(?!\w)")


def _safe_message(message: str, raw: str, visible: str) -> str:
    """A validator's message, fit for the one line: redacted as the logs are and, when the
    input held a secret (``visible``, the input as shown, differs from ``raw``), any quoted
    fragment that is not part of ``visible`` masked too.

    Libraries quote parts of the value they reject, and not always the parts the redaction
    knows: urllib reads a password with an unescaped "/" as the port and says so
    ("port could not be cast to integer value as 'pa'").
    """
    message = redact_text(message)
    if visible == raw:
        return message
    return _QUOTED.sub(lambda match: match[0] if match[1] in visible else f"'{MASK}'", message)


def _describe(
    error: ValidationError, from_env: Mapping[str, Any], toml: Mapping[str, Any], path: Path | None
) -> str:
    """One line for the first error, naming the setting as it was given (env var or TOML key)."""
    errors = error.errors(include_url=False)
    first = errors[0]
    message = str(first["msg"]).removeprefix("Value error, ").split(", unable to parse")[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    if not field:  # a model-level rule: its message names its settings and echoes no value
        return message
    shown = first.get("input")
    raw = shown if isinstance(shown, str) else repr(shown)
    visible = "" if field in _SECRET_FIELDS else redact_text(raw)
    message = _safe_message(message[:1].lower() + message[1:], raw, visible)
    name = ENV_NAMES.get(field, field)
    if field not in from_env and field in toml:
        name = f"{field} ({path})"
    if first["type"] == "extra_forbidden":
        message = "unknown setting"
    elif field not in _SECRET_FIELDS:
        text = visible[:80]
        message += f", got {text!r}" if isinstance(shown, str) else f", got {text}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{name}: {message}{more}"


def load_settings(
    config_file: str | Path | None = None, *, require_credentials: bool = True, **overrides: Any
) -> Settings:
    """Build the settings from every source; ``overrides`` (field names) win over all.

    ``config_file`` is the file ``--config`` names: errors about it name ``--config``.
    ``None`` overrides are dropped, so a CLI can pass its options through unconditionally.
    ``require_credentials=False`` skips the Kite credential rules (for probes that only read
    Redis).

    Raises:
        ConfigError: with one line naming the setting and what is wrong.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    dotenv = _read_dotenv()
    _check_bridge_vars(os.environ)
    _check_bridge_vars(dotenv)
    path, name = _config_path(config_file, dotenv)
    toml = _read_toml(path, name) if path else {}
    token = _LOADED_TOML.set(toml)
    require = _REQUIRE_CREDENTIALS.set(require_credentials)
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        from_env = {**_env_values(dotenv), **_env_values(os.environ), **given}
        raise ConfigError(_describe(exc, from_env, toml, path)) from None
    except (SettingsError, ValueError) as exc:
        raise ConfigError(redact_text(str(exc)).splitlines()[0]) from None
    finally:
        _LOADED_TOML.reset(token)
        _REQUIRE_CREDENTIALS.reset(require)
    settings._config_file = path
    return settings
