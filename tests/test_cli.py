"""The ``bridge`` command: sub-commands, help, version, exit codes (CONTRACT §6)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tomllib
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from bridge.cli import main
from bridge.config import Settings

ROOT = Path(__file__).resolve().parents[1]
SECRET = "Zq8SecretToken0xDEADBEEF"


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No bridge variables from the developer's environment, an empty working directory, and
    the logging set-up restored afterwards."""
    for name in list(os.environ):
        if name.upper().startswith(("KITE_", "BRIDGE_")) or name.upper() == "REDIS_URL":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield tmp_path
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


@pytest.fixture
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KITE_ENCTOKEN", SECRET)
    monkeypatch.setenv("KITE_USER_ID", "AB1234")


def fake_module(monkeypatch: pytest.MonkeyPatch, name: str, **attrs: Any) -> None:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert SECRET not in err
    return err.strip()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert re.fullmatch(
        r"bridge 0\.1\.0 \(Python 3\.\d+\.\d+, websockets \d+\.\d+(\.\d+)?, "
        r"redis-py \d+\.\d+\.\d+\)",
        out,
    ), out


@pytest.mark.parametrize("command", ["run", "simulate", "health", "check-config"])
def test_each_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    assert f"usage: bridge {command}" in capsys.readouterr().out


def test_top_level_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("run", "simulate", "health", "check-config"):
        assert command in out


def test_simulate_help_shows_the_simulators_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--port" in out
    assert "--log-level" in out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "required" in capsys.readouterr().err
    assert main(["fly"]) == 2
    assert main(["run", "--log-level", "loud"]) == 2


# -- check-config ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("creds")
def test_check_config_prints_settings_with_secrets_masked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://default:{SECRET}@redis:6379/0")
    monkeypatch.setenv("BRIDGE_SUBSCRIBE", "full:408065,256265")
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    shown = orjson.loads(out)
    assert shown["kite_enctoken"] == "***"
    assert shown["kite_access_token"] is None
    assert shown["redis_url"] == "redis://default:***@redis:6379/0"
    assert shown["subscribe"] == {"256265": "full", "408065": "full"}
    assert shown["config_file"] is None
    assert shown["kite_ws_url"] is None  # as configured: the default applies ...
    # ... and this is the endpoint it resolves to, the enctoken masked.
    assert shown["feed_url"].startswith("wss://ws.zerodha.com/?api_key=kitefront&user_id=")
    assert "&enctoken=***&" in shown["feed_url"]
    assert set(shown) == {"config_file", "feed_url", *Settings.model_fields}


@pytest.mark.usefixtures("creds")
@pytest.mark.parametrize(
    "url",
    [
        f"redis://default:p@ss{SECRET}@redis:6379/0",  # an "@" in the password
        f"redis://default:pa ss{SECRET}@redis:6379/0",  # a space in the password
    ],
)
def test_check_config_masks_the_whole_redis_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert SECRET[:6] not in out
    assert orjson.loads(out)["redis_url"] == "redis://default:***@redis:6379/0"


