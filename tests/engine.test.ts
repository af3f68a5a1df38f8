/**
 * Crypto engines (PROTOCOL.md §2): noble (pure JS) and native (node:crypto / BoringSSL) must give identical bytes,
 * and each must match the published known answers:
 *   - AES-256-CBC: NIST SP 800-38A, appendix F.2.5 / F.2.6 (CBC-AES256);
 *   - HMAC-SHA256: RFC 4231, test cases 1, 2 and 6;
 *   - X25519: RFC 7748, section 6.1 (Alice and Bob).
 * Each engine also writes into the output buffers it is handed (in place, misaligned, wrong-sized) correctly.
 */
import { describe, expect, test } from 'bun:test';
import { randomBytes } from 'node:crypto';
import { ChannelReceiver, ChannelSender, MAX_PAYLOAD, RECORD } from '../channel.ts';
import { type Engine, getEngine, nativeEngine, nobleEngine } from '../engine.ts';
import { ClientHandshake, type DirectionKeys, keysFromKeyFile, ServerHandshake, VERSION_1, VERSION_2 } from '../handshake.ts';

const ENGINES: readonly Engine[] = [nobleEngine, nativeEngine];
const EACH_ENGINE = ENGINES.map((e) => [e.name, e] as const);
const CROSS = [
  ['noble', 'native', nobleEngine, nativeEngine],
  ['native', 'noble', nativeEngine, nobleEngine],
] as const;
const rand = (n: number) => new Uint8Array(randomBytes(n));
const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');
const bytes = (h: string) => new Uint8Array(Buffer.from(h, 'hex'));
const utf8 = (s: string) => new TextEncoder().encode(s);
const padded = (n: number) => (Math.floor(n / 16) + 1) * 16;

describe('published known answers', () => {
  // NIST SP 800-38A F.2.5 (encrypt) / F.2.6 (decrypt), CBC-AES256, four blocks.
  const NIST = {
    key: '603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4',
    iv: '000102030405060708090a0b0c0d0e0f',
    pt: '6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e5130c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710',
    ct: 'f58c4c04d6e5f1ba779eabfb5f7bfbd69cfc4e967edb808d679f777bc6702c7d39f23369a9d9bacfa530e26304231461b2eb05e2c39be9fcda6c19078c6a9d1b',
  };
  test.each(EACH_ENGINE)('AES-256-CBC matches NIST SP 800-38A F.2.5/F.2.6 (%s)', (_n, e) => {
    expect(hex(e.encryptCbc(bytes(NIST.key), bytes(NIST.iv), bytes(NIST.pt), false))).toBe(NIST.ct);
    expect(hex(e.decryptCbc(bytes(NIST.key), bytes(NIST.iv), bytes(NIST.ct), false))).toBe(NIST.pt);
  });

  const RFC4231 = [
    ['1', '0b'.repeat(20), hex(utf8('Hi There')), 'b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7'],
    ['2', hex(utf8('Jefe')), hex(utf8('what do ya want for nothing?')), '5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843'],
    ['6', 'aa'.repeat(131), hex(utf8('Test Using Larger Than Block-Size Key - Hash Key First')), '60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54'],
  ] as const;
  test.each(EACH_ENGINE)('HMAC-SHA256 matches RFC 4231 test cases 1, 2 and 6 (%s)', (_n, e) => {
    for (const [, key, data, want] of RFC4231) expect(hex(e.mac(bytes(key))(bytes(data)))).toBe(want);
  });

  const RFC7748 = {
    a: '77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a',
    A: '8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a',
    b: '5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb',
    B: 'de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f',
    K: '4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742',
  };
  test.each(EACH_ENGINE)('X25519 matches RFC 7748 section 6.1 (%s)', (_n, e) => {
    expect(hex(e.x25519Public(bytes(RFC7748.a)))).toBe(RFC7748.A);
    expect(hex(e.x25519Public(bytes(RFC7748.b)))).toBe(RFC7748.B);
    expect(hex(e.x25519(bytes(RFC7748.a), bytes(RFC7748.B)))).toBe(RFC7748.K);
    expect(hex(e.x25519(bytes(RFC7748.b), bytes(RFC7748.A)))).toBe(RFC7748.K);
  });
});

