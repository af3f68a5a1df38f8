/**
 * The three-message handshake (PROTOCOL.md §3–§5): a shared secret in, per-direction traffic keys out.
 *
 *   Message 1, client → server (steps C1, S1)
 *     v1:  0      1         17                  49        81
 *          | ver | IV (16) | E_wrap(SK) (32)   | R_A (32) |
 *     v2:  ... as v1 ...                                 81          113
 *                                                        | E_C (32)  |
 *     v3:  ... as v2 ...                                             113         129
 *                                                                    | H (16)    |
 *   Message 2, server → client (steps S2, C2)
 *     v1:  0          32                       64
 *          | R_B (32) | HMAC(K_auth, m1‖R_B‖"SRVR") |
 *     v2:  0          32          64                       96
 *          | R_B (32) | E_S (32)  | HMAC(K_auth, m1‖R_B‖E_S‖"SRVR") |
 *   Message 3, client → server (steps C3, S3)
 *          0                                      32
 *          | HMAC(K_auth, m1‖m2‖"CLNT")          |
 *
 * SK is the client's random session key, wrapped with AES-256-CBC (no padding) under K_wrap. E_C/E_S are
 * ephemeral X25519 public keys (versions 2 and 3, forward secrecy). H (version 3) is the key hint: HMAC(K_hint, R_A)
 * cut to 16 bytes, by which a keyring server finds the client's key without the client naming itself (§3 S1, §4.1).
 * Messages 2 and 3 of version 3 are those of version 2. Traffic keys: HKDF-SHA256 over SK (‖ DH from v2 on) with
 * salt R_A‖R_B and the transcript hash in `info` (§5).
 *
 * Each message has one create/consume pair. A consume checks the exact length first, works on local values and
 * changes state only after every check has passed; any failure throws a VpnError and the caller drops the session.
 */
import { concatBytes, equalBytes, randomBytes } from '@noble/ciphers/utils.js';
import { hkdf } from '@noble/hashes/hkdf.js';
import { scrypt } from '@noble/hashes/scrypt.js';
import { sha256 } from '@noble/hashes/sha2.js';
import { type Engine, type KeyedMac, MAC_LEN, nobleEngine } from './engine.ts';
import { VpnError } from './errors.ts';

// ---- Specification constants (PROTOCOL.md §2) ----
export const VERSION_1 = 0x01; // the original design's handshake
export const VERSION_2 = 0x02; // + ephemeral X25519 (forward secrecy)
export const VERSION_3 = 0x03; // + a key hint: a key per client (serve --keyring)
export const VERSION_LEN = 1;
export const IV_LEN = 16;
export const KEY_LEN = 32;
export const WRAPPED_KEY_LEN = KEY_LEN; // AES-256-CBC without padding of exactly two blocks
export const NONCE_LEN = 32;
export const PUB_LEN = 32;
export const MSG1_V1_LEN = VERSION_LEN + IV_LEN + WRAPPED_KEY_LEN + NONCE_LEN; // 81
export const MSG1_V2_LEN = MSG1_V1_LEN + PUB_LEN; // 113
export const HINT_LEN = 16;
export const MSG1_V3_LEN = MSG1_V2_LEN + HINT_LEN; // 129
export const MSG2_V1_LEN = NONCE_LEN + MAC_LEN; // 64
export const MSG2_V2_LEN = NONCE_LEN + PUB_LEN + MAC_LEN; // 96
export const MSG3_LEN = MAC_LEN; // 32
export const MSG1_MAX_LEN = MSG1_V3_LEN;
/** Sent by a `--require-pfs` server instead of message 2 when it refuses version 1, then it closes (§3, S1). */
export const REFUSE_V1 = new Uint8Array([0x00, 0x50, 0x46, 0x53]); // 0x00 "PFS"

