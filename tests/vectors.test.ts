/**
 * PROTOCOL.md §12: known-answer vectors. Fixed secret and fixed "random" bytes → the exact bytes of the long-term
 * keys, messages 1–3, the traffic keys and frames, for protocol versions 1 and 2: §12.1–§12.4 (key-file and
 * passphrase long-term keys, a v1 and a v2 handshake, two client→server frames each), §12.5–§12.6 (the frames of a
 * real session in both directions under the §12.4 keys: CONFIG first, DATA of 14/15/16/65535/65536 bytes, PING/PONG,
 * CLOSE), §12.7 (a v2 handshake under passphrase keys, the passphrase changed by NFKC) and §12.8 (the ACK of each
 * direction after its CLOSE, and a rekey with fixed ephemeral secrets: INIT, REPLY, DH', the new s2c keys at REPLY,
 * DONE, the new c2s keys at DONE, one DATA each way under the new keys).
 *
 * Where the expected hex came from: it was produced once by running handshake.ts/channel.ts with the inputs below
 * and written into PROTOCOL.md §12 (and, for §12.1–§12.4, hard-coded here as well). Each test checks that these
 * agree byte for byte:
 *   1. the hex in PROTOCOL.md §12, which this file parses (tables and code blocks) — so a digit changed in the
 *      document fails a test; §12.1–§12.4 are also held here, and the document is checked against them;
 *   2. the code under test, with the noble engine and with the native engine;
 *   3. an independent re-computation in this file that uses only node:crypto (createHmac, hkdfSync, scryptSync,
 *      createCipheriv, diffieHellman) and the formulas of PROTOCOL.md §3–§6, so the vectors are not merely the
 *      code agreeing with itself.
 */
import { describe, expect, test } from 'bun:test';
import {
  createCipheriv,
  createDecipheriv,
  createHash,
  createHmac,
  createPrivateKey,
  createPublicKey,
  diffieHellman,
  hkdfSync,
  scryptSync,
} from 'node:crypto';
import { readFileSync } from 'node:fs';
import { ChannelReceiver, ChannelSender, RECORD, type RecordType } from '../channel.ts';
import { type Engine, nativeEngine, nobleEngine } from '../engine.ts';
import {
  ClientHandshake,
  keysFromKeyFile,
  keysFromPassphrase,
  type DirectionKeys,
  type LongTermKeys,
  type RandomSource,
  ServerHandshake,
  type TrafficKeys,
} from '../handshake.ts';
import { Keyring, parseKeyringText } from '../keyring.ts';
import { readRekey, REKEY_DONE, REKEY_INIT, REKEY_REPLY, rekeyDh, rekeyDirection, rekeyPayload } from '../rekey.ts';
import { MAX_CONFIG, Session, type SessionApp, type Transport } from '../session.ts';
import type { VpnError } from '../errors.ts';

const ENGINES: readonly Engine[] = [nobleEngine, nativeEngine];
const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');
const bytes = (h: string) => new Uint8Array(Buffer.from(h, 'hex'));
const utf8 = (s: string) => new TextEncoder().encode(s);

/**
 * The deterministic random source of §12: a byte counter starting at `start`. Every call returns the next `n`
 * bytes start, start+1, … (mod 256), each call a fresh array (the handshake wipes what it was given).
 */
function counter(start: number): RandomSource {
  let c = start;
  return (n) => {
    const out = new Uint8Array(n);
    for (let i = 0; i < n; i++) out[i] = c++ & 0xff;
    return out;
  };
}

// ---- §12 inputs, spelled out as the bytes the counters hand out (the order of draws is part of the vector) ----
const KEY_FILE = '0f1e2d3c4b5a69788796a5b4c3d2e1f000112233445566778899aabbccddeeff';
const PASSPHRASE = 'correct horse battery staple';
const CLIENT_RANDOM_START = 0x00; // SK, then IV, then R_A, then (v2) e_C
const SERVER_RANDOM_START = 0x80; // R_B, then (v2) e_S
const FRAME_IV_START = 0xc0; // IV of c2s frame 1, then of frame 2
const IN = {
  sk: '000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f',
  iv: '202122232425262728292a2b2c2d2e2f',
  ra: '303132333435363738393a3b3c3d3e3f404142434445464748494a4b4c4d4e4f',
  ec: '505152535455565758595a5b5c5d5e5f606162636465666768696a6b6c6d6e6f', // client ephemeral secret (v2)
  rb: '808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f',
  es: 'a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf', // server ephemeral secret (v2)
  frameIv1: 'c0c1c2c3c4c5c6c7c8c9cacbcccdcecf',
  frameIv2: 'd0d1d2d3d4d5d6d7d8d9dadbdcdddedf',
  payload1: 'hello', // frame 1: DATA "hello"; frame 2: CLOSE (empty payload)
};

// ---- §12 expected outputs ----
const KEYFILE_KEYS = {
  wrap: 'b80bd67ab836581e8111711714ea448caf5d215debbb520cec9ba4ec50ab7a61',
  auth: 'a9e599848906c8a5800ef10d576e3a0d2b6a007c10890f326eacba6f02f4e1fc',
};
/** scrypt(passphrase, "vpn.ts passphrase", N = 2^16, r = 8, p = 1, 32 bytes): the HKDF input of §4. */
const PASSPHRASE_SCRYPT = '1ec54e511629a5e04309c264df13037a1f8f203bec47af10729c34ce3e1872e9';
const PASSPHRASE_KEYS = {
  wrap: '2913d3dc3d34bd6815e73fcfa5b298e7e3ec2fd765959cdf7da238d13386815c',
  auth: 'bd9a3086a66ca2ebf3da06da206f6082c42aa97ef7caa636a0c049b4147c72d3',
};

interface Expected {
  m1: string;
  m2: string;
  m3: string;
  transcript: string;
  c2s: { enc: string; mac: string; chain0: string };
  s2c: { enc: string; mac: string; chain0: string };
  frame1: string;
  frame2: string;
}

const WRAPPED_SK = 'a7aaf0e8d253d9de81718d98b5da96051996dc555854f40d86abf030d6490c0e';
const E_C = '392d174a38b3b1beafaf1fe824870841c5fa531bc6eafdb6402c124664488c1c';
const E_S = '605a725d2a4adfeeb1a29e17edd621c1b7593ee8cdbc44ac6c4ab6e2f805d23c';
const DH = '4bff3f094faccdd6cff29091a6454189349026a42900a79e383af49af4d07012';

const V1: Expected = {
  m1: '01' + IN.iv + WRAPPED_SK + IN.ra,
  m2: IN.rb + '94b4add7f3cfba5180062ed136a0c98a56bf1bd371d8591641f3d5bd8491e0b3',
  m3: 'b23f464659bd22002b2bc09c3d8bee7c97879655c7e141a3e0029c88e49c27cc',
  transcript: 'f39d810b829e6efb9cc430f3151f49e24668a7e6649c7c3c4a911d284b3cc2c5',
  c2s: {
    enc: '8804ee9563261a1e589dc847ce2ca8efe6a0ab90e67cee6d03c7a9f05716c009',
    mac: '34d67a975ad83fed4528a14a1af3fe79efe0c28c3e2867d74120c658f368744d',
    chain0: 'acd86d60e01c1ec0a54e851986c8824c99669439be35f1556ea76ad8d4be2ed2',
  },
  s2c: {
    enc: 'ddbd8c0e5eef249d1283ac22b0893f318a017b71e4bf4f10447a1bcd1c525403',
    mac: 'c9956bfaa6f371c56973716e00dfc38c5390dd9ff508612775df21f268037c45',
    chain0: '7ced86930fce7e366136372958f7432854ea49cc3d4e328c9b463dff2251d076',
  },
  frame1:
    '00000010' + IN.frameIv1 + 'defca7991596258a347565f4d99d26ba' +
    '3add2673c65d9cc7face8d99dade7211a443b9329877b8a5d40881d7449de030',
  frame2:
    '00000010' + IN.frameIv2 + 'aafd3368278fba5b49291e5a154d39b2' +
    'fd1055401d953c9cc2b68a9d0d7fc6e2ee7d9c35cd1456fdeb56b8cd3dc539bb',
};

const V2: Expected = {
  m1: '02' + IN.iv + WRAPPED_SK + IN.ra + E_C,
  m2: IN.rb + E_S + 'cde72668a3c8736bf9767f89b17194c3092b486b6957da134bea91ce4c7106c0',
  m3: '62000910e15a165f0d00fff1e2f6794b939f589f60634497f7f3f4464122ce48',
  transcript: '62ce63a2777870210a7abab78e62aba323c8576ced1f4c1bb5daa05f06908c4b',
  c2s: {
    enc: '14ac91548dadcce9f383be69810a1ae006c17068af7c915c2ab15961a47397ee',
    mac: '3d325f53f880276431e0f44fe41752c90d99d2047b38b5325577df3a36a0e7b8',
    chain0: '3334fa4fcea5b52061d2a83bfae56e00407bb5acb260a9167838e0e72477895f',
  },
  s2c: {
    enc: 'c7d76fbbd679f4fde6036196615a381ec29b72e82572aa0644689352262ecd52',
    mac: '651ddcd79aa4b428ed7eaa62d75d87c7f263ee3dec98fa1b6d709750fc81eb4a',
    chain0: '434249abb299706585fec7cd07ddd2bf1a76bcfa11116f213cf171effa29b8e0',
  },
  frame1:
    '00000010' + IN.frameIv1 + '28d607fe333b5ccafb3f3b466c6f5902' +
    'effa6ea775e82227b57285ea6d01ff67e2e3f8c956eef37186047766adda7a2f',
  frame2:
    '00000010' + IN.frameIv2 + '6ec36dec1d7d4ff6ec5df42a41f0f75b' +
    '6785443806da69a5be86eaa401c8756fd3cd23bca2c7b0eb6c0b5bdd7db92962',
};
const EXPECTED: Record<1 | 2, Expected> = { 1: V1, 2: V2 };

