'use strict';
/**
 * A tiny promise-based client for the keybroker gRPC API (package keybroker.v1).
 *
 * The contract is loaded at run time from protos/keybroker/v1/keybroker.proto with
 * @grpc/proto-loader, so there is no generated code to keep in step: a new RPC in the proto shows
 * up here as a new method. Conversions follow the proto-loader options below: field names stay as
 * in the proto (snake_case), int64 fields are strings, enums are their names, unset fields have
 * their defaults. Money is always a decimal string of US dollars ("12.5") — never a JS number.
 *
 *   const { createClient } = require('./keybroker');
 *   const kb = createClient('127.0.0.1:50051', process.env.KEYBROKER_TOKEN, { deadlineMs: 5000 });
 *   const key = await kb.getKey({ user_id: 'user-1' });
 *   kb.close();
 *
 * Every call carries `authorization: Bearer <token>` and a deadline. Every failure is a
 * KeybrokerError whose `reason` is the google.rpc.ErrorInfo reason the broker sent (NO_API_KEY,
 * MONTHLY_LIMIT_EXCEEDED, KEY_DISABLED, ...), decoded from the `grpc-status-details-bin` trailer.
 */

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const DEFAULT_PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
const PROTO_FILE = 'keybroker/v1/keybroker.proto';
const DEFAULT_DEADLINE_MS = 10_000;
const SERVICES = ['KeyBroker', 'KeyBrokerAdmin'];

// --- rich error details (google.rpc.Status in grpc-status-details-bin) -----------------------

// The few messages of google/rpc/status.proto and error_details.proto the broker sends, inline so
// that no googleapis checkout is needed. Field numbers are those of the published protos.
const RPC_PROTOS = [
  `syntax = "proto3";
   package google.protobuf;
   message Any { string type_url = 1; bytes value = 2; }
   message Duration { int64 seconds = 1; int32 nanos = 2; }`,
  `syntax = "proto3";
   package google.rpc;
   message Status { int32 code = 1; string message = 2; repeated google.protobuf.Any details = 3; }
   message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
   message RetryInfo { google.protobuf.Duration retry_delay = 1; }
   message QuotaFailure {
     message Violation { string subject = 1; string description = 2; }
     repeated Violation violations = 1;
   }
   message BadRequest {
     message FieldViolation { string field = 1; string description = 2; }
     repeated FieldViolation field_violations = 1;
   }`,
];
const rpcRoot = new protobuf.Root();
for (const source of RPC_PROTOS) protobuf.parse(source, rpcRoot, { keepCase: true });
rpcRoot.resolveAll();
const RpcStatus = rpcRoot.lookupType('google.rpc.Status');
const DETAIL_TYPES = new Map(
  ['ErrorInfo', 'RetryInfo', 'QuotaFailure', 'BadRequest'].map((name) => [
    `google.rpc.${name}`,
    rpcRoot.lookupType(`google.rpc.${name}`),
  ]),
);
const TO_OBJECT = { longs: String, enums: String, defaults: true, arrays: true, objects: true };

const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

/** A failed keybroker call: the gRPC status plus the broker's ErrorInfo and other details. */
class KeybrokerError extends Error {
  constructor({ code, message, reason = '', domain = '', metadata = {}, details = [], cause }) {
    const codeName = CODE_NAMES[code] ?? String(code);
    super(`${codeName}${reason ? ` ${reason}` : ''}: ${message}`, cause ? { cause } : undefined);
    this.name = 'KeybrokerError';
    /** Numeric gRPC status code (compare with grpc.status.NOT_FOUND etc.). */
    this.code = code;
    /** The status code's name, e.g. "NOT_FOUND". */
    this.codeName = codeName;
    /** ErrorInfo.reason (UPPER_SNAKE, e.g. "NO_API_KEY"); "" when the status carried none. */
    this.reason = reason;
    /** ErrorInfo.domain ("keybroker" for the broker's own errors). */
    this.domain = domain;
    /** ErrorInfo.metadata, e.g. { limit_usd: "10", usage_usd: "10.5" }. */
    this.metadata = metadata;
    /** Every decoded detail: [{ type: "google.rpc.BadRequest", field_violations: [...] }, ...]. */
    this.details = details;
    /** RetryInfo.retry_delay in milliseconds, or null when the broker gave none. */
    this.retryDelayMs = null;
    for (const detail of details) {
      if (detail.type === 'google.rpc.RetryInfo' && detail.retry_delay) {
        const { seconds, nanos } = detail.retry_delay;
        this.retryDelayMs = Number(seconds) * 1000 + Math.round(nanos / 1e6);
      }
    }
  }
}

