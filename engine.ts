/**
 * Crypto engines: the primitives the protocol uses (PROTOCOL.md §2), behind one interface.
 *
 * - `noble` (default): AES-256-CBC from @noble/ciphers, HMAC-SHA256 from @noble/hashes, X25519 from @noble/curves.
 *   Audited pure JS; no native code.
 * - `native` (`--engine native`): the same primitives from Bun's built-in node:crypto (BoringSSL, AES-NI).
 *
 * Both produce identical bytes for identical inputs; tests/engine.test.ts cross-checks them. Key derivation
 * (HKDF, scrypt, SHA-256 of the transcript) runs once per process or handshake and always uses noble.
 */
import { cbc } from '@noble/ciphers/aes.js';
import { x25519 } from '@noble/curves/ed25519.js';
import { hmac } from '@noble/hashes/hmac.js';
import { sha256 } from '@noble/hashes/sha2.js';
import * as nodeCrypto from 'node:crypto';

export const MAC_LEN = 32;

/** A MAC keyed once, computed many times over a message given in parts. */
export type KeyedMac = (...parts: Uint8Array[]) => Uint8Array;

export interface Engine {
  readonly name: EngineName;
  /** AES-256-CBC. `pad` selects PKCS#7; without it the input must be a whole number of blocks. */
  encryptCbc(key: Uint8Array, iv: Uint8Array, plaintext: Uint8Array, pad: boolean): Uint8Array;
  /** AES-256-CBC decryption; throws on a bad PKCS#7 pad (callers verify the MAC first, so this is never observable). */
  decryptCbc(key: Uint8Array, iv: Uint8Array, ciphertext: Uint8Array, pad: boolean): Uint8Array;
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

function rejectZero(shared: Uint8Array): Uint8Array {
  let acc = 0;
  for (const b of shared) acc |= b;
  if (acc === 0) throw new Error('x25519: all-zero shared secret (low-order point)');
  return shared;
}

export const nobleEngine: Engine = {
  name: 'noble',
  encryptCbc: (key, iv, plaintext, pad) => cbc(key, iv, { disablePadding: !pad }).encrypt(plaintext),
  decryptCbc: (key, iv, ciphertext, pad) => cbc(key, iv, { disablePadding: !pad }).decrypt(ciphertext),
  mac(key) {
    const keyed = hmac.create(sha256, key);
    return (...parts) => {
      const h = keyed.clone();
      for (const p of parts) h.update(p);
      return h.digest();
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

function nativePrivate(secretKey: Uint8Array) {
  return nodeCrypto.createPrivateKey({ key: Buffer.concat([PKCS8_X25519, secretKey]), format: 'der', type: 'pkcs8' });
}

export const nativeEngine: Engine = {
  name: 'native',
  encryptCbc(key, iv, plaintext, pad) {
    const c = nodeCrypto.createCipheriv('aes-256-cbc', key, iv);
    c.setAutoPadding(pad);
    const a = c.update(plaintext);
    const b = c.final();
    return b.length === 0 ? u8(a) : u8(Buffer.concat([a, b]));
  },
  decryptCbc(key, iv, ciphertext, pad) {
    const d = nodeCrypto.createDecipheriv('aes-256-cbc', key, iv);
    d.setAutoPadding(pad);
    const a = d.update(ciphertext);
    const b = d.final();
    return b.length === 0 ? u8(a) : u8(Buffer.concat([a, b]));
  },
  mac(key) {
    const k = Buffer.from(key);
    return (...parts) => {
      const h = nodeCrypto.createHmac('sha256', k);
      for (const p of parts) h.update(p);
      return u8(h.digest());
    };
  },
  x25519Keygen() {
    const { privateKey, publicKey } = nodeCrypto.generateKeyPairSync('x25519');
    const sk = privateKey.export({ format: 'der', type: 'pkcs8' });
    const pk = publicKey.export({ format: 'der', type: 'spki' });
    return { secretKey: new Uint8Array(sk.subarray(PKCS8_X25519.length)), publicKey: new Uint8Array(pk.subarray(SPKI_X25519.length)) };
  },
  x25519(secretKey, publicKey) {
    let shared: Uint8Array;
    try {
      const pub = nodeCrypto.createPublicKey({ key: Buffer.concat([SPKI_X25519, publicKey]), format: 'der', type: 'spki' });
      shared = u8(nodeCrypto.diffieHellman({ privateKey: nativePrivate(secretKey), publicKey: pub }));
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

/** The engine called `name`; throws on an unknown name. */
export function getEngine(name: string): Engine {
  if (name === 'noble') return nobleEngine;
  if (name === 'native') return nativeEngine;
  throw new Error(`unknown engine "${name}" (expected noble or native)`);
}