// ---- §12.5–§12.6 inputs: the records of a real session, per direction, under the §12.4 (version 2) traffic keys ----
/** Record type bytes of PROTOCOL.md §7, held here so that the reference does not take them from channel.ts. */
const TYPE_BYTE = { DATA: 0x00, CLOSE: 0x01, PING: 0x02, PONG: 0x03, CONFIG: 0x04, ACK: 0x05, REKEY: 0x06 } as const;
type RecordName = keyof typeof TYPE_BYTE;
interface SessionRecord {
  type: RecordName;
  payload: Uint8Array;
}
/** A DATA payload of n bytes in §12.5: 00 01 02 … (byte i is i mod 256). */
const counting = (n: number) => Uint8Array.from({ length: n }, (_, i) => i & 0xff);
const CONFIG_STDIO = '{"mode":"stdio"}';
const rec = (type: RecordName, payload: Uint8Array = new Uint8Array(0)): SessionRecord => ({ type, payload });
/** Frames with a payload this large are listed in parts (L, IV, first and last 32 bytes of ct, chain_n), not whole. */
const LISTED_IN_PARTS = 1024;
const SESSION = {
  c2s: {
    section: '12.5',
    ivStart: 0x10,
    records: [
      rec('CONFIG', utf8(CONFIG_STDIO)),
      rec('DATA', counting(14)), // plaintext 15 bytes: one block, 1 byte of pad
      rec('DATA', counting(15)), // plaintext 16 bytes: a whole block of pad follows
      rec('DATA', counting(16)), // plaintext 17 bytes: two blocks
      rec('DATA', counting(65535)), // plaintext 65536 bytes: the largest block-aligned plaintext
      rec('DATA', counting(65536)), // MAX_PAYLOAD: plaintext 65537 bytes, L = MAX_CIPHERTEXT
      rec('PING'),
      rec('CLOSE'),
    ],
  },
  s2c: {
    section: '12.6',
    ivStart: 0x90,
    records: [rec('CONFIG', utf8(CONFIG_STDIO)), rec('DATA', utf8('hello')), rec('DATA'), rec('PONG'), rec('CLOSE')],
  },
} as const;
type Direction = keyof typeof SESSION;

// ---- §12.7 input: a passphrase that NFKC changes (fullwidth forms; e + COMBINING ACUTE ACCENT) ----
const TYPED_PASSPHRASE = '\uff34\uff52\uff10\uff55\uff42\uff14\uff44\uff4f\uff52\uff06\uff13 cafe\u0301';
/** Its NFKC form by the Unicode tables (compatibility decomposition of U+FF01–U+FF5E, canonical composition to U+00E9). */
const PASSPHRASE_NFKC = 'Tr0ub4dor&3 caf\u00e9';

// ---- the independent re-computation: node:crypto and the formulas of PROTOCOL.md, nothing from the code under test ----
const ref = {
  hmac(key: Uint8Array, ...parts: Uint8Array[]): Buffer {
    const h = createHmac('sha256', key);
    for (const p of parts) h.update(p);
    return h.digest();
  },
  hkdf: (ikm: Uint8Array, salt: Uint8Array, info: Uint8Array, n: number) => Buffer.from(hkdfSync('sha256', ikm, salt, info, n)),
  cbc(key: Uint8Array, iv: Uint8Array, pt: Uint8Array, pad: boolean): Buffer {
    const c = createCipheriv('aes-256-cbc', key, iv);
    c.setAutoPadding(pad);
    return Buffer.concat([c.update(pt), c.final()]);
  },
  // RFC 8410 DER prefixes for raw X25519 keys.
  priv: (sk: Uint8Array) =>
    createPrivateKey({ key: Buffer.concat([Buffer.from('302e020100300506032b656e04220420', 'hex'), sk]), format: 'der', type: 'pkcs8' }),
  pub(sk: Uint8Array): Buffer {
    return createPublicKey(ref.priv(sk)).export({ format: 'der', type: 'spki' }).subarray(12);
  },
  dh(sk: Uint8Array, pub: Uint8Array): Buffer {
    const p = createPublicKey({ key: Buffer.concat([Buffer.from('302a300506032b656e032100', 'hex'), pub]), format: 'der', type: 'spki' });
    return diffieHellman({ privateKey: ref.priv(sk), publicKey: p });
  },
  longTerm(ikm: Uint8Array, salt: string) {
    const okm = ref.hkdf(ikm, utf8(salt), utf8('vpn.ts long-term keys'), 64);
    return { wrap: okm.subarray(0, 32), auth: okm.subarray(32) };
  },
  /** §3–§6 for one version, from the IN values above (under the key-file keys of §12.1 unless `lt` is given). */
  session(version: 1 | 2, lt: { wrap: Uint8Array; auth: Uint8Array } = ref.longTerm(bytes(KEY_FILE), 'vpn.ts key file')): Expected {
    const [sk, iv, ra, rb] = [bytes(IN.sk), bytes(IN.iv), bytes(IN.ra), bytes(IN.rb)];
    const ec = ref.pub(bytes(IN.ec));
    const es = ref.pub(bytes(IN.es));
    const m1 = Buffer.concat([Buffer.of(version), iv, ref.cbc(lt.wrap, iv, sk, false), ra, ...(version === 2 ? [ec] : [])]);
    const body = Buffer.concat([rb, ...(version === 2 ? [es] : [])]);
    const m2 = Buffer.concat([body, ref.hmac(lt.auth, m1, body, utf8('SRVR'))]);
    const m3 = ref.hmac(lt.auth, m1, m2, utf8('CLNT'));
    const th = createHash('sha256').update(m1).update(m2).update(m3).digest();
    const ikm = version === 2 ? Buffer.concat([sk, ref.dh(bytes(IN.ec), es)]) : Buffer.from(sk);
    const okm = ref.hkdf(ikm, Buffer.concat([ra, rb]), Buffer.concat([utf8(`vpn.ts v${version} traffic`), th]), 192);
    const k = (i: number) => hex(okm.subarray(32 * i, 32 * i + 32));
    const c2s = { enc: k(0), mac: k(1), chain0: k(2) };
    const s2c = { enc: k(3), mac: k(4), chain0: k(5) };
    // §6: L ‖ IV ‖ AES-256-CBC-PKCS7(enc, IV, type ‖ payload) ‖ chain_n, chain_n = HMAC(mac, chain_(n-1) ‖ L ‖ IV ‖ ct)
    let chain: Uint8Array = bytes(c2s.chain0);
    const frame = (ivHex: string, type: number, payload: Uint8Array) => {
      const ct = ref.cbc(bytes(c2s.enc), bytes(ivHex), Buffer.concat([Buffer.of(type), payload]), true);
      const len = Buffer.alloc(4);
      len.writeUInt32BE(ct.length);
      const head = Buffer.concat([len, bytes(ivHex), ct]);
      chain = ref.hmac(bytes(c2s.mac), chain, head);
      return hex(Buffer.concat([head, chain]));
    };
    const frame1 = frame(IN.frameIv1, 0x00, utf8(IN.payload1));
    const frame2 = frame(IN.frameIv2, 0x01, new Uint8Array(0));
    return { m1: hex(m1), m2: hex(m2), m3: hex(m3), transcript: hex(th), c2s, s2c, frame1, frame2 };
  },
  /** §6 for a whole direction (§12.5, §12.6): one chain from `keys.chain0`, IVs from a counter at `ivStart`. */
  sequence(keys: { enc: string; mac: string; chain0: string }, ivStart: number, records: readonly SessionRecord[]): Buffer[] {
    const nextIv = counter(ivStart);
    let chain: Uint8Array = bytes(keys.chain0);
    return records.map(({ type, payload }) => {
      const iv = nextIv(16);
      const ct = ref.cbc(bytes(keys.enc), iv, Buffer.concat([Buffer.of(TYPE_BYTE[type]), payload]), true);
      const len = Buffer.alloc(4);
      len.writeUInt32BE(ct.length);
      const head = Buffer.concat([len, iv, ct]);
      chain = ref.hmac(bytes(keys.mac), chain, head);
      return Buffer.concat([head, chain]);
    });
  },
};

/** Run the code under test over the §12 inputs with one engine per side (key-file keys of §12.1 unless `lt` is given). */
function runCode(version: 1 | 2, clientEngine: Engine, serverEngine: Engine, lt: LongTermKeys = keysFromKeyFile(bytes(KEY_FILE))) {
  const transcript: Uint8Array[] = [];
  const client = new ClientHandshake(lt, version, {
    engine: clientEngine,
    random: counter(CLIENT_RANDOM_START),
    trace: (field, v) => {
      if (field === 'transcript hash') transcript.push(v.slice());
    },
  });
  const server = new ServerHandshake(lt, { engine: serverEngine, random: counter(SERVER_RANDOM_START) });
  const m1 = client.createMessage1();
  const m2 = server.consumeMessage1(m1);
  const m3 = client.consumeMessage2(m2);
  const skeys = server.consumeMessage3(m3);
  const ckeys = client.keys!;
  const sender = new ChannelSender(clientEngine, ckeys.send, counter(FRAME_IV_START));
  const frame1 = sender.seal(RECORD.DATA, utf8(IN.payload1));
  const frame2 = sender.seal(RECORD.CLOSE);
  return { m1, m2, m3, ckeys, skeys, frame1, frame2, transcript: transcript[0]! };
}