@pytest.mark.parametrize(
    ("argv", "env", "toml", "expected"),
    [
        (["check-config"], {}, None, "KITE_ACCESS_TOKEN / KITE_ENCTOKEN: no credentials"),
        (
            ["run"],
            {"KITE_ENCTOKEN": SECRET, "KITE_USER_ID": "U", "BRIDGE_MAX_RETRIES": "abc"},
            None,
            "BRIDGE_MAX_RETRIES: input should be a valid integer, got 'abc'",
        ),
        (
            ["run"],
            {"KITE_ENCTOKEN": SECRET, "KITE_USER_ID": "U", "BRIDGE_CONFIG": "gone.toml"},
            None,
            "BRIDGE_CONFIG: config file 'gone.toml' does not exist",
        ),
        (
            ["health", "--config", "gone.toml"],
            {"KITE_ENCTOKEN": SECRET, "KITE_USER_ID": "U"},
            None,
            "--config: config file 'gone.toml' does not exist",
        ),
        (
            ["run", "--config", "missing.toml"],
            {"KITE_ENCTOKEN": SECRET, "KITE_USER_ID": "U", "BRIDGE_CONFIG": "other.toml"},
            None,
            "--config: config file 'missing.toml' does not exist",
        ),
        (
            ["check-config"],
            {"KITE_ENCTOKEN": SECRET, "KITE_USER_ID": "U", "BRIDGE_CONFIG": "."},
            None,
            "BRIDGE_CONFIG: config file '.' is not a file",
        ),
        (
            ["check-config"],
            {"KITE_ENCTOKEN": SECRET, "KITE_USER_ID": "U", "KITE_WS_URL": "ws://127.0.0.1:99999"},
            None,
            "KITE_WS_URL: port out of range 0-65535, got 'ws://127.0.0.1:99999'",
        ),
        (
            ["run"],
            {"KITE_ENCTOKEN": SECRET, "KITE_USER_ID": "U", "REDIS_URL": "redis://h:6379/xyz"},
            None,
            "REDIS_URL: the path must be empty or a database number such as /0",
        ),
        (
            ["check-config"],
            {"KITE_ENCTOKEN": SECRET, "KITE_USER_ID": "U", "BRIDGE_MAX_RETRIES": "9" * 26},
            None,
            "BRIDGE_MAX_RETRIES: input should be less than or equal to 1000000",
        ),
        (
            ["run"],
            {"KITE_ENCTOKEN": SECRET, "KITE_USER_ID": "U", "BRIDGE_HTTP_HOST": " "},
            None,
            "BRIDGE_HTTP_HOST: must be non-empty and contain no spaces",
        ),
        (
            ["check-config"],
            {"KITE_ENCTOKEN": SECRET, "KITE_USER_ID": "U"},
            b'namespace = "\xff"\n',
            "BRIDGE_CONFIG: cannot read 'config/bridge.toml': not UTF-8 text (byte 0xff at offset",
        ),
        (
            ["run"],
            {"KITE_ENCTOKEN": SECRET, "KITE_USER_ID": "U"},
            "max_retires = 5\n",
            "max_retires (config/bridge.toml): unknown setting; did you mean 'max_retries'?",
        ),
        (
            ["run"],
            {"KITE_ACCESS_TOKEN": SECRET},
            None,
            "KITE_API_KEY: an access token needs your Kite Connect api key",
        ),
    ],
)
def test_config_errors_exit_2_with_one_line_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    isolated: Path,
    argv: list[str],
    env: dict[str, str],
    toml: str | bytes | None,
    expected: str,
) -> None:
    calls: list[Settings] = []
    fake_module(monkeypatch, "bridge.service", run=calls.append)
    fake_module(monkeypatch, "bridge.health", main=lambda settings, max_age: calls.append(settings))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if toml is not None:
        (isolated / "config").mkdir()
        file = isolated / "config/bridge.toml"
        if isinstance(toml, bytes):
            file.write_bytes(toml)
        else:
            file.write_text(toml)
    assert main(argv) == 2
    assert one_error_line(capsys).startswith(f"bridge: config error: {expected}")
    assert calls == []


# -- run ------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("creds")
def test_run_hands_the_settings_to_the_service_and_returns_its_exit_code(
    monkeypatch: pytest.MonkeyPatch, isolated: Path
) -> None:
    seen: list[Settings] = []

    def run(settings: Settings) -> int:
        seen.append(settings)
        return 4

    fake_module(monkeypatch, "bridge.service", run=run)
    monkeypatch.setenv("BRIDGE_LOG_LEVEL", "error")
    config = isolated / "custom.toml"
    config.write_text('namespace = "custom"\n')
    assert (
        main(["run", "--config", str(config), "--log-level", "DEBUG", "--log-format", "json"]) == 4
    )
    (settings,) = seen
    assert settings.namespace == "custom"
    assert settings.log_level == "debug"  # the option beats BRIDGE_LOG_LEVEL
    assert settings.log_format == "json"
    assert logging.getLogger().level == logging.DEBUG  # logging configured before the service


@pytest.mark.usefixtures("creds")
def test_run_without_options_uses_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Settings] = []

    def run(settings: Settings) -> int:
        seen.append(settings)
        return 0

    fake_module(monkeypatch, "bridge.service", run=run)
    monkeypatch.setenv("BRIDGE_LOG_LEVEL", "error")
    assert main(["run"]) == 0
    assert seen[0].log_level == "error"