/** Decodes the google.rpc.Status of a grpc-js error, or returns null when there is none. */
function decodeStatusDetails(error) {
  const raw = error?.metadata?.get?.('grpc-status-details-bin')?.[0];
  if (!raw) return null;
  try {
    const status = RpcStatus.decode(Buffer.isBuffer(raw) ? raw : Buffer.from(String(raw), 'base64'));
    const details = status.details.map(({ type_url, value }) => {
      const type = type_url.slice(type_url.lastIndexOf('/') + 1);
      const message = DETAIL_TYPES.get(type);
      return message ? { type, ...message.toObject(message.decode(value), TO_OBJECT) } : { type };
    });
    return { code: status.code, message: status.message, details };
  } catch {
    return null; // a malformed trailer must not hide the status itself
  }
}

/** Turns any error of a grpc-js call into a KeybrokerError (returns it unchanged if it is one). */
function toKeybrokerError(error) {
  if (error instanceof KeybrokerError) return error;
  const code = typeof error?.code === 'number' ? error.code : grpc.status.UNKNOWN;
  const status = decodeStatusDetails(error);
  const info = status?.details.find((detail) => detail.type === 'google.rpc.ErrorInfo');
  return new KeybrokerError({
    code,
    message: status?.message || error?.details || error?.message || 'call failed',
    reason: info?.reason ?? '',
    domain: info?.domain ?? '',
    metadata: { ...(info?.metadata ?? {}) },
    details: status?.details ?? [],
    cause: error,
  });
}

// --- the client ----------------------------------------------------------------------------

const loaded = new Map();

/** The keybroker.v1 package for one proto root, loaded once per process. */
function loadPackage(protoRoot) {
  if (!loaded.has(protoRoot)) {
    const definition = protoLoader.loadSync(PROTO_FILE, {
      includeDirs: [protoRoot],
      keepCase: true,
      longs: String,
      enums: String,
      defaults: true,
      oneofs: true,
    });
    loaded.set(protoRoot, grpc.loadPackageDefinition(definition).keybroker.v1);
  }
  return loaded.get(protoRoot);
}

const lowerFirst = (name) => name[0].toLowerCase() + name.slice(1);

/**
 * Opens one channel to the broker and returns an object with a method per RPC of KeyBroker and
 * KeyBrokerAdmin, named in lowerCamelCase: getKey, checkLimit, recordUsage, releaseReservation,
 * rotateKey, reportKeyInvalid, watchKeys, provisionKey, updateKey, revokeKey, getKeyInfo, listKeys,
 * getUsageSummary, reconcile, rotateKeys (admin RPCs need an admin-scoped token).
 *
 * Unary methods take (request, { deadlineMs }?) and return a promise of the response object.
 * watchKeys(request) returns an async iterable of WatchKeysResponse (no deadline: it runs until
 * you break out of the loop, which cancels the call).
 *
 * @param {string} target  host:port of the broker, e.g. "127.0.0.1:50051"
 * @param {string} token   caller token ("kbt_..."), sent as `authorization: Bearer <token>`
 * @param {object} [options]
 * @param {number} [options.deadlineMs=10000]  deadline of each unary call
 * @param {grpc.ChannelCredentials} [options.credentials]  default: plaintext; use
 *        grpc.credentials.createSsl(rootCa, clientKey, clientCert) for TLS / client certificates
 * @param {object} [options.channelOptions]  grpc-js channel options
 * @param {string} [options.protoRoot]  directory holding keybroker/v1/keybroker.proto
 */
