/**
 * One tunnel session over one transport: it drives the handshake (PROTOCOL.md §3), exchanges the CONFIG records
 * (§8), then carries records (§6–§7) with backpressure, keepalives and an authenticated end.
 *
 * Phases, in order (each checked first by every event handler):
 *   handshake   messages 1–3 (§3); the handshake timeout runs
 *   config      traffic keys established; waiting for the peer's CONFIG record (the client has sent its own)
 *   open        both directions carry DATA
 *   sentClose   we sent CLOSE; the peer may still send          ┐ half-closed (§7)
 *   peerClosed  the peer sent CLOSE; we may still send          ┘
 *   flushing    both CLOSEs exchanged (and, with acknowledged close, our CLOSE confirmed); our last frames leave
 *   done        over; the transport is closed, or half-closed and lingering for the peer's FIN
 *
 * Acknowledged close (§7 ACK, negotiated in CONFIG): a side that verified the peer's CLOSE answers with ACK, the byte
 * and record counts of DATA it verified; a side that sent CLOSE ends cleanly only once an ACK confirming exactly what
 * it sent has arrived. So a sender's clean end means "the peer verified all of it", not only "all was sent".
 *
 * Every way a session can end goes through `finish(err, how)`: one place that stops the timers, closes the
 * transport and reports to the application exactly once. A peer that misbehaves ends its own session, never the
 * process. No Bun import: the transport is an interface (net.ts's Link in the product, a fake in
 * tests/session.test.ts).
 */
import { bytesToHex } from '@noble/hashes/utils.js';
import { ChannelReceiver, ChannelSender, MAX_PAYLOAD, RECORD, type RecordType } from './channel.ts';
import type { Engine } from './engine.ts';
import { asVpnError, VpnError } from './errors.ts';
import { ClientHandshake, type ClientKey, type DirectionKeys, type Handshake, type LongTermKeys, REFUSE_V1, ServerHandshake, type ServerKeys, VERSION_2 } from './handshake.ts';
import { readRekey, REKEY_AFTER_BYTES, REKEY_DONE, REKEY_INIT, REKEY_REPLY, rekeyDh, rekeyDirection, rekeyPayload } from './rekey.ts';

// ---- Tuning constants (not part of the protocol) ----
/** After a clean end, how long to wait for the peer's FIN before closing the transport anyway. */
const LINGER_MS = 2000;
/** Largest CONFIG record accepted (§8), and largest refusal a CLOSE may carry (§7). */
export const MAX_CONFIG = 4096;

export type Json = Record<string, unknown>;

/** What a Session needs of its connection. Writes are queued; the transport delivers events to the session. */
export interface Transport {
  /** Send bytes; false once the outbound queue is above its high-water mark (`onDrain` follows when it is empty). */
  write(data: Uint8Array): boolean;
  /** outbound bytes not yet taken by the network */
  readonly queued: number;
  readonly empty: boolean;
  /** hold inbound events (in order) until `resume` */
  pause(): void;
  resume(): void;
  /** FIN after the queued bytes; keep reading */
  shutdown(): void;
  /** close now */
  close(): void;
  /** reset now: the peer sees an error, never a clean end */
  abort(): void;
  /** the peer's address as text, for logs */
  readonly peer: string;
}

export interface SessionOptions {
  role: 'client' | 'server';
  /** client: its key. server: the one shared key, or every client's (a keyring: ServerKeys) */
  keys: LongTermKeys | ServerKeys;
  engine: Engine;
  /** client: protocol version to offer (1 = `--no-pfs`, 2 = default, 3 = a client key of a keyring) */
  version?: number;
  /** server: refuse version 1 */
  requirePfs?: boolean;
  handshakeTimeoutMs: number;
  /** idle interval before a PING; 0 disables keepalives */
  keepaliveMs: number;
  /** client: CONFIG to send. server: answer to the client's CONFIG, or a VpnError to refuse it (§8). */
  config: (peer: Json) => Json | VpnError;
  /** `-v`: one line per handshake field and frame (includes secrets; the CLI warns first) */
  trace?: (line: string) => void;
  /** `--step`: blocks until the user pressed Enter, before each handshake message; the handshake timeout waits too */
  step?: (what: string) => void;
  /** client: rekey after this many ms (and after REKEY_AFTER_BYTES), when both sides offered it; 0 = never */
  rekeyAfterMs?: number;
  /** each record verified (`out` false) or sealed (`out` true), with its payload length: counters (metrics.ts) */
  onRecord?: (out: boolean, type: RecordType, bytes: number) => void;
}

