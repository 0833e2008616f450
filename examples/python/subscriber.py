#!/usr/bin/env python3
"""Subscribe to Tidepool batches (MQTT 5) and print each event once, as one JSON line.

    pip install 'paho-mqtt>=2,<3'
    python3 subscriber.py --host broker.example.com --port 1883 --topic 'tidepool/+/events'

Each message is one batch: JSON, gzip-compressed when the gateway has
`[upstream] compression = "gzip"` (user property `content-encoding = gzip`, and the payload
starts with 1f 8b). Events are delivered at least once: after a crash or a reconnect a
gateway sends again what it had not seen acknowledged, with the same (gateway, id). Under
`drain = "live_first"` live events overtake the backlog, so ids arrive out of order across
batches. Hence the rule: dedupe on the set of (gateway, id) seen, never on the highest id.

Prints "subscribed" on stderr once the broker granted the subscription, and the count of
events and duplicates on stderr at exit (Ctrl-C, SIGTERM, --count or --timeout).
"""

import argparse
import json
import os
import signal
import sys
import threading
from collections import OrderedDict

import paho.mqtt.client as mqtt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_batch import decode  # noqa: E402  (the decoder beside this file)

JSON_BATCH = "application/vnd.tidepool.batch+json"


class Seen:
    """The (gateway, id) pairs seen, at most `per_gateway` ids per gateway.

    The bound: a repeat arrives after a reconnect, when the gateway resends what it had in
    flight; between the two copies come only the events sent meanwhile (under live_first with
    a slow `drain_rate`, the live events that run ahead of a resent backlog batch). Remember
    more ids than that and no repeat gets through; the oldest id is forgotten first, and an id
    seen again counts as recent. CPython needs about 100 bytes an id: 1,000,000 ids is about
    100 MB per gateway; lower `--remember` on a small machine.
    """

    def __init__(self, per_gateway):
        self.per_gateway = per_gateway
        self.ids = {}  # gateway -> OrderedDict of ids, least recently seen first

    def add(self, gateway, event_id):
        """Whether (gateway, event_id) is new; remembers it either way."""
        ids = self.ids.setdefault(gateway, OrderedDict())
        if event_id in ids:
            ids.move_to_end(event_id)
            return False
        ids[event_id] = None
        if len(ids) > self.per_gateway:
            ids.popitem(last=False)
        return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--topic", default="tidepool/+/events")
    ap.add_argument("--remember", type=int, default=1_000_000, help="ids kept per gateway for dedupe")
    ap.add_argument("--count", type=int, help="exit after this many distinct events")
    ap.add_argument("--timeout", type=float, help="exit after this many seconds")
    args = ap.parse_args()

    seen = Seen(args.remember)
    stats = {"events": 0, "duplicates": 0}
    done = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            print(f"connection refused: {reason_code}", file=sys.stderr)
            done.set()
            return
        client.subscribe(args.topic, qos=1)  # again after every reconnect

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        if any(rc.is_failure for rc in reason_codes):
            print(f"subscription refused: {reason_codes}", file=sys.stderr)
            done.set()
        else:
            print("subscribed", file=sys.stderr, flush=True)

    def on_message(client, userdata, msg):
        props = msg.properties
        content_type = getattr(props, "ContentType", JSON_BATCH)
        if content_type != JSON_BATCH:
            print(f"skipped a batch in {content_type} (this example reads JSON)", file=sys.stderr)
            return
        encoding = dict(getattr(props, "UserProperty", [])).get("content-encoding")
        batch = decode(msg.payload, encoding)  # gunzips by that property or the 1f 8b magic
        gateway = batch["gateway"]
        for event in batch["events"]:
            if not seen.add(gateway, event["id"]):
                stats["duplicates"] += 1
                continue
            stats["events"] += 1
            print(json.dumps({"gateway": gateway, **event}, separators=(",", ":")), flush=True)
            if args.count and stats["events"] >= args.count:
                done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    client.connect(args.host, args.port, keepalive=30)
    client.loop_start()
    try:
        done.wait(args.timeout)
    except KeyboardInterrupt:
        pass
    client.disconnect()
    client.loop_stop()
    print(f"{stats['events']} events, {stats['duplicates']} duplicates", file=sys.stderr)
    sys.exit(1 if args.count and stats["events"] < args.count else 0)


if __name__ == "__main__":
    main()
