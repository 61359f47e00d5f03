#!/usr/bin/env node
// Using the queue manager from Node.js: no generated code, no Python, just the proto.
//
//   cd examples/node && npm ci
//   QM_SERVER=localhost:50051 QM_USER=admin QM_PASSWORD=... node example.js
//
// It logs in (GetChallenge, RSA-OAEP-SHA256 with Node's own crypto, Auth), creates a
// queue, adds, polls and acks a message, writes and reads a map, and logs out. Progress
// goes to stderr; a JSON summary of what happened goes to stdout, for scripts and tests.
//
// Environment: QM_SERVER (default localhost:50051), QM_USER, QM_PASSWORD, QM_QUEUE
// (default node-example), QM_MAP (default node-example), QM_PIN (optional: the server
// key's fingerprint, as logged by qm-server at start; the login is refused if it differs),
// QM_PROTO (default: the proto in this repository).
'use strict';

const crypto = require('node:crypto');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO = process.env.QM_PROTO ||
  path.join(__dirname, '..', '..', 'protos', 'qm', 'v1', 'queue_manager.proto');
const TIMEOUT_MS = 10_000;

// keepCase keeps the proto's field names (queue_name, not queueName); int64 ids arrive as
// strings so that no id above 2^53 loses precision; enums arrive by name ("CODE_OK").
const definition = protoLoader.loadSync(PROTO, {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { QueueManagerService } = grpc.loadPackageDefinition(definition).qm.v1;
// proto-loader builds gRPC methods only; the PasswordEnvelope that Auth encrypts is a plain
// message, so protobufjs (which proto-loader itself uses) serializes it.
const PasswordEnvelope = protobuf.loadSync(PROTO).lookupType('qm.v1.PasswordEnvelope');

/** A domain outcome other than CODE_OK, e.g. CODE_QUEUE_NOT_FOUND. */
class QmError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
  }
}

/** Calls `method` with a deadline; resolves to the response, rejects on any non-OK code. */
function call(client, method, request, { accept = [], timeoutMs = TIMEOUT_MS } = {}) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + timeoutMs }, (err, response) => {
      if (err) {
        reject(err); // a gRPC status: deadline, unreachable, too large...
      } else if (response.code !== 'CODE_OK' && !accept.includes(response.code)) {
        reject(new QmError(response.code, response.message));
      } else {
        resolve(response);
      }
    });
  });
}

/** The fingerprint the contract defines: hex SHA-256 of the DER SubjectPublicKeyInfo. */
function fingerprintOf(publicKeyPem) {
  const der = crypto.createPublicKey(publicKeyPem).export({ type: 'spki', format: 'der' });
  return crypto.createHash('sha256').update(der).digest('hex');
}

/** The two-call login; returns { token, sessionTtlMs, fingerprint }. */
async function login(client, username, password, pin) {
  const challenge = await call(client, 'GetChallenge', {});
  if (challenge.algorithm !== 'RSA-OAEP-SHA256') {
    throw new Error(`unsupported login algorithm ${challenge.algorithm}`);
  }
  // Computed here, not taken from the response: a swapped key could claim any fingerprint.
  const fingerprint = fingerprintOf(challenge.public_key_pem);
  if (pin && pin.toLowerCase().replace(/:/g, '') !== fingerprint) {
    throw new Error(`server key ${fingerprint} does not match QM_PIN; password not sent`);
  }
  const envelope = PasswordEnvelope.encode(
    PasswordEnvelope.create({ password, challenge: challenge.challenge })
  ).finish();
  // oaepHash sets both the OAEP digest and the MGF1 digest to SHA-256.
  const ciphertext = crypto.publicEncrypt(
    {
      key: challenge.public_key_pem,
      padding: crypto.constants.RSA_PKCS1_OAEP_PADDING,
      oaepHash: 'sha256',
    },
    envelope
  );
  const auth = await call(client, 'Auth', { username, password: ciphertext });
  return { token: auth.token, sessionTtlMs: Number(auth.session_ttl_ms), fingerprint };
}

// Every entry of a map, page by page in key order. A page may hold fewer entries than
// asked when large values would not fit in one answer, so only an empty page ends it.
async function readMap(client, token, map) {
  const entries = [];
  for (;;) {
    const page = await call(client, 'MapGetList', { token, map, offset: entries.length, size: 100 });
    if (page.list.length === 0) {
      return entries;
    }
    entries.push(...page.list);
  }
}

async function main() {
  const target = process.env.QM_SERVER || 'localhost:50051';
  const queue = process.env.QM_QUEUE || 'node-example';
  const map = process.env.QM_MAP || 'node-example';
  if (!process.env.QM_USER || process.env.QM_PASSWORD === undefined) {
    throw new Error('set QM_USER and QM_PASSWORD');
  }
  const client = new QueueManagerService(target, grpc.credentials.createInsecure());
  try {
    const session = await login(client, process.env.QM_USER, process.env.QM_PASSWORD,
      process.env.QM_PIN);
    const { token } = session;
    console.error(`logged in to ${target}; server key ${session.fingerprint}`);
    // A session ends after session_ttl_ms without a call. A long-running Node consumer
    // would send { token } to HeartBeat on a timer well inside that, e.g. every third.

    await call(client, 'NewQueue', { token, queue_name: queue },
      { accept: ['CODE_QUEUE_ALREADY_EXISTS'] });
    const added = await call(client, 'Add', { token, queue_name: queue, element: 'hello from node' });
    console.error(`added message ${added.message_id} to ${queue}`);

    // Long-poll up to 5 s; the deadline must cover the wait.
    const polled = await call(client, 'Poll', { token, queue_name: queue, wait_ms: 5000 },
      { accept: ['CODE_QUEUE_EMPTY'], timeoutMs: TIMEOUT_MS + 5000 });
    if (polled.code === 'CODE_QUEUE_EMPTY') {
      throw new Error(`${queue} is empty`);
    }
    console.error(`polled message ${polled.message_id}: ${polled.element}`);
    await call(client, 'Ack', { token, message_id: polled.message_id, ack_type: 'ACK_TYPE_DONE' });
    console.error(`acked message ${polled.message_id}`);

    await call(client, 'MapPut', { token, map, key: 'language', value: 'javascript' });
    const pairs = [{ key: 'runtime', value: `node ${process.versions.node}` }];
    await call(client, 'MapBatchPut', { token, map, size: pairs.length, list: pairs });
    const one = await call(client, 'MapGet', { token, map, key: 'language' });
    const entries = await readMap(client, token, map);
    console.error(`map ${map}: ${entries.map((kv) => `${kv.key}=${kv.value}`).join(', ')}`);

    await call(client, 'Logout', { token });
    console.log(JSON.stringify({
      fingerprint: session.fingerprint,
      session_ttl_ms: session.sessionTtlMs,
      added_id: added.message_id,
      polled: {
        message_id: polled.message_id,
        element: polled.element,
        delivery_count: Number(polled.delivery_count),
      },
      language: one.value,
      map: Object.fromEntries(entries.map((kv) => [kv.key, kv.value])),
    }));
  } finally {
    client.close();
  }
}

main().catch((err) => {
  console.error(`error: ${err.message}`);
  process.exitCode = 1;
});
