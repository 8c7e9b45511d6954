#!/usr/bin/env bash
# Start Mosquitto on 127.0.0.1:PORT in the background with a generated config; print its pid.
#   scripts/start_mosquitto.sh [PORT] [DIR]     (defaults: 1883, a new temporary folder)
# The config allows anonymous clients on loopback only, keeps sessions and retained messages on
# disk (so a broker restart loses nothing), and sets no message-size limit (batches are MBs).
# With BRIDGE_TO=HOST:PORT it also bridges every splitfed/# topic both ways (QoS 1, retained
# flags kept) to the broker there: two bridged Mosquittos are a minimal stand-in for a broker
# cluster (scripts/start_mosquitto_bridge.sh starts such a pair).
# Stop it with: kill PID
set -euo pipefail
PORT="${1:-1883}"
DIR="${2:-$(mktemp -d -t mosquitto.XXXXXX)}"
BIN="${MOSQUITTO:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}"
if [ ! -x "$BIN" ]; then
  echo "mosquitto not found: install it (scripts/setup.sh, or apt-get install mosquitto)" >&2
  exit 1
fi
mkdir -p "$DIR"
cat >"$DIR/mosquitto.conf" <<CONF
listener $PORT 127.0.0.1
user $(id -un)
allow_anonymous true
set_tcp_nodelay true
persistence true
persistence_location $DIR/
autosave_interval 60
max_queued_messages 100000
max_inflight_messages 100
log_dest file $DIR/mosquitto.log
log_type error
log_type warning
log_type notice
CONF
if [ -n "${BRIDGE_TO:-}" ]; then
  # try_private: the remote Mosquitto knows this is a bridge (no loops, retained flags kept).
  cat >>"$DIR/mosquitto.conf" <<CONF
connection splitfed-bridge
address $BRIDGE_TO
topic splitfed/# both 1
try_private true
cleansession true
notifications false
restart_timeout 1 2
CONF
fi
"$BIN" -c "$DIR/mosquitto.conf" >"$DIR/stdout.log" 2>&1 &
PID=$!
for _ in $(seq 50); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    echo "$PID"
    exit 0
  fi
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "mosquitto exited; see $DIR/mosquitto.log" >&2
    exit 1
  fi
  sleep 0.1
done
echo "mosquitto did not open 127.0.0.1:$PORT; see $DIR/mosquitto.log" >&2
exit 1
