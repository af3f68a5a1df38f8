/**
 * The three-message handshake (PROTOCOL.md §3–§5, steps C1 S1 S2 C2 C3 S3), both sides in-process, no network.
 * Each test names the promise it checks; where a test shows that something fails, it also runs the honest case
 * through the same objects so that it would notice if everything failed for an unrelated reason.
 */
import { describe, expect, test } from 'bun:test';
import { hkdfSync, randomBytes } from 'node:crypto';
import { sha256 } from '@noble/hashes/sha2.js';
import { ChannelReceiver, ChannelSender, RECORD } from '../channel.ts';
import { type Engine, nativeEngine, nobleEngine } from '../engine.ts';
import { type ErrorCode, VpnError } from '../errors.ts';
import {
  ClientHandshake,
  type DirectionKeys,
  keysFromKeyFile,
  LABEL_CLNT,
  LABEL_SRVR,
  type LongTermKeys,
  message1Length,
  MSG1_V1_LEN,
  MSG1_V2_LEN,
  MSG2_V1_LEN,
  MSG2_V2_LEN,
  MSG3_LEN,
  type RandomSource,
  REFUSE_V1,
  ServerHandshake,
  sharedKey,
  VERSION_1,
  VERSION_2,
  VERSION_3,
} from '../handshake.ts';
import { spied } from './helpers.ts';

const ENGINES: readonly Engine[] = [nobleEngine, nativeEngine];
const VERSIONS = [VERSION_1, VERSION_2] as const;
const ENGINE_PAIRS = [
  [nobleEngine, nobleEngine],
  [nativeEngine, nativeEngine],
  [nobleEngine, nativeEngine],
  [nativeEngine, nobleEngine],
] as const;

const rand = (n: number) => new Uint8Array(randomBytes(n));
const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');
const bytes = (h: string) => new Uint8Array(Buffer.from(h, 'hex'));
const cat = (...p: Uint8Array[]) => new Uint8Array(Buffer.concat(p));
const freshSecret = (): LongTermKeys => keysFromKeyFile(rand(32));

/** Run `fn`, expect it to throw a VpnError with `code`, return the error. */
function expectVpnError(fn: () => unknown, code: ErrorCode): VpnError {
  let err: unknown = null;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(VpnError);
  expect((err as VpnError).code).toBe(code);
  return err as VpnError;
}

/** CSPRNG bytes, with every draw kept: lets a test replay a server's choices or play a later attacker. */
function recording(): { random: RandomSource; draws: Uint8Array[] } {
  const draws: Uint8Array[] = [];
  return {
    draws,
    random: (n) => {
      const b = rand(n);
      draws.push(b.slice());
      return b;
    },
  };
}

/** A source that hands out the recorded draws again, in order (fresh copies: the handshake wipes them). */
function replaying(draws: Uint8Array[]): RandomSource {
  let i = 0;
  return (n) => {
    const d = draws[i++];
    if (!d || d.length !== n) throw new Error('replaying source out of step');
    return d.slice();
  };
}

/** One honest handshake; returns both sides and the three messages. */
function handshake(version: number, ce: Engine, se: Engine, lt = freshSecret()) {
  const client = new ClientHandshake(lt, version, { engine: ce });
  const server = new ServerHandshake(lt, { engine: se });
  const m1 = client.createMessage1();
  const m2 = server.consumeMessage1(m1);
  const m3 = client.consumeMessage2(m2);
  server.consumeMessage3(m3);
  return { lt, client, server, m1, m2, m3 };
}

const keyHex = (k: DirectionKeys) => [hex(k.enc), hex(k.mac), hex(k.chain0)];

/** Seal one DATA record with `from` and open it with `to`; returns the payload as text. */
function carry(e1: Engine, from: DirectionKeys, e2: Engine, to: DirectionKeys, text: string): string {
  const frame = new ChannelSender(e1, from).seal(RECORD.DATA, new TextEncoder().encode(text));
  return new TextDecoder().decode(new ChannelReceiver(e2, to).open(frame).payload);
}