/** Options every session of a process shares: all but the role and the CONFIG. */
export type SessionBase = Omit<SessionOptions, 'role' | 'config'>;

export interface SessionApp {
  /** The handshake succeeded and both CONFIG records are exchanged. */
  onOpen(session: Session, peerConfig: Json): void;
  /** A verified DATA payload. Call `pauseInbound()` if the sink cannot take more. */
  onData(payload: Uint8Array): void;
  /** The peer sent CLOSE: it will send no more data. */
  onPeerClose(): void;
  /** The session is over: null for a clean end (both CLOSEs), else why. Called exactly once. */
  onEnd(err: VpnError | null): void;
  /** The outbound queue emptied: a source that `write` told to pause may go on. */
  onWritable?(): void;
}

export type Phase = 'handshake' | 'config' | 'open' | 'sentClose' | 'peerClosed' | 'flushing' | 'done';

/** How `finish` leaves the transport: half-closed and lingering (a clean end, a refusal), closed, or reset. */
type Ending = 'linger' | 'close' | 'abort';

export class Session {
  readonly startedAt = Date.now();
  /** TUN server: the client's tunnel addresses, for `status` (set by tun.ts once they are assigned) */
  tunnel: string[] | null = null;
  private phaseNow: Phase = 'handshake';
  private readonly hs: Handshake;
  private hsBuf: Uint8Array = new Uint8Array(0);
  private sender?: ChannelSender;
  private receiver?: ChannelReceiver;
  private hsDeadline: number;
  private hsTimer?: ReturnType<typeof setTimeout>;
  private kaTimer?: ReturnType<typeof setInterval>;
  private lingerTimer?: ReturnType<typeof setTimeout>;
  private lastRecv = Date.now();
  private lastSend = Date.now();
  /** when our outbound queue was last empty: a peer that stops reading is noticed by this, not by what it sends */
  private lastEmpty = Date.now();
  /** a PING arrived while our queue was not empty: one PONG is owed, sent when it drains (never more than one) */
  private pongOwed = false;
  private pausedIn = false;
  private openedAt = 0;
  private authenticatedAt = 0;
  private endedBy: VpnError | null | undefined = undefined;
  private counts = { bytesIn: 0, bytesOut: 0, recordsIn: 0, recordsOut: 0 };
  /** both CONFIGs said `"ack": true`: the end is acknowledged (§7, §8.1) */
  private acked = false;
  /** with `acked`: we sent CLOSE and no ACK has confirmed it yet */
  private awaitingAck = false;
  /** both CONFIGs said `"rekey": true` (version 2 only): the client may rekey (§7 REKEY, rekey.ts) */
  private rekeying = false;
  /** the current keys of each direction (the old ones feed the next rekey) */
  private sendKeys?: DirectionKeys;
  private recvKeys?: DirectionKeys;
  /** client: the INIT's ephemeral secret until the REPLY; server: the DH until the DONE */
  private rekeyEph: { secretKey: Uint8Array; publicKey: Uint8Array } | null = null;
  private rekeyDhPending: Uint8Array | null = null;
  private rekeyTimer?: ReturnType<typeof setInterval>;
  private lastRekey = 0;
  private bytesAtRekey = 0;
  /** how many times this session's keys changed */
  private rekeys = 0;

  constructor(
    readonly transport: Transport,
    private readonly o: SessionOptions,
    readonly app: SessionApp,
  ) {
    this.hsDeadline = Date.now() + o.handshakeTimeoutMs;
    const trace = this.hsTracer();
    this.hs =
      o.role === 'client'
        ? new ClientHandshake(o.keys as LongTermKeys, o.version ?? VERSION_2, { engine: o.engine, trace })
        : new ServerHandshake(o.keys, { engine: o.engine, requirePfs: o.requirePfs, trace });
  }