@pytest.mark.usefixtures("creds")
def test_unexpected_errors_exit_1_and_are_logged_redacted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(settings: Settings) -> int:
        raise RuntimeError(f"cannot reach wss://x/?enctoken={SECRET}")

    fake_module(monkeypatch, "bridge.service", run=run)
    assert main(["run", "--log-format", "json"]) == 1
    err = capsys.readouterr().err
    record = orjson.loads(err.splitlines()[-1])
    assert record["event"] == "unexpected error"
    assert "RuntimeError" in record["exception"]
    assert SECRET not in err


@pytest.mark.usefixtures("creds")
def test_interrupt_before_the_service_handles_signals_is_a_clean_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def run(settings: Settings) -> int:
        raise KeyboardInterrupt

    fake_module(monkeypatch, "bridge.service", run=run)
    assert main(["run"]) == 0


# -- simulate and health --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"), [("BRIDGE_LOG_LEVEL", "verbose"), ("BRIDGE_LOG_FORMAT", "xml")]
)
def test_simulate_rejects_bad_log_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, value: str
) -> None:
    fake_module(
        monkeypatch, "bridge.simulator.cli", add_arguments=lambda parser: None, run=lambda a: 0
    )
    monkeypatch.setenv(name, value)
    assert main(["simulate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bridge: config error: {name}: expected one of")
    assert err.count("\n") == 1


def test_simulate_needs_no_credentials_and_passes_its_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[argparse.Namespace] = []

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--port", type=int, default=8765)

    def run(args: argparse.Namespace) -> int:
        seen.append(args)
        return 0

    fake_module(monkeypatch, "bridge.simulator.cli", add_arguments=add_arguments, run=run)
    monkeypatch.setenv("BRIDGE_LOG_LEVEL", "WARNING")
    assert main(["simulate", "--port", "9999"]) == 0
    (args,) = seen
    assert args.port == 9999
    assert args.log_level == "warning"
    assert logging.getLogger().level == logging.WARNING


@pytest.mark.usefixtures("creds")
@pytest.mark.parametrize(("argv", "max_age"), [([], 10.0), (["--max-age", "2.5"], 2.5)])
def test_health_returns_the_probes_exit_code(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], max_age: float
) -> None:
    seen: list[tuple[Settings, float]] = []

    def probe(settings: Settings, age: float) -> int:
        seen.append((settings, age))
        return 1

    fake_module(monkeypatch, "bridge.health", main=probe)
    assert main(["health", *argv]) == 1
    assert seen[0][1] == max_age


def test_health_needs_no_kite_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe only reads Redis: a container without credentials must still be probed."""
    seen: list[str] = []

    def probe(settings: Settings, age: float) -> int:
        seen.append(settings.namespace)
        return 0

    monkeypatch.setenv("BRIDGE_NAMESPACE", "probe")
    fake_module(monkeypatch, "bridge.health", main=probe)
    assert main(["health"]) == 0
    assert seen == ["probe"]
    # ...while every command that talks to Kite still insists on them.
    assert main(["check-config"]) == 2


def test_health_rejects_a_bad_max_age() -> None:
    assert main(["health", "--max-age", "-1"]) == 2
    assert main(["health", "--max-age", "soon"]) == 2


# -- entry points ---------------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.upper().startswith(("KITE_", "BRIDGE_")) and name.upper() != "REDIS_URL"
    }
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_console_script_points_at_main() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["bridge"] == "bridge.process:main"


@pytest.mark.parametrize(
    "launcher",
    [
        ["-m", "bridge"],
        # What the console-script wrapper generated for "bridge.process:main" does.
        ["-c", "import sys; from bridge.process import main; sys.exit(main())"],
    ],
    ids=["python -m bridge", "console script"],
)
def test_entry_points_exit_with_mains_code(launcher: list[str], isolated: Path) -> None:
    version = subprocess.run(
        [sys.executable, *launcher, "--version"], env=clean_env(), capture_output=True, text=True
    )
    assert version.returncode == 0
    assert version.stdout.startswith("bridge 0.1.0 (")
    broken = subprocess.run(
        [sys.executable, *launcher, "check-config"], env=clean_env(), capture_output=True, text=True
    )
    assert broken.returncode == 2
    assert broken.stderr.startswith("bridge: config error: KITE_ACCESS_TOKEN / KITE_ENCTOKEN")
