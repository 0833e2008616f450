#!/usr/bin/env node
// Subscribe to Tidepool batches (MQTT 5) and print each event once, as one JSON line.
//
//     npm install mqtt@5
//     node subscriber.js --host broker.example.com --port 1883 --topic 'tidepool/+/events'
//
// Each message is one batch: JSON, gzip-compressed when the gateway has
// `[upstream] compression = "gzip"` (user property `content-encoding = gzip`, and the payload
// starts with 1f 8b). Events are delivered at least once: after a crash or a reconnect a
// gateway sends again what it had not seen acknowledged, with the same (gateway, id). Under
// `drain = "live_first"` live events overtake the backlog, so ids arrive out of order across
// batches. Hence the rule: dedupe on the set of (gateway, id) seen, never on the highest id.
//
// Prints "subscribed" on stderr once the broker granted the subscription, and the count of
// events and duplicates on stderr at exit (Ctrl-C, SIGTERM, --count or --timeout).
// Ids are integers well below 2^53, so a JavaScript number holds them exactly.

'use strict';

const { parseArgs } = require('node:util');
const zlib = require('node:zlib');
const mqtt = require('mqtt');

const JSON_BATCH = 'application/vnd.tidepool.batch+json';

const { values: args } = parseArgs({
  options: {
    host: { type: 'string', default: '127.0.0.1' },
    port: { type: 'string', default: '1883' },
    topic: { type: 'string', default: 'tidepool/+/events' },
    remember: { type: 'string', default: '1000000' }, // ids kept per gateway for dedupe
    count: { type: 'string' }, // exit after this many distinct events
    timeout: { type: 'string' }, // exit after this many seconds
  },
});
const remember = Number(args.remember);
const count = args.count ? Number(args.count) : 0;

// The (gateway, id) pairs seen, at most `remember` ids per gateway. The bound: a repeat
// arrives after a reconnect, when the gateway resends what it had in flight; between the two
// copies come only the events sent meanwhile (under live_first with a slow `drain_rate`, the
// live events that run ahead of a resent backlog batch). Remember more ids than that and no
// repeat gets through. A Map keeps insertion order: the oldest id is forgotten first, and an id
// seen again is moved to the end (recent). About 50 bytes an id in V8: 1,000,000 ids is about
// 50 MB per gateway; lower --remember on a small machine.
const seen = new Map(); // gateway -> Map(id -> true), least recently seen first

function isNew(gateway, id) {
  let ids = seen.get(gateway);
  if (!ids) seen.set(gateway, (ids = new Map()));
  const known = ids.delete(id);
  ids.set(id, true);
  if (ids.size > remember) ids.delete(ids.keys().next().value);
  return !known;
}

const stats = { events: 0, duplicates: 0 };
const client = mqtt.connect(`mqtt://${args.host}:${args.port}`, { protocolVersion: 5 });

function finish() {
  client.end(false, {}, () => {
    console.error(`${stats.events} events, ${stats.duplicates} duplicates`);
    process.exit(count && stats.events < count ? 1 : 0);
  });
}
process.on('SIGTERM', finish);
process.on('SIGINT', finish);
if (args.timeout) setTimeout(finish, Number(args.timeout) * 1000);

client.on('connect', () => {
  // MQTT.js subscribes again by itself after a reconnect.
  client.subscribe(args.topic, { qos: 1 }, (err, granted) => {
    if (err || granted.some((g) => g.qos >= 0x80)) {
      console.error('subscription refused:', err || granted);
      finish();
    } else {
      console.error('subscribed');
    }
  });
});
client.on('error', (err) => console.error('mqtt:', err.message));

client.on('message', (topic, payload, packet) => {
  const props = packet.properties || {};
  const contentType = props.contentType || JSON_BATCH;
  if (contentType !== JSON_BATCH) {
    console.error(`skipped a batch in ${contentType} (this example reads JSON)`);
    return;
  }
  const encoding = (props.userProperties || {})['content-encoding'];
  const gzipped = encoding === 'gzip' || (payload[0] === 0x1f && payload[1] === 0x8b);
  const batch = JSON.parse(gzipped ? zlib.gunzipSync(payload) : payload);
  for (const event of batch.events) {
    if (!isNew(batch.gateway, event.id)) {
      stats.duplicates += 1;
      continue;
    }
    stats.events += 1;
    console.log(JSON.stringify({ gateway: batch.gateway, ...event }));
    if (count && stats.events === count) finish();
  }
});