describe('noble and native give identical bytes', () => {
  test('AES-256-CBC with PKCS#7 padding, plaintexts of 0 to 48 bytes and 1000 bytes, each opened by the other engine', () => {
    const key = rand(32);
    const iv = rand(16);
    for (const n of [...Array.from({ length: 49 }, (_, i) => i), 1000]) {
      const pt = rand(n);
      const a = nobleEngine.encryptCbc(key, iv, pt, true);
      const b = nativeEngine.encryptCbc(key, iv, pt, true);
      expect(hex(a)).toBe(hex(b));
      expect(a.length).toBe((Math.floor(n / 16) + 1) * 16);
      expect(hex(nativeEngine.decryptCbc(key, iv, a, true))).toBe(hex(pt));
      expect(hex(nobleEngine.decryptCbc(key, iv, b, true))).toBe(hex(pt));
    }
  });

  test('AES-256-CBC without padding (the key wrap of §3): identical for whole blocks, refused by both otherwise', () => {
    const key = rand(32);
    const iv = rand(16);
    for (const n of [16, 32, 64]) {
      const pt = rand(n);
      const a = nobleEngine.encryptCbc(key, iv, pt, false);
      expect(a.length).toBe(n);
      expect(hex(nativeEngine.encryptCbc(key, iv, pt, false))).toBe(hex(a));
      for (const e of ENGINES) expect(hex(e.decryptCbc(key, iv, a, false))).toBe(hex(pt));
    }
    for (const e of ENGINES) for (const n of [1, 15, 17, 31]) expect(() => e.encryptCbc(key, iv, rand(n), false)).toThrow();
  });

  test('a keyed cbc(key) gives the one-shot bytes for every frame size class, in place and not, and each opens the other', () => {
    // native's keyed form chains small frames itself over two ECB contexts (≤ 64 bytes out to encrypt, ≤ 4096 in to
    // decrypt) and hands larger ones to a fresh CBC object: every size on both sides of both bounds.
    const key = rand(32);
    const sizes = [...Array.from({ length: 80 }, (_, i) => i), 95, 96, 97, 4063, 4064, 4079, 4080, 4095, 4096, 4097, 9000];
    for (const e of ENGINES) {
      const c = e.cbc(key);
      for (const n of sizes) {
        const iv = rand(16);
        const pt = rand(n);
        const want = nobleEngine.encryptCbc(key, iv, pt, true);
        expect(hex(c.encrypt(iv, pt, true))).toBe(hex(want));
        // In place, as channel.ts seals: the plaintext laid out where its ciphertext goes.
        const buf = new Uint8Array(want.length);
        buf.set(pt);
        const sealed = c.encrypt(iv, buf.subarray(0, n), true, buf);
        expect(hex(sealed)).toBe(hex(want));
        expect(hex(c.decrypt(iv, want, true))).toBe(hex(pt));
        const copy = want.slice();
        expect(hex(c.decrypt(iv, copy, true, copy))).toBe(hex(pt)); // in place, as a reassembled frame is opened
        if (n % 16 === 0 && n > 0) {
          const raw = nobleEngine.encryptCbc(key, iv, pt, false);
          expect(hex(c.encrypt(iv, pt, false))).toBe(hex(raw));
          expect(hex(c.decrypt(iv, raw, false))).toBe(hex(pt));
        }
      }
      for (const n of [1, 15, 17]) expect(() => c.encrypt(rand(16), rand(n), false)).toThrow();
      for (const n of [15, 17, 4095]) expect(() => c.decrypt(rand(16), rand(n), true)).toThrow();
      for (const last of [0x00, 0x11]) {
        const block = rand(32);
        block[31] = last;
        const iv = rand(16);
        expect(() => c.decrypt(iv, nobleEngine.encryptCbc(key, iv, block, false), true)).toThrow();
      }
      c.wipe();
    }
  });

  test('cbc(key) keeps a copy of the key: changing the caller\'s array later changes nothing, and wipe() leaves it alone', () => {
    for (const e of ENGINES) {
      const key = rand(32);
      const before = hex(key);
      const iv = rand(16);
      const pt = rand(5);
      const want = hex(nobleEngine.encryptCbc(key, iv, pt, true));
      const c = e.cbc(key);
      key.fill(0); // what channel.ts does to a direction's key on a rekey
      expect(hex(c.encrypt(iv, pt, true))).toBe(want);
      key.set(Buffer.from(before, 'hex'));
      c.wipe();
      expect(hex(key)).toBe(before);
    }
  });

  test('both engines throw on a bad PKCS#7 pad', () => {
    const key = rand(32);
    const iv = rand(16);
    for (const last of [0x00, 0x11, 0xff]) {
      const block = rand(16);
      block[15] = last;
      const ct = nobleEngine.encryptCbc(key, iv, block, false);
      for (const e of ENGINES) expect(() => e.decryptCbc(key, iv, ct, true)).toThrow();
    }
    // Control: a pad that is valid (0x01) decrypts in both.
    const ok = rand(16);
    ok[15] = 0x01;
    const ct = nobleEngine.encryptCbc(key, iv, ok, false);
    for (const e of ENGINES) expect(hex(e.decryptCbc(key, iv, ct, true))).toBe(hex(ok.subarray(0, 15)));
  });

  test('HMAC-SHA256 over up to three parts equals HMAC over their concatenation, for keys of 1 to 131 bytes', () => {
    for (const keyLen of [1, 32, 64, 65, 131]) {
      const key = rand(keyLen);
      for (const parts of [[rand(0), rand(1), rand(63)], [rand(64), rand(1000)], [rand(32), rand(84), rand(8)]]) {
        const whole = new Uint8Array(Buffer.concat(parts));
        const want = hex(nobleEngine.mac(key)(whole));
        for (const e of ENGINES) expect(hex(e.mac(key)(parts[0]!, parts[1], parts[2]))).toBe(want);
      }
    }
  });

  test.each(EACH_ENGINE)('a keyed MAC gives the same answer every time it is used (%s)', (_n, e) => {
    const mac = e.mac(rand(32));
    const a = rand(100);
    const b = rand(100);
    const first = hex(mac(a));
    expect(hex(mac(b))).not.toBe(first);
    expect(hex(mac(a))).toBe(first); // no state carried over from earlier messages
    expect(hex(mac(a.subarray(0, 40), a.subarray(40)))).toBe(first);
  });

  test('X25519 public keys and shared secrets agree for fixed and fresh keys', () => {
    const fixed = ['00'.repeat(32), 'ff'.repeat(32), '50'.repeat(32), hex(rand(32))];
    for (const s of fixed) expect(hex(nativeEngine.x25519Public(bytes(s)))).toBe(hex(nobleEngine.x25519Public(bytes(s))));
    for (const [, , g1, g2] of CROSS) {
      const a = g1.x25519Keygen();
      const b = g2.x25519Keygen();
      expect([a.secretKey.length, a.publicKey.length]).toEqual([32, 32]);
      expect(hex(g2.x25519Public(a.secretKey))).toBe(hex(a.publicKey));
      const k = hex(g1.x25519(a.secretKey, b.publicKey));
      expect(hex(g2.x25519(b.secretKey, a.publicKey))).toBe(k);
      expect(hex(g2.x25519(a.secretKey, b.publicKey))).toBe(k);
      expect(hex(g1.x25519(b.secretKey, a.publicKey))).toBe(k);
    }
  });

  test.each(EACH_ENGINE)('x25519 throws instead of returning an all-zero secret (%s)', (_n, e) => {
    const sk = rand(32);
    for (const p of ['00'.repeat(32), '01' + '00'.repeat(31), 'e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800']) {
      expect(() => e.x25519(sk, bytes(p))).toThrow();
    }
    expect(e.x25519(sk, e.x25519Keygen().publicKey).length).toBe(32);
  });

  test('getEngine names the two engines and refuses others', () => {
    expect(getEngine('noble')).toBe(nobleEngine);
    expect(getEngine('native')).toBe(nativeEngine);
    expect(() => getEngine('openssl')).toThrow('unknown engine');
  });
});