function createClient(target, token, options = {}) {
  if (!token) throw new TypeError('a caller token is required');
  const {
    deadlineMs = DEFAULT_DEADLINE_MS,
    credentials = grpc.credentials.createInsecure(),
    channelOptions = {},
    protoRoot = DEFAULT_PROTO_ROOT,
  } = options;
  const pkg = loadPackage(protoRoot);
  const authorization = `Bearer ${token}`;
  const metadata = () => {
    const md = new grpc.Metadata();
    md.set('authorization', authorization);
    return md;
  };

  // Both services share one channel (one connection, one set of subchannels).
  const first = new pkg[SERVICES[0]](target, credentials, channelOptions);
  const stubs = SERVICES.map((name, i) =>
    i === 0 ? first : new pkg[name](target, credentials, { channelOverride: first.getChannel() }),
  );

  const client = {
    /** Closes the channel; pending calls fail with CANCELLED. */
    close: () => first.close(),
  };
  SERVICES.forEach((serviceName, i) => {
    const stub = stubs[i];
    for (const [rpc, method] of Object.entries(pkg[serviceName].service)) {
      const name = lowerFirst(rpc);
      if (name in client) throw new Error(`two RPCs map to the method name ${name}`);
      if (method.requestStream) continue; // the API has no client-streaming RPCs
      client[name] = method.responseStream
        ? (request = {}) => watch(stub[rpc](request, metadata()))
        : (request = {}, callOptions = {}) =>
            new Promise((resolve, reject) => {
              const deadline = Date.now() + (callOptions.deadlineMs ?? deadlineMs);
              stub[rpc](request, metadata(), { deadline }, (error, reply) =>
                error ? reject(toKeybrokerError(error)) : resolve(reply),
              );
            });
    }
  });
  return client;
}

/** A server stream as an async iterable whose errors are KeybrokerErrors. */
async function* watch(call) {
  call.on('error', () => {}); // errors are rethrown by the iterator; a late CANCELLED is expected
  try {
    for await (const message of call) yield message;
  } catch (error) {
    if (error?.code === grpc.status.CANCELLED) return;
    throw toKeybrokerError(error);
  } finally {
    call.cancel();
  }
}

// --- exact numbers from OpenRouter's JSON --------------------------------------------------

// A JSON string (kept as it is) or a JSON number. Outside strings a digit can only belong to a
// number, so scanning strings first finds every number of a valid document with its source text.
const JSON_TOKEN = /"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?/g;

/**
 * JSON.parse that never turns a fraction into a binary float: every number that is not a safe
 * integer comes back as a string of its exact source text ("0.00000990", "7.5e-7"). Integers such
 * as token counts stay numbers. Use it for OpenRouter replies, whose usage.cost is a JSON number.
 * (Node 20 has no JSON.parse source access — the reviver `context.source` of Node >= 21 — so the
 * numbers are quoted before parsing instead.)
 */
function parseJsonExact(text) {
  const quoted = text.replace(JSON_TOKEN, (token) =>
    token.startsWith('"') || (/^-?\d+$/.test(token) && Number.isSafeInteger(Number(token)))
      ? token
      : `"${token}"`,
  );
  return JSON.parse(quoted);
}

/**
 * The exact plain decimal string of a JSON number's text, as the broker's *_usd fields want it:
 * "7.5e-7" -> "0.00000075", "0.00000990" -> "0.0000099", 12 -> "12". Only moves the decimal
 * point and drops redundant zeros — no float arithmetic, so no rounding.
 */
function plainDecimal(value) {
  const text = String(value).trim();
  const match = /^(-?)(\d+)(?:\.(\d+))?(?:[eE]([+-]?\d+))?$/.exec(text);
  if (!match) throw new TypeError(`not a decimal number: ${JSON.stringify(text)}`);
  const [, sign, integer, fraction = '', exponent = '0'] = match;
  const shift = Number(exponent);
  if (Math.abs(shift) > 100) throw new RangeError(`exponent out of range: ${text}`);
  let digits = integer + fraction;
  let point = integer.length + shift; // index in `digits` where the decimal point goes
  if (point <= 0) {
    digits = '0'.repeat(1 - point) + digits;
    point = 1;
  }
  digits = digits.padEnd(point, '0');
  const whole = digits.slice(0, point).replace(/^0+(?=\d)/, '');
  const part = digits.slice(point).replace(/0+$/, '');
  const plain = part ? `${whole}.${part}` : whole;
  return sign && /[1-9]/.test(plain) ? `-${plain}` : plain;
}

module.exports = {
  createClient,
  KeybrokerError,
  toKeybrokerError,
  parseJsonExact,
  plainDecimal,
  status: grpc.status,
};