const keyHex = (k: TrafficKeys['send']) => ({ enc: hex(k.enc), mac: hex(k.mac), chain0: hex(k.chain0) });

describe('§12.1 long-term keys', () => {
  test('the key file gives the listed wrap and auth keys (code and node:crypto HKDF agree)', () => {
    const lt = keysFromKeyFile(bytes(KEY_FILE));
    expect({ wrap: hex(lt.wrap), auth: hex(lt.auth) }).toEqual(KEYFILE_KEYS);
    const r = ref.longTerm(bytes(KEY_FILE), 'vpn.ts key file');
    expect({ wrap: hex(r.wrap), auth: hex(r.auth) }).toEqual(KEYFILE_KEYS);
  });

  test('the passphrase gives the listed wrap and auth keys (code and node:crypto scrypt + HKDF agree)', () => {
    const lt = keysFromPassphrase(PASSPHRASE);
    expect({ wrap: hex(lt.wrap), auth: hex(lt.auth) }).toEqual(PASSPHRASE_KEYS);
    const salt = utf8('vpn.ts passphrase');
    const stretched = scryptSync(utf8(PASSPHRASE.normalize('NFKC')), salt, 32, { N: 1 << 16, r: 8, p: 1, maxmem: 256 << 20 });
    expect(hex(stretched)).toBe(PASSPHRASE_SCRYPT);
    const r = ref.longTerm(stretched, 'vpn.ts passphrase');
    expect({ wrap: hex(r.wrap), auth: hex(r.auth) }).toEqual(PASSPHRASE_KEYS);
  });
});

describe.each([1, 2] as const)('§12 protocol version %i', (version) => {
  const want = EXPECTED[version];

  test('the listed sizes match the byte layouts of §3 and §6', () => {
    expect([want.m1, want.m2, want.m3].map((h) => h.length / 2)).toEqual(version === 1 ? [81, 64, 32] : [113, 96, 32]);
    expect([want.frame1, want.frame2].map((h) => h.length / 2)).toEqual([4 + 16 + 16 + 32, 4 + 16 + 16 + 32]);
  });

  test('an independent node:crypto computation from the formulas gives exactly the listed bytes', () => {
    expect(ref.session(version)).toEqual(want);
  });

  test.each(ENGINES.map((e) => [e.name, e] as const))('the code with the %s engine reproduces every listed byte', (_name, engine) => {
    const got = runCode(version, engine, engine);
    expect(hex(got.m1)).toBe(want.m1);
    expect(hex(got.m2)).toBe(want.m2);
    expect(hex(got.m3)).toBe(want.m3);
    expect(hex(got.transcript)).toBe(want.transcript);
    expect(keyHex(got.ckeys.send)).toEqual(want.c2s);
    expect(keyHex(got.ckeys.recv)).toEqual(want.s2c);
    expect(keyHex(got.skeys.recv)).toEqual(want.c2s);
    expect(keyHex(got.skeys.send)).toEqual(want.s2c);
    expect(hex(got.frame1)).toBe(want.frame1);
    expect(hex(got.frame2)).toBe(want.frame2);
  });

  test.each(ENGINES.map((e) => [e.name, e] as const))('the %s engine opens the listed frames as DATA "hello" then CLOSE', (_name, engine) => {
    const rx = new ChannelReceiver(engine, {
      enc: bytes(want.c2s.enc),
      mac: bytes(want.c2s.mac),
      chain0: bytes(want.c2s.chain0),
    });
    const got: [number, string][] = [];
    rx.push(bytes(want.frame1 + want.frame2), (type, payload) => got.push([type, new TextDecoder().decode(payload)]));
    expect(got).toEqual([
      [RECORD.DATA, 'hello'],
      [RECORD.CLOSE, ''],
    ]);
    expect(() => rx.end()).not.toThrow();
  });

  test('a client and a server on different engines produce the same bytes', () => {
    for (const [c, s] of [
      [nobleEngine, nativeEngine],
      [nativeEngine, nobleEngine],
    ] as const) {
      const got = runCode(version, c, s);
      expect([hex(got.m1), hex(got.m2), hex(got.m3), hex(got.frame1)]).toEqual([want.m1, want.m2, want.m3, want.frame1]);
    }
  });
});

test('§12 v2: the ephemeral public keys and the X25519 shared secret are the listed values', () => {
  for (const e of ENGINES) {
    expect(hex(e.x25519Public(bytes(IN.ec)))).toBe(E_C);
    expect(hex(e.x25519Public(bytes(IN.es)))).toBe(E_S);
    expect(hex(e.x25519(bytes(IN.ec), bytes(E_S)))).toBe(DH);
    expect(hex(e.x25519(bytes(IN.es), bytes(E_C)))).toBe(DH);
  }
  expect(hex(ref.dh(bytes(IN.es), ref.pub(bytes(IN.ec))))).toBe(DH);
  expect(hex(ref.cbc(bytes(KEYFILE_KEYS.wrap), bytes(IN.iv), bytes(IN.sk), false))).toBe(WRAPPED_SK);
});

// ---- PROTOCOL.md §12 as the test reads it ----
/**
 * One value of a §12 code block. A line is a label in columns 1–12 and hex from column 13 on, then an optional
 * comment. A label at the left margin starts an entry (`m1 (81)`: name `m1`, 81 bytes); an indented label starts a
 * part of the entry above it (`  IV` under `frame 5` is `frame 5/IV`), except `  (68)`, which gives the size of the
 * entry above; an empty label continues the current entry or part.
 */
interface DocEntry {
  hex: string;
  size?: number;
  /** the comment on the entry's first line */
  note: string;
}
type DocBlock = Map<string, DocEntry>;
interface DocSection {
  text: string;
  tables: string[][][];
  blocks: DocBlock[];
}

function parseBlock(body: string, where: string): DocBlock {
  const out: DocBlock = new Map();
  let top: string | null = null;
  let current: DocEntry | null = null;
  const start = (name: string, note: string, size?: number) => {
    if (out.has(name)) throw new Error(`${where}: "${name}" is listed twice`);
    current = { hex: '', note, ...(size === undefined ? {} : { size }) };
    out.set(name, current);
  };
  for (const line of body.split('\n')) {
    if (line.trim() === '') continue;
    const label = line.slice(0, 12).trimEnd();
    const m = /^([0-9a-f]+)(?:\s+(.*))?$/.exec(line.slice(12));
    if (!m || (line.length > 12 && line[11] !== ' ')) throw new Error(`${where}: cannot read the line "${line}"`);
    const [, value, note = ''] = m;
    let size: RegExpExecArray | null;
    if (label === '') {
      if (!current) throw new Error(`${where}: a continuation line comes first: "${line}"`);
    } else if ((size = /^\s+\((\d+)\)$/.exec(label))) {
      if (!current || top === null) throw new Error(`${where}: a size with no entry: "${line}"`);
      const entry: DocEntry = out.get(top)!;
      entry.size = Number(size[1]);
      current = entry;
    } else if (/^\s/.test(label)) {
      if (top === null) throw new Error(`${where}: a part with no entry: "${line}"`);
      start(`${top}/${label.trim()}`, note);
    } else {
      const named = /^(.+?)(?: \((\d+)\))?$/.exec(label)!;
      top = named[1]!;
      start(top, note, named[2] === undefined ? undefined : Number(named[2]));
    }
    current!.hex += value;
  }
  for (const [name, e] of out) {
    if (e.hex.length % 2 !== 0) throw new Error(`${where}: "${name}" has an odd number of hex digits`);
    if (e.size !== undefined && e.size !== e.hex.length / 2) {
      throw new Error(`${where}: "${name}" says (${e.size}) but lists ${e.hex.length / 2} bytes`);
    }
  }
  return out;
}

