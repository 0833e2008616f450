#!/usr/bin/env python3
"""Send a command to a Tidepool gateway and wait for its result (its acknowledgement).

    pip install 'paho-mqtt>=2,<3'
    python3 send_command.py --host broker.example.com --gateway pi-kitchen-01 \
        --target actuators/valve-3 --payload '{"open": true}'

The gateway (with `[commands] enabled = true` and the target in `allow`) takes commands from
`tidepool/{gateway}/commands/TARGET` and answers each on `tidepool/{gateway}/commands/result`
with {"gateway", "id", "target", "status", "why"?, "ts"}; status is delivered, failed, expired
or refused. Results are at least once: a gateway that crashed between publishing a result and
recording that the broker took it publishes it again, so match results by id and take the
first.

Subscribes to the results before it publishes, so the answer cannot be missed. Prints the
result as one JSON line; exits 0 when delivered, 1 when not, 2 when no result came in time.
"""

import argparse
import json
import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--gateway", required=True, help="the gateway's [gateway] id")
    p.add_argument("--target", required=True, help="a local topic, or serial/NAME")
    p.add_argument("--payload", default="null", help="JSON (a string goes as its text)")
    p.add_argument("--id", default=None, help="the command's id (default: a new UUID)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the result")
    a = p.parse_args()

    command_id = a.id or str(uuid.uuid4())
    command = {
        "id": command_id,
        "payload": json.loads(a.payload),
        "ts": int(time.time() * 1000),
    }
    result_topic = f"tidepool/{a.gateway}/commands/result"
    subscribed = threading.Event()
    answered = threading.Event()
    result = {}

    def on_connect(client, _userdata, _flags, reason_code, _properties):
        if reason_code.is_failure:
            print(f"connect refused: {reason_code}", file=sys.stderr)
            return
        client.subscribe(result_topic, qos=1)

    def on_subscribe(_client, _userdata, _mid, reason_codes, _properties):
        if any(rc.is_failure for rc in reason_codes):
            print("the broker refused the subscription to the results", file=sys.stderr)
            return
        subscribed.set()

    def on_message(_client, _userdata, msg):
        try:
            r = json.loads(msg.payload)
        except ValueError:
            return
        if r.get("id") == command_id and not answered.is_set():
            result.update(r)
            answered.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(a.host, a.port, keepalive=30)
    client.loop_start()
    try:
        if not subscribed.wait(a.timeout):
            print("no subscription to the results", file=sys.stderr)
            return 2
        info = client.publish(
            f"tidepool/{a.gateway}/commands/{a.target}", json.dumps(command), qos=1
        )
        info.wait_for_publish(a.timeout)
        if not answered.wait(a.timeout):
            print(f"no result for {command_id} within {a.timeout}s", file=sys.stderr)
            return 2
        print(json.dumps(result), flush=True)
        return 0 if result.get("status") == "delivered" else 1
    finally:
        client.loop_stop()
        client.disconnect()


if __name__ == "__main__":
    sys.exit(main())