  /** Start: arm the handshake timeout and, on the client, send message 1 (C1). Call once, after wiring events. */
  start(): void {
    this.armHandshakeTimer();
    if (this.hs instanceof ClientHandshake) {
      const hs = this.hs;
      this.step('send message 1');
      if (this.phaseNow !== 'handshake') return;
      try {
        this.send(hs.createMessage1());
      } catch (e) {
        this.finish(asVpnError(e, 'AUTH_FAILED'), 'close');
      }
    }
  }

  // ---- read-only state ----

  get phase(): Phase {
    return this.phaseNow;
  }
  get role(): 'client' | 'server' {
    return this.o.role;
  }
  get peer(): string {
    return this.transport.peer;
  }
  /** server: the name of the client's key (a keyring entry), once message 1 named it; null for the shared key */
  get clientName(): string | null {
    return this.hs instanceof ServerHandshake ? (this.hs.client?.name ?? null) : null;
  }
  /** server: the client's key (its keyring entry), once message 1 named it */
  get clientKey(): ClientKey | null {
    return this.hs instanceof ServerHandshake ? this.hs.client : null;
  }
  /** protocol version in use (0 until message 1 named one) */
  get version(): number {
    return this.hs.version;
  }
  get bytesIn(): number {
    return this.counts.bytesIn;
  }
  get bytesOut(): number {
    return this.counts.bytesOut;
  }
  /** message 3 verified: the peer holds the secret */
  get authenticated(): boolean {
    return this.authenticatedAt > 0;
  }
  /** both CONFIG records exchanged: the session really opened */
  get opened(): boolean {
    return this.openedAt > 0;
  }
  /** the app may still send DATA (we have not sent CLOSE) */
  get sending(): boolean {
    return this.phaseNow === 'open' || this.phaseNow === 'peerClosed';
  }
  /** how many rekeys this session completed */
  get rekeyCount(): number {
    return this.rekeys;
  }
  /** whether this session's end is acknowledged (both sides offered `ack` in CONFIG) */
  get acknowledgedClose(): boolean {
    return this.acked;
  }
  /** outbound bytes waiting for the transport */
  get queued(): number {
    return this.transport.queued;
  }
  /** how it ended: undefined while running, null for a clean end */
  get endReason(): VpnError | null | undefined {
    return this.endedBy;
  }

  // ---- transport events ----

  onData(chunk: Uint8Array): void {
    if (this.phaseNow === 'done') return;
    this.lastRecv = Date.now();
    if (this.phaseNow !== 'handshake') {
      this.feed(chunk);
      return;
    }
    // No bound is needed here beyond the chunk itself: each pump consumes every whole message buffered, so what
    // stays is less than the next message (at most 112 bytes); bytes after message 3 — a pipelined CONFIG and
    // DATA (§8) — go to the channel receiver, which bounds every frame (§6).
    const b = new Uint8Array(this.hsBuf.length + chunk.length);
    b.set(this.hsBuf);
    b.set(chunk, this.hsBuf.length);
    this.hsBuf = b;
    this.pumpHandshake();
  }

  onDrain(): void {
    if (this.phaseNow === 'done') return;
    this.lastEmpty = Date.now();
    if (this.pongOwed) {
      this.pongOwed = false;
      this.sendRecord(RECORD.PONG);
    }
    this.maybeFinish();
    if (this.sending) this.app.onWritable?.();
  }

  onEnd(): void {
    switch (this.phaseNow) {
      case 'done':
        this.closeTransport(); // the peer's FIN after our clean end: now close for good
        return;
      case 'handshake':
        this.finish(this.handshakeEof(), 'close');
        return;
      case 'config':
        if (this.o.role === 'client') {
          this.finish(new VpnError('AUTH_FAILED', 'the server closed the connection during the handshake (wrong secret?)'), 'close');
          return;
        }
    }
    try {
      if (this.awaitingAck) throw this.unconfirmed(); // what matters to a sender: its data was not confirmed
      this.receiver!.end();
    } catch (e) {
      this.finish(asVpnError(e), 'close');
      return;
    }
    this.maybeFinish();
  }