const te = new TextEncoder();
export const LABEL_SRVR = te.encode('SRVR');
export const LABEL_CLNT = te.encode('CLNT');
export const SALT_KEYFILE = te.encode('vpn.ts key file');
export const SALT_PASSPHRASE = te.encode('vpn.ts passphrase');
export const INFO_LONG_TERM = te.encode('vpn.ts long-term keys');
export const INFO_KEY_HINT = te.encode('vpn.ts key hint');
export const INFO_TRAFFIC = [te.encode('vpn.ts v1 traffic'), te.encode('vpn.ts v2 traffic'), te.encode('vpn.ts v3 traffic')] as const;
/** scrypt cost for passphrases (§4): N = 2^16, r = 8, p = 1, about 0.6 s and 64 MiB here. */
export const SCRYPT = { N: 1 << 16, r: 8, p: 1, dkLen: 32 } as const;
export const KEYFILE_LEN = 32;
const TRAFFIC_OKM_LEN = 6 * 32;

/** Keys derived once from the shared secret at start-up (§4). */
export interface LongTermKeys {
  /** wraps the session key in message 1 */
  readonly wrap: Uint8Array;
  /** keys the handshake HMACs of messages 2 and 3 */
  readonly auth: Uint8Array;
  /** keys the hint of a version 3 message 1 (§4.1); key files only, not passphrases */
  readonly hint?: Uint8Array;
}

/** A key the server knows, and whose it is: a keyring entry's name, or null for the one shared key. */
export interface ClientKey {
  readonly name: string | null;
  readonly keys: LongTermKeys;
}

/**
 * What a server authenticates clients with (§3 S1): the one shared key (`--key`), or a keyring (`--keyring`).
 */
export interface ServerKeys {
  /** the key of version 1 and 2 clients, which send no hint; null when every client must name its key (a keyring) */
  readonly shared: ClientKey | null;
  /**
   * Version 3: the key whose hint over R_A is H, or null. It MUST try every key it holds whatever the answer (the time
   * it takes must not tell which key matched) and compare in constant time.
   */
  find(ra: Uint8Array, h: Uint8Array): ClientKey | null;
}

/** The hint of a version 3 message 1 (§3 C1.3): HMAC(K_hint, R_A) cut to HINT_LEN bytes. */
export function keyHint(mac: KeyedMac, ra: Uint8Array): Uint8Array {
  return mac(ra).subarray(0, HINT_LEN);
}

/** sharedKey(keys) for each unnamed key in use: a server makes it once, not once per connection. */
const sharedKeys = new WeakMap<LongTermKeys, ServerKeys>();

/**
 * ServerKeys for one key (`serve --key`): version 1 and 2 clients, and version 3 ones whose hint it matches. Without a
 * name the answer is made once per key and shared: every session held its own keyed HMAC (about 2.5 KiB) before.
 */
export function sharedKey(keys: LongTermKeys, name: string | null = null): ServerKeys {
  if (name === null) {
    let k = sharedKeys.get(keys);
    if (!k) sharedKeys.set(keys, (k = makeSharedKey(keys, null)));
    return k;
  }
  return makeSharedKey(keys, name);
}

function makeSharedKey(keys: LongTermKeys, name: string | null): ServerKeys {
  const entry: ClientKey = { name, keys };
  const mac = keys.hint ? hintMac(keys.hint) : null;
  return {
    shared: entry,
    find: (ra, h) => (mac !== null && equalBytes(keyHint(mac, ra), h) ? entry : null),
  };
}

/** HMAC-SHA256 keyed once by K_hint (noble, with the keyed state prepared once: two compressions per hint). */
export function hintMac(kHint: Uint8Array): KeyedMac {
  return nobleEngine.mac(kHint);
}

/** One direction's keys and the starting value of its HMAC chain (§5). */
export interface DirectionKeys {
  readonly enc: Uint8Array;
  readonly mac: Uint8Array;
  readonly chain0: Uint8Array;
}
export interface TrafficKeys {
  readonly version: number;
  readonly send: DirectionKeys;
  readonly recv: DirectionKeys;
}

function expectLen(field: string, b: Uint8Array, n: number): void {
  if (b.length !== n) throw new VpnError('AUTH_FAILED', `"${field}" expected ${n} bytes, got ${b.length}`);
}