describe('frames and handshakes across engines', () => {
  test('the same keys and IVs give byte-identical frames from either engine', () => {
    const keys: DirectionKeys = { enc: rand(32), mac: rand(32), chain0: rand(32) };
    const ivs = Array.from({ length: 5 }, () => rand(16));
    const seal = (e: Engine) => {
      let i = 0;
      const tx = new ChannelSender(e, keys, () => ivs[i++]!.slice());
      return [0, 1, 16, 1000, 65536].map((n) => hex(tx.seal(RECORD.DATA, new Uint8Array(n).fill(n & 0xff))));
    };
    expect(seal(nativeEngine)).toEqual(seal(nobleEngine));
  });

  test.each(CROSS)('frames sealed by %s open with %s', (_a, _b, se, re) => {
    const keys: DirectionKeys = { enc: rand(32), mac: rand(32), chain0: rand(32) };
    const tx = new ChannelSender(se, keys);
    const rx = new ChannelReceiver(re, keys);
    for (const n of [0, 1, 16, 1000, 65536]) {
      const p = rand(n);
      const got = rx.open(tx.seal(RECORD.DATA, p));
      expect(got.type).toBe(RECORD.DATA);
      expect(hex(got.payload)).toBe(hex(p));
    }
    expect(rx.open(tx.seal(RECORD.CLOSE)).type).toBe(RECORD.CLOSE);
    expect(() => rx.end()).not.toThrow();
  });

  test.each([
    ...CROSS.map(([a, b, c, s]) => [VERSION_1, a, b, c, s] as const),
    ...CROSS.map(([a, b, c, s]) => [VERSION_2, a, b, c, s] as const),
  ])('a v%i handshake between a %s client and a %s server succeeds and carries a frame each way', (v, _a, _b, ce, se) => {
    const lt = keysFromKeyFile(rand(32));
    const client = new ClientHandshake(lt, v, { engine: ce });
    const server = new ServerHandshake(lt, { engine: se });
    server.consumeMessage3(client.consumeMessage2(server.consumeMessage1(client.createMessage1())));
    const up = new ChannelReceiver(se, server.keys!.recv).open(new ChannelSender(ce, client.keys!.send).seal(RECORD.DATA, utf8('up')));
    const down = new ChannelReceiver(ce, client.keys!.recv).open(new ChannelSender(se, server.keys!.send).seal(RECORD.DATA, utf8('down')));
    expect(new TextDecoder().decode(up.payload)).toBe('up');
    expect(new TextDecoder().decode(down.payload)).toBe('down');
  });
});