  private unconfirmed(): VpnError {
    return new VpnError('TRUNCATED', `the peer did not confirm receipt: ${this.counts.bytesOut} bytes unconfirmed (the connection ended before its ACK)`);
  }

  onClose(err?: Error): void {
    const p = this.phaseNow;
    if (p === 'done') {
      clearTimeout(this.lingerTimer);
      return;
    }
    if (p === 'handshake' || (p === 'config' && this.o.role === 'client')) {
      this.finish(err ? new VpnError('AUTH_FAILED', `connection lost during the handshake (${err.message})`) : this.handshakeEof(), 'close');
      return;
    }
    if (this.awaitingAck) {
      this.finish(this.unconfirmed(), 'close');
      return;
    }
    if (p === 'flushing') {
      this.finish(null, 'close');
      return;
    }
    this.finish(new VpnError('TRUNCATED', `the connection ${err ? `failed (${err.message})` : 'closed'} before an authenticated CLOSE`), 'close');
  }

  private handshakeEof(): VpnError {
    if (this.o.role === 'client' && this.hsBuf.length === REFUSE_V1.length && this.hsBuf.every((b, i) => b === REFUSE_V1[i])) {
      return Object.assign(new VpnError('PFS_REQUIRED', 'the server requires forward secrecy and refused protocol version 1'), { final: true });
    }
    return new VpnError('AUTH_FAILED', `the ${this.o.role === 'client' ? 'server' : 'client'} closed the connection during the handshake`);
  }

  // ---- handshake (§3) ----

  private hsTracer() {
    const t = this.o.trace;
    return t ? (field: string, v: Uint8Array) => t(`handshake ${field} (${v.length}): ${bytesToHex(v)}`) : undefined;
  }

  private armHandshakeTimer(): void {
    clearTimeout(this.hsTimer);
    this.hsTimer = setTimeout(
      () => this.finish(new VpnError('HANDSHAKE_TIMEOUT', `handshake not completed within ${this.o.handshakeTimeoutMs / 1000} s`), 'close'),
      Math.max(0, this.hsDeadline - Date.now()),
    );
  }

  /** `--step`: wait for Enter; the time spent waiting does not count against the handshake timeout. */
  private step(what: string): void {
    const step = this.o.step;
    if (!step) return;
    const t0 = Date.now();
    step(what);
    this.hsDeadline += Date.now() - t0;
    this.armHandshakeTimer();
  }

  /** Consume every whole message buffered (S1/C2/S3), answering each; then the data phase takes the rest. */
  private pumpHandshake(): void {
    const hs = this.hs;
    while (this.phaseNow === 'handshake') {
      let reply: Uint8Array | null;
      try {
        const n = hs.nextLength(this.hsBuf);
        if (n === null || n === 0 || this.hsBuf.length < n) return;
        const message = this.hsBuf.slice(0, n);
        this.hsBuf = this.hsBuf.slice(n);
        reply = hs.consume(message); // every consume verifies before it answers (C2 before C3, S3 before unwrapping)
      } catch (e) {
        const err = asVpnError(e, 'AUTH_FAILED');
        err.final = true; // a message that failed its checks: the peer's answer, not a lost connection
        if (err.code === 'PFS_REQUIRED') this.send(REFUSE_V1);
        this.finish(err, err.code === 'PFS_REQUIRED' ? 'linger' : 'close');
        return;
      }
      if (reply) {
        this.step(`send message ${this.o.role === 'client' ? 3 : 2}`);
        if (this.phaseNow !== 'handshake') return;
        this.send(reply);
      }
      if (hs.state === 'established') this.established();
    }
  }

  private established(): void {
    const keys = this.hs.keys!;
    this.sendKeys = keys.send;
    this.recvKeys = keys.recv;
    this.sender = new ChannelSender(this.o.engine, keys.send);
    this.receiver = new ChannelReceiver(this.o.engine, keys.recv);
    const t = this.o.trace;
    if (t) {
      const ft = (dir: string, type: number, len: number, iv: Uint8Array, chain: Uint8Array) =>
        t(`frame ${dir} type=${type} len=${len} iv=${bytesToHex(iv)} chain=${bytesToHex(chain)}`);
      this.sender.trace = ft;
      this.receiver.trace = ft;
    }
    this.authenticatedAt = Date.now();
    this.phaseNow = 'config';
    if (this.o.role === 'client') {
      const offer: Json = { ...(this.o.config({}) as Json), ack: true };
      if (this.version >= VERSION_2) offer.rekey = true;
      this.sendConfig(offer); // C3: CONFIG right behind message 3 (§8)
    }
    const rest = this.hsBuf;
    this.hsBuf = new Uint8Array(0);
    if (rest.length > 0) this.feed(rest);
  }