describe('both sides derive the same traffic keys (§5)', () => {
  const cases = VERSIONS.flatMap((v) => ENGINE_PAIRS.map(([c, s]) => [v, c.name, s.name, c, s] as const));
  test.each(cases)('v%i, client %s, server %s: client.send = server.recv and client.recv = server.send', (v, _c, _s, ce, se) => {
    const { client, server } = handshake(v, ce, se);
    const ck = client.keys!;
    const sk = server.keys!;
    expect([ck.version, sk.version, server.version]).toEqual([v, v, v]);
    expect(keyHex(ck.send)).toEqual(keyHex(sk.recv));
    expect(keyHex(ck.recv)).toEqual(keyHex(sk.send));
    // Key separation: the six values are all different (no key serves two purposes or both directions).
    expect(new Set([...keyHex(ck.send), ...keyHex(ck.recv)]).size).toBe(6);
    expect(carry(ce, ck.send, se, sk.recv, 'to the server')).toBe('to the server');
    expect(carry(se, sk.send, ce, ck.recv, 'to the client')).toBe('to the client');
  });

  test.each([...VERSIONS])('v%i: two sessions under the same secret get unrelated keys', (v) => {
    const lt = freshSecret();
    const a = handshake(v, nativeEngine, nativeEngine, lt).client.keys!;
    const b = handshake(v, nativeEngine, nativeEngine, lt).client.keys!;
    const all = [...keyHex(a.send), ...keyHex(a.recv), ...keyHex(b.send), ...keyHex(b.recv)];
    expect(new Set(all).size).toBe(12);
  });
});

describe('one key, many connections', () => {
  test('a server prepares its one key once: every connection shares it (a keyed HMAC each was 2.5 KiB per session), a named entry is its own', () => {
    const keys = freshSecret();
    expect(sharedKey(keys)).toBe(sharedKey(keys));
    expect(sharedKey(freshSecret())).not.toBe(sharedKey(keys));
    expect(sharedKey(keys, 'alice')).not.toBe(sharedKey(keys, 'alice'));
    // and through the shared one, handshakes of every version (v3 finds the key by its hint) still complete
    for (const v of [VERSION_1, VERSION_2, VERSION_3, VERSION_3]) {
      const { client, server } = handshake(v, nobleEngine, nativeEngine, keys);
      expect(keyHex(server.keys!.recv)).toEqual(keyHex(client.keys!.send));
    }
  });
});

describe('a wrong secret is caught', () => {
  test.each([...VERSIONS])('v%i: by the client at message 2, which then sends no message 3 and has no keys', (v) => {
    for (const e of ENGINES) {
      const client = new ClientHandshake(freshSecret(), v, { engine: e });
      const server = new ServerHandshake(freshSecret(), { engine: e });
      const m2 = server.consumeMessage1(client.createMessage1());
      expectVpnError(() => client.consumeMessage2(m2), 'AUTH_FAILED');
      expect(client.keys).toBeNull();
    }
  });

  test.each([...VERSIONS])('v%i: by the server at message 3, before it unwraps the session key', (v) => {
    for (const e of ENGINES) {
      // A client holding the wrong secret that skips its own check of message 2 and answers anyway.
      const wrong = freshSecret();
      const right = freshSecret();
      const attacker = new ClientHandshake(wrong, v, { engine: e });
      const s = spied(e);
      const server = new ServerHandshake(right, { engine: s.engine });
      const m1 = attacker.createMessage1();
      const m2 = server.consumeMessage1(m1);
      const forged = e.mac(wrong.auth)(m1, m2, LABEL_CLNT);
      expectVpnError(() => server.consumeMessage3(forged), 'AUTH_FAILED');
      expect(server.keys).toBeNull();
      expect(s.decrypts()).toBe(0);
      // Control: with the right secret the same kind of server unwraps exactly once.
      const honest = spied(e);
      const c = new ClientHandshake(right, v, { engine: e });
      const srv = new ServerHandshake(right, { engine: honest.engine });
      srv.consumeMessage3(c.consumeMessage2(srv.consumeMessage1(c.createMessage1())));
      expect(honest.decrypts()).toBe(1);
    }
  });
});

