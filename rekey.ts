/**
 * Rekeying inside a session (PROTOCOL.md §7 REKEY): a fresh X25519 exchange carried in the channel itself,
 * authenticated by the chain, with new traffic keys derived from the old state and the new DH; old keys wiped.
 *
 *   REKEY payload   0        1                33
 *                   | step   | E (32)         |        step 1 INIT (client), 2 REPLY (server): an ephemeral key
 *                   | step   |                         step 3 DONE (client): no key
 *
 *   client                                              server
 *   INIT(E_C)          under old c2s          ──▶        DH = X25519(e_S, E_C)
 *                                             ◀──        REPLY(E_S) under old s2c; then s2c switches
 *   DH = X25519(e_C, E_S); s2c switches after REPLY
 *   DONE under old c2s; then c2s switches     ──▶        c2s switches after DONE
 *
 *   new keys of direction d = HKDF-SHA256(ikm = DH ‖ old mac key of d, salt = chain value of the frame at which d
 *                             switches (REPLY for s2c, DONE for c2s), info = "vpn.ts rekey " ‖ d, 96) → enc, mac, chain0
 *
 * Every switch happens at a record boundary both sides know, so no byte is lost or reordered in either direction,
 * whatever DATA is in flight. This file holds the wire format and the derivation; session.ts drives the steps.
 */
import { concatBytes } from '@noble/ciphers/utils.js';
import { hkdf } from '@noble/hashes/hkdf.js';
import { sha256 } from '@noble/hashes/sha2.js';
import type { Engine } from './engine.ts';
import { VpnError } from './errors.ts';
import { type DirectionKeys, KEY_LEN, PUB_LEN } from './handshake.ts';

// ---- Specification constants (§7 REKEY) ----
export const REKEY_INIT = 0x01;
export const REKEY_REPLY = 0x02;
export const REKEY_DONE = 0x03;
export const REKEY_STEP_LEN = 1;
export const REKEY_KEYED_LEN = REKEY_STEP_LEN + PUB_LEN; // 33
const te = new TextEncoder();
export const INFO_REKEY = { c2s: te.encode('vpn.ts rekey c2s'), s2c: te.encode('vpn.ts rekey s2c') } as const;

// ---- Tuning ----
/** Default `--rekey-after`: WireGuard rekeys every 120 s. */
export const REKEY_AFTER_MS = 120_000;
/** A session also rekeys after this many bytes in both directions together since the last rekey. */
export const REKEY_AFTER_BYTES = 1 << 30;

/** The new keys of one direction (see the header). The inputs are the caller's; the result is fresh. */
export function rekeyDirection(dh: Uint8Array, oldMac: Uint8Array, chainAtSwitch: Uint8Array, dir: 'c2s' | 's2c'): DirectionKeys {
  const ikm = concatBytes(dh, oldMac);
  const okm = hkdf(sha256, ikm, chainAtSwitch, INFO_REKEY[dir], 3 * KEY_LEN);
  ikm.fill(0);
  const keys = { enc: okm.slice(0, KEY_LEN), mac: okm.slice(KEY_LEN, 2 * KEY_LEN), chain0: okm.slice(2 * KEY_LEN) };
  okm.fill(0);
  return keys;
}

/** A REKEY payload: the step, and the ephemeral public key for INIT and REPLY. */
export function rekeyPayload(step: number, pub?: Uint8Array): Uint8Array {
  return pub ? concatBytes(new Uint8Array([step]), pub) : new Uint8Array([step]);
}

/** Parse a REKEY payload; throws INTEGRITY for a wrong length or step. */
export function readRekey(payload: Uint8Array): { step: number; pub: Uint8Array | null } {
  const step = payload[0];
  if ((step === REKEY_INIT || step === REKEY_REPLY) && payload.length === REKEY_KEYED_LEN) return { step, pub: payload.subarray(REKEY_STEP_LEN) };
  if (step === REKEY_DONE && payload.length === REKEY_STEP_LEN) return { step, pub: null };
  throw new VpnError('INTEGRITY', 'a REKEY record of the wrong form');
}

/** X25519 with the all-zero result refused (a low-order key, §11.13). Wipes `secret`. */
export function rekeyDh(engine: Engine, secret: Uint8Array, peerPub: Uint8Array): Uint8Array {
  try {
    return engine.x25519(secret, peerPub);
  } catch {
    throw new VpnError('INTEGRITY', 'the peer sent an invalid ephemeral key in a REKEY record');
  } finally {
    secret.fill(0);
  }
}