function longTerm(ikm: Uint8Array, salt: Uint8Array): LongTermKeys {
  const okm = hkdf(sha256, ikm, salt, INFO_LONG_TERM, 2 * KEY_LEN);
  return { wrap: okm.slice(0, KEY_LEN), auth: okm.slice(KEY_LEN) };
}

/** §4: a 32-byte key file → long-term keys (HKDF-SHA256). Throws USAGE when the key is not 32 bytes. */
export function keysFromKeyFile(key: Uint8Array): LongTermKeys {
  if (key.length !== KEYFILE_LEN) throw new VpnError('USAGE', `key must be ${KEYFILE_LEN} bytes, got ${key.length}`);
  // §4.1: K_hint from the same key under its own info; HKDF's separate info keeps it independent of K_wrap, K_auth.
  return { ...longTerm(key, SALT_KEYFILE), hint: hkdf(sha256, key, SALT_KEYFILE, INFO_KEY_HINT, KEY_LEN) };
}

/** §4: a passphrase → scrypt → HKDF-SHA256 → long-term keys. Slow on purpose (about half a second). */
export function keysFromPassphrase(passphrase: string): LongTermKeys {
  if (passphrase.length === 0) throw new VpnError('USAGE', 'the passphrase is empty');
  const stretched = scrypt(te.encode(passphrase.normalize('NFKC')), SALT_PASSPHRASE, SCRYPT);
  const keys = longTerm(stretched, SALT_PASSPHRASE);
  stretched.fill(0);
  return keys;
}

/** Random bytes; tests inject a deterministic source to reproduce the known-answer vectors. */
export type RandomSource = (n: number) => Uint8Array;
/** Receives every handshake field for `-v` tracing (which warns first: the fields include secrets). */
export type Tracer = (field: string, value: Uint8Array) => void;

export interface HandshakeOptions {
  engine: Engine;
  random?: RandomSource;
  trace?: Tracer;
}

/** §5: both sides run this over the same inputs and get mirror-image keys. */
function deriveTraffic(
  version: number,
  ikm: Uint8Array,
  ra: Uint8Array,
  rb: Uint8Array,
  m1: Uint8Array,
  m2: Uint8Array,
  m3: Uint8Array,
  role: 'client' | 'server',
  trace?: Tracer,
): TrafficKeys {
  const th = sha256(concatBytes(m1, m2, m3));
  const okm = hkdf(sha256, ikm, concatBytes(ra, rb), concatBytes(INFO_TRAFFIC[version - 1]!, th), TRAFFIC_OKM_LEN);
  const part = (i: number) => okm.slice(i * 32, i * 32 + 32);
  const c2s: DirectionKeys = { enc: part(0), mac: part(1), chain0: part(2) };
  const s2c: DirectionKeys = { enc: part(3), mac: part(4), chain0: part(5) };
  okm.fill(0);
  if (trace) {
    trace('transcript hash', th);
    for (const [n, k] of [['c2s', c2s], ['s2c', s2c]] as const) {
      trace(`${n} enc key`, k.enc);
      trace(`${n} mac key`, k.mac);
      trace(`${n} chain0`, k.chain0);
    }
  }
  return role === 'client' ? { version, send: c2s, recv: s2c } : { version, send: s2c, recv: c2s };
}

/**
 * Where a handshake stands (wireguard-go's handshake states): every create/consume checks it first and moves it on
 * only after all its checks passed, so a message that failed leaves the state as it was (the session layer drops
 * the session on any failure; the tests replay a corrected message into the same handshake).
 */
export type HandshakeState = 'start' | 'awaiting message 1' | 'awaiting message 2' | 'awaiting message 3' | 'established';

/** What the session layer drives, whichever side it is on. */
export interface Handshake {
  readonly state: HandshakeState;
  /** the protocol version in use; 0 on the server until message 1 named one */
  readonly version: number;
  /** the traffic keys, once `state` is `established` */
  readonly keys: TrafficKeys | null;
  /**
   * Length of the next message expected from the peer, given the first bytes buffered so far (`head`): null while
   * `head` does not tell yet (the server needs message 1's version byte), 0 when nothing more is expected.
   * Throws AUTH_FAILED for a version byte that names no version.
   */
  nextLength(head: Uint8Array): number | null;
  /** Consume the next message (exactly `nextLength` bytes); returns the answer to send, or null. Throws on failure. */
  consume(message: Uint8Array): Uint8Array | null;
}

