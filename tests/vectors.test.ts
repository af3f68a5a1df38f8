/**
 * PROTOCOL.md §12: known-answer vectors. Fixed secret and fixed "random" bytes → the exact bytes of the long-term
 * keys, messages 1–3, the traffic keys and the first two client→server frames, for protocol versions 1 and 2.
 *
 * Where the expected hex came from: it was produced once by running handshake.ts/channel.ts with the inputs below
 * and then hard-coded here and in PROTOCOL.md §12. Each test checks three things agree byte for byte:
 *   1. the hard-coded hex;
 *   2. the code under test, with the noble engine and with the native engine;
 *   3. an independent re-computation in this file that uses only node:crypto (createHmac, hkdfSync, scryptSync,
 *      createCipheriv, diffieHellman) and the formulas of PROTOCOL.md §3–§6, so the vectors are not merely the
 *      code agreeing with itself.
 */
import { describe, expect, test } from 'bun:test';
import {
  createCipheriv,
  createHash,
  createHmac,
  createPrivateKey,
  createPublicKey,
  diffieHellman,
  hkdfSync,
  scryptSync,
} from 'node:crypto';
import { ChannelReceiver, ChannelSender, RECORD } from '../channel.ts';
import { type Engine, nativeEngine, nobleEngine } from '../engine.ts';
import {
  ClientHandshake,
  keysFromKeyFile,
  keysFromPassphrase,
  type RandomSource,
  ServerHandshake,
  type TrafficKeys,
} from '../handshake.ts';

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
  /** §3–§6 for one version, from the IN values above. */
  session(version: 1 | 2): Expected {
    const lt = ref.longTerm(bytes(KEY_FILE), 'vpn.ts key file');
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
};

/** Run the code under test over the §12 inputs with one engine per side. */
function runCode(version: 1 | 2, clientEngine: Engine, serverEngine: Engine) {
  const lt = keysFromKeyFile(bytes(KEY_FILE));
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