  // ---- data phase (§6–§8) ----

  private feed(chunk: Uint8Array): void {
    try {
      this.receiver!.push(chunk, this.onRecord);
    } catch (e) {
      this.finish(asVpnError(e, 'INTEGRITY'), 'close');
    }
  }

  private onRecord = (type: RecordType, payload: Uint8Array): void => {
    const p = this.phaseNow;
    if (p === 'done') return;
    this.o.onRecord?.(false, type, payload.length);
    if (p === 'config') {
      if (type !== RECORD.CONFIG) throw new VpnError('INTEGRITY', 'the first record was not CONFIG');
      this.onConfig(payload);
      return;
    }
    switch (type) {
      case RECORD.DATA:
        this.counts.bytesIn += payload.length;
        this.counts.recordsIn++;
        this.app.onData(payload);
        return;
      case RECORD.CLOSE: {
        const refusal = payload.length > 0 ? readRefusal(payload, `the ${this.o.role === 'client' ? 'server' : 'client'} refused the session`) : null;
        if (refusal) {
          this.finish(refusal, 'close'); // the peer cannot use this session (§8): an end, but not a clean one
          return;
        }
        this.phaseNow = p === 'sentClose' ? 'flushing' : 'peerClosed';
        if (this.acked) this.sendRecord(RECORD.ACK, ackPayload(this.counts.bytesIn, this.counts.recordsIn));
        this.app.onPeerClose();
        this.maybeFinish();
        return;
      }
      case RECORD.ACK:
        this.onAck(payload);
        return;
      case RECORD.REKEY:
        this.onRekey(payload);
        return;
      case RECORD.PING:
        // Under the same backpressure as data: answered at once only when nothing is queued, else one PONG is
        // owed until the queue drains — a peer that floods PINGs and never reads makes us hold nothing more.
        if (this.transport.empty) this.sendRecord(RECORD.PONG);
        else this.pongOwed = true;
        return;
      case RECORD.PONG:
        return;
      default:
        throw new VpnError('INTEGRITY', 'unexpected CONFIG record');
    }
  };

  // ---- rekeying (§7 REKEY; the steps and the derivation are in rekey.ts) ----

  /** client: time (or volume) for new keys? Only while both directions are open and no rekey is under way. */
  private maybeRekey = (): void => {
    if (this.phaseNow !== 'open' || this.rekeyEph) return;
    const now = Date.now();
    const bytes = this.counts.bytesIn + this.counts.bytesOut;
    if (now - this.lastRekey < (this.o.rekeyAfterMs ?? 0) && bytes - this.bytesAtRekey < REKEY_AFTER_BYTES) return;
    this.startRekey();
  };

  /** client: send INIT with a fresh ephemeral key. */
  startRekey(): void {
    if (!this.rekeying || this.o.role !== 'client' || this.phaseNow !== 'open' || this.rekeyEph) return;
    this.rekeyEph = this.o.engine.x25519Keygen();
    this.sendRecord(RECORD.REKEY, rekeyPayload(REKEY_INIT, this.rekeyEph.publicKey));
  }