describe.each(VERSIONS.flatMap((v) => ENGINES.map((e) => [v, e.name, e] as const)))(
  'flipping any byte of a message fails the handshake (v%i, %s)',
  (v, _name, engine) => {
    test('every byte of message 1: the server refuses a bad version byte, the client catches the rest at message 2', () => {
      const lt = freshSecret();
      const client = new ClientHandshake(lt, v, { engine });
      const m1 = client.createMessage1();
      const caughtBy: string[] = [];
      for (let i = 0; i < m1.length; i++) {
        const bad = m1.slice();
        bad[i]! ^= 0x01;
        const server = new ServerHandshake(lt, { engine });
        let m2: Uint8Array;
        try {
          m2 = server.consumeMessage1(bad);
        } catch (e) {
          expect((e as VpnError).code).toBe('AUTH_FAILED');
          caughtBy.push('S1');
          continue;
        }
        expectVpnError(() => client.consumeMessage2(m2), 'AUTH_FAILED');
        expect(client.keys).toBeNull();
        expect(server.keys).toBeNull();
        caughtBy.push('C2');
      }
      expect(caughtBy).toEqual(['S1', ...Array(m1.length - 1).fill('C2')]);
      // Control: the same client still completes with the unaltered message 1.
      const server = new ServerHandshake(lt, { engine });
      server.consumeMessage3(client.consumeMessage2(server.consumeMessage1(m1)));
      expect(keyHex(client.keys!.send)).toEqual(keyHex(server.keys!.recv));
    });

    test('every byte of message 2 is caught by the client (C2), which then has no keys', () => {
      const lt = freshSecret();
      const client = new ClientHandshake(lt, v, { engine });
      const server = new ServerHandshake(lt, { engine });
      const m2 = server.consumeMessage1(client.createMessage1());
      for (let i = 0; i < m2.length; i++) {
        const bad = m2.slice();
        bad[i]! ^= 0x01;
        expectVpnError(() => client.consumeMessage2(bad), 'AUTH_FAILED');
        expect(client.keys).toBeNull();
      }
      // Control: the unaltered message 2 is accepted by the same client.
      server.consumeMessage3(client.consumeMessage2(m2));
      expect(keyHex(client.keys!.recv)).toEqual(keyHex(server.keys!.send));
    });

    test('every byte of message 3 is caught by the server (S3), which never unwraps the session key', () => {
      const lt = freshSecret();
      const client = new ClientHandshake(lt, v, { engine });
      const rec = recording();
      const first = new ServerHandshake(lt, { engine, random: rec.random });
      const m1 = client.createMessage1();
      const m2 = first.consumeMessage1(m1);
      const m3 = client.consumeMessage2(m2);
      // Each attempt uses a fresh server that draws the same R_B (and e_S), so it expects this very message 3.
      const freshServer = () => {
        const s = spied(engine);
        const server = new ServerHandshake(lt, { engine: s.engine, random: replaying(rec.draws) });
        expect(hex(server.consumeMessage1(m1))).toBe(hex(m2));
        return { server, decrypts: s.decrypts };
      };
      for (let i = 0; i < m3.length; i++) {
        const bad = m3.slice();
        bad[i]! ^= 0x01;
        const { server, decrypts } = freshServer();
        expectVpnError(() => server.consumeMessage3(bad), 'AUTH_FAILED');
        expect(server.keys).toBeNull();
        expect(decrypts()).toBe(0);
      }
      // Control: the unaltered message 3 is accepted. (The client derived its keys at C3 already; they stay
      // unconfirmed until the server's CONFIG record verifies, §8.)
      const { server, decrypts } = freshServer();
      server.consumeMessage3(m3);
      expect(decrypts()).toBe(1);
      expect(keyHex(server.keys!.recv)).toEqual(keyHex(client.keys!.send));
    });
  },
);

