#!/usr/bin/env node
// A ZANDD HSM producer written from the wire contract v1 (docs/design.md, "Wire contract v1")
// and the JSON Schemas in contracts/schemas/ alone: create a key, sign a message, and leave
// public.pem, message.bin and signature.der in OUT_DIR for `openssl dgst -sha256 -verify`.
// Then the reads: the fleet verifies the signature (and refuses a tampered message), key.list
// pages through the producer's keys with a cursor, key.describe shows the key's versions.
// Then rotate the key, sign with its new version and leave public-v2.pem, message-v2.bin and
// signature-v2.der beside them.
// Last, one ECDSA P-384 and one RSA-PSS key, verified with node's crypto (OUT_DIR/<algorithm>/).
//
// Usage: node producer.mjs AMQP_URL OUT_DIR
//   e.g. node producer.mjs amqp://guest:guest@localhost:5672/ ./out
// Environment: ZANDD_TIMEOUT_MS (default 30000): per-request deadline, sent as `expiration`.
//   ZANDD_ATTESTATION_KEY: a PEM file holding the fleet attestation key, pinned beforehand
//   (`zandd tpm attestation-key`); when set, the key's TPM attestation from key.public is
//   checked against it before the key is used.

import { constants, createHash, createPublicKey, randomBytes, randomUUID, verify } from 'node:crypto';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import amqp from 'amqplib';

const EXCHANGE = 'zandd';
const TIMEOUT_MS = Number.parseInt(process.env.ZANDD_TIMEOUT_MS ?? '30000', 10);
const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

class ProducerError extends Error {}

function fail(message) {
  process.stderr.write(`node-producer: ${message}\n`);
  process.exit(1);
}

function parseArgs(argv) {
  if (argv.length !== 2) {
    throw new ProducerError('usage: node producer.mjs AMQP_URL OUT_DIR');
  }
  const [amqpUrl, outDir] = argv;
  let url;
  try {
    url = new URL(amqpUrl);
  } catch {
    throw new ProducerError(`not a URL: ${amqpUrl}`);
  }
  if (url.protocol !== 'amqp:' && url.protocol !== 'amqps:') {
    throw new ProducerError(`not an amqp:// or amqps:// URL: ${url.protocol}`);
  }
  if (!Number.isInteger(TIMEOUT_MS) || TIMEOUT_MS <= 0) {
    throw new ProducerError('ZANDD_TIMEOUT_MS must be a positive integer');
  }
  // user_id must equal the connection's user or the broker closes the channel;
  // amqplib logs in as guest when the URL names no user.
  const user = url.username ? decodeURIComponent(url.username) : 'guest';
  return { amqpUrl, outDir, user };
}

function b64decode(value, what) {
  if (typeof value !== 'string' || !BASE64.test(value)) {
    throw new ProducerError(`${what} is not standard padded base64`);
  }
  return Buffer.from(value, 'base64');
}

function requireFields(body, fields, what) {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    throw new ProducerError(`${what} body is not a JSON object`);
  }
  for (const [name, type] of Object.entries(fields)) {
    const ok = type === 'integer' ? Number.isInteger(body[name]) : typeof body[name] === type;
    if (!ok) throw new ProducerError(`${what} lacks a ${type} "${name}"`);
  }
}

// Key attestation (docs/design.md, "Key attestation"): TPMS_ATTEST and TPMT_PUBLIC, big-endian.
const TPM_GENERATED_VALUE = 0xff544347;
const TPM_ST_ATTEST_CERTIFY = 0x8017;
const TPM_ALG_SHA256 = 0x000b;
const TPM_ALG_ECC = 0x0023;
const TPM_ALG_NULL = 0x0010;
const FIXED_TPM = 1 << 1;
const FIXED_PARENT = 1 << 4;
const SENSITIVE_DATA_ORIGIN = 1 << 5;

