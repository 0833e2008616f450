#!/usr/bin/env python3
"""Decode a Tidepool upstream batch (JSON encoding, optionally gzip-compressed).

Standard library only. As a program: reads a payload from FILE (or stdin) and prints one
JSON line per event, with the batch's gateway beside each:

    python3 decode_batch.py batch.bin
    mosquitto_sub -t 'tidepool/+/events' -C 1 -N | python3 decode_batch.py --gzip

As a library: ``decode(payload, content_encoding)`` returns the batch as a dict; pass the
HTTP ``Content-Encoding`` header (or the MQTT content-encoding user property) when there is
one. A payload that starts with the gzip magic (1f 8b) is gunzipped either way: a JSON batch
starts with ``{``, so the two cannot be confused. A payload that is not JSON text arrives as
a base64 string with ``"payload_encoding": "base64"`` beside it. Subscribers dedupe on
(gateway, id).
"""

import argparse
import gzip
import json
import sys

GZIP_MAGIC = b"\x1f\x8b"


def decode(payload, content_encoding=None):
    """The batch dict of one payload (bytes): gunzipped if gzip, then parsed as JSON."""
    if content_encoding not in (None, "", "identity", "gzip"):
        raise ValueError(f"unsupported content encoding {content_encoding!r}")
    if content_encoding == "gzip" or payload[:2] == GZIP_MAGIC:
        payload = gzip.decompress(payload)
    return json.loads(payload)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", nargs="?", help="the payload (default: stdin)")
    ap.add_argument("--gzip", action="store_true", help="the payload is gzip (Content-Encoding: gzip)")
    args = ap.parse_args(argv)
    if args.file:
        with open(args.file, "rb") as f:
            payload = f.read()
    else:
        payload = sys.stdin.buffer.read()
    batch = decode(payload, "gzip" if args.gzip else None)
    for event in batch["events"]:
        print(json.dumps({"gateway": batch["gateway"], **event}, separators=(",", ":")))


if __name__ == "__main__":
    main()