/** PROTOCOL.md §12, by subsection ("12.3" → its text, its tables as rows of cells, its code blocks). */
function readDoc(): Map<string, DocSection> {
  const doc = readFileSync(new URL('../PROTOCOL.md', import.meta.url), 'utf8');
  const at = doc.indexOf('\n## §12 ');
  if (at < 0) throw new Error('PROTOCOL.md has no "## §12" section');
  let s12 = doc.slice(at + 1);
  const next = s12.indexOf('\n## ');
  if (next >= 0) s12 = s12.slice(0, next);
  const parts = s12.split(/^### §(12\.\d+) .*$/m);
  const out = new Map<string, DocSection>();
  for (let i = 1; i < parts.length; i += 2) {
    const id = parts[i]!;
    const text = parts[i + 1]!;
    const blocks = [...text.matchAll(/^```\n([\s\S]*?)^```$/gm)].map((m, k) => parseBlock(m[1]!, `§${id} block ${k + 1}`));
    const outside = text.replace(/^```\n[\s\S]*?^```$/gm, '');
    const tables: string[][][] = [];
    let rows: string[][] | null = null;
    for (const line of outside.split('\n')) {
      if (!line.startsWith('|')) {
        rows = null;
        continue;
      }
      if (!rows) tables.push((rows = []));
      rows.push(line.split('|').slice(1, -1).map((c) => c.trim()));
    }
    // Drop each table's header and |---| rows.
    out.set(id, { text, tables: tables.map((t) => t.slice(2)), blocks });
  }
  return out;
}

let docCache: Map<string, DocSection> | undefined;
function docSection(id: string): DocSection {
  docCache ??= readDoc();
  const s = docCache.get(id);
  if (!s) throw new Error(`PROTOCOL.md has no §${id}`);
  return s;
}
function docBlock(id: string, k = 0): DocBlock {
  const b = docSection(id).blocks[k];
  if (!b) throw new Error(`PROTOCOL.md §${id} has no code block ${k + 1}`);
  return b;
}
function docHex(block: DocBlock, name: string): string {
  const e = block.get(name);
  if (!e) throw new Error(`the §12 block has no "${name}"`);
  return e.hex;
}
/** The value inside the first `backticks` of a table cell. */
const ticked = (cell: string) => /`([^`]*)`/.exec(cell)?.[1] ?? `(no value in "${cell}")`;
const handshakeOf = (b: DocBlock) => ({
  m1: docHex(b, 'm1'),
  m2: docHex(b, 'm2'),
  m3: docHex(b, 'm3'),
  transcript: docHex(b, 'th'),
  c2s: { enc: docHex(b, 'c2s enc'), mac: docHex(b, 'c2s mac'), chain0: docHex(b, 'c2s chain0') },
  s2c: { enc: docHex(b, 's2c enc'), mac: docHex(b, 's2c mac'), chain0: docHex(b, 's2c chain0') },
});
const HANDSHAKE_NAMES = ['m1', 'm2', 'm3', 'th', 'c2s enc', 'c2s mac', 'c2s chain0', 's2c enc', 's2c mac', 's2c chain0'];

describe('PROTOCOL.md §12 is what this file checks', () => {
  test('§12 has the subsections 12.1–12.9, and every code block reads: sizes and "L = n" notes agree with the bytes', () => {
    expect([...readDoc().keys()]).toEqual(['12.1', '12.2', '12.3', '12.4', '12.5', '12.6', '12.7', '12.8', '12.9']);
    for (const [id, s] of readDoc()) {
      for (const b of s.blocks) {
        for (const [name, e] of b) {
          const l = /^L = (\d+)\b/.exec(e.note);
          if (l) expect({ id, name, L: Number.parseInt(e.hex.slice(0, 8), 16) }).toEqual({ id, name, L: Number(l[1]) });
        }
      }
    }
  });

  test('§12.1 lists the long-term keys held here', () => {
    const rows = docSection('12.1').tables[0]!.map(([label, value]) => [label, ticked(value!)]);
    expect(rows).toEqual([
      ['key file F (32 bytes)', KEY_FILE],
      ['→ K_wrap', KEYFILE_KEYS.wrap],
      ['→ K_auth', KEYFILE_KEYS.auth],
      ['passphrase', PASSPHRASE],
      ['→ scrypt output S', PASSPHRASE_SCRYPT],
      ['→ K_wrap', PASSPHRASE_KEYS.wrap],
      ['→ K_auth', PASSPHRASE_KEYS.auth],
    ]);
  });

  test('§12.2 lists the draws of the random source held here, which are the counters of this file, and W', () => {
    const s = docSection('12.2');
    const rows = s.tables[0]!.map(([draw, size, value]) => [draw, Number(size), ticked(value!)]);
    const client = counter(CLIENT_RANDOM_START);
    const server = counter(SERVER_RANDOM_START);
    const frameIv = counter(FRAME_IV_START);
    const want: [string, number, string][] = [
      ['client 1: SK', 32, IN.sk],
      ['client 2: IV', 16, IN.iv],
      ['client 3: R_A', 32, IN.ra],
      ['client 4 (v2): e_C', 32, IN.ec],
      ['server 1: R_B', 32, IN.rb],
      ['server 2 (v2): e_S', 32, IN.es],
      ['c2s frame 1 IV', 16, IN.frameIv1],
      ['c2s frame 2 IV', 16, IN.frameIv2],
    ];
    expect(rows).toEqual(want);
    const draws = [client(32), client(16), client(32), client(32), server(32), server(32), frameIv(16), frameIv(16)];
    expect(draws.map(hex)).toEqual(want.map(([, , v]) => v));
    expect(/W, the wrap of SK under K_wrap with IV \(both versions\): `([0-9a-f]+)`/.exec(s.text)?.[1]).toBe(WRAPPED_SK);
    const starts =
      /client counter starts at\s+`0x(\w+)`, the server counter at\s+`0x(\w+)`, the frame-IV counter at\s+`0x(\w+)`/.exec(s.text);
    expect(starts?.slice(1).map((h) => Number.parseInt(h, 16))).toEqual([CLIENT_RANDOM_START, SERVER_RANDOM_START, FRAME_IV_START]);
    expect(/frame 1 is DATA `"hello"` \(`([0-9a-f]+)`\)/.exec(s.text)?.[1]).toBe(hex(utf8(IN.payload1)));
  });

  test.each([
    ['12.3', 1],
    ['12.4', 2],
  ] as const)('§%s lists the version %i handshake and frames held here', (id, version) => {
    const b = docBlock(id);
    expect([...b.keys()]).toEqual([...(version === 2 ? ['E_C', 'E_S', 'DH'] : []), ...HANDSHAKE_NAMES, 'frame 1', 'frame 2']);
    expect({ ...handshakeOf(b), frame1: docHex(b, 'frame 1'), frame2: docHex(b, 'frame 2') }).toEqual(EXPECTED[version]);
    if (version === 2) expect([docHex(b, 'E_C'), docHex(b, 'E_S'), docHex(b, 'DH')]).toEqual([E_C, E_S, DH]);
  });
});

// ---- §12.5–§12.6: a session's frames, both directions ----
/** A frame as §12.5/§12.6 list it: whole, or (for the largest) by its parts. */
type FrameView = { frame: string } | { L: string; IV: string; 'ct[0:32]': string; 'ct[L-32:]': string; chain: string };
const inParts = (r: SessionRecord) => r.payload.length >= LISTED_IN_PARTS;

function frameView(f: Uint8Array, parts: boolean): FrameView {
  if (!parts) return { frame: hex(f) };
  const end = f.length - 32;
  return {
    L: hex(f.subarray(0, 4)),
    IV: hex(f.subarray(4, 20)),
    'ct[0:32]': hex(f.subarray(20, 52)),
    'ct[L-32:]': hex(f.subarray(end - 32, end)),
    chain: hex(f.subarray(end)),
  };
}

function docFrames(dir: Direction): FrameView[] {
  const b = docBlock(SESSION[dir].section);
  return SESSION[dir].records.map((r, i) => {
    const n = `frame ${i + 1}`;
    if (!inParts(r)) return { frame: docHex(b, n) };
    return {
      L: docHex(b, n),
      IV: docHex(b, `${n}/IV`),
      'ct[0:32]': docHex(b, `${n}/ct[0:32]`),
      'ct[L-32:]': docHex(b, `${n}/ct[L-32:]`),
      chain: docHex(b, `${n}/chain_${i + 1}`),
    };
  });
}

/** L of §6 from the plaintext length, by the formula (not from channel.ts). */
const ciphertextLen = (plaintext: number) => 16 * (Math.floor(plaintext / 16) + 1);

/** The code under test seals one direction of the session: the client's c2s sender or the server's s2c sender. */
function sealByCode(dir: Direction, clientEngine: Engine, serverEngine: Engine): { frames: Uint8Array[]; receiverKeys: DirectionKeys } {
  const hs = runCode(2, clientEngine, serverEngine);
  const [engine, send, receiverKeys] =
    dir === 'c2s' ? [clientEngine, hs.ckeys.send, hs.skeys.recv] : [serverEngine, hs.skeys.send, hs.ckeys.recv];
  const tx = new ChannelSender(engine, send, counter(SESSION[dir].ivStart));
  return { frames: SESSION[dir].records.map((r) => tx.seal(RECORD[r.type], r.payload)), receiverKeys };
}

/**
 * Open a direction's byte stream the way a session does (§7, §8, as session.ts applies them to the records the
 * channel delivers): the first record must be CONFIG holding a JSON object of at most MAX_CONFIG bytes, no CONFIG
 * after it, and the end of stream after the CLOSE is clean.
 */
function openAsSession(engine: Engine, keys: DirectionKeys, stream: Uint8Array, chunk: number): [RecordName, string][] {
  const rx = new ChannelReceiver(engine, keys);
  const got: [RecordName, string][] = [];
  const name = (t: RecordType) => (Object.keys(TYPE_BYTE) as RecordName[]).find((k) => TYPE_BYTE[k] === t)!;
  for (let off = 0; off < stream.length; off += chunk) {
    rx.push(stream.subarray(off, off + chunk), (type, payload) => {
      if (got.length === 0) {
        expect(type).toBe(RECORD.CONFIG);
        expect(payload.length).toBeLessThanOrEqual(MAX_CONFIG);
        const v = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(payload));
        expect(typeof v === 'object' && v !== null && !Array.isArray(v)).toBe(true);
      } else {
        expect(type).not.toBe(RECORD.CONFIG);
      }
      got.push([name(type), hex(payload)]);
    });
  }
  expect(rx.buffered).toBe(0);
  expect(() => rx.end()).not.toThrow();
  return got;
}

describe.each([
  ['c2s', 'client → server'],
  ['s2c', 'server → client'],
] as const)('§12.5–§12.6 a session, %s (%s)', (dir, _what) => {
  const { section, ivStart, records } = SESSION[dir];

  test('the record type bytes of §7 are those of channel.ts, and the CONFIG is what a session sends', () => {
    expect(RECORD).toMatchObject(TYPE_BYTE); // the types these vectors use (a later type may be added)
    expect(JSON.stringify({ mode: 'stdio' })).toBe(CONFIG_STDIO);
    const text = docSection(section).text;
    expect(/`\{"mode":"stdio"\}`(?: = `([0-9a-f]+)`)?/.exec(docSection('12.5').text)?.[1]).toBe(hex(utf8(CONFIG_STDIO)));
    expect(/(?:starting at|counter starts at) `0x([0-9a-f]{2})`/.exec(text)?.[1]).toBe(ivStart.toString(16).padStart(2, '0'));
    // Payloads the prose spells out in hex.
    for (const m of text.matchAll(/`"(\w+)"` \(`([0-9a-f]+)`\)/g)) expect(m[2]).toBe(hex(utf8(m[1]!)));
    if (dir === 's2c') expect(text).toContain('DATA `"hello"` (`68656c6c6f`)');
  });

  test('the table lists each record, its payload, plaintext, L and pad as §6 computes them', () => {
    const rows = docSection(section).tables[0]!;
    expect(rows).toEqual(
      records.map((r, i) => {
        const pt = 1 + r.payload.length;
        const L = ciphertextLen(pt);
        return [String(i + 1), r.type, String(r.payload.length), String(pt), String(L), String(L - pt)];
      }),
    );
  });

  test('the block lists chain_0 (the §12.4 chain0 of this direction) and every frame, each exactly once', () => {
    const b = docBlock(section);
    const names = ['chain_0'];
    records.forEach((r, i) => {
      const n = `frame ${i + 1}`;
      names.push(n, ...(inParts(r) ? [`${n}/IV`, `${n}/ct[0:32]`, `${n}/ct[L-32:]`, `${n}/chain_${i + 1}`] : []));
    });
    expect([...b.keys()]).toEqual(names);
    expect(docHex(b, 'chain_0')).toBe(V2[dir].chain0);
    // Whole frames are 52 + L bytes; the L of every frame is the one of the table.
    records.forEach((r, i) => {
      const L = ciphertextLen(1 + r.payload.length);
      expect(docHex(b, `frame ${i + 1}`)).toHaveLength(2 * (inParts(r) ? 4 : 52 + L));
      expect(Number.parseInt(docHex(b, `frame ${i + 1}`).slice(0, 8), 16)).toBe(L);
    });
  });

  test('an independent node:crypto computation from the formulas gives exactly the listed frames', () => {
    const keys = ref.session(2)[dir];
    const frames = ref.sequence(keys, ivStart, records);
    expect(frames.map((f, i) => frameView(f, inParts(records[i]!)))).toEqual(docFrames(dir));
  });

  test.each(ENGINES.map((e) => [e.name, e] as const))('the code with the %s engine seals exactly the listed frames', (_name, engine) => {
    const { frames, receiverKeys } = sealByCode(dir, engine, engine);
    expect(frames.map((f, i) => frameView(f, inParts(records[i]!)))).toEqual(docFrames(dir));
    expect(hex(receiverKeys.chain0)).toBe(docHex(docBlock(section), 'chain_0'));
  });

  test('a client and a server on different engines seal the same frames', () => {
    const views = (c: Engine, s: Engine) => sealByCode(dir, c, s).frames.map((f, i) => frameView(f, inParts(records[i]!)));
    expect(views(nobleEngine, nativeEngine)).toEqual(docFrames(dir));
    expect(views(nativeEngine, nobleEngine)).toEqual(docFrames(dir));
  });

  test.each(ENGINES.map((e) => [e.name, e] as const))(
    'the %s engine opens the listed frames as a session does: CONFIG first, the records in order, a clean end',
    (_name, engine) => {
      const b = docBlock(section);
      const built = sealByCode(dir, engine, engine);
      // The listed bytes where the document has the whole frame; the code's frame (checked against its listed parts) else.
      const stream = Buffer.concat(records.map((r, i) => (inParts(r) ? built.frames[i]! : bytes(docHex(b, `frame ${i + 1}`)))));
      const want = records.map((r): [RecordName, string] => [r.type, hex(r.payload)]);
      expect(openAsSession(engine, built.receiverKeys, stream, stream.length)).toEqual(want);
      expect(openAsSession(engine, built.receiverKeys, stream, 1000)).toEqual(want);
    },
  );
});

// ---- §12.7: a passphrase handshake ----
describe('§12.7 a version 2 handshake under passphrase keys', () => {
  let codeKeys: LongTermKeys | undefined;
  const passphraseKeys = () => (codeKeys ??= keysFromPassphrase(TYPED_PASSPHRASE));

  test('the block lists the passphrase, its NFKC form, S, the long-term keys and the handshake, each exactly once', () => {
    const b = docBlock('12.7');
    expect([...b.keys()]).toEqual(['typed', 'P', 'S', 'K_wrap', 'K_auth', ...HANDSHAKE_NAMES]);
    expect(docHex(b, 'typed')).toBe(hex(utf8(TYPED_PASSPHRASE)));
    expect(docHex(b, 'P')).toBe(hex(utf8(PASSPHRASE_NFKC)));
    expect(TYPED_PASSPHRASE.normalize('NFKC')).toBe(PASSPHRASE_NFKC);
    expect(TYPED_PASSPHRASE).not.toBe(PASSPHRASE_NFKC);
    // The prose: the code points named, in order (the fullwidth forms, the combining accent, the precomposed é) and
    // the two spellings in backticks.
    const text = docSection('12.7').text;
    const cp = (c: string) => c.codePointAt(0)!.toString(16).toUpperCase().padStart(4, '0');
    const fullwidth = [...TYPED_PASSPHRASE].filter((c) => c.codePointAt(0)! >= 0xff00);
    expect([...text.matchAll(/U\+([0-9A-F]{4})/g)].map((m) => m[1])).toEqual([...fullwidth.map(cp), '0301', '00E9']);
    expect(text).toContain('(`' + fullwidth.join('') + '`)');
    expect(text).toContain('`' + PASSPHRASE_NFKC + '`');
    expect(text).toContain('a space, `' + TYPED_PASSPHRASE.slice(TYPED_PASSPHRASE.indexOf(' ') + 1, -1) + '` and U+0301');
  });

  test('node:crypto scrypt and HKDF over the listed P give the listed S and long-term keys', () => {
    const b = docBlock('12.7');
    const stretched = scryptSync(bytes(docHex(b, 'P')), utf8('vpn.ts passphrase'), 32, { N: 1 << 16, r: 8, p: 1, maxmem: 256 << 20 });
    expect(hex(stretched)).toBe(docHex(b, 'S'));
    const r = ref.longTerm(stretched, 'vpn.ts passphrase');
    expect({ wrap: hex(r.wrap), auth: hex(r.auth) }).toEqual({ wrap: docHex(b, 'K_wrap'), auth: docHex(b, 'K_auth') });
  });

  test('the code derives the listed long-term keys from the passphrase as typed', () => {
    const b = docBlock('12.7');
    const lt = passphraseKeys();
    expect({ wrap: hex(lt.wrap), auth: hex(lt.auth) }).toEqual({ wrap: docHex(b, 'K_wrap'), auth: docHex(b, 'K_auth') });
  });

  test('an independent node:crypto computation of the handshake gives exactly the listed bytes', () => {
    const b = docBlock('12.7');
    const lt = { wrap: bytes(docHex(b, 'K_wrap')), auth: bytes(docHex(b, 'K_auth')) };
    const { frame1: _f1, frame2: _f2, ...handshake } = ref.session(2, lt);
    expect(handshake).toEqual(handshakeOf(b));
    // Only the secret changed: the ephemeral keys are those of §12.4, W is the wrap under this K_wrap.
    expect(docHex(b, 'm1')).toBe('02' + IN.iv + hex(ref.cbc(lt.wrap, bytes(IN.iv), bytes(IN.sk), false)) + IN.ra + E_C);
    expect(docHex(b, 'm2').slice(0, 128)).toBe(IN.rb + E_S);
  });

  test.each(ENGINES.map((e) => [e.name, e] as const))('the code with the %s engine reproduces every listed byte', (_name, engine) => {
    const want = handshakeOf(docBlock('12.7'));
    const got = runCode(2, engine, engine, passphraseKeys());
    expect({ m1: hex(got.m1), m2: hex(got.m2), m3: hex(got.m3), transcript: hex(got.transcript) }).toEqual({
      m1: want.m1,
      m2: want.m2,
      m3: want.m3,
      transcript: want.transcript,
    });
    expect(keyHex(got.ckeys.send)).toEqual(want.c2s);
    expect(keyHex(got.ckeys.recv)).toEqual(want.s2c);
    expect(keyHex(got.skeys.recv)).toEqual(want.c2s);
    expect(keyHex(got.skeys.send)).toEqual(want.s2c);
  });

  test('a client and a server on different engines produce the same bytes', () => {
    const want = handshakeOf(docBlock('12.7'));
    for (const [c, s] of [
      [nobleEngine, nativeEngine],
      [nativeEngine, nobleEngine],
    ] as const) {
      const got = runCode(2, c, s, passphraseKeys());
      expect([hex(got.m1), hex(got.m2), hex(got.m3), keyHex(got.skeys.send).chain0]).toEqual([want.m1, want.m2, want.m3, want.s2c.chain0]);
    }
  });
});

// ---- §12.8: acknowledged close and rekeying, two continuations of the §12.4–§12.6 session ----
/** The IV of frame n (from 1, CONFIG first) of a direction: the §12.5/§12.6 counters going on. */
const ivStartOf = (dir: Direction, n: number) => (SESSION[dir].ivStart + 16 * (n - 1)) & 0xff;
/** What one side verified of the other's direction: the DATA of that direction's §12.5/§12.6 records. */
function verifiedData(dir: Direction): { bytes: number; records: number } {
  const data = SESSION[dir].records.filter((r) => r.type === 'DATA');
  return { bytes: data.reduce((n, r) => n + r.payload.length, 0), records: data.length };
}
/** ACK payload by §7: u64be bytes ‖ u64be records. */
function ackBytes({ bytes, records }: { bytes: number; records: number }): Buffer {
  const b = Buffer.alloc(16);
  b.writeBigUInt64BE(BigInt(bytes), 0);
  b.writeBigUInt64BE(BigInt(records), 8);
  return b;
}
const REKEY_IN = { ec: '41'.repeat(32), es: '42'.repeat(32), c2sData: 'hello', s2cData: 'world' } as const;
const ACK_NAMES = [
  's2c chain_5', 's2c ACK', 's2c frame 6',
  'c2s chain_8', 'c2s ACK', 'c2s frame 9',
];
const REKEY_NAMES = [
  "e_C'", "e_S'", "E_C'", "E_S'", "DH'", 'c2s chain_1', 's2c chain_1',
  'INIT', 'c2s frame 2', 'REPLY', 's2c frame 2', "s2c' enc", "s2c' mac", "s2c' chain0",
  'DONE', 'c2s frame 3', "c2s' enc", "c2s' mac", "c2s' chain0", 'c2s frame 4', 's2c frame 3',
];
const docMap = (b: DocBlock) => Object.fromEntries([...b].map(([name, e]) => [name, e.hex]));
const lastChain = (frame: Uint8Array) => hex(frame.subarray(frame.length - 32));
const keysHex = (k: DirectionKeys) => ({ enc: hex(k.enc), mac: hex(k.mac), chain0: hex(k.chain0) });
const primed = (dir: 'c2s' | 's2c', k: { enc: string; mac: string; chain0: string }) => ({
  [`${dir}' enc`]: k.enc,
  [`${dir}' mac`]: k.mac,
  [`${dir}' chain0`]: k.chain0,
});