class TpmReader {
  constructor(buffer, what) {
    this.buffer = buffer;
    this.at = 0;
    this.what = what;
  }

  take(count) {
    if (this.at + count > this.buffer.length) throw new ProducerError(`the ${this.what} is truncated`);
    const chunk = this.buffer.subarray(this.at, this.at + count);
    this.at += count;
    return chunk;
  }

  u16() {
    return this.take(2).readUInt16BE(0);
  }

  u32() {
    return this.take(4).readUInt32BE(0);
  }

  sized() {
    return this.take(this.u16());
  }

  end() {
    if (this.at !== this.buffer.length) throw new ProducerError(`the ${this.what} has trailing bytes`);
  }
}

function parseCertifyInfo(buffer) {
  const r = new TpmReader(buffer, 'TPMS_ATTEST');
  if (r.u32() !== TPM_GENERATED_VALUE) throw new ProducerError('the TPMS_ATTEST was not made by a TPM');
  if (r.u16() !== TPM_ST_ATTEST_CERTIFY) throw new ProducerError('the TPMS_ATTEST is not a certification');
  r.sized(); // qualifiedSigner
  const extraData = r.sized();
  r.take(17 + 8); // clockInfo, firmwareVersion
  const name = r.sized();
  r.sized(); // qualifiedName
  r.end();
  return { extraData, name };
}

function parsePublicArea(buffer) {
  const r = new TpmReader(buffer, 'TPMT_PUBLIC');
  if (r.u16() !== TPM_ALG_ECC) throw new ProducerError('the attested key is not an ECC key');
  r.u16(); // nameAlg (the name check below pins SHA-256)
  const attributes = r.u32();
  const policy = r.sized();
  if (r.u16() !== TPM_ALG_NULL) throw new ProducerError('the attested key is not a signing key');
  if (r.u16() !== TPM_ALG_NULL) r.u16(); // scheme and its hash
  r.u16(); // curve
  if (r.u16() !== TPM_ALG_NULL) r.u16(); // kdf
  const x = r.sized();
  const y = r.sized();
  r.end();
  return { attributes, policy, x, y };
}

function qualifyingData(keyId, version) {
  const id = Buffer.from(keyId, 'utf8');
  const length = Buffer.alloc(4);
  length.writeUInt32BE(id.length);
  const number = Buffer.alloc(8);
  number.writeBigUInt64BE(BigInt(version));
  return createHash('sha256').update(Buffer.concat([Buffer.from('zandd-attest/1'), length, id, number])).digest();
}

// Checks a key.public reply's attestation with the pinned attestation key; returns what it says.
function verifyAttestation(reply, attestationKeyPem) {
  const attestation = reply.attestation;
  if (attestation === null || typeof attestation !== 'object') {
    throw new ProducerError(`key ${reply.key_id} comes without an attestation`);
  }
  const publicArea = b64decode(attestation.public_area, 'attestation "public_area"');
  const certifyInfo = b64decode(attestation.certify_info, 'attestation "certify_info"');
  const signature = b64decode(attestation.signature, 'attestation "signature"');
  if (!verify('sha256', certifyInfo, { key: attestationKeyPem, dsaEncoding: 'der' }, signature)) {
    throw new ProducerError('the attestation signature does not verify with the pinned attestation key');
  }
  const info = parseCertifyInfo(certifyInfo);
  const area = parsePublicArea(publicArea);
  const prefix = Buffer.alloc(2);
  prefix.writeUInt16BE(TPM_ALG_SHA256);
  const name = Buffer.concat([prefix, createHash('sha256').update(publicArea).digest()]);
  if (!info.name.equals(name)) throw new ProducerError('the certified name is not the attested public area');
  const jwk = createPublicKey(reply.public_key_pem).export({ format: 'jwk' });
  const pad = (b) => Buffer.concat([Buffer.alloc(Math.max(0, 32 - b.length)), b]);
  if (!pad(area.x).equals(Buffer.from(jwk.x, 'base64url')) || !pad(area.y).equals(Buffer.from(jwk.y, 'base64url'))) {
    throw new ProducerError('the attested public area holds another public key');
  }
  if (!info.extraData.equals(qualifyingData(reply.key_id, reply.version))) {
    throw new ProducerError(`the attestation was made for another key than ${reply.key_id}`);
  }
  if (!(area.attributes & SENSITIVE_DATA_ORIGIN)) {
    throw new ProducerError('the key was not generated inside the TPM');
  }
  const tpmBound = Boolean(area.attributes & FIXED_TPM) && Boolean(area.attributes & FIXED_PARENT);
  return { tpm_bound: tpmBound, policy: area.policy.toString('hex') };
}