describe('exact lengths (§3)', () => {
  test.each([
    ['empty', new Uint8Array(0)],
    ['only a version byte', Uint8Array.of(VERSION_1)],
    ['v1, one byte short', cat(Uint8Array.of(VERSION_1), rand(MSG1_V1_LEN - 2))],
    ['v1, one byte long', cat(Uint8Array.of(VERSION_1), rand(MSG1_V1_LEN))],
    ['v1 byte with a v2 length', cat(Uint8Array.of(VERSION_1), rand(MSG1_V2_LEN - 1))],
    ['v2, one byte short', cat(Uint8Array.of(VERSION_2), rand(MSG1_V2_LEN - 2))],
    ['v2, one byte long', cat(Uint8Array.of(VERSION_2), rand(MSG1_V2_LEN))],
    ['v2 byte with a v1 length', cat(Uint8Array.of(VERSION_2), rand(MSG1_V1_LEN - 1))],
  ])('the server rejects message 1 of the wrong length: %s', (_what, m1) => {
    const lt = freshSecret();
    const server = new ServerHandshake(lt, { engine: nobleEngine });
    expectVpnError(() => server.consumeMessage1(m1), 'AUTH_FAILED');
    expect(server.version).toBe(0);
    // Nothing was committed: the same server still takes a proper message 1.
    const client = new ClientHandshake(lt, VERSION_2, { engine: nobleEngine });
    expect(server.consumeMessage1(client.createMessage1()).length).toBe(MSG2_V2_LEN);
  });

  test.each([
    [VERSION_1, [0, MSG2_V1_LEN - 1, MSG2_V1_LEN + 1, MSG2_V2_LEN]],
    [VERSION_2, [0, MSG2_V1_LEN, MSG2_V2_LEN - 1, MSG2_V2_LEN + 1]],
  ] as const)('a v%i client rejects message 2 of lengths %p', (v, lengths) => {
    const lt = freshSecret();
    const client = new ClientHandshake(lt, v, { engine: nobleEngine });
    const server = new ServerHandshake(lt, { engine: nobleEngine });
    const m2 = server.consumeMessage1(client.createMessage1());
    for (const n of lengths) {
      // Keep a true prefix so that only the length is wrong.
      const bad = n <= m2.length ? m2.slice(0, n) : cat(m2, rand(n - m2.length));
      expectVpnError(() => client.consumeMessage2(bad), 'AUTH_FAILED');
      expect(client.keys).toBeNull();
    }
    expect(client.consumeMessage2(m2).length).toBe(MSG3_LEN);
  });

  test.each([...VERSIONS])('a v%i server rejects message 3 of lengths 0, 31, 33 and 64', (v) => {
    const lt = freshSecret();
    const client = new ClientHandshake(lt, v, { engine: nobleEngine });
    const server = new ServerHandshake(lt, { engine: nobleEngine });
    const m3 = client.consumeMessage2(server.consumeMessage1(client.createMessage1()));
    for (const bad of [new Uint8Array(0), m3.slice(0, 31), cat(m3, rand(1)), cat(m3, m3)]) {
      expectVpnError(() => server.consumeMessage3(bad), 'AUTH_FAILED');
      expect(server.keys).toBeNull();
    }
    server.consumeMessage3(m3);
    expect(keyHex(server.keys!.recv)).toEqual(keyHex(client.keys!.send));
  });
});