/** §12.8 from the formulas with node:crypto only: both blocks, as name → hex. */
const ref128 = {
  ack(): Record<string, string> {
    const out: Record<string, string> = {};
    for (const [dir, peer] of [['s2c', 'c2s'], ['c2s', 's2c']] as const) {
      const { records } = SESSION[dir];
      const chain = lastChain(ref.sequence(V2[dir], SESSION[dir].ivStart, records).at(-1)!);
      const payload = ackBytes(verifiedData(peer));
      const n = records.length + 1;
      out[`${dir} chain_${n - 1}`] = chain;
      out[`${dir} ACK`] = hex(payload);
      out[`${dir} frame ${n}`] = hex(ref.sequence({ ...V2[dir], chain0: chain }, ivStartOf(dir, n), [rec('ACK', payload)])[0]!);
    }
    return out;
  },
  rekey(): Record<string, string> {
    const [ec, es] = [bytes(REKEY_IN.ec), bytes(REKEY_IN.es)];
    const EC = ref.pub(ec);
    const ES = ref.pub(es);
    const dh = ref.dh(ec, ES);
    expect(hex(ref.dh(es, EC))).toBe(hex(dh));
    const config = [rec('CONFIG', utf8(CONFIG_STDIO))];
    const c1 = lastChain(ref.sequence(V2.c2s, ivStartOf('c2s', 1), config)[0]!);
    const s1 = lastChain(ref.sequence(V2.s2c, ivStartOf('s2c', 1), config)[0]!);
    const init = Buffer.concat([Buffer.of(0x01), EC]);
    const reply = Buffer.concat([Buffer.of(0x02), ES]);
    const done = Buffer.of(0x03);
    const frame = (k: { enc: string; mac: string }, chain0: string, dir: Direction, n: number, r: SessionRecord) =>
      ref.sequence({ ...k, chain0 }, ivStartOf(dir, n), [r])[0]!;
    const newKeys = (dir: 'c2s' | 's2c', salt: string) => {
      const okm = ref.hkdf(Buffer.concat([dh, bytes(V2[dir].mac)]), bytes(salt), utf8(`vpn.ts rekey ${dir}`), 96);
      return { enc: hex(okm.subarray(0, 32)), mac: hex(okm.subarray(32, 64)), chain0: hex(okm.subarray(64)) };
    };
    const cf2 = frame(V2.c2s, c1, 'c2s', 2, rec('REKEY', init));
    const sf2 = frame(V2.s2c, s1, 's2c', 2, rec('REKEY', reply));
    const s2cNew = newKeys('s2c', lastChain(sf2)); // s2c switches after REPLY: salt = REPLY's chain value
    const cf3 = frame(V2.c2s, lastChain(cf2), 'c2s', 3, rec('REKEY', done));
    const c2sNew = newKeys('c2s', lastChain(cf3)); // c2s switches after DONE: salt = DONE's chain value
    return {
      "e_C'": hex(ec),
      "e_S'": hex(es),
      "E_C'": hex(EC),
      "E_S'": hex(ES),
      "DH'": hex(dh),
      'c2s chain_1': c1,
      's2c chain_1': s1,
      INIT: hex(init),
      'c2s frame 2': hex(cf2),
      REPLY: hex(reply),
      's2c frame 2': hex(sf2),
      ...primed('s2c', s2cNew),
      DONE: hex(done),
      'c2s frame 3': hex(cf3),
      ...primed('c2s', c2sNew),
      'c2s frame 4': hex(frame(c2sNew, c2sNew.chain0, 'c2s', 4, rec('DATA', utf8(REKEY_IN.c2sData)))),
      's2c frame 3': hex(frame(s2cNew, s2cNew.chain0, 's2c', 3, rec('DATA', utf8(REKEY_IN.s2cData)))),
    };
  },
};

