#!/usr/bin/env node
// One MQTT.js (MQTT 5) session against the embedded broker, for tests/tests/broker.rs.
//
// Connects, notes the CONNACK properties, subscribes to PREFIX/#, publishes PREFIX/alias/t
// twice at QoS 1 with a content type and a user property (the first sets topic alias 1, the
// second has an empty topic and only the alias), waits for both, and prints one JSON summary
// on stdout. Exits 0 unless MQTT.js itself failed; the Rust test judges the summary.
//
//     node mqttjs_check.js PORT CLIENT_ID PREFIX

'use strict';

let mqtt;
try {
  mqtt = require('mqtt');
} catch (e) {
  console.error('MQTT.js is not installed: run scripts/test (it runs npm ci in tests/clients)');
  process.exit(3);
}

const [port, clientId, prefix] = process.argv.slice(2);
const out = {
  mqttjs: require('mqtt/package.json').version,
  connack: null,
  granted: null,
  acked: [],
  received: [],
  errors: [],
};
const topic = `${prefix}/alias/t`;
const sends = 2;

const client = mqtt.connect({
  host: '127.0.0.1',
  port: Number(port),
  protocolVersion: 5,
  clientId,
  clean: true,
  keepalive: 30,
  reconnectPeriod: 0,
  connectTimeout: 5000,
});

function finish() {
  clearTimeout(timer);
  client.end(false, {}, () => {
    console.log(JSON.stringify(out));
    process.exit(0);
  });
}

const timer = setTimeout(() => {
  out.errors.push('timed out');
  finish();
}, 5000);

client.on('error', (e) => {
  out.errors.push(String(e && e.message ? e.message : e));
  finish();
});

client.on('message', (t, payload, packet) => {
  const p = packet.properties || {};
  out.received.push({
    topic: t,
    qos: packet.qos,
    payload: payload.toString(),
    contentType: p.contentType || null,
    userProperties: p.userProperties || null,
  });
  if (out.received.length >= sends && out.acked.length >= sends) finish();
});

client.once('connect', (connack) => {
  const p = connack.properties || {};
  out.connack = {
    reasonCode: connack.reasonCode,
    sessionPresent: connack.sessionPresent,
    receiveMaximum: p.receiveMaximum ?? null,
    maximumPacketSize: p.maximumPacketSize ?? null,
    topicAliasMaximum: p.topicAliasMaximum ?? null,
    retainAvailable: p.retainAvailable ?? null,
    sharedSubscriptionAvailable: p.sharedSubscriptionAvailable ?? null,
  };
  client.subscribe(`${prefix}/#`, { qos: 1 }, (err, granted) => {
    if (err) {
      out.errors.push(`subscribe: ${err.message}`);
      return finish();
    }
    out.granted = granted.map((g) => g.qos);
    for (let i = 0; i < sends; i++) {
      const payload = JSON.stringify({ from: 'mqttjs', n: i });
      const opts = {
        qos: 1,
        properties: {
          contentType: 'application/json',
          userProperties: { n: String(i) },
          topicAlias: 1,
        },
      };
      client.publish(i === 0 ? topic : '', payload, opts, (e) => {
        if (e) out.errors.push(`publish ${i}: ${e.message}`);
        else out.acked.push(i);
        if (out.received.length >= sends && out.acked.length >= sends) finish();
      });
    }
  });
});
