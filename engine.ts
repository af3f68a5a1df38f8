/**
 * Crypto engines: the primitives the protocol uses (PROTOCOL.md §2), behind one interface.
 *
 * - `noble` (default): AES-256-CBC from @noble/ciphers, HMAC-SHA256 from @noble/hashes, X25519 from @noble/curves.
 *   Audited pure JS; no native code.
 * - `native` (`--engine native`): the same primitives from Bun's built-in node:crypto (BoringSSL, AES-NI).
 *
 * Both produce identical bytes for identical inputs; tests/engine.test.ts cross-checks them. Key derivation
 * (HKDF, scrypt, SHA-256 of the transcript) runs once per process or handshake and always uses noble.
 *
 * The data path prepares each direction's keys once (`cbc(key)`, `mac(key)`) and calls them once per frame, so both
 * engines avoid per-call waste: noble encrypts and decrypts into a caller's buffer (in place, for a frame) and
 * computes every MAC in one shared HMAC instance instead of cloning one per message; native keeps two ECB contexts
 * per key and chains small frames itself (NativeCbc), MACs with a keyed Bun CryptoHasher copied per message, unpads
 * itself (no concatenation), and keeps the KeyObject of an X25519 key it generated so that the shared secret does not
 * re-import, and re-derive, the secret key. The one-shot `encryptCbc`/`decryptCbc` serve the handshake.
 */
import { cbc } from '@noble/ciphers/aes.js';
import { x25519 } from '@noble/curves/ed25519.js';
import { type _HMAC, hmac } from '@noble/hashes/hmac.js';
import { sha256 } from '@noble/hashes/sha2.js';
import * as nodeCrypto from 'node:crypto';

export const MAC_LEN = 32;

/** A MAC keyed once, computed many times over a message given in (at most three) parts. */
export type KeyedMac = (a: Uint8Array, b?: Uint8Array, c?: Uint8Array) => Uint8Array;

/**
 * AES-256-CBC under one key, prepared once for the many frames of a direction (channel.ts); `encrypt` and `decrypt`
 * behave as Engine.encryptCbc/decryptCbc under that key. `wipe` zeroes this object's copy of the key and drops
 * what it prepared; it must not be used afterwards.
 */
export interface KeyedCbc {
  encrypt(iv: Uint8Array, plaintext: Uint8Array, pad: boolean, out?: Uint8Array): Uint8Array;
  decrypt(iv: Uint8Array, ciphertext: Uint8Array, pad: boolean, out?: Uint8Array): Uint8Array;
  wipe(): void;
}

export interface Engine {
  readonly name: EngineName;
  /**
   * AES-256-CBC. `pad` selects PKCS#7; without it the input must be a whole number of blocks. With `out` (exactly the
   * ciphertext's length, and either apart from `plaintext` or starting at the same byte, for in-place use), an engine
   * may write the ciphertext there and return `out`; it may also ignore `out` and return a new array.
   */
  encryptCbc(key: Uint8Array, iv: Uint8Array, plaintext: Uint8Array, pad: boolean, out?: Uint8Array): Uint8Array;
  /**
   * AES-256-CBC decryption; throws on a bad PKCS#7 pad (callers verify the MAC first, so this is never observable).
   * `out` as for encryptCbc (`ciphertext`'s length; may be `ciphertext` itself); the result is always the returned
   * array, which may be a view of `out`.
   */
  decryptCbc(key: Uint8Array, iv: Uint8Array, ciphertext: Uint8Array, pad: boolean, out?: Uint8Array): Uint8Array;
  /** AES-256-CBC under `key`, prepared once: what the data channel calls per frame. */
  cbc(key: Uint8Array): KeyedCbc;
  /** HMAC-SHA256 under `key`, prepared once so per-frame MACs do not rehash the key. */
  mac(key: Uint8Array): KeyedMac;
  /** A fresh X25519 key pair (RFC 7748). */
  x25519Keygen(): { secretKey: Uint8Array; publicKey: Uint8Array };
  /** X25519(secretKey, publicKey); throws when the result is all zero (a low-order point). */
  x25519(secretKey: Uint8Array, publicKey: Uint8Array): Uint8Array;
  /** X25519 public key of `secretKey` (used by the known-answer vectors). */
  x25519Public(secretKey: Uint8Array): Uint8Array;
}