describe('protocol versions (§3)', () => {
  test.each([0x00, 0x04, 0x7f, 0x80, 0xff].map((b) => [b.toString(16).padStart(2, '0'), b] as const))(
    'the server rejects an unknown version byte 0x%s',
    (_hex, b) => {
    expectVpnError(() => message1Length(b), 'AUTH_FAILED');
    for (const n of [MSG1_V1_LEN, MSG1_V2_LEN]) {
      const server = new ServerHandshake(freshSecret(), { engine: nobleEngine });
      expectVpnError(() => server.consumeMessage1(cat(Uint8Array.of(b), rand(n - 1))), 'AUTH_FAILED');
    }
    },
  );

  test('a client cannot be made to offer an unknown version', () => {
    for (const v of [0, 4, 255]) expectVpnError(() => new ClientHandshake(freshSecret(), v, { engine: nobleEngine }), 'USAGE');
    // Version 3 needs a key file's K_hint: a passphrase's keys have none.
    expectVpnError(() => new ClientHandshake({ wrap: rand(32), auth: rand(32) }, 3, { engine: nobleEngine }), 'USAGE');
  });

  test('a --require-pfs server refuses version 1 with PFS_REQUIRED and still accepts version 2', () => {
    const lt = freshSecret();
    const v1 = new ClientHandshake(lt, VERSION_1, { engine: nobleEngine });
    const strict = new ServerHandshake(lt, { engine: nobleEngine, requirePfs: true });
    expectVpnError(() => strict.consumeMessage1(v1.createMessage1()), 'PFS_REQUIRED');
    expect(strict.version).toBe(0);
    expect(strict.keys).toBeNull();
    const v2 = new ClientHandshake(lt, VERSION_2, { engine: nobleEngine });
    const s2 = new ServerHandshake(lt, { engine: nobleEngine, requirePfs: true });
    s2.consumeMessage3(v2.consumeMessage2(s2.consumeMessage1(v2.createMessage1())));
    expect(s2.version).toBe(VERSION_2);
    // Control: without --require-pfs the same version-1 offer is served.
    expect(handshake(VERSION_1, nobleEngine, nobleEngine, lt).server.version).toBe(VERSION_1);
  });

  test('the refusal REFUSE_V1 is 0x00 "PFS" and cannot be mistaken for a message 2', () => {
    expect(hex(REFUSE_V1)).toBe('00504653');
    expect([MSG2_V1_LEN, MSG2_V2_LEN]).not.toContain(REFUSE_V1.length);
  });
});

