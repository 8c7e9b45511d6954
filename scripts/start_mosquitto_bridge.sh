#!/usr/bin/env bash
# Two Mosquittos on 127.0.0.1, B bridged to A (every splitfed/# topic, both ways, QoS 1):
# a minimal stand-in for a broker cluster. Agents can use A and the aggregator B, or any mix.
#   scripts/start_mosquitto_bridge.sh PORT_A PORT_B [DIR]   (default DIR: a new temporary folder)
# Prints "PID_A PID_B" once both listen and a message crossed the bridge both ways.
# Stop them with: kill PID_A PID_B
set -euo pipefail
PORT_A="${1:?usage: start_mosquitto_bridge.sh PORT_A PORT_B [DIR]}"
PORT_B="${2:?usage: start_mosquitto_bridge.sh PORT_A PORT_B [DIR]}"
DIR="${3:-$(mktemp -d -t mosquitto-bridge.XXXXXX)}"
HERE="$(cd "$(dirname "$0")" && pwd)"
PID_A="$("$HERE/start_mosquitto.sh" "$PORT_A" "$DIR/a")"
if ! PID_B="$(BRIDGE_TO="127.0.0.1:$PORT_A" "$HERE/start_mosquitto.sh" "$PORT_B" "$DIR/b")"; then
  kill "$PID_A"
  exit 1
fi
# Wait until the bridge carries a message each way (it connects in the background), with
# paho from the project's environment (PYTHON, default .venv/bin/python or python3).
PY="${PYTHON:-$HERE/../.venv/bin/python}"
[ -x "$PY" ] || PY=python3
if ! "$PY" - "$PORT_A" "$PORT_B" <<'PROBE'
import sys, threading, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

def crossed(src: int, dst: int) -> bool:
    got = threading.Event()
    topic = f"splitfed/bridge-probe/p{src}/status"
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-sub-{src}")
    sub.on_message = lambda *_: got.set()
    sub.connect("127.0.0.1", dst)
    sub.subscribe(topic, 1)
    sub.loop_start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-pub-{src}")
    pub.connect("127.0.0.1", src)
    pub.loop_start()
    deadline = time.monotonic() + 20
    while not got.is_set() and time.monotonic() < deadline:
        pub.publish(topic, b"probe", qos=1)
        got.wait(0.3)
    for c in (sub, pub):
        c.disconnect()
        c.loop_stop()
    return got.is_set()

a, b = int(sys.argv[1]), int(sys.argv[2])
sys.exit(0 if crossed(b, a) and crossed(a, b) else 1)
PROBE
then
  echo "the bridge did not carry messages both ways; see $DIR/b/mosquitto.log" >&2
  kill "$PID_A" "$PID_B"
  exit 1
fi
echo "$PID_A $PID_B"