// One connection, one confirm channel, one exclusive reply queue; requests matched by correlation_id.
class Rpc {
  constructor(connection, channel, replyQueue, user) {
    this.connection = connection;
    this.channel = channel;
    this.replyQueue = replyQueue;
    this.user = user;
    this.pending = new Map(); // correlation_id -> { resolve, reject, operation }
  }

  static async open(amqpUrl, user) {
    const connection = await amqp.connect(amqpUrl);
    const channel = await connection.createConfirmChannel();
    const rpc = new Rpc(connection, channel, null, user);
    const abortAll = (reason) => {
      for (const { reject } of rpc.pending.values()) reject(new ProducerError(reason));
      rpc.pending.clear();
    };
    connection.on('error', (err) => abortAll(`connection error: ${err.message}`));
    connection.on('close', () => abortAll('connection closed by the broker'));
    channel.on('error', (err) => abortAll(`channel error: ${err.message}`));
    channel.on('close', () => abortAll('channel closed by the broker'));
    // mandatory publish that no queue takes: the broker returns it before confirming it.
    channel.on('return', (msg) => {
      const id = msg.properties.correlationId;
      const entry = rpc.pending.get(id);
      if (!entry) return;
      rpc.pending.delete(id);
      entry.reject(
        new ProducerError(
          `${entry.operation} was unroutable (basic.return ${msg.fields.replyCode} ${msg.fields.replyText}): ` +
            `is the exchange "${EXCHANGE}" bound to a queue for "${msg.fields.routingKey}" on this vhost?`,
        ),
      );
    });

    const { queue } = await channel.assertQueue('', { exclusive: true, autoDelete: true, durable: false });
    rpc.replyQueue = queue;
    await channel.consume(queue, (msg) => rpc.onReply(msg), { noAck: true });
    return rpc;
  }

  onReply(msg) {
    if (msg === null) return; // consumer cancelled; the close handlers report it
    const entry = this.pending.get(msg.properties.correlationId);
    if (!entry) return; // a late reply to a request we gave up on
    this.pending.delete(msg.properties.correlationId);
    let body;
    try {
      body = JSON.parse(msg.content.toString('utf8'));
    } catch {
      entry.reject(new ProducerError(`${entry.operation} reply is not JSON`));
      return;
    }
    const type = msg.properties.type;
    if (type === 'error') {
      try {
        requireFields(body, { code: 'string', message: 'string', retryable: 'boolean' }, 'error reply');
      } catch (err) {
        entry.reject(err);
        return;
      }
      entry.reject(
        new ProducerError(
          `${entry.operation} failed: ${body.code}: ${body.message}` + (body.retryable ? ' (retryable)' : ''),
        ),
      );
    } else if (type === `${entry.operation}.reply`) {
      entry.resolve(body);
    } else {
      entry.reject(new ProducerError(`${entry.operation} got a reply of unexpected type ${JSON.stringify(type)}`));
    }
  }