export type EngineName = 'noble' | 'native';
export const ENGINE_NAMES: readonly EngineName[] = ['noble', 'native'];

const BLOCK = 16;

function rejectZero(shared: Uint8Array): Uint8Array {
  let acc = 0;
  for (const b of shared) acc |= b;
  if (acc === 0) throw new Error('x25519: all-zero shared secret (low-order point)');
  return shared;
}

/**
 * The one HMAC instance every noble MAC computation works in: set from the keyed state (`_cloneInto`), fed, digested,
 * which wipes it. Nothing to allocate per message, nothing extra held per key; JS runs one computation at a time.
 */
let macWork: _HMAC<any> | undefined;

/** noble writes into `out` only when it is 4-byte aligned; otherwise it gets a fresh array. */
const usable = (out: Uint8Array | undefined, len: number) => out !== undefined && out.length === len && out.byteOffset % 4 === 0;

export const nobleEngine: Engine = {
  name: 'noble',
  encryptCbc(key, iv, plaintext, pad, out) {
    const len = pad ? (Math.floor(plaintext.length / BLOCK) + 1) * BLOCK : plaintext.length;
    return cbc(key, iv, { disablePadding: !pad }).encrypt(plaintext, usable(out, len) ? out : undefined);
  },
  decryptCbc(key, iv, ciphertext, pad, out) {
    let src = ciphertext;
    let dst = usable(out, ciphertext.length) ? out : undefined;
    if (dst === undefined && ciphertext.byteOffset % 4 !== 0) {
      // noble would copy a misaligned input, allocate the output and wipe the copy: copy once and decrypt in place.
      src = ciphertext.slice();
      dst = src;
    }
    return cbc(key, iv, { disablePadding: !pad }).decrypt(src, dst);
  },
  cbc(key) {
    // noble expands the key inside every call (0.7 µs of the 7 µs a one-block frame costs here): nothing to prepare.
    const k = key.slice();
    return {
      encrypt: (iv, plaintext, pad, out) => nobleEngine.encryptCbc(k, iv, plaintext, pad, out),
      decrypt: (iv, ciphertext, pad, out) => nobleEngine.decryptCbc(k, iv, ciphertext, pad, out),
      wipe: () => void k.fill(0),
    };
  },
  mac(key) {
    const keyed = hmac.create(sha256, key);
    return (a, b, c) => {
      const h = (macWork = keyed._cloneInto(macWork));
      h.update(a);
      if (b) h.update(b);
      if (c) h.update(c);
      const tag = new Uint8Array(MAC_LEN);
      h.digestInto(tag);
      return tag;
    };
  },
  x25519Keygen: () => {
    const { secretKey, publicKey } = x25519.keygen();
    return { secretKey, publicKey };
  },
  x25519: (secretKey, publicKey) => {
    let shared: Uint8Array;
    try {
      shared = x25519.getSharedSecret(secretKey, publicKey);
    } catch {
      // noble refuses low-order points itself; report them the same way as the native engine does.
      shared = new Uint8Array(32);
    }
    return rejectZero(shared);
  },
  x25519Public: (secretKey) => x25519.getPublicKey(secretKey),
};

// DER wrappers for raw X25519 keys (RFC 8410): node:crypto imports keys only as DER/PEM/JWK.
const PKCS8_X25519 = Buffer.from('302e020100300506032b656e04220420', 'hex');
const SPKI_X25519 = Buffer.from('302a300506032b656e032100', 'hex');
const u8 = (b: Buffer) => new Uint8Array(b.buffer, b.byteOffset, b.byteLength);

/**
 * Secret keys this engine generated, with their KeyObject: importing a raw secret key costs a scalar
 * multiplication (node:crypto derives the public key), as much as half of the shared-secret computation. An entry
 * serves one `x25519` call (ephemeral keys are used once) and only while the caller's array still holds the bytes it
 * was made for; its copy of the bytes is wiped when used, and it goes away with the caller's array in any case.
 */