describe('no downgrade, no key substitution (v2)', () => {
  const LOW_ORDER = [
    '0000000000000000000000000000000000000000000000000000000000000000', // 0
    '0100000000000000000000000000000000000000000000000000000000000000', // 1
    'e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800', // order 8
    '5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157', // order 8
    'ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f', // p - 1
    'edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f', // p (= 0)
    'eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f', // p + 1 (= 1)
    '0000000000000000000000000000000000000000000000000000000000000080', // 0 with the ignored top bit set
  ];

  test('rewriting the version byte to 1 and stripping E_C is detected by the client at message 2', () => {
    for (const e of ENGINES) {
      const lt = freshSecret();
      const client = new ClientHandshake(lt, VERSION_2, { engine: e });
      const m1 = client.createMessage1();
      const downgraded = cat(Uint8Array.of(VERSION_1), m1.subarray(1, MSG1_V1_LEN));
      const server = new ServerHandshake(lt, { engine: e });
      const m2v1 = server.consumeMessage1(downgraded); // the server cannot tell yet: it answers as version 1
      expect(server.version).toBe(VERSION_1);
      // Forwarded as is: wrong length for the v2 client.
      expectVpnError(() => client.consumeMessage2(m2v1), 'AUTH_FAILED');
      // Padded with an E_S of the attacker's choosing to the v2 length: the MAC covers the real message 1.
      const padded = cat(m2v1.subarray(0, 32), e.x25519Keygen().publicKey, m2v1.subarray(32));
      expect(padded.length).toBe(MSG2_V2_LEN);
      expectVpnError(() => client.consumeMessage2(padded), 'AUTH_FAILED');
      expect(client.keys).toBeNull();
      // A --require-pfs server refuses the rewritten message outright.
      expectVpnError(() => new ServerHandshake(lt, { engine: e, requirePfs: true }).consumeMessage1(downgraded), 'PFS_REQUIRED');
    }
  });

  test('rewriting only the version byte (keeping E_C) is rejected by the server for its length', () => {
    const lt = freshSecret();
    const m1 = new ClientHandshake(lt, VERSION_2, { engine: nobleEngine }).createMessage1();
    const bad = m1.slice();
    bad[0] = VERSION_1;
    expectVpnError(() => new ServerHandshake(lt, { engine: nobleEngine }).consumeMessage1(bad), 'AUTH_FAILED');
  });

  test.each([
    ['E_C in message 1', 'm1'],
    ['E_S in message 2', 'm2'],
    ['both (a man in the middle with its own key pairs)', 'both'],
  ] as const)('replacing %s in flight is detected by the client at message 2', (_what, where) => {
    for (const e of ENGINES) {
      const lt = freshSecret();
      const client = new ClientHandshake(lt, VERSION_2, { engine: e });
      const server = new ServerHandshake(lt, { engine: e });
      let m1 = client.createMessage1();
      if (where !== 'm2') m1 = cat(m1.subarray(0, MSG1_V1_LEN), e.x25519Keygen().publicKey);
      let m2 = server.consumeMessage1(m1);
      if (where !== 'm1') m2 = cat(m2.subarray(0, 32), e.x25519Keygen().publicKey, m2.subarray(64));
      expectVpnError(() => client.consumeMessage2(m2), 'AUTH_FAILED');
      expect(client.keys).toBeNull();
    }
  });

  test.each(LOW_ORDER.map((p) => [p]))('both engines refuse the low-order ephemeral key %s on either side', (point) => {
    for (const e of ENGINES) {
      const lt = freshSecret();
      // As E_C: the server refuses message 1 and sends no message 2.
      const m1 = new ClientHandshake(lt, VERSION_2, { engine: e }).createMessage1();
      const server = new ServerHandshake(lt, { engine: e });
      expectVpnError(() => server.consumeMessage1(cat(m1.subarray(0, MSG1_V1_LEN), bytes(point))), 'AUTH_FAILED');
      expect(server.version).toBe(0);
      // As E_S, even inside a message 2 with a valid MAC (a peer that holds the secret): the client refuses it.
      const client = new ClientHandshake(lt, VERSION_2, { engine: e });
      const cm1 = client.createMessage1();
      const body = cat(rand(32), bytes(point));
      const m2 = cat(body, e.mac(lt.auth)(cm1, body, LABEL_SRVR));
      expectVpnError(() => client.consumeMessage2(m2), 'AUTH_FAILED');
      expect(client.keys).toBeNull();
    }
  });
});