  call(operation, body) {
    const messageId = randomUUID();
    const correlationId = randomUUID();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(correlationId);
        reject(new ProducerError(`${operation}: no reply within ${TIMEOUT_MS} ms`));
      }, TIMEOUT_MS);
      const settle = (fn) => (value) => {
        clearTimeout(timer);
        fn(value);
      };
      this.pending.set(correlationId, { resolve: settle(resolve), reject: settle(reject), operation });
      const options = {
        contentType: 'application/json',
        type: operation,
        messageId,
        correlationId,
        replyTo: this.replyQueue,
        userId: this.user,
        expiration: String(TIMEOUT_MS),
        persistent: true,
        mandatory: true,
        timestamp: Math.floor(Date.now() / 1000),
        headers: { traceparent: `00-${randomBytes(16).toString('hex')}-${randomBytes(8).toString('hex')}-01` },
      };
      const content = Buffer.from(JSON.stringify(body), 'utf8');
      this.channel.publish(EXCHANGE, operation, content, options, (err) => {
        if (err && this.pending.has(correlationId)) {
          const entry = this.pending.get(correlationId);
          this.pending.delete(correlationId);
          entry.reject(new ProducerError(`${operation}: the broker refused the publish (basic.nack)`));
        }
      });
    });
  }

  async close() {
    try {
      await this.connection.close();
    } catch {
      // already closed
    }
  }
}

// -- issue 15, reads: verify on the fleet, key.list (paged), key.describe ----------------------

// Every page of key.list, following next_cursor; page_size 1 so the cursor is exercised.
async function listAllKeys(rpc, scope) {
  const keyIds = [];
  let cursor;
  for (let pages = 0; pages < 10000; pages += 1) {
    const page = await rpc.call('key.list', { scope, page_size: 1, ...(cursor ? { cursor } : {}) });
    if (!Array.isArray(page.keys)) throw new ProducerError('key.list reply lacks an array "keys"');
    for (const key of page.keys) {
      requireFields(key, { key_id: 'string', version: 'integer', state: 'string' }, 'key.list entry');
      keyIds.push(key.key_id);
    }
    if (page.next_cursor === undefined || page.next_cursor === null) return keyIds;
    if (typeof page.next_cursor !== 'string') throw new ProducerError('key.list next_cursor is not a string');
    cursor = page.next_cursor;
  }
  throw new ProducerError('key.list did not end within 10000 pages');
}

async function reads(rpc, created, message, signature) {
  const asked = { key_id: created.key_id, signature: signature.toString('base64') };
  const verified = await rpc.call('verify', { ...asked, message: message.toString('base64') });
  requireFields(verified, { key_id: 'string', version: 'integer', valid: 'boolean' }, 'verify reply');
  const tampered = Buffer.concat([message, Buffer.from('!')]);
  const refused = await rpc.call('verify', { ...asked, message: tampered.toString('base64') });
  requireFields(refused, { valid: 'boolean' }, 'verify reply');
  const digest = createHash('sha256').update(message).digest('base64');
  const batch = await rpc.call('verify.batch', {
    key_id: created.key_id,
    items: [
      { digest, signature: asked.signature },
      { message: tampered.toString('base64'), signature: asked.signature },
    ],
  });
  if (!Array.isArray(batch.valid)) throw new ProducerError('verify.batch reply lacks an array "valid"');

  const listed = await listAllKeys(rpc, 'owned');
  const described = await rpc.call('key.describe', { key_id: created.key_id });
  if (!Array.isArray(described.versions)) throw new ProducerError('key.describe reply lacks "versions"');
  const current = described.versions.find((v) => v.version === described.current_version);
  if (!current || current.public_key_pem !== created.public_key_pem) {
    throw new ProducerError('key.describe shows another public key than key.create returned');
  }
  return {
    fleet_verify: { valid: verified.valid, tampered: refused.valid, batch: batch.valid },
    listed,
    described_versions: described.versions.map((v) => v.version),
  };
}