/** The code under test: both ACK frames, each sealed after its direction's §12.5/§12.6 records. */
function codeAck(clientEngine: Engine, serverEngine: Engine, doc: Record<string, string>) {
  const hs = runCode(2, clientEngine, serverEngine);
  const out: Record<string, string> = {};
  for (const [dir, engine, keys] of [
    ['s2c', serverEngine, hs.skeys.send],
    ['c2s', clientEngine, hs.ckeys.send],
  ] as const) {
    const tx = new ChannelSender(engine, keys, counter(SESSION[dir].ivStart));
    const { records } = SESSION[dir];
    for (const r of records) tx.seal(RECORD[r.type], r.payload);
    out[`${dir} chain_${records.length}`] = hex(tx.chainValue);
    out[`${dir} ACK`] = doc[`${dir} ACK`]!; // the payload session.ts builds is checked by the session test below
    out[`${dir} frame ${records.length + 1}`] = hex(tx.seal(RECORD.ACK, bytes(doc[`${dir} ACK`]!)));
  }
  return { out, hs };
}

/**
 * The code under test takes the steps of session.ts's `onRekey` (rekey.ts for the payloads, the DH and the
 * derivation, channel.ts for the frames and the switch): the client's side on `clientEngine`, the server's on
 * `serverEngine`. The server's receiver opens the listed c2s frames and the client's the listed s2c frames.
 */