function expectState(actual: HandshakeState, wanted: HandshakeState, what: string): void {
  if (actual !== wanted) throw new VpnError('AUTH_FAILED', `${what} out of order (handshake is ${actual})`);
}

/** The client side: createMessage1 (C1), consumeMessage2 (C2, returns message 3 = C3), then `keys`. */
export class ClientHandshake implements Handshake {
  readonly version: number;
  state: HandshakeState = 'start';
  private readonly lt: LongTermKeys;
  private readonly o: HandshakeOptions;
  private sk: Uint8Array | null = null;
  private ra: Uint8Array | null = null;
  private eph: { secretKey: Uint8Array; publicKey: Uint8Array } | null = null;
  private m1: Uint8Array | null = null;
  keys: TrafficKeys | null = null;

  constructor(lt: LongTermKeys, version: number, o: HandshakeOptions) {
    if (version !== VERSION_1 && version !== VERSION_2 && version !== VERSION_3) throw new VpnError('USAGE', `unknown protocol version ${version}`);
    if (version === VERSION_3 && !lt.hint) throw new VpnError('USAGE', 'protocol version 3 needs a key file (a passphrase has no key hint)');
    this.lt = lt;
    this.version = version;
    this.o = o;
  }

  nextLength(): number | null {
    if (this.state !== 'awaiting message 2') return 0;
    return this.version >= VERSION_2 ? MSG2_V2_LEN : MSG2_V1_LEN;
  }

  consume(message: Uint8Array): Uint8Array {
    return this.consumeMessage2(message);
  }

  /** C1: session key, IV and R_A (and E_C in v2) → message 1. */
  createMessage1(): Uint8Array {
    expectState(this.state, 'start', 'createMessage1');
    return this.c1();
  }

  private c1(): Uint8Array {
    const rnd = this.o.random ?? randomBytes;
    const sk = rnd(KEY_LEN);
    const iv = rnd(IV_LEN);
    const ra = rnd(NONCE_LEN);
    const wrapped = this.o.engine.encryptCbc(this.lt.wrap, iv, sk, false);
    const parts = [new Uint8Array([this.version]), iv, wrapped, ra];
    if (this.version >= VERSION_2) {
      const e = this.o.engine;
      this.eph = this.o.random ? (() => { const s = rnd(KEY_LEN); return { secretKey: s, publicKey: e.x25519Public(s) }; })() : e.x25519Keygen();
      parts.push(this.eph.publicKey);
    }
    const h = this.version === VERSION_3 ? keyHint(hintMac(this.lt.hint!), ra) : null;
    if (h) parts.push(h);
    const m1 = concatBytes(...parts);
    const t = this.o.trace;
    if (t) {
      t('C1 session key (secret)', sk);
      t('C1 IV', iv);
      t('C1 wrapped session key', wrapped);
      t('C1 R_A', ra);
      if (this.eph) t('C1 E_C (ephemeral public)', this.eph.publicKey);
      if (h) t('C1 H (key hint)', h);
      t('message 1', m1);
    }
    this.sk = sk;
    this.ra = ra;
    this.m1 = m1;
    this.state = 'awaiting message 2';
    return m1;
  }

  /** C2 + C3: verify message 2 (constant time), then answer with message 3 and derive the traffic keys. */
  consumeMessage2(m2: Uint8Array): Uint8Array {
    expectState(this.state, 'awaiting message 2', 'consumeMessage2');
    return this.c2(m2);
  }