describe('forward secrecy (v2)', () => {
  /** Play the attacker of §11 who recorded m1, m2, m3 and later learned the long-term secret. */
  function attack(lt: LongTermKeys, m1: Uint8Array, m2: Uint8Array, m3: Uint8Array) {
    const sk = nobleEngine.decryptCbc(lt.wrap, m1.subarray(1, 17), m1.subarray(17, 49), false);
    const ra = m1.subarray(49, 81);
    const rb = m2.subarray(0, 32);
    const th = sha256(cat(m1, m2, m3));
    const c2s = (ikm: Uint8Array, label: string): DirectionKeys => {
      const okm = new Uint8Array(hkdfSync('sha256', ikm, cat(ra, rb), cat(new TextEncoder().encode(label), th), 192));
      return { enc: okm.slice(0, 32), mac: okm.slice(32, 64), chain0: okm.slice(64, 96) };
    };
    const tryOpen = (keys: DirectionKeys, frame: Uint8Array) => new TextDecoder().decode(new ChannelReceiver(nobleEngine, keys).open(frame).payload);
    return { sk, c2s, tryOpen };
  }

  function recordSession(version: number) {
    const lt = freshSecret();
    const crec = recording();
    const client = new ClientHandshake(lt, version, { engine: nobleEngine, random: crec.random });
    const server = new ServerHandshake(lt, { engine: nobleEngine });
    const m1 = client.createMessage1();
    const m2 = server.consumeMessage1(m1);
    const m3 = client.consumeMessage2(m2);
    server.consumeMessage3(m3);
    const frame = new ChannelSender(nobleEngine, client.keys!.send).seal(RECORD.DATA, new TextEncoder().encode('attack at dawn'));
    expect(new TextDecoder().decode(new ChannelReceiver(nobleEngine, server.keys!.recv).open(frame).payload)).toBe('attack at dawn');
    return { lt, clientDraws: crec.draws, m1, m2, m3, frame };
  }

  test('a recorded v2 session cannot be opened with the shared secret alone', () => {
    const rec = recordSession(VERSION_2);
    const a = attack(rec.lt, rec.m1, rec.m2, rec.m3);
    expect(hex(a.sk)).toBe(hex(rec.clientDraws[0]!)); // the secret does give the attacker the session key…
    // …but neither the version-1 derivation nor the version-2 label without the X25519 secret opens the frame.
    expectVpnError(() => a.tryOpen(a.c2s(a.sk, 'vpn.ts v1 traffic'), rec.frame), 'INTEGRITY');
    expectVpnError(() => a.tryOpen(a.c2s(a.sk, 'vpn.ts v2 traffic'), rec.frame), 'INTEGRITY');
    // Control: the same recipe with SK ‖ X25519(e_C, E_S) does open it, so only the ephemeral secret was missing.
    const dh = nobleEngine.x25519(rec.clientDraws[3]!, rec.m2.subarray(32, 64));
    expect(a.tryOpen(a.c2s(cat(a.sk, dh), 'vpn.ts v2 traffic'), rec.frame)).toBe('attack at dawn');
  });

  test('a recorded v1 session is opened by the same recipe (version 1 has no forward secrecy)', () => {
    const rec = recordSession(VERSION_1);
    const a = attack(rec.lt, rec.m1, rec.m2, rec.m3);
    expect(a.tryOpen(a.c2s(a.sk, 'vpn.ts v1 traffic'), rec.frame)).toBe('attack at dawn');
  });
});

describe('replay', () => {
  test.each([...VERSIONS])('v%i: a replayed message 1 gets a fresh R_B, so the old message 3 fails at S3', (v) => {
    for (const e of ENGINES) {
      const old = handshake(v, e, e);
      const s = spied(e);
      const fresh = new ServerHandshake(old.lt, { engine: s.engine });
      const m2 = fresh.consumeMessage1(old.m1); // the server cannot tell a replay from message 1 alone
      expect(hex(m2.subarray(0, 32))).not.toBe(hex(old.m2.subarray(0, 32)));
      expectVpnError(() => fresh.consumeMessage3(old.m3), 'AUTH_FAILED');
      expect(fresh.keys).toBeNull();
      expect(s.decrypts()).toBe(0);
    }
  });

  test.each([...VERSIONS])('v%i: a replayed message 2 fails at C2 because R_A and SK are fresh', (v) => {
    const old = handshake(v, nobleEngine, nobleEngine);
    const client = new ClientHandshake(old.lt, v, { engine: nobleEngine });
    client.createMessage1();
    expectVpnError(() => client.consumeMessage2(old.m2), 'AUTH_FAILED');
    expect(client.keys).toBeNull();
  });
});

describe('call order', () => {
  test('each side refuses a message out of turn', () => {
    const lt = freshSecret();
    expect(() => new ClientHandshake(lt, VERSION_1, { engine: nobleEngine }).consumeMessage2(rand(MSG2_V1_LEN))).toThrow('out of order');
    expect(() => new ServerHandshake(lt, { engine: nobleEngine }).consumeMessage3(rand(MSG3_LEN))).toThrow('out of order');
    const { client, server, m1, m2 } = handshake(VERSION_1, nobleEngine, nobleEngine, lt);
    expect(() => server.consumeMessage1(m1)).toThrow('out of order');
    expect(() => client.consumeMessage2(m2)).toThrow('out of order');
  });
});
