#!/usr/bin/env node
// Send a command to a Tidepool gateway and wait for its result (its acknowledgement).
//
//     npm install mqtt@5
//     node send_command.js --host broker.example.com --gateway pi-kitchen-01 \
//         --target actuators/valve-3 --payload '{"open": true}'
//
// The gateway (with `[commands] enabled = true` and the target in `allow`) takes commands from
// `tidepool/{gateway}/commands/TARGET` and answers each on `tidepool/{gateway}/commands/result`
// with {gateway, id, target, status, why?, ts}; status is delivered, failed, expired or
// refused. Results are at least once: match them by id and take the first.
//
// Subscribes to the results before it publishes, so the answer cannot be missed. Prints the
// result as one JSON line; exits 0 when delivered, 1 when not, 2 when no result came in time.

'use strict';

const { parseArgs } = require('node:util');
const { randomUUID } = require('node:crypto');
const mqtt = require('mqtt');

const { values: args } = parseArgs({
  options: {
    host: { type: 'string', default: '127.0.0.1' },
    port: { type: 'string', default: '1883' },
    gateway: { type: 'string' },
    target: { type: 'string' },
    payload: { type: 'string', default: 'null' }, // JSON; a string goes as its text
    id: { type: 'string' }, // the command's id (default: a new UUID)
    timeout: { type: 'string', default: '30' }, // seconds to wait for the result
  },
});
if (!args.gateway || !args.target) {
  console.error('usage: send_command.js --gateway ID --target TOPIC|serial/NAME [--payload JSON]');
  process.exit(2);
}

const id = args.id || randomUUID();
const resultTopic = `tidepool/${args.gateway}/commands/result`;
const client = mqtt.connect(`mqtt://${args.host}:${args.port}`, { protocolVersion: 5 });
const timer = setTimeout(() => {
  console.error(`no result for ${id} within ${args.timeout}s`);
  client.end(true, () => process.exit(2));
}, Number(args.timeout) * 1000);

client.on('message', (_topic, payload) => {
  let r;
  try {
    r = JSON.parse(payload.toString());
  } catch {
    return;
  }
  if (r.id !== id) return;
  clearTimeout(timer);
  console.log(JSON.stringify(r));
  client.end(false, () => process.exit(r.status === 'delivered' ? 0 : 1));
});

client.once('connect', () => {
  client.subscribe(resultTopic, { qos: 1 }, (err, granted) => {
    if (err || granted.some((g) => g.qos > 2)) {
      console.error('the broker refused the subscription to the results');
      process.exit(2);
    }
    const command = { id, payload: JSON.parse(args.payload), ts: Date.now() };
    client.publish(`tidepool/${args.gateway}/commands/${args.target}`, JSON.stringify(command), { qos: 1 });
  });
});
client.on('error', (e) => console.error(`mqtt: ${e.message}`));