// -- end issue 15, reads --------------------------------------------------------------------
// --- issue 15, key writes -------------------------------------------------------------------
// key.rotate makes a new version and makes it the primary: a sign without "version" uses it,
// and its reply names it. Old versions keep verifying: key.public with all_versions lists
// them all (JWK kid "<key_id>.v<version>"). Leaves public-v2.pem, message-v2.bin and
// signature-v2.der in OUT_DIR for openssl.
async function rotateAndSign(rpc, created, outDir) {
  // message_id (set on every call) is key.rotate's idempotency key.
  const rotated = await rpc.call('key.rotate', { key_id: created.key_id });
  requireFields(
    rotated,
    { key_id: 'string', version: 'integer', algorithm: 'string', public_key_pem: 'string', public_key_jwk: 'object' },
    'key.rotate reply',
  );
  if (rotated.key_id !== created.key_id || rotated.version <= created.version) {
    throw new ProducerError(`key.rotate made ${rotated.key_id} v${rotated.version}, not a newer version`);
  }
  if (rotated.public_key_jwk.kid !== `${created.key_id}.v${rotated.version}`) {
    throw new ProducerError(`key.rotate reply JWK kid is ${rotated.public_key_jwk.kid}`);
  }
  const message = Buffer.from(`hello from node after rotation ${Date.now()}`, 'utf8');
  const signed = await rpc.call('sign', { key_id: created.key_id, message: message.toString('base64') });
  requireFields(signed, { version: 'integer', signature: 'string' }, 'sign reply');
  if (signed.version !== rotated.version) {
    throw new ProducerError(`sign after key.rotate used v${signed.version}, not the new primary v${rotated.version}`);
  }
  const signature = b64decode(signed.signature, 'sign reply "signature"');
  if (!verify('sha256', message, { key: rotated.public_key_pem, dsaEncoding: 'der' }, signature)) {
    throw new ProducerError('the signature does not verify against the key.rotate public key');
  }
  const all = await rpc.call('key.public', { key_id: created.key_id, all_versions: true });
  if (!Array.isArray(all.versions)) throw new ProducerError('key.public all_versions reply lacks "versions"');
  const kids = all.versions.map((v) => v.public_key_jwk?.kid);
  const byVersion = new Map(all.versions.map((v) => [v.version, v.public_key_pem]));
  if (byVersion.get(created.version) !== created.public_key_pem || byVersion.get(rotated.version) !== rotated.public_key_pem) {
    throw new ProducerError('key.public all_versions serves other public keys than key.create and key.rotate returned');
  }
  await writeFile(join(outDir, 'public-v2.pem'), rotated.public_key_pem);
  await writeFile(join(outDir, 'message-v2.bin'), message);
  await writeFile(join(outDir, 'signature-v2.der'), signature);
  return { version: rotated.version, signed_version: signed.version, kids };
}
// --- end issue 15, key writes ----------------------------------------------------------------

// ---- issue 15, aliases ------------------------------------------------------------------------
// key.alias.set names a key of ours "alias/<name>" (1-128 of [A-Za-z0-9._-]); sign (and every
// operation whose key_id may be an alias) takes the alias, and the reply names the real key id.
// The producer checks the signature against the key it meant, then deletes the alias.
async function aliasAndSign(rpc, created) {
  const alias = `alias/node-${randomUUID().slice(0, 8)}`;
  const set = await rpc.call('key.alias.set', { alias, key_id: created.key_id });
  requireFields(set, { alias: 'string', key_id: 'string', owner: 'string' }, 'key.alias.set reply');
  if (set.alias !== alias || set.key_id !== created.key_id) {
    throw new ProducerError(`key.alias.set pointed ${set.alias} at ${set.key_id}, not ${created.key_id}`);
  }
  const message = Buffer.from(`hello from node through ${alias}`, 'utf8');
  const signed = await rpc.call('sign', { key_id: alias, message: message.toString('base64') });
  requireFields(signed, { key_id: 'string', version: 'integer', signature: 'string' }, 'sign reply');
  if (signed.key_id !== created.key_id) {
    throw new ProducerError(`sign through ${alias} was made by ${signed.key_id}, not ${created.key_id}`);
  }
  const described = await rpc.call('key.public', { key_id: alias, version: signed.version });
  const signature = b64decode(signed.signature, 'sign reply "signature"');
  const verified = verify('sha256', message, { key: described.public_key_pem, dsaEncoding: 'der' }, signature);
  const deleted = await rpc.call('key.alias.delete', { alias });
  return { alias, key_id: signed.key_id, verified, deleted_pointed_at: deleted.previous_key_id };
}
// ---- end issue 15, aliases --------------------------------------------------------------------