  private c2(m2: Uint8Array): Uint8Array {
    const v2 = this.version >= VERSION_2;
    expectLen('message 2', m2, v2 ? MSG2_V2_LEN : MSG2_V1_LEN);
    const body = m2.subarray(0, m2.length - MAC_LEN);
    const mac = m2.subarray(m2.length - MAC_LEN);
    const authMac = this.o.engine.mac(this.lt.auth);
    const expect = authMac(this.m1!, body, LABEL_SRVR);
    this.o.trace?.('message 2', m2);
    if (!equalBytes(expect, mac)) throw new VpnError('AUTH_FAILED', 'message 2 failed verification (wrong secret, or not a vpn server)');
    const rb = m2.slice(0, NONCE_LEN);
    let ikm = this.sk!;
    if (v2) {
      const es = m2.slice(NONCE_LEN, NONCE_LEN + PUB_LEN);
      let dh: Uint8Array;
      try {
        dh = this.o.engine.x25519(this.eph!.secretKey, es);
      } catch {
        throw new VpnError('AUTH_FAILED', 'the server sent an invalid ephemeral key');
      } finally {
        this.eph!.secretKey.fill(0);
      }
      this.o.trace?.('C2 X25519 shared secret (secret)', dh);
      ikm = concatBytes(this.sk!, dh);
      dh.fill(0);
    }
    const m3 = authMac(this.m1!, m2, LABEL_CLNT);
    this.o.trace?.('message 3', m3);
    this.keys = deriveTraffic(this.version, ikm, this.ra!, rb, this.m1!, m2, m3, 'client', this.o.trace);
    ikm.fill(0);
    this.sk!.fill(0);
    this.state = 'established';
    return m3;
  }
}

/** Length of message 1 for a version byte, or throws AUTH_FAILED for a byte that names no version. */
export function message1Length(versionByte: number): number {
  if (versionByte === VERSION_1) return MSG1_V1_LEN;
  if (versionByte === VERSION_2) return MSG1_V2_LEN;
  if (versionByte === VERSION_3) return MSG1_V3_LEN;
  throw new VpnError('AUTH_FAILED', `unknown protocol version byte 0x${versionByte.toString(16).padStart(2, '0')} (not a vpn client)`);
}

/** The server side: consumeMessage1 (S1, returns message 2 = S2), then consumeMessage3 (S3) → traffic keys. */
export class ServerHandshake implements Handshake {
  state: HandshakeState = 'awaiting message 1';
  private readonly keyring: ServerKeys;
  /** the client's key, found at S1 (the shared one, or the keyring entry whose hint matched) */
  client: ClientKey | null = null;
  private readonly o: HandshakeOptions & { requirePfs?: boolean };
  private m1: Uint8Array | null = null;
  private m2: Uint8Array | null = null;
  private rb: Uint8Array | null = null;
  /** e_S and E_S (version 2) from S1 until S3 computes DH, then wiped */
  private eph: KeyPair | null = null;
  version = 0;
  keys: TrafficKeys | null = null;

  /** `keys`: one shared key (LongTermKeys, as `serve --key`), or ServerKeys (a keyring). */
  constructor(keys: LongTermKeys | ServerKeys, o: HandshakeOptions & { requirePfs?: boolean }) {
    this.keyring = 'find' in keys ? keys : sharedKey(keys);
    this.o = o;
  }

  private get lt(): LongTermKeys {
    return this.client!.keys;
  }

  nextLength(head: Uint8Array): number | null {
    if (this.state === 'awaiting message 3') return MSG3_LEN;
    if (this.state !== 'awaiting message 1') return 0;
    if (head.length < VERSION_LEN) return null;
    return message1Length(head[0]!);
  }

  consume(message: Uint8Array): Uint8Array | null {
    if (this.state === 'awaiting message 1') return this.consumeMessage1(message);
    this.consumeMessage3(message);
    return null;
  }

  /** S1 + S2: check message 1's version and exact length, then answer with R_B (and E_S) and the SRVR HMAC. */
  consumeMessage1(m1: Uint8Array): Uint8Array {
    expectState(this.state, 'awaiting message 1', 'consumeMessage1');
    return this.s1(m1);
  }