function codeRekey(clientEngine: Engine, serverEngine: Engine, doc: Record<string, string>): Record<string, string> {
  const hs = runCode(2, clientEngine, serverEngine);
  const ctx = new ChannelSender(clientEngine, hs.ckeys.send, counter(ivStartOf('c2s', 1)));
  const stx = new ChannelSender(serverEngine, hs.skeys.send, counter(ivStartOf('s2c', 1)));
  const crx = new ChannelReceiver(clientEngine, hs.ckeys.recv);
  const srx = new ChannelReceiver(serverEngine, hs.skeys.recv);
  const oldMac = { c2s: hs.ckeys.send.mac.slice(), s2c: hs.skeys.send.mac.slice() };
  const config = utf8(CONFIG_STDIO);
  ctx.seal(RECORD.CONFIG, config);
  stx.seal(RECORD.CONFIG, config);
  srx.open(bytes(docHex(docBlock('12.5'), 'frame 1')));
  crx.open(bytes(docHex(docBlock('12.6'), 'frame 1')));
  const out: Record<string, string> = { 'c2s chain_1': hex(ctx.chainValue), 's2c chain_1': hex(stx.chainValue) };
  const ec = bytes(REKEY_IN.ec);
  const es = bytes(REKEY_IN.es);
  out["e_C'"] = hex(ec);
  out["e_S'"] = hex(es);
  // Client: INIT under the old c2s keys.
  const init = rekeyPayload(REKEY_INIT, clientEngine.x25519Public(ec));
  out.INIT = hex(init);
  out['c2s frame 2'] = hex(ctx.seal(RECORD.REKEY, init));
  // Server: on INIT, DH', REPLY under the old s2c keys, then s2c switches.
  const gotInit = srx.open(bytes(doc['c2s frame 2']!));
  expect(gotInit.type).toBe(RECORD.REKEY);
  const i = readRekey(gotInit.payload);
  expect(i.step).toBe(REKEY_INIT);
  out["E_C'"] = hex(i.pub!);
  const sdh = rekeyDh(serverEngine, es.slice(), i.pub!);
  const reply = rekeyPayload(REKEY_REPLY, serverEngine.x25519Public(es));
  out.REPLY = hex(reply);
  out['s2c frame 2'] = hex(stx.seal(RECORD.REKEY, reply));
  const s2cServer = rekeyDirection(sdh, oldMac.s2c, stx.chainValue, 's2c');
  stx.rekey({ enc: s2cServer.enc.slice(), mac: s2cServer.mac, chain0: s2cServer.chain0 });
  // Client: on REPLY, DH', s2c switches; DONE under the old c2s keys, then c2s switches.
  const gotReply = crx.open(bytes(doc['s2c frame 2']!));
  const r = readRekey(gotReply.payload);
  expect([gotReply.type, r.step]).toEqual([RECORD.REKEY, REKEY_REPLY]);
  out["E_S'"] = hex(r.pub!);
  const cdh = rekeyDh(clientEngine, ec.slice(), r.pub!);
  out["DH'"] = hex(cdh);
  expect(hex(sdh)).toBe(hex(cdh));
  const s2cClient = rekeyDirection(cdh, oldMac.s2c, crx.chainValue, 's2c');
  Object.assign(out, primed('s2c', keysHex(s2cClient)));
  expect(keysHex(s2cServer)).toEqual(keysHex(s2cClient));
  crx.rekey({ ...s2cClient, enc: s2cClient.enc.slice() });
  const done = rekeyPayload(REKEY_DONE);
  out.DONE = hex(done);
  out['c2s frame 3'] = hex(ctx.seal(RECORD.REKEY, done));
  const c2sClient = rekeyDirection(cdh, oldMac.c2s, ctx.chainValue, 'c2s');
  Object.assign(out, primed('c2s', keysHex(c2sClient)));
  ctx.rekey({ ...c2sClient, enc: c2sClient.enc.slice() });
  // Server: on DONE, c2s switches.
  const gotDone = srx.open(bytes(doc['c2s frame 3']!));
  expect([gotDone.type, readRekey(gotDone.payload).step]).toEqual([RECORD.REKEY, REKEY_DONE]);
  const c2sServer = rekeyDirection(sdh, oldMac.c2s, srx.chainValue, 'c2s');
  expect(keysHex(c2sServer)).toEqual(keysHex(c2sClient));
  srx.rekey(c2sServer);
  // One DATA each way under the new keys, sealed by the code and the listed ones opened by the code.
  out['c2s frame 4'] = hex(ctx.seal(RECORD.DATA, utf8(REKEY_IN.c2sData)));
  out['s2c frame 3'] = hex(stx.seal(RECORD.DATA, utf8(REKEY_IN.s2cData)));
  const d1 = srx.open(bytes(doc['c2s frame 4']!));
  const d2 = crx.open(bytes(doc['s2c frame 3']!));
  expect([d1.type, hex(d1.payload), d2.type, hex(d2.payload)]).toEqual([
    RECORD.DATA,
    hex(utf8(REKEY_IN.c2sData)),
    RECORD.DATA,
    hex(utf8(REKEY_IN.s2cData)),
  ]);
  return out;
}

const ENGINE_PAIRS = [
  [nobleEngine, nobleEngine],
  [nativeEngine, nativeEngine],
  [nobleEngine, nativeEngine],
  [nativeEngine, nobleEngine],
] as const;
const pairName = ([c, s]: readonly [Engine, Engine]) => `client ${c.name}, server ${s.name}`;

describe('§12.8 acknowledged close and rekeying', () => {
  const ackDoc = () => docMap(docBlock('12.8', 0));
  const rekeyDoc = () => docMap(docBlock('12.8', 1));

  test('the blocks list each value exactly once, and the prose states the inputs this file uses', () => {
    const s = docSection('12.8');
    expect(s.blocks.length).toBe(2);
    expect(Object.keys(ackDoc())).toEqual(ACK_NAMES);
    expect(Object.keys(rekeyDoc())).toEqual(REKEY_NAMES);
    const t = s.text.replace(/\s+/g, ' ');
    expect(t).toContain(`a c2s frame n has the 16 bytes from 0x${SESSION.c2s.ivStart.toString(16)} + 16 · (n − 1)`);
    expect(t).toContain(`an s2c frame n those from 0x${SESSION.s2c.ivStart.toString(16)} + 16 · (n − 1)`);
    expect(t).toContain(`e_C' = 32 bytes \`0x${REKEY_IN.ec.slice(0, 2)}\``);
    expect(t).toContain(`e_S' = 32 bytes \`0x${REKEY_IN.es.slice(0, 2)}\``);
    expect(t).toContain(`ACK \`0x0${TYPE_BYTE.ACK}\` or REKEY \`0x0${TYPE_BYTE.REKEY}\``);
    expect(t).toContain(`DATA \`"${REKEY_IN.c2sData}"\` (\`${hex(utf8(REKEY_IN.c2sData))}\`) under c2s'`);
    expect(t).toContain(`DATA \`"${REKEY_IN.s2cData}"\` (\`${hex(utf8(REKEY_IN.s2cData))}\`) under s2c'`);
    const c = verifiedData('c2s');
    const sv = verifiedData('s2c');
    const sizes = SESSION.c2s.records.filter((r) => r.type === 'DATA').map((r) => r.payload.length);
    expect(t).toContain(`${sizes.join(' + ')} = ${c.bytes} bytes in ${c.records} records`);
    expect(t).toContain(`${sv.bytes} bytes in ${sv.records} records`);
    expect(t).toContain(`ACK as s2c frame ${SESSION.s2c.records.length + 1}, extending chain_${SESSION.s2c.records.length} of §12.6`);
    expect(t).toContain(`ACK as c2s frame ${SESSION.c2s.records.length + 1}, extending chain_${SESSION.c2s.records.length} of §12.5`);
    expect(t).toContain('info = `"vpn.ts rekey s2c"`');
    expect(t).toContain('info = `"vpn.ts rekey c2s"`');
    // The chain values these continue from are the listed ones of §12.5 and §12.6.
    const tail = (id: string, n: string) => docHex(docBlock(id), n).slice(-64);
    expect(ackDoc()['s2c chain_5']).toBe(tail('12.6', 'frame 5'));
    expect(ackDoc()['c2s chain_8']).toBe(tail('12.5', 'frame 8'));
    expect(rekeyDoc()['c2s chain_1']).toBe(tail('12.5', 'frame 1'));
    expect(rekeyDoc()['s2c chain_1']).toBe(tail('12.6', 'frame 1'));
  });

  test('an independent node:crypto computation from the formulas gives exactly the listed ACK payloads and frames', () => {
    expect(ref128.ack()).toEqual(ackDoc());
  });

  test('an independent node:crypto computation from the formulas of §7 gives exactly the listed rekey', () => {
    expect(ref128.rekey()).toEqual(rekeyDoc());
  });

  test.each(ENGINE_PAIRS.map((p) => [pairName(p), p] as const))('the code (%s) seals the listed ACK frames, and opens them after CLOSE with a clean end', (_n, [c, s]) => {
    const doc = ackDoc();
    const { out, hs } = codeAck(c, s, doc);
    expect(out).toEqual(doc);
    for (const [dir, engine, keys] of [
      ['s2c', c, hs.ckeys.recv],
      ['c2s', s, hs.skeys.recv],
    ] as const) {
      const { records } = SESSION[dir];
      const tx = new ChannelSender(dir === 's2c' ? s : c, dir === 's2c' ? hs.skeys.send : hs.ckeys.send, counter(SESSION[dir].ivStart));
      const stream = Buffer.concat([...records.map((r) => tx.seal(RECORD[r.type], r.payload)), bytes(doc[`${dir} frame ${records.length + 1}`]!)]);
      const got = openAsSession(engine, keys, stream, 1000);
      expect(got).toEqual([...records.map((r): [RecordName, string] => [r.type, hex(r.payload)]), ['ACK', doc[`${dir} ACK`]!]]);
    }
  });

  test.each(ENGINE_PAIRS.map((p) => [pairName(p), p] as const))('the code (%s) takes the rekey steps of §7 and gives exactly the listed values', (_n, [c, s]) => {
    const doc = rekeyDoc();
    expect(codeRekey(c, s, doc)).toEqual(doc);
  });
});

/** A transport for the session test below: each write is handed to the peer in order (a microtask later) and kept. */
class Wire implements Transport {
  other!: Wire;
  session!: Session;
  readonly sent: Uint8Array[] = [];
  readonly queued = 0;
  readonly empty = true;
  readonly peer = 'wire';
  write(data: Uint8Array): boolean {
    const copy = data.slice();
    this.sent.push(copy);
    queueMicrotask(() => this.other.session.onData(copy.slice()));
    return true;
  }
  pause(): void {}
  resume(): void {}
  shutdown(): void {
    queueMicrotask(() => this.other.session.onEnd());
  }
  close(): void {}
  abort(): void {}
}