async function main() {
  const { amqpUrl, outDir, user } = parseArgs(process.argv.slice(2));
  let rpc;
  try {
    rpc = await Rpc.open(amqpUrl, user);
  } catch (err) {
    throw new ProducerError(`cannot connect to the broker: ${err.message}`);
  }
  try {
    const created = await rpc.call('key.create', { label: 'node-producer interop' });
    requireFields(
      created,
      { key_id: 'string', version: 'integer', algorithm: 'string', public_key_pem: 'string', created_at: 'string' },
      'key.create reply',
    );

    let attested = null;
    if (process.env.ZANDD_ATTESTATION_KEY) {
      const pinned = await readFile(process.env.ZANDD_ATTESTATION_KEY, 'utf8');
      const served = await rpc.call('key.public', { key_id: created.key_id });
      if (served.public_key_pem !== created.public_key_pem) {
        throw new ProducerError('key.public serves another public key than key.create returned');
      }
      attested = verifyAttestation(served, pinned);
    }

    const message = Buffer.from(`hello from node ${Date.now()}`, 'utf8');
    const signed = await rpc.call('sign', {
      key_id: created.key_id,
      message: message.toString('base64'),
      encoding: 'der',
    });
    requireFields(
      signed,
      { key_id: 'string', version: 'integer', algorithm: 'string', encoding: 'string', signature: 'string' },
      'sign reply',
    );
    if (signed.key_id !== created.key_id) {
      throw new ProducerError(`sign reply names key ${signed.key_id}, asked for ${created.key_id}`);
    }
    if (signed.encoding !== 'der') {
      throw new ProducerError(`sign reply encoding is ${signed.encoding}, asked for der`);
    }
    const signature = b64decode(signed.signature, 'sign reply "signature"');
    // A producer should check what it got back before handing it on.
    const good = verify('sha256', message, { key: created.public_key_pem, dsaEncoding: 'der' }, signature);
    if (!good) throw new ProducerError('the signature does not verify against the key.create public key');

    const read = await reads(rpc, created, message, signature);

    await mkdir(outDir, { recursive: true });
    await writeFile(join(outDir, 'public.pem'), created.public_key_pem);
    await writeFile(join(outDir, 'message.bin'), message);
    await writeFile(join(outDir, 'signature.der'), signature);
    const summary = { key_id: created.key_id, signature_bytes: signature.length, attestation: attested, ...read };

    // --- issue 15, key writes: rotate, sign with the new primary, list every version ---
    summary.rotation = await rotateAndSign(rpc, created, outDir);
    // --- end issue 15, key writes ---
    // ---- issue 15, aliases: name the key, sign through the name ----
    summary.alias = await aliasAndSign(rpc, created);
    // ---- end issue 15, aliases ----

    summary.algorithms = await otherAlgorithms(rpc, outDir);
    process.stdout.write(`${JSON.stringify(summary)}\n`);
  } finally {
    await rpc.close();
  }
}