const generated = new WeakMap<Uint8Array, { bytes: Uint8Array; key: nodeCrypto.KeyObject }>();

function nativePrivate(secretKey: Uint8Array, once = false): nodeCrypto.KeyObject {
  const g = generated.get(secretKey);
  if (g) {
    const same = g.bytes.length === secretKey.length && g.bytes.every((b, i) => b === secretKey[i]);
    if (once || !same) {
      generated.delete(secretKey);
      g.bytes.fill(0);
    }
    if (same) return g.key;
  }
  return nodeCrypto.createPrivateKey({ key: Buffer.concat([PKCS8_X25519, secretKey]), format: 'der', type: 'pkcs8' });
}

/** Strip a PKCS#7 pad (1–16 bytes, all equal to their count); throws when it is not one. */
function unpad(pt: Uint8Array): Uint8Array {
  const n = pt.length;
  const p = n > 0 ? pt[n - 1]! : 0;
  let bad = n === 0 || p === 0 || p > BLOCK ? 1 : 0;
  for (let i = 1; i <= BLOCK && i <= n; i++) if (i <= p && pt[n - i] !== p) bad = 1;
  if (bad) throw new Error('aes-cbc: invalid PKCS#7 padding');
  return pt.subarray(0, n - p);
}

export const nativeEngine: Engine = {
  name: 'native',
  encryptCbc(key, iv, plaintext, pad, out) {
    const c = nodeCrypto.createCipheriv('aes-256-cbc', key, iv);
    c.setAutoPadding(pad);
    const a = c.update(plaintext);
    const b = c.final();
    const len = a.length + b.length;
    if (b.length === 0 && !(out && out.length === len)) return u8(a);
    // Both parts straight into their final place: no concatenation.
    const ct = out && out.length === len ? out : new Uint8Array(len);
    ct.set(a);
    ct.set(b, a.length);
    return ct;
  },
  decryptCbc(key, iv, ciphertext, pad) {
    // The pad is checked here, not by BoringSSL: with auto-padding on, update() holds the last block back and final()
    // returns it, so the plaintext would have to be concatenated from two buffers.
    const d = nodeCrypto.createDecipheriv('aes-256-cbc', key, iv);
    d.setAutoPadding(false);
    const a = d.update(ciphertext);
    d.final(); // throws when the input is not a whole number of blocks
    return pad ? unpad(u8(a)) : u8(a);
  },
  cbc: (key) => new NativeCbc(key),
  mac(key) {
    // Bun's own HMAC object, keyed once and copied per message: a third of createHmac's cost per frame (0.6 µs
    // against 1.7 µs for a 1-byte record, measured here), which a 1-byte round trip pays four times.
    const keyed = new Bun.CryptoHasher('sha256', key);
    return (a, b, c) => {
      const h = keyed.copy();
      h.update(a);
      if (b) h.update(b);
      if (c) h.update(c);
      return new Uint8Array(h.digest()); // a plain array, not a Buffer (whose slice() would be a view)
    };
  },
  x25519Keygen() {
    const { privateKey, publicKey } = nodeCrypto.generateKeyPairSync('x25519');
    const sk = privateKey.export({ format: 'der', type: 'pkcs8' });
    const pk = publicKey.export({ format: 'der', type: 'spki' });
    const secretKey = new Uint8Array(sk.subarray(PKCS8_X25519.length));
    sk.fill(0);
    generated.set(secretKey, { bytes: secretKey.slice(), key: privateKey });
    return { secretKey, publicKey: new Uint8Array(pk.subarray(SPKI_X25519.length)) };
  },
  x25519(secretKey, publicKey) {
    let shared: Uint8Array;
    try {
      const pub = nodeCrypto.createPublicKey({ key: Buffer.concat([SPKI_X25519, publicKey]), format: 'der', type: 'spki' });
      shared = u8(nodeCrypto.diffieHellman({ privateKey: nativePrivate(secretKey, true), publicKey: pub }));
    } catch {
      shared = new Uint8Array(32); // BoringSSL refuses low-order points by throwing
    }
    return rejectZero(shared);
  },
  x25519Public(secretKey) {
    const pub = nodeCrypto.createPublicKey(nativePrivate(secretKey)).export({ format: 'der', type: 'spki' });
    return new Uint8Array(pub.subarray(SPKI_X25519.length));
  },
};