  private onRekey(payload: Uint8Array): void {
    const { step, pub } = readRekey(payload);
    const client = this.o.role === 'client';
    if (!this.rekeying) throw new VpnError('INTEGRITY', 'a REKEY record although rekeying was not agreed');
    if (client && step === REKEY_REPLY && this.rekeyEph) {
      // The REPLY was the last s2c frame under the old keys: switch receiving now, then send DONE and switch sending.
      const dh = rekeyDh(this.o.engine, this.rekeyEph.secretKey, pub!);
      this.rekeyEph = null;
      this.switchRecv(rekeyDirection(dh, this.recvKeys!.mac, this.receiver!.chainValue, 's2c'), 's2c');
      this.sendRecord(RECORD.REKEY, rekeyPayload(REKEY_DONE));
      this.switchSend(rekeyDirection(dh, this.sendKeys!.mac, this.sender!.chainValue, 'c2s'), 'c2s');
      dh.fill(0);
      this.lastRekey = Date.now();
      this.bytesAtRekey = this.counts.bytesIn + this.counts.bytesOut;
      this.rekeys++;
      return;
    }
    if (!client && step === REKEY_INIT && !this.rekeyDhPending) {
      const eph = this.o.engine.x25519Keygen();
      const dh = rekeyDh(this.o.engine, eph.secretKey, pub!);
      this.sendRecord(RECORD.REKEY, rekeyPayload(REKEY_REPLY, eph.publicKey));
      this.switchSend(rekeyDirection(dh, this.sendKeys!.mac, this.sender!.chainValue, 's2c'), 's2c');
      this.rekeyDhPending = dh; // c2s switches at the client's DONE
      return;
    }
    if (!client && step === REKEY_DONE && this.rekeyDhPending) {
      const dh = this.rekeyDhPending;
      this.rekeyDhPending = null;
      this.switchRecv(rekeyDirection(dh, this.recvKeys!.mac, this.receiver!.chainValue, 'c2s'), 'c2s');
      dh.fill(0);
      this.rekeys++;
      return;
    }
    throw new VpnError('INTEGRITY', 'a REKEY record out of order');
  }

  private switchSend(keys: DirectionKeys, dir: string): void {
    this.sendKeys!.mac.fill(0);
    this.sender!.rekey(keys);
    this.sendKeys = keys;
    this.traceRekey(dir, keys);
  }

  private switchRecv(keys: DirectionKeys, dir: string): void {
    this.recvKeys!.mac.fill(0);
    this.receiver!.rekey(keys);
    this.recvKeys = keys;
    this.traceRekey(dir, keys);
  }

  private traceRekey(dir: string, k: DirectionKeys): void {
    const t = this.o.trace;
    if (t) t(`rekey: new ${dir} keys enc=${bytesToHex(k.enc)} mac=${bytesToHex(k.mac)} chain0=${bytesToHex(k.chain0)}`);
  }

  /** The peer's ACK (§7): it must confirm exactly what we sent, once, after our CLOSE. */
  private onAck(payload: Uint8Array): void {
    if (!this.acked || !this.awaitingAck || payload.length !== ACK_LEN) throw new VpnError('INTEGRITY', 'unexpected ACK record');
    const v = new DataView(payload.buffer, payload.byteOffset, ACK_LEN);
    const bytes = Number(v.getBigUint64(0));
    const records = Number(v.getBigUint64(8));
    if (bytes !== this.counts.bytesOut || records !== this.counts.recordsOut) {
      throw new VpnError('TRUNCATED', `the peer did not confirm receipt: ${this.counts.bytesOut - bytes} bytes unconfirmed (it verified ${bytes} of ${this.counts.bytesOut})`);
    }
    this.awaitingAck = false;
    this.maybeFinish();
  }