describe('engines: output buffers', () => {
  test.each(EACH_ENGINE)('encryptCbc in place (plaintext laid out where its ciphertext goes) equals the plain call (%s)', (_n, e) => {
    for (const n of [0, 1, 15, 16, 17, 1000, MAX_PAYLOAD + 1]) {
      const key = rand(32);
      const iv = rand(16);
      const pt = rand(n);
      const want = hex(nobleEngine.encryptCbc(key, iv, pt, true));
      const buf = new Uint8Array(padded(n));
      buf.set(pt);
      const out = e.encryptCbc(key, iv, buf.subarray(0, n), true, buf);
      expect(out).toBe(buf);
      expect(hex(buf)).toBe(want);
    }
  });

  test.each(EACH_ENGINE)('decryptCbc into the ciphertext itself, into a misaligned buffer, or into a wrong-sized one all give the right plaintext (%s)', (_n, e) => {
    const key = rand(32);
    const iv = rand(16);
    const pt = rand(1000);
    const ct = nobleEngine.encryptCbc(key, iv, pt, true);
    expect(hex(e.decryptCbc(key, iv, ct.slice(), true, undefined))).toBe(hex(pt));
    const inPlace = ct.slice();
    expect(hex(e.decryptCbc(key, iv, inPlace, true, inPlace))).toBe(hex(pt));
    const odd = new Uint8Array(ct.length + 1).subarray(1); // byteOffset 1: noble cannot write there
    expect(hex(e.decryptCbc(key, iv, ct, true, odd))).toBe(hex(pt));
    expect(hex(e.decryptCbc(key, iv, ct, true, new Uint8Array(5)))).toBe(hex(pt));
    // A misaligned input (a frame somewhere inside a socket chunk) decrypts correctly and is left as it was.
    const shifted = new Uint8Array(ct.length + 3).subarray(3);
    shifted.set(ct);
    expect(hex(e.decryptCbc(key, iv, shifted, true))).toBe(hex(pt));
    expect(hex(shifted)).toBe(hex(ct));
  });

  test.each(EACH_ENGINE)('decryptCbc refuses a ciphertext that is not whole blocks, and an empty one with padding (%s)', (_n, e) => {
    const key = rand(32);
    const iv = rand(16);
    for (const n of [1, 15, 17, 33]) expect(() => e.decryptCbc(key, iv, rand(n), false)).toThrow();
    expect(() => e.decryptCbc(key, iv, new Uint8Array(0), true)).toThrow();
  });

  test('native X25519 with a key it generated agrees with noble, and a key changed after keygen is not served from its cache', () => {
    const a = nativeEngine.x25519Keygen();
    const b = nobleEngine.x25519Keygen();
    const c = nobleEngine.x25519Keygen();
    const want = hex(nobleEngine.x25519(a.secretKey.slice(), b.publicKey));
    expect(hex(nativeEngine.x25519(a.secretKey, b.publicKey))).toBe(want);
    // The caller overwrites the array it got from keygen: the result must follow the bytes, not the cached key.
    a.secretKey.set(c.secretKey);
    expect(hex(nativeEngine.x25519(a.secretKey, b.publicKey))).toBe(hex(nobleEngine.x25519(c.secretKey, b.publicKey)));
    // A second use of a generated key (the cache serves one) still gives the right answer.
    const d = nativeEngine.x25519Keygen();
    const once = hex(nativeEngine.x25519(d.secretKey, b.publicKey));
    expect(hex(nativeEngine.x25519(d.secretKey, b.publicKey))).toBe(once);
    expect(hex(nativeEngine.x25519Public(d.secretKey))).toBe(hex(d.publicKey));
  });
});