describe('§12.8 and session.ts', () => {
  test.each(ENGINES.map((e) => [e.name, e] as const))(
    'two sessions (%s engine) with the listed ephemeral secrets send the listed INIT, REPLY and DONE, switch keys where the formula says, and send the listed ACKs',
    async (_name, engine) => {
      const ack = docMap(docBlock('12.8', 0));
      const rk = docMap(docBlock('12.8', 1));
      // x25519Keygen gives the listed e_C' (client) and e_S' (server) once armed, after the handshake.
      const armed = { client: false, server: false };
      const eng = (side: 'client' | 'server', secret: string): Engine => ({
        ...engine,
        x25519Keygen: () => {
          if (!armed[side]) return engine.x25519Keygen();
          armed[side] = false;
          return { secretKey: bytes(secret), publicKey: engine.x25519Public(bytes(secret)) };
        },
      });
      const [cw, sw] = [new Wire(), new Wire()];
      cw.other = sw;
      sw.other = cw;
      const traces = { client: [] as string[], server: [] as string[] };
      const ended = { client: Promise.withResolvers<VpnError | null>(), server: Promise.withResolvers<VpnError | null>() };
      const app = (side: 'client' | 'server'): SessionApp => ({
        onOpen() {},
        onData() {},
        onPeerClose() {},
        onEnd: (err) => ended[side].resolve(err),
      });
      const base = { keys: keysFromKeyFile(bytes(KEY_FILE)), handshakeTimeoutMs: 5000, keepaliveMs: 0, config: () => ({ mode: 'stdio' }) };
      const server = new Session(sw, { ...base, role: 'server', engine: eng('server', rk["e_S'"]!), trace: (l) => traces.server.push(l) }, app('server'));
      const client = new Session(cw, { ...base, role: 'client', engine: eng('client', rk["e_C'"]!), trace: (l) => traces.client.push(l) }, app('client'));
      cw.session = client;
      sw.session = server;
      server.start();
      client.start();
      const until = async (cond: () => boolean) => {
        for (let i = 0; i < 500 && !cond(); i++) await Bun.sleep(2);
        return cond();
      };
      expect(await until(() => client.phase === 'open' && server.phase === 'open')).toBe(true);
      armed.client = armed.server = true;
      client.startRekey();
      expect(await until(() => client.rekeyCount === 1 && server.rekeyCount === 1)).toBe(true);
      // The DATA of §12.5 one way and of §12.6 the other, then both CLOSEs: each side's ACK counts what it verified.
      for (const r of SESSION.c2s.records) if (r.type === 'DATA') expect(client.writeRecord(r.payload)).toBe(true);
      for (const r of SESSION.s2c.records) if (r.type === 'DATA') expect(server.writeRecord(r.payload)).toBe(true);
      client.close();
      server.close();
      expect([await ended.client.promise, await ended.server.promise]).toEqual([null, null]);

      // Open each direction from the wire with node:crypto only: the traffic keys as traced, then the keys of
      // §7 at the REPLY (s2c) and at the DONE (c2s), from the listed DH' and the chain value of that frame.
      const traced = (dir: Direction) => {
        const v = (what: string) => new RegExp(`^handshake ${dir} ${what} \\(32\\): ([0-9a-f]{64})$`, 'm').exec(traces.client.join('\n'))![1]!;
        return { enc: v('enc key'), mac: v('mac key'), chain0: v('chain0') };
      };
      const open = (dir: Direction, writes: Uint8Array[]) => {
        let k = traced(dir);
        let chain = k.chain0;
        const got: [number, string][] = [];
        const switched: { enc: string; mac: string; chain0: string }[] = [];
        for (const f of writes) {
          const L = Buffer.from(f).readUInt32BE(0);
          expect(f.length).toBe(52 + L);
          const head = f.subarray(0, 20 + L);
          const tag = hex(ref.hmac(bytes(k.mac), bytes(chain), head));
          expect(hex(f.subarray(20 + L))).toBe(tag);
          chain = tag;
          const d = createDecipheriv('aes-256-cbc', bytes(k.enc), f.subarray(4, 20));
          const pt = Buffer.concat([d.update(f.subarray(20, 20 + L)), d.final()]);
          got.push([pt[0]!, hex(pt.subarray(1))]);
          if (pt[0] === TYPE_BYTE.REKEY && pt[1] === (dir === 's2c' ? 0x02 : 0x03)) {
            const okm = ref.hkdf(Buffer.concat([bytes(rk["DH'"]!), bytes(k.mac)]), bytes(chain), utf8(`vpn.ts rekey ${dir}`), 96);
            k = { enc: hex(okm.subarray(0, 32)), mac: hex(okm.subarray(32, 64)), chain0: hex(okm.subarray(64)) };
            chain = k.chain0;
            switched.push(k);
          }
        }
        return { got, switched };
      };
      // Client writes: message 1, message 3, then frames; server writes: message 2, then frames.
      const c2s = open('c2s', cw.sent.slice(2));
      const s2c = open('s2c', sw.sent.slice(1));
      const rekeys = (dir: Direction) => (dir === 'c2s' ? c2s : s2c).got.filter(([t]) => t === TYPE_BYTE.REKEY).map(([, p]) => p);
      expect(rekeys('c2s')).toEqual([rk.INIT!, rk.DONE!]);
      expect(rekeys('s2c')).toEqual([rk.REPLY!]);
      const acks = (dir: Direction) => (dir === 'c2s' ? c2s : s2c).got.filter(([t]) => t === TYPE_BYTE.ACK).map(([, p]) => p);
      expect(acks('s2c')).toEqual([ack['s2c ACK']!]);
      expect(acks('c2s')).toEqual([ack['c2s ACK']!]);
      // Both sessions traced the new keys the formula gives: s2c first, then c2s.
      const want = [s2c.switched[0]!, c2s.switched[0]!].map((k, i) => `rekey: new ${i === 0 ? 's2c' : 'c2s'} keys enc=${k.enc} mac=${k.mac} chain0=${k.chain0}`);
      for (const side of ['client', 'server'] as const) expect(traces[side].filter((l) => l.startsWith('rekey: new'))).toEqual(want);
      expect([c2s.switched.length, s2c.switched.length]).toEqual([1, 1]);
    },
  );
});

// ---- §12.9: version 3, a client key of a keyring ----

describe('§12.9 version 3 (a key per client)', () => {
  /** §4.1 and §3 for version 3 from the formulas, with node:crypto only. */
  function reference() {
    const f = bytes(KEY_FILE);
    const lt = ref.longTerm(f, 'vpn.ts key file');
    const kHint = ref.hkdf(f, utf8('vpn.ts key file'), utf8('vpn.ts key hint'), 32);
    const [sk, iv, ra, rb] = [bytes(IN.sk), bytes(IN.iv), bytes(IN.ra), bytes(IN.rb)];
    const ec = ref.pub(bytes(IN.ec));
    const es = ref.pub(bytes(IN.es));
    const h = ref.hmac(kHint, ra).subarray(0, 16);
    const m1 = Buffer.concat([Buffer.of(3), iv, ref.cbc(lt.wrap, iv, sk, false), ra, ec, h]);
    const body = Buffer.concat([rb, es]);
    const m2 = Buffer.concat([body, ref.hmac(lt.auth, m1, body, utf8('SRVR'))]);
    const m3 = ref.hmac(lt.auth, m1, m2, utf8('CLNT'));
    const th = createHash('sha256').update(m1).update(m2).update(m3).digest();
    const okm = ref.hkdf(Buffer.concat([sk, ref.dh(bytes(IN.ec), es)]), Buffer.concat([ra, rb]), Buffer.concat([utf8('vpn.ts v3 traffic'), th]), 192);
    const k = (i: number) => hex(okm.subarray(32 * i, 32 * i + 32));
    return {
      kHint: hex(kHint),
      h: hex(h),
      hs: { m1: hex(m1), m2: hex(m2), m3: hex(m3), transcript: hex(th), c2s: { enc: k(0), mac: k(1), chain0: k(2) }, s2c: { enc: k(3), mac: k(4), chain0: k(5) } },
    };
  }

  test('the document, node:crypto from the formulas, and the code (both engines, a keyring server) agree', () => {
    const b = docBlock('12.9');
    expect([...b.keys()]).toEqual(['K_hint', 'H', ...HANDSHAKE_NAMES]);
    const want = reference();
    expect(docHex(b, 'K_hint')).toBe(want.kHint);
    expect(docHex(b, 'H')).toBe(want.h);
    expect(handshakeOf(b)).toEqual(want.hs);
    const lt = keysFromKeyFile(bytes(KEY_FILE));
    expect(hex(lt.hint!)).toBe(want.kHint);
    for (const engine of [nobleEngine, nativeEngine]) {
      // The keyring holds other keys before and after this one: which others does not change a byte.
      const ring = new Keyring('ring', parseKeyringText(`first ${'11'.repeat(32)}\nalice ${KEY_FILE}\nlast ${'22'.repeat(32)}\n`, 'ring'));
      const client = new ClientHandshake(lt, 3, { engine, random: counter(CLIENT_RANDOM_START) });
      const server = new ServerHandshake(ring, { engine, random: counter(SERVER_RANDOM_START) });
      const m1 = client.createMessage1();
      const m2 = server.consumeMessage1(m1);
      const m3 = client.consumeMessage2(m2);
      const skeys = server.consumeMessage3(m3);
      expect(server.client!.name).toBe('alice');
      expect({ m1: hex(m1), m2: hex(m2), m3: hex(m3) }).toEqual({ m1: want.hs.m1, m2: want.hs.m2, m3: want.hs.m3 });
      expect({ c2s: keyHex(client.keys!.send), s2c: keyHex(client.keys!.recv) }).toEqual({ c2s: want.hs.c2s, s2c: want.hs.s2c });
      expect({ c2s: keyHex(skeys.recv), s2c: keyHex(skeys.send) }).toEqual({ c2s: want.hs.c2s, s2c: want.hs.s2c });
    }
  });
});
