#!/usr/bin/env python3
"""A minimal HTTP function for a Tidepool `[[sink]] kind = "http"`: standard library only.

    python3 http_function.py --port 8080
    # gateway config:
    #   [[sink]]
    #   name = "fn"
    #   kind = "http"
    #   url = "http://HOST:8080/ingest"
    #   headers = { "X-Api-Key" = "change-me" }

Each POST is one batch, the same JSON the MQTT upstream gets, gzip-compressed when the sink
has `compression = "gzip"` (`Content-Encoding: gzip`). `Idempotency-Key` is
GATEWAY-FIRSTID-LASTID: a batch the gateway sends again (after a timeout, a 5xx, a restart)
carries the same key, so a function that already took it answers 200 and does nothing.
Events are at least once: dedupe on (gateway, id) too, since a batch cut differently after a
restart carries a new key but the same ids.

Answers: 200 when taken; 401 without the right X-Api-Key (with --api-key): the gateway keeps
the batch and shows "credentials refused"; 400 for a body that is not a batch: the gateway
dead-letters it (it would never be taken). Prints each new event as one JSON line on stdout,
and "listening PORT" on stderr when ready.
"""

import argparse
import gzip
import json
import sys
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Lock


class Bounded:
    """The last `n` keys seen (least recently seen forgotten first)."""

    def __init__(self, n):
        self.n = n
        self.keys = OrderedDict()

    def add(self, key):
        """Whether `key` is new; remembers it either way."""
        if key in self.keys:
            self.keys.move_to_end(key)
            return False
        self.keys[key] = None
        if len(self.keys) > self.n:
            self.keys.popitem(last=False)
        return True


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help="require this X-Api-Key")
    p.add_argument("--remember", type=int, default=1_000_000, help="event ids kept for dedupe")
    a = p.parse_args()

    lock = Lock()
    batches = Bounded(100_000)
    events = Bounded(a.remember)
    counts = {"batches": 0, "repeated_batches": 0, "events": 0, "repeated_events": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the gateway reuses its connection

        def reply(self, status, text):
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):  # noqa: N802 (http.server's name)
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            if a.api_key is not None and self.headers.get("X-Api-Key") != a.api_key:
                return self.reply(401, "wrong or missing X-Api-Key")
            try:
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                batch = json.loads(body)
                gateway = batch["gateway"]
                items = batch["events"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                return self.reply(400, f"not a Tidepool JSON batch: {e}")
            key = self.headers.get("Idempotency-Key", "")
            with lock:
                if key and not batches.add(key):
                    counts["repeated_batches"] += 1
                    return self.reply(200, "already taken")
                counts["batches"] += 1
                for e in items:
                    if events.add((gateway, e["id"])):
                        counts["events"] += 1
                        print(json.dumps({"gateway": gateway, **e}), flush=True)
                    else:
                        counts["repeated_events"] += 1
            self.reply(200, "ok")

        def log_message(self, *args):
            pass  # quiet: stdout carries the events

    server = ThreadingHTTPServer((a.host, a.port), Handler)
    print(f"listening {server.server_address[1]}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        print(json.dumps(counts), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
