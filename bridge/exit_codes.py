"""Process exit codes (CONTRACT §6): what supervisors, compose and scripts branch on."""

from __future__ import annotations

from typing import Final

__all__ = ["EXIT_AUTH", "EXIT_CONFIG", "EXIT_CRASH", "EXIT_LEASE_LOST", "EXIT_OK", "EXIT_RETRIES"]

EXIT_OK: Final = 0
#: An unexpected error (a bug); also a failed ``check-config --connect`` check.
EXIT_CRASH: Final = 1
#: Invalid settings or command line: one line names the setting.
EXIT_CONFIG: Final = 2
#: Kite refused the login with HTTP 403: a new token is needed, restarting will not help.
EXIT_AUTH: Final = 3
#: The feed's reconnect attempts ran out.
EXIT_RETRIES: Final = 4
#: Another bridge took over the namespace (contract addition, see docs/service.md).
EXIT_LEASE_LOST: Final = 5