  private onConfig(payload: Uint8Array): void {
    if (payload.length > MAX_CONFIG) throw new VpnError('INTEGRITY', 'CONFIG record too large');
    let peer: Json;
    try {
      const v = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(payload));
      if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not an object');
      peer = v as Json;
    } catch {
      throw new VpnError('INTEGRITY', 'CONFIG record is not a JSON object');
    }
    if (this.o.role === 'server') {
      const answer = this.o.config(peer);
      if (answer instanceof VpnError) {
        // A refusal the client can explain to its user: {"error": "...", "code": "..."} (§8), then the end.
        this.sendConfig({ error: answer.message, code: answer.code });
        this.finish(answer, 'linger');
        return;
      }
      this.acked = peer.ack === true;
      this.rekeying = peer.rekey === true && this.version >= VERSION_2;
      const full: Json = { ...answer };
      if (this.acked) full.ack = true;
      if (this.rekeying) full.rekey = true;
      this.sendConfig(full);
    } else {
      const refusal = readRefusal(payload, 'the server refused the session', peer);
      if (refusal) {
        this.finish(refusal, 'close');
        return;
      }
      this.acked = peer.ack === true;
      this.rekeying = peer.rekey === true && this.version >= VERSION_2;
    }
    this.o.trace?.(`rekeying: ${this.rekeying ? 'on' : 'off'}`);
    this.o.trace?.(`acknowledged close: ${this.acked ? 'on (both sides offered it)' : "off (the peer did not offer it): a clean end means all was sent, not that the peer verified it"}`);
    clearTimeout(this.hsTimer);
    this.phaseNow = 'open';
    this.openedAt = Date.now();
    this.lastRecv = Date.now();
    if (this.o.keepaliveMs > 0) this.kaTimer = setInterval(this.keepalive, Math.max(50, this.o.keepaliveMs / 4));
    const every = this.o.rekeyAfterMs ?? 0;
    if (this.rekeying && this.o.role === 'client' && every > 0) {
      this.lastRekey = Date.now();
      this.rekeyTimer = setInterval(this.maybeRekey, Math.max(50, Math.min(every / 4, 1000)));
      this.rekeyTimer.unref?.();
    }
    this.app.onOpen(this, peer);
  }

  private sendConfig(c: Json): void {
    this.sendRecord(RECORD.CONFIG, new TextEncoder().encode(JSON.stringify(c)));
  }

  private keepalive = (): void => {
    const now = Date.now();
    const k = this.o.keepaliveMs;
    if (!this.pausedIn && now - this.lastRecv >= 3 * k) {
      this.finish(new VpnError('DEAD_PEER', `nothing heard from the peer for ${(3 * k) / 1000} s`), 'close');
      return;
    }
    if (this.transport.empty) this.lastEmpty = now;
    else if (now - this.lastEmpty >= 3 * k) {
      this.finish(new VpnError('DEAD_PEER', `the peer stopped reading: nothing it was sent was taken for ${(3 * k) / 1000} s`), 'close');
      return;
    }
    if (now - this.lastSend >= k && this.transport.empty) this.sendRecord(RECORD.PING);
  };

  private send(bytes: Uint8Array): boolean {
    this.lastSend = Date.now();
    return this.transport.write(bytes);
  }

  private sendRecord(type: RecordType, payload?: Uint8Array): boolean {
    this.o.onRecord?.(true, type, payload?.length ?? 0);
    return this.send(this.sender!.seal(type, payload));
  }

  // ---- the application's side ----

  /**
   * Send application bytes (split into records of at most MAX_PAYLOAD). Returns false when the source should pause
   * until `onWritable`. Bytes written after `close()` or after the end are a caller bug and are refused.
   */
  write(data: Uint8Array): boolean {
    if (!this.sending) return false;
    let ok = true;
    for (let off = 0; off < data.length; off += MAX_PAYLOAD) {
      const part = data.length <= MAX_PAYLOAD ? data : data.subarray(off, Math.min(off + MAX_PAYLOAD, data.length));
      this.counts.bytesOut += part.length;
      this.counts.recordsOut++;
      ok = this.sendRecord(RECORD.DATA, part);
    }
    return ok;
  }

  /** Send one record holding exactly `data` (TUN: one IP packet per record). */
  writeRecord(data: Uint8Array): boolean {
    if (!this.sending || data.length > MAX_PAYLOAD) return false;
    this.counts.bytesOut += data.length;
    this.counts.recordsOut++;
    return this.sendRecord(RECORD.DATA, data);
  }

  /**
   * The client cannot use the server's answer (a wrong mode, an invalid TUN set-up): say why in a CLOSE (§8) and
   * end with `err`. The server learns the reason instead of seeing a truncated stream.
   */
  refuse(err: VpnError): void {
    err.final = true; // the server's answer will not change by asking again
    if (!this.sending) return;
    this.phaseNow = 'flushing';
    this.sendRecord(RECORD.CLOSE, new TextEncoder().encode(JSON.stringify({ error: err.message.slice(0, 1000), code: err.code })));
    this.finish(err, 'linger');
  }

  /** Half-close: send CLOSE; we send no more data. The session ends once the peer's CLOSE has arrived too. */
  close(): void {
    if (!this.sending) return;
    this.phaseNow = this.phaseNow === 'peerClosed' ? 'flushing' : 'sentClose';
    this.awaitingAck = this.acked;
    this.sendRecord(RECORD.CLOSE);
    this.maybeFinish();
  }

  /** The application's sink is full: stop reading from the transport. */
  pauseInbound(): void {
    if (this.pausedIn || this.phaseNow === 'done') return;
    this.pausedIn = true;
    this.transport.pause();
  }

  resumeInbound(): void {
    if (!this.pausedIn || this.phaseNow === 'done') return;
    this.pausedIn = false;
    this.lastRecv = Date.now();
    this.transport.resume();
  }

  /** End at once with a reset, never a clean end (graceful shutdown's grace is over, or a second signal). */
  abort(err: VpnError): void {
    this.finish(err, 'abort');
  }

  private maybeFinish(): void {
    if (this.phaseNow === 'flushing' && !this.awaitingAck && this.transport.empty) this.finish(null, 'linger');
  }

  /** End the session now: `null` for a clean end, else the reason. Idempotent. */
  finish(err: VpnError | null, how: Ending = err ? 'close' : 'linger'): void {
    if (this.phaseNow === 'done') return;
    this.phaseNow = 'done';
    this.endedBy = err;
    clearTimeout(this.hsTimer);
    clearInterval(this.kaTimer);
    clearInterval(this.rekeyTimer);
    this.rekeyEph?.secretKey.fill(0);
    this.rekeyDhPending?.fill(0);
    this.hsBuf = new Uint8Array(0);
    if (how === 'abort') {
      this.transport.abort();
    } else if (how === 'close') {
      this.transport.close();
    } else {
      // A clean end (or a refusal the client should read): half-close and keep reading until the peer's FIN, since
      // closing with unread input makes the kernel send RST, and an RST makes the peer's kernel throw away
      // whatever it has not read yet — possibly our last frames. Closed for good on the FIN or after LINGER_MS.
      this.transport.shutdown();
      if (this.pausedIn) this.transport.resume();
      this.lingerTimer = setTimeout(() => this.closeTransport(), LINGER_MS);
      this.lingerTimer.unref?.();
    }
    this.app.onEnd(err);
  }

  private closeTransport(): void {
    clearTimeout(this.lingerTimer);
    this.transport.close();
  }
}