  private s1(m1: Uint8Array): Uint8Array {
    if (m1.length < 1) throw new VpnError('AUTH_FAILED', 'empty message 1');
    const version = m1[0]!;
    expectLen('message 1', m1, message1Length(version));
    if (version === VERSION_1 && this.o.requirePfs) {
      throw new VpnError('PFS_REQUIRED', 'the client offered protocol version 1 (no forward secrecy) and --require-pfs is set');
    }
    // S1.3: whose key. Version 3 names it by its hint (every key is tried, in constant time each); versions 1 and 2
    // can only use the shared key, which a keyring server does not have.
    let client: ClientKey | null;
    if (version === VERSION_3) {
      const ra = m1.subarray(VERSION_LEN + IV_LEN + WRAPPED_KEY_LEN, MSG1_V1_LEN);
      client = this.keyring.find(ra, m1.subarray(MSG1_V2_LEN, MSG1_V3_LEN));
      if (!client) throw new VpnError('AUTH_FAILED', 'message 1 names no key this server holds (an unknown or revoked client key)');
    } else {
      client = this.keyring.shared;
      if (!client) throw new VpnError('AUTH_FAILED', `the client offered protocol version ${version}, which names no key; this server (--keyring) takes only client keys from its keyring (version 3)`);
    }
    const rnd = this.o.random ?? randomBytes;
    const rb = rnd(NONCE_LEN);
    const body = [rb];
    let eph: KeyPair | null = null;
    if (version >= VERSION_2) {
      // S1.4 without the scalar multiplication: a low-order E_C is refused by its encoding (the same set of keys
      // whose DH is all zero), and DH itself waits for S3, after m3 verified — mac2 does not cover it, so a
      // stranger's message 1 costs one key pair (often a prepared one) and one HMAC (PROTOCOL.md §3 S1.5, §11.18).
      if (isLowOrder(m1.subarray(MSG1_V1_LEN, MSG1_V2_LEN))) throw new VpnError('AUTH_FAILED', 'the client sent an invalid ephemeral key');
      const e = this.o.engine;
      eph = this.o.random ? (() => { const s = rnd(KEY_LEN); return { secretKey: s, publicKey: e.x25519Public(s) }; })() : takeKeyPair(e);
      body.push(eph.publicKey);
    }
    const bodyBytes = concatBytes(...body);
    const mac = this.o.engine.mac(client.keys.auth)(m1, bodyBytes, LABEL_SRVR);
    const m2 = concatBytes(bodyBytes, mac);
    if (this.o.trace) {
      this.o.trace('message 1', m1);
      this.o.trace('S1 R_B', rb);
      if (eph) this.o.trace('S1 E_S (ephemeral public)', eph.publicKey);
      this.o.trace('message 2', m2);
    }
    this.version = version;
    this.client = client;
    this.m1 = m1.slice();
    this.m2 = m2;
    this.rb = rb;
    this.eph = eph;
    this.state = 'awaiting message 3';
    return m2;
  }

  /** S3: verify message 3 in constant time; only then unwrap the session key and derive the traffic keys. */
  consumeMessage3(m3: Uint8Array): TrafficKeys {
    expectState(this.state, 'awaiting message 3', 'consumeMessage3');
    return this.s3(m3);
  }

  private s3(m3: Uint8Array): TrafficKeys {
    const m1 = this.m1!;
    const m2 = this.m2!;
    expectLen('message 3', m3, MSG3_LEN);
    const expect = this.o.engine.mac(this.lt.auth)(m1, m2, LABEL_CLNT);
    this.o.trace?.('message 3', m3);
    if (!equalBytes(expect, m3)) {
      this.wipeEphemeral();
      throw new VpnError('AUTH_FAILED', 'message 3 failed verification (wrong secret, or a replayed or altered handshake)');
    }
    let dh: Uint8Array | null = null;
    if (this.eph) {
      try {
        dh = this.o.engine.x25519(this.eph.secretKey, m1.subarray(MSG1_V1_LEN, MSG1_V2_LEN));
      } catch {
        throw new VpnError('AUTH_FAILED', 'the client sent an invalid ephemeral key'); // isLowOrder let none through
      } finally {
        this.wipeEphemeral();
      }
      this.o.trace?.('S3 X25519 shared secret (secret)', dh);
    }
    const iv = m1.subarray(VERSION_LEN, VERSION_LEN + IV_LEN);
    const wrapped = m1.subarray(VERSION_LEN + IV_LEN, VERSION_LEN + IV_LEN + WRAPPED_KEY_LEN);
    const ra = m1.subarray(VERSION_LEN + IV_LEN + WRAPPED_KEY_LEN, MSG1_V1_LEN);
    const sk = this.o.engine.decryptCbc(this.lt.wrap, iv, wrapped, false);
    this.o.trace?.('S3 session key (secret)', sk);
    const ikm = dh ? concatBytes(sk, dh) : sk;
    this.keys = deriveTraffic(this.version, ikm, ra, this.rb!, m1, m2, m3, 'server', this.o.trace);
    ikm.fill(0);
    sk.fill(0);
    dh?.fill(0);
    this.state = 'established';
    return this.keys;
  }

