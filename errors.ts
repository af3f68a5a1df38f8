/**
 * Typed errors with stable codes. Each code maps to one exit status (README "Exit statuses") and one plain
 * sentence: what happened and what to do. Messages never contain secret material.
 */

export const EXIT_OK = 0;
export const EXIT_NETWORK = 1;
export const EXIT_USAGE = 2;
export const EXIT_AUTH = 3;
export const EXIT_INTEGRITY = 4;

export type ErrorCode =
  | 'USAGE' // bad flags, unreadable key file, missing secret
  | 'NETWORK' // refused, reset before the handshake, DNS, I/O
  | 'DEAD_PEER' // keepalive: nothing heard for three intervals
  | 'AUTH_FAILED' // wrong secret or not a vpn peer
  | 'HANDSHAKE_TIMEOUT' // the handshake did not finish in time
  | 'PFS_REQUIRED' // the server refuses protocol version 1
  | 'INTEGRITY' // a frame failed verification (tampered, replayed, reordered, dropped)
  | 'TRUNCATED'; // the stream ended without an authenticated CLOSE

const STATUS: Record<ErrorCode, number> = {
  USAGE: EXIT_USAGE,
  NETWORK: EXIT_NETWORK,
  DEAD_PEER: EXIT_NETWORK,
  AUTH_FAILED: EXIT_AUTH,
  HANDSHAKE_TIMEOUT: EXIT_AUTH,
  PFS_REQUIRED: EXIT_AUTH,
  INTEGRITY: EXIT_INTEGRITY,
  TRUNCATED: EXIT_INTEGRITY,
};

const ADVICE: Record<ErrorCode, string> = {
  USAGE: '',
  NETWORK: 'check the address and that the peer is running.',
  DEAD_PEER: 'the peer stopped answering keepalives; check the network path.',
  AUTH_FAILED: 'check that both ends use the same key or passphrase and that the address is a vpn peer.',
  HANDSHAKE_TIMEOUT: 'the peer did not complete the handshake in time; is it a vpn peer?',
  PFS_REQUIRED: 'the server requires forward secrecy; connect without --no-pfs.',
  INTEGRITY: 'the stream was modified in transit; data after the last verified frame was discarded.',
  TRUNCATED: 'the stream ended without an authenticated close; the data may be incomplete.',
};

export class VpnError extends Error {
  readonly code: ErrorCode;
  /**
   * The peer *proved* this end: a verified refusal, or a handshake message that failed verification. A TUN client
   * does not reconnect after such an end; after any other (a lost connection, a server restart) it does.
   */
  final = false;
  constructor(code: ErrorCode, message: string) {
    super(message);
    this.name = 'VpnError';
    this.code = code;
  }
  get exitStatus(): number {
    return STATUS[this.code];
  }
  /** One line for a user: what happened, then what to do. */
  get sentence(): string {
    const advice = ADVICE[this.code];
    return advice ? `${this.message}: ${advice}` : this.message;
  }
}

/** Wrap anything thrown into a VpnError (unknown errors count as network/I-O errors). */
export function asVpnError(e: unknown, fallback: ErrorCode = 'NETWORK'): VpnError {
  if (e instanceof VpnError) return e;
  const msg = e instanceof Error ? e.message : String(e);
  return new VpnError(fallback, msg);
}