/** ACK payload (§7): u64be bytes ‖ u64be records of DATA verified. */
const ACK_LEN = 16;
function ackPayload(bytes: number, records: number): Uint8Array {
  const b = new Uint8Array(ACK_LEN);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, BigInt(bytes));
  v.setBigUint64(8, BigInt(records));
  return b;
}

/** Refusal codes (§8): what the refusing side's reason means for the other side's exit status. */
const REFUSAL_CODES = new Set(['NETWORK', 'USAGE']);

/**
 * A refusal `{"error": TEXT, "code": CODE}` in a CONFIG or CLOSE payload (§8), or null when `payload` holds none.
 * The text is the peer's: it is cut to 200 characters and every control character is shown as `?`, so it can reach
 * a log line or a terminal. An unknown code counts as USAGE.
 */
export function readRefusal(payload: Uint8Array, what: string, parsed?: Json): VpnError | null {
  let v: unknown = parsed;
  if (v === undefined) {
    if (payload.length > MAX_CONFIG) return null;
    try {
      v = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(payload));
    } catch {
      return null;
    }
  }
  if (typeof v !== 'object' || v === null || typeof (v as Json).error !== 'string') return null;
  const j = v as Json;
  const code = typeof j.code === 'string' && REFUSAL_CODES.has(j.code) ? (j.code as 'NETWORK' | 'USAGE') : 'USAGE';
  return Object.assign(new VpnError(code, `${what}: ${escapeText(String(j.error))}`), { final: true });
}

/** Text from a peer, made safe for one log line or a terminal: at most `max` characters, controls shown as `?`. */
export function escapeText(text: string, max = 200): string {
  const t = text.length > max ? `${text.slice(0, max)}…` : text;
  return t.replace(/[\u0000-\u001f\u007f-\u009f\u2028\u2029]/g, '?');
}

