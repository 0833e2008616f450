#!/usr/bin/env python3
"""One paho-mqtt session against the embedded broker, for tests/tests/broker.rs.

Connects with keep-alive 0 (none), stays idle for --idle seconds, subscribes to
PREFIX/+/data at QoS 2, publishes PREFIX/x/y/data (the filter must not match it) at QoS 1,
then PREFIX/q1/data at QoS 1 and PREFIX/q2/data at QoS 2, waits for its own messages and for
the acknowledgements, and prints one JSON summary on stdout. Exits 0 unless paho itself
failed; the Rust test judges the summary.

    python3 paho_check.py --port 1883 --version 5 --client-id paho-5 --prefix paho5
"""

import argparse
import json
import sys
import threading
import time

try:
    import paho.mqtt
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
except ImportError:
    print("paho-mqtt is not installed: run scripts/test (it installs paho-mqtt==2.1.0)", file=sys.stderr)
    sys.exit(3)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--version", choices=["3.1.1", "5"], required=True)
    ap.add_argument("--client-id", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--idle", type=float, default=0.0)
    ap.add_argument("--timeout", type=float, default=5.0)
    a = ap.parse_args()

    v5 = a.version == "5"
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=a.client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
    )
    out = {
        "paho": paho.mqtt.__version__,
        "protocol": a.version,
        "connack": None,
        "granted": None,
        "acked": {},
        "received": [],
        "disconnected": None,
        "errors": [],
    }
    connected = threading.Event()
    subscribed = threading.Event()
    lock = threading.Lock()
    mids = {}

    def on_connect(client, userdata, flags, reason_code, properties):
        out["connack"] = {
            "reason": reason_code.value,
            "session_present": bool(flags.session_present),
        }
        connected.set()

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        out["granted"] = [rc.value for rc in reason_codes]
        subscribed.set()

    def on_message(client, userdata, msg):
        with lock:
            out["received"].append(
                {
                    "topic": msg.topic,
                    "qos": msg.qos,
                    "retain": bool(msg.retain),
                    "payload": msg.payload.decode("utf-8", "replace"),
                }
            )

    def on_publish(client, userdata, mid, reason_code, properties):
        with lock:
            name = mids.get(mid)
            if name is not None:
                out["acked"][name] = reason_code.value

    def on_disconnect(client, userdata, flags, reason_code, properties):
        out["disconnected"] = reason_code.value

    c.on_connect = on_connect
    c.on_subscribe = on_subscribe
    c.on_message = on_message
    c.on_publish = on_publish
    c.on_disconnect = on_disconnect

    if v5:
        c.connect("127.0.0.1", a.port, keepalive=0, clean_start=True)
    else:
        c.connect("127.0.0.1", a.port, keepalive=0)
    c.loop_start()
    try:
        if not connected.wait(a.timeout):
            out["errors"].append("no CONNACK")
            return finish(out)
        if a.idle > 0:
            time.sleep(a.idle)
            if not c.is_connected():
                out["errors"].append("closed while idle with keep-alive 0")
                return finish(out)
        c.subscribe(f"{a.prefix}/+/data", qos=2)
        if not subscribed.wait(a.timeout):
            out["errors"].append("no SUBACK")
            return finish(out)
        sends = [
            ("nomatch", f"{a.prefix}/x/y/data", 1),
            ("q1", f"{a.prefix}/q1/data", 1),
            ("q2", f"{a.prefix}/q2/data", 2),
        ]
        for name, topic, qos in sends:
            payload = json.dumps({"from": "paho", "name": name, "version": a.version})
            with lock:
                info = c.publish(topic, payload, qos=qos)
                mids[info.mid] = name
        until = time.monotonic() + a.timeout
        while time.monotonic() < until:
            with lock:
                matched = [m for m in out["received"] if m["topic"].endswith("/data")]
                if len(out["acked"]) == len(sends) and len(matched) >= 2:
                    break
            time.sleep(0.02)
        # A short grace for anything that should not come.
        time.sleep(0.2)
        c.disconnect()
    finally:
        c.loop_stop()
    return finish(out)


def finish(out) -> int:
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