  /** e_S is used once: wiped after S3's DH, or when m3 failed. */
  private wipeEphemeral(): void {
    this.eph?.secretKey.fill(0);
    this.eph = null;
  }
}

// ---- Server pre-auth cost (tuning, not part of the protocol) ----

type KeyPair = { secretKey: Uint8Array; publicKey: Uint8Array };

/**
 * X25519 public keys whose shared secret with any clamped scalar is all zero: the points of order 1, 2, 4 and 8 and
 * their encodings up to 2^255 (the top bit is ignored, RFC 7748 §5). Refusing these at S1 is the same check as
 * S1.4's all-zero DH (tests/handshake.test.ts runs every one of them through both engines' X25519), done by
 * comparison instead of a scalar multiplication.
 */
const LOW_ORDER = [
  '0000000000000000000000000000000000000000000000000000000000000000', // 0
  '0100000000000000000000000000000000000000000000000000000000000000', // 1
  'e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800', // order 8
  '5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157', // order 8
  'ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f', // p - 1 (order 2)
  'edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f', // p (= 0)
  'eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f', // p + 1 (= 1)
].map((h) => Uint8Array.from(h.match(/../g)!, (b) => parseInt(b, 16)));

/** Whether the X25519 public key `pub` (32 bytes, public data) is one of LOW_ORDER, ignoring its top bit. */
export function isLowOrder(pub: Uint8Array): boolean {
  return LOW_ORDER.some((lo) => {
    for (let i = 0; i < PUB_LEN - 1; i++) if (pub[i] !== lo[i]) return false;
    return (pub[PUB_LEN - 1]! & 0x7f) === lo[PUB_LEN - 1];
  });
}

/**
 * Ephemeral key pairs prepared while the server is idle, so that a burst of message 1s does not wait for key
 * generation. Each pair is handed out once and never returned (S3 or a failed m3 wipes it); an unused one lives in
 * this process's memory only, as a fresh pair would between S1 and S3. Refilled one pair per event-loop turn, and
 * only once no message 1 has come for POOL_IDLE_MS: under a steady flood the pool stays empty and each message 1
 * generates its own pair, so preparing keys never adds work of its own.
 */
const POOL_SIZE = 8;
const POOL_IDLE_MS = 50;
const pools = new Map<Engine, KeyPair[]>();
let refillTimer: ReturnType<typeof setTimeout> | null = null;

function takeKeyPair(e: Engine): KeyPair {
  let pool = pools.get(e);
  if (!pool) pools.set(e, (pool = []));
  const pair = pool.pop() ?? e.x25519Keygen();
  if (refillTimer) clearTimeout(refillTimer);
  refillTimer = setTimeout(() => {
    refillTimer = null;
    refill(e);
  }, POOL_IDLE_MS);
  refillTimer.unref?.();
  return pair;
}

function refill(e: Engine): void {
  const pool = pools.get(e)!;
  if (pool.length >= POOL_SIZE || refillTimer) return; // full, or a message 1 came meanwhile (it re-arms the timer)
  pool.push(e.x25519Keygen());
  setImmediate(() => refill(e)).unref?.();
}