/** Frames up to this many bytes are encrypted a block per call through one ECB context kept with the key. */
const SMALL_ENCRYPT = 4 * BLOCK;
/** … and decrypted in one call through the other, the CBC chaining done here (it is one XOR per byte). */
const SMALL_DECRYPT = 4096;

/**
 * Native AES-256-CBC under one key. A node:crypto cipher object costs 1.7 µs to create, more than a small record's
 * whole AES work, and the data path would create one per frame: so two ECB contexts (encrypt, decrypt; no padding,
 * so they hold no state between calls) are made once per key, and small frames are chained here — encryption one
 * block per call (CBC encryption is sequential), decryption in one call for the whole frame and the XOR with the
 * previous ciphertext block after it. Larger frames use a fresh CBC object, where BoringSSL's own chaining is faster.
 * The ECB contexts keep their key schedule inside BoringSSL until they are garbage collected: `wipe` drops them and
 * zeroes the copy of the key held here, as is done for every per-frame cipher object today.
 */
class NativeCbc implements KeyedCbc {
  private key: Buffer;
  private enc: nodeCrypto.Cipheriv | null = null;
  private dec: nodeCrypto.Decipheriv | null = null;
  private readonly block = new Uint8Array(BLOCK);

  constructor(key: Uint8Array) {
    this.key = Buffer.from(key);
  }

  encrypt(iv: Uint8Array, plaintext: Uint8Array, pad: boolean, out?: Uint8Array): Uint8Array {
    const n = plaintext.length;
    const len = pad ? (Math.floor(n / BLOCK) + 1) * BLOCK : n;
    if (len > SMALL_ENCRYPT || (!pad && n % BLOCK !== 0) || len === 0) return nativeEngine.encryptCbc(this.key, iv, plaintext, pad, out);
    if (!this.enc) {
      this.enc = nodeCrypto.createCipheriv('aes-256-ecb', this.key, null);
      this.enc.setAutoPadding(false);
    }
    const ct = out && out.length === len ? out : new Uint8Array(len);
    const x = this.block;
    let prev: Uint8Array = iv;
    let prevAt = 0;
    // Block i of the ciphertext is written only after block i of the plaintext was read: in place is fine.
    for (let at = 0; at < len; at += BLOCK) {
      for (let j = 0; j < BLOCK; j++) {
        const i = at + j;
        const p = i < n ? plaintext[i]! : len - n; // PKCS#7: every pad byte is the pad's length
        x[j] = p ^ prev[prevAt + j]!;
      }
      ct.set(this.enc.update(x), at);
      prev = ct;
      prevAt = at;
    }
    x.fill(0);
    return ct;
  }

  decrypt(iv: Uint8Array, ciphertext: Uint8Array, pad: boolean): Uint8Array {
    const len = ciphertext.length;
    if (len > SMALL_DECRYPT || len === 0 || len % BLOCK !== 0) return nativeEngine.decryptCbc(this.key, iv, ciphertext, pad);
    if (!this.dec) {
      this.dec = nodeCrypto.createDecipheriv('aes-256-ecb', this.key, null);
      this.dec.setAutoPadding(false);
    }
    // The chaining XOR goes into the ECB output itself (the plaintext is returned there; `out` is not needed).
    const pt = this.dec.update(ciphertext);
    for (let i = BLOCK; i < len; i++) pt[i]! ^= ciphertext[i - BLOCK]!;
    for (let i = 0; i < BLOCK; i++) pt[i]! ^= iv[i]!;
    return pad ? unpad(pt) : pt;
  }

  wipe(): void {
    this.key.fill(0);
    this.enc = null;
    this.dec = null;
  }
}

/** The engine called `name`; throws on an unknown name. */
export function getEngine(name: string): Engine {
  if (name === 'noble') return nobleEngine;
  if (name === 'native') return nativeEngine;
  throw new Error(`unknown engine "${name}" (expected noble or native)`);
}