// -- algorithms (issue 15) --
// A key's algorithm is chosen at key.create ("algorithm"; the schema lists them). One key of
// another curve and one RSA key: each signs, and node's crypto verifies it with the JWK that
// key.public serves (RSA: kty RSA, n/e, alg RS256 or PS256; EC P-384: ES384). ECDSA is asked
// for in "raw" (r‖s, as JWS has it); an RSA signature has one encoding. The files land in
// OUT_DIR/<algorithm>/ for openssl (public.pem, message.bin, signature.bin; DER for ECDSA).
const OTHER_ALGORITHMS = [
  { algorithm: 'ecdsa-p384-sha384', hash: 'sha384', encoding: 'raw' },
  { algorithm: 'rsa-pss-2048-sha256', hash: 'sha256', encoding: 'der' },
];

function nodeKeyOptions(algorithm, key) {
  if (algorithm.startsWith('rsa-pss-')) {
    return { key, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 };
  }
  if (algorithm.startsWith('rsa-pkcs1-')) return { key, padding: constants.RSA_PKCS1_PADDING };
  return { key, dsaEncoding: 'ieee-p1363' };
}

async function otherAlgorithms(rpc, outDir) {
  const results = {};
  for (const { algorithm, hash, encoding } of OTHER_ALGORITHMS) {
    const created = await rpc.call('key.create', { label: `node-producer ${algorithm}`, algorithm });
    if (created.algorithm !== algorithm) {
      throw new ProducerError(`key.create made a ${created.algorithm} key, asked for ${algorithm}`);
    }
    const served = await rpc.call('key.public', { key_id: created.key_id });
    const jwk = served.public_key_jwk;
    const key = createPublicKey({ key: jwk, format: 'jwk' });
    const pem = createPublicKey(created.public_key_pem).export({ format: 'pem', type: 'spki' });
    if (key.export({ format: 'pem', type: 'spki' }) !== pem) {
      throw new ProducerError(`the ${algorithm} JWK is not the key key.create returned`);
    }
    const message = Buffer.from(`hello from node, ${algorithm}, ${Date.now()}`, 'utf8');
    const signed = await rpc.call('sign', { key_id: created.key_id, message: message.toString('base64'), encoding });
    if (signed.algorithm !== algorithm) throw new ProducerError(`sign replied ${signed.algorithm}`);
    const signature = b64decode(signed.signature, `${algorithm} signature`);
    if (!verify(hash, message, nodeKeyOptions(algorithm, key), signature)) {
      throw new ProducerError(`the ${algorithm} signature does not verify with node's crypto`);
    }
    const dir = join(outDir, algorithm);
    await mkdir(dir, { recursive: true });
    await writeFile(join(dir, 'public.pem'), created.public_key_pem);
    await writeFile(join(dir, 'message.bin'), message);
    // openssl takes ECDSA in DER: re-encode what node verified as r‖s.
    const forOpenssl = algorithm.startsWith('ecdsa-') ? p1363ToDer(signature) : signature;
    await writeFile(join(dir, 'signature.bin'), forOpenssl);
    results[algorithm] = { key_id: created.key_id, jwk_alg: jwk.alg, signature_bytes: signature.length, verified: true };
  }
  return results;
}

function derInteger(bytes) {
  let i = 0;
  while (i < bytes.length - 1 && bytes[i] === 0) i += 1;
  let value = bytes.subarray(i);
  if (value[0] & 0x80) value = Buffer.concat([Buffer.from([0]), value]);
  return Buffer.concat([Buffer.from([0x02, value.length]), value]);
}

function p1363ToDer(signature) {
  const half = signature.length / 2;
  const body = Buffer.concat([derInteger(signature.subarray(0, half)), derInteger(signature.subarray(half))]);
  const length = body.length < 0x80 ? Buffer.from([body.length]) : Buffer.from([0x81, body.length]);
  return Buffer.concat([Buffer.from([0x30]), length, body]);
}
// -- end algorithms --

main().then(
  () => process.exit(0),
  (err) => fail(err instanceof ProducerError ? err.message : `unexpected failure: ${err?.stack ?? err}`),
);
