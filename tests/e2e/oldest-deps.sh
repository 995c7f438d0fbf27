#!/usr/bin/env bash
# The fast part of the suite (everything not marked slow) against the OLDEST release of each
# runtime dependency that pyproject.toml admits: every `name>=X` becomes the constraint `name==X`.
# A lower bound nobody installs is a guess; this one is tested, so a user whose environment pins
# an older release gets what pyproject promises (prometheus-client>=0.20 did not even import).
#
#   tests/e2e/oldest-deps.sh            # in .venv-oldest, with REDIS_URL as the caller set it
#   tests/e2e/oldest-deps.sh -k codec   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/../.."

venv="${OLDEST_VENV:-.venv-oldest}"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT

python3 - "$constraints" <<'PY'
import re
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    dependencies = tomllib.load(f)["project"]["dependencies"]
pins = []
for requirement in dependencies:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([^,\s;]+).*", requirement)
    if match is None:
        sys.exit(f"oldest-deps: no lower bound to test in {requirement!r}")
    pins.append(f"{match[1]}=={match[3]}")
with open(sys.argv[1], "w") as f:
    f.write("\n".join(pins) + "\n")
print("oldest-deps:", " ".join(pins))
PY

python3 -m venv --clear "$venv"
"$venv/bin/pip" install -q -c "$constraints" -e '.[test]'
"$venv/bin/pip" check
"$venv/bin/pytest" -m "not slow" -p no:cacheprovider "$@"
