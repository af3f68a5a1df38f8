/**
 * One tunnel session over one Bun TCP (or unix) socket: it drives the handshake (PROTOCOL.md §3), exchanges the
 * CONFIG records (§8), then carries records (§6–§7) with backpressure, keepalives and an authenticated end.
 *
 * Every way a session can end goes through `finish(err)`: one place that stops the timers, closes the socket
 * and reports to the application exactly once. A peer that misbehaves ends its own session, never the process.
 */
import type { Socket, SocketHandler } from 'bun';
import { ChannelReceiver, ChannelSender, MAX_PAYLOAD, RECORD, type RecordType } from './channel.ts';
import type { Engine } from './engine.ts';
import { asVpnError, VpnError } from './errors.ts';
import {
  ClientHandshake,
  type LongTermKeys,
  message1Length,
  MSG1_MAX_LEN,
  MSG2_V1_LEN,
  MSG2_V2_LEN,
  MSG3_LEN,
  REFUSE_V1,
  ServerHandshake,
  type TrafficKeys,
  VERSION_2,
} from './handshake.ts';

// ---- Tuning constants (not part of the protocol) ----
/** Above this many queued outbound bytes, `write` asks the source to pause; it resumes once the queue is empty. */
export const HIGH_WATER = 256 * 1024;
/** After a clean end, how long to wait for the peer's FIN before closing the socket anyway. */
const LINGER_MS = 2000;
/** Largest CONFIG record accepted (§8). */
export const MAX_CONFIG = 4096;
/** Bytes the handshake may buffer before it has keys: message 1 (or 2) plus message 3 plus one pipelined frame. */
const MAX_HANDSHAKE_BUFFER = MSG1_MAX_LEN + MSG3_LEN + 4096;

export type Json = Record<string, unknown>;

export interface SessionOptions {
  role: 'client' | 'server';
  keys: LongTermKeys;
  engine: Engine;
  /** client: protocol version to offer (1 = `--no-pfs`, 2 = default) */
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
  /** `--step`: resolves when the user pressed Enter, before each handshake message */
  step?: (what: string) => Promise<void>;
}

export interface SessionApp {
  /** The handshake succeeded and both CONFIG records are exchanged. */
  onOpen(session: Session, peerConfig: Json): void;
  /** A verified DATA payload. Call `pauseInbound()` if the sink cannot take more. */
  onData(payload: Uint8Array): void;
  /** The peer sent CLOSE: it will send no more data. */
  onPeerClose(): void;
  /** The session is over: null for a clean end (both CLOSEs), else why. Called exactly once. */
  onEnd(err: VpnError | null): void;
  /** The outbound queue emptied after `write` returned false: resume the source. */
  onWritable?(): void;
}

type Phase = 'handshake' | 'config' | 'open' | 'done';

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');

// ---- Write coalescing ----
/** Writes of at most this many bytes made inside `corked` are gathered into one socket write. */
const GATHER_MAX_WRITE = 16 * 1024;
/** A gathered batch goes out as soon as it holds this much. */
const GATHER_BATCH = 64 * 1024;
let corkDepth = 0;
let gathering: WriteQueue[] = [];

/**
 * Run `fn` with small writes gathered: each WriteQueue written to inside `fn` sends what it gathered as one socket
 * write when the outermost `corked` returns. Many small records opened from one read become one write to the app;
 * many small records sealed in one go (say, TUN packets from one read) become one write to the tunnel.
 */
export function corked<T>(fn: () => T): T {
  corkDepth++;
  try {
    return fn();
  } finally {
    if (--corkDepth === 0) {
      const queues = gathering;
      gathering = [];
      for (const q of queues) q.sendGathered(true);
    }
  }
}

/**
 * A queue in front of a Bun socket: what `write` did not take is kept and flushed on `drain`. Inside `corked`, small
 * writes are gathered instead and sent together; `onDrained` runs when sending them left nothing queued (there is no
 * `drain` event then, and someone may be waiting for `empty`).
 */
export class WriteQueue {
  private q: Uint8Array[] = [];
  queued = 0;
  private gathered: Uint8Array[] = [];
  private gatheredBytes = 0;
  constructor(
    private readonly socket: Socket<any>,
    private readonly onDrained?: () => void,
  ) {}
  /** Queue or write `data`; returns true while the queue is below the high-water mark. */
  write(data: Uint8Array): boolean {
    if (corkDepth > 0 && this.q.length === 0 && data.length <= GATHER_MAX_WRITE) {
      if (this.gathered.length === 0) gathering.push(this);
      this.gathered.push(data);
      this.gatheredBytes += data.length;
      if (this.gatheredBytes >= GATHER_BATCH) this.sendGathered(false);
      return this.queued + this.gatheredBytes < HIGH_WATER;
    }
    if (this.gathered.length > 0) this.sendGathered(false); // what was gathered goes first
    this.writeNow(data);
    return this.queued < HIGH_WATER;
  }
  private writeNow(data: Uint8Array): void {
    if (this.q.length > 0) {
      this.q.push(data);
      this.queued += data.length;
    } else {
      const n = this.socket.write(data);
      const w = n < 0 ? 0 : n;
      if (w < data.length) {
        const rest = data.subarray(w);
        this.q.push(rest);
        this.queued += rest.length;
      }
    }
  }
  /** Send the gathered writes as one; with `notify`, call `onDrained` if nothing is left queued. */
  sendGathered(notify: boolean): void {
    const parts = this.gathered;
    if (parts.length === 0) return;
    let data = parts[0]!;
    if (parts.length > 1) {
      data = new Uint8Array(this.gatheredBytes);
      let off = 0;
      for (const p of parts) {
        data.set(p, off);
        off += p.length;
      }
    }
    this.gathered = [];
    this.gatheredBytes = 0;
    this.writeNow(data); // not write(): inside corked() that would gather it again, behind later writes
    if (notify && this.q.length === 0) this.onDrained?.();
  }
  /** On `drain`: write what is queued; returns true when the queue is empty. */
  flush(): boolean {
    while (this.q.length > 0) {
      const head = this.q[0]!;
      const n = this.socket.write(head);
      const w = n < 0 ? 0 : n;
      this.queued -= w;
      if (w < head.length) {
        this.q[0] = head.subarray(w);
        return false;
      }
      this.q.shift();
    }
    return true;
  }
  get empty(): boolean {
    return this.q.length === 0 && this.gathered.length === 0;
  }
}

export class Session {
  readonly o: SessionOptions;
  readonly app: SessionApp;
  readonly socket: Socket<any>;
  readonly startedAt = Date.now();
  /** the peer's address as text, for logs */
  peer = '';
  phase: Phase = 'handshake';
  version = 0;
  bytesIn = 0;
  bytesOut = 0;
  sentClose = false;
  peerClosed = false;
  private out: WriteQueue;
  private hsBuf: Uint8Array = new Uint8Array(0);
  private hsBusy = false;
  private client?: ClientHandshake;
  private server?: ServerHandshake;
  private sender?: ChannelSender;
  private receiver?: ChannelReceiver;
  private hsTimer?: ReturnType<typeof setTimeout>;
  private kaTimer?: ReturnType<typeof setInterval>;
  private lastRecv = Date.now();
  private lastSend = Date.now();
  private pausedIn = false;
  private held: Uint8Array[] = [];
  private endPending = false;
  private lingerTimer?: ReturnType<typeof setTimeout>;
  /** true once both CONFIG records are exchanged: the session really opened */
  opened = false;
  private closePending: { err?: Error } | null = null;
  private wantWritable = false;

  constructor(socket: Socket<any>, o: SessionOptions, app: SessionApp) {
    this.socket = socket;
    this.o = o;
    this.app = app;
    this.out = new WriteQueue(socket, () => this.onSocketDrain());
    this.peer = describePeer(socket);
    try {
      socket.setNoDelay(true);
    } catch {
      // unix sockets have no Nagle to turn off
    }
    this.hsTimer = setTimeout(
      () => this.finish(new VpnError('HANDSHAKE_TIMEOUT', `handshake not completed within ${o.handshakeTimeoutMs / 1000} s`)),
      o.handshakeTimeoutMs,
    );
    if (o.role === 'client') {
      this.client = new ClientHandshake(o.keys, o.version ?? VERSION_2, { engine: o.engine, trace: this.hsTracer() });
      void this.clientStart();
    } else {
      this.server = new ServerHandshake(o.keys, { engine: o.engine, requirePfs: o.requirePfs, trace: this.hsTracer() });
    }
  }

  private hsTracer() {
    const t = this.o.trace;
    return t ? (field: string, v: Uint8Array) => t(`handshake ${field} (${v.length}): ${hex(v)}`) : undefined;
  }

  private async clientStart(): Promise<void> {
    this.hsBusy = true;
    try {
      await this.o.step?.('send message 1');
      if (this.phase === 'done') return;
      this.send(this.client!.createMessage1());
    } catch (e) {
      this.finish(asVpnError(e, 'AUTH_FAILED'));
    } finally {
      this.hsBusy = false;
    }
    this.pumpHandshake();
  }

  // ---- socket events (wired by `sessionHandler`) ----

  onSocketData(chunk: Uint8Array): void {
    if (this.phase === 'done') return;
    if (this.pausedIn) {
      // Bun may deliver reads that were already under way when pause() was called: hold them, unprocessed,
      // and re-assert the pause. They are processed, in order, on resume.
      this.held.push(chunk);
      this.socket.pause();
      return;
    }
    this.lastRecv = Date.now();
    if (this.phase === 'handshake') {
      if (this.hsBuf.length + chunk.length > MAX_HANDSHAKE_BUFFER) {
        this.finish(new VpnError('AUTH_FAILED', 'too many bytes during the handshake (not a vpn peer)'));
        return;
      }
      const b = new Uint8Array(this.hsBuf.length + chunk.length);
      b.set(this.hsBuf);
      b.set(chunk, this.hsBuf.length);
      this.hsBuf = b;
      this.pumpHandshake();
      return;
    }
    this.feed(chunk);
  }

  onSocketDrain(): void {
    if (this.phase === 'done') {
      return;
    }
    if (this.out.flush()) {
      this.maybeFinish();
      if (this.wantWritable && this.phase === 'open') {
        this.wantWritable = false;
        this.app.onWritable?.();
      }
    }
  }

  onSocketEnd(): void {
    if (this.phase === 'done') {
      this.closeSocket(); // the peer's FIN after our clean end: now close for good
      return;
    }
    if (this.held.length > 0) {
      this.endPending = true; // held bytes come first: they may hold the CLOSE
      return;
    }
    if (this.phase !== 'open' && this.phase !== 'config') {
      this.finish(this.handshakeEof());
      return;
    }
    if (this.phase === 'config' && this.o.role === 'client') {
      this.finish(new VpnError('AUTH_FAILED', 'the server closed the connection during the handshake (wrong secret?)'));
      return;
    }
    try {
      this.receiver!.end();
    } catch (e) {
      this.finish(asVpnError(e));
      return;
    }
    this.maybeFinish();
  }

  onSocketClose(err?: Error): void {
    if (this.phase === 'done') {
      clearTimeout(this.lingerTimer);
      return;
    }
    if (this.held.length > 0) {
      this.closePending = { err };
      return;
    }
    if (this.phase === 'handshake' || (this.phase === 'config' && this.o.role === 'client')) {
      this.finish(err ? new VpnError('AUTH_FAILED', `connection lost during the handshake (${err.message})`) : this.handshakeEof());
      return;
    }
    if (this.sentClose && this.peerClosed) {
      this.finish(null);
      return;
    }
    this.finish(new VpnError('TRUNCATED', `the connection ${err ? `failed (${err.message})` : 'closed'} before an authenticated CLOSE`));
  }

  private handshakeEof(): VpnError {
    if (this.o.role === 'client' && this.hsBuf.length === REFUSE_V1.length && this.hsBuf.every((b, i) => b === REFUSE_V1[i])) {
      return new VpnError('PFS_REQUIRED', 'the server requires forward secrecy and refused protocol version 1');
    }
    return new VpnError('AUTH_FAILED', `the ${this.o.role === 'client' ? 'server' : 'client'} closed the connection during the handshake`);
  }

  // ---- handshake (§3) ----

  private take(n: number): Uint8Array | null {
    if (this.hsBuf.length < n) return null;
    const m = this.hsBuf.slice(0, n);
    this.hsBuf = this.hsBuf.slice(n);
    return m;
  }

  private pumpHandshake(): void {
    if (this.hsBusy || this.phase !== 'handshake') return;
    this.hsBusy = true;
    void this.stepHandshake()
      .catch((e) => this.finish(asVpnError(e, 'AUTH_FAILED')))
      .finally(() => {
        this.hsBusy = false;
      });
  }

  private async stepHandshake(): Promise<void> {
    if (this.client) {
      const len = this.client.version === VERSION_2 ? MSG2_V2_LEN : MSG2_V1_LEN;
      const m2 = this.take(len);
      if (!m2) return;
      const m3 = this.client.consumeMessage2(m2); // C2: message 2 verified before message 3 is sent
      await this.o.step?.('send message 3');
      if (this.phase === 'done') return;
      this.send(m3);
      this.established(this.client.keys!);
      this.sendRecord(RECORD.CONFIG, new TextEncoder().encode(JSON.stringify(this.o.config({}))));
      this.phase = 'config';
    } else {
      const s = this.server!;
      if (s.version === 0) {
        if (this.hsBuf.length < 1) return;
        const m1 = this.take(message1Length(this.hsBuf[0]!));
        if (!m1) return;
        let m2: Uint8Array;
        try {
          m2 = s.consumeMessage1(m1);
        } catch (e) {
          const err = asVpnError(e, 'AUTH_FAILED');
          if (err.code === 'PFS_REQUIRED') this.send(REFUSE_V1);
          throw err;
        }
        await this.o.step?.('send message 2');
        if (this.phase === 'done') return;
        this.send(m2);
      }
      const m3 = this.take(MSG3_LEN);
      if (!m3) return;
      this.established(s.consumeMessage3(m3)); // S3: verified before the session key is unwrapped
      this.phase = 'config';
    }
    this.version = this.client?.version ?? this.server!.version;
    const rest = this.hsBuf;
    this.hsBuf = new Uint8Array(0);
    if (rest.length > 0) this.feed(rest);
  }

  private established(keys: TrafficKeys): void {
    this.sender = new ChannelSender(this.o.engine, keys.send);
    this.receiver = new ChannelReceiver(this.o.engine, keys.recv);
    const t = this.o.trace;
    if (t) {
      const ft = (dir: string, type: number, len: number, iv: Uint8Array, chain: Uint8Array) =>
        t(`frame ${dir} type=${type} len=${len} iv=${hex(iv)} chain=${hex(chain)}`);
      this.sender.trace = ft;
      this.receiver.trace = ft;
    }
  }

  // ---- data phase (§6–§8) ----

  private feed(chunk: Uint8Array): void {
    try {
      this.receiver!.push(chunk, this.onRecord);
    } catch (e) {
      this.finish(asVpnError(e, 'INTEGRITY'));
    }
  }

  private onRecord = (type: RecordType, payload: Uint8Array): void => {
    if (this.phase === 'done') return;
    if (this.phase === 'config') {
      if (type !== RECORD.CONFIG) throw new VpnError('INTEGRITY', 'the first record was not CONFIG');
      this.onConfig(payload);
      return;
    }
    switch (type) {
      case RECORD.DATA:
        this.bytesIn += payload.length;
        this.app.onData(payload);
        return;
      case RECORD.CLOSE:
        this.peerClosed = true;
        this.app.onPeerClose();
        this.maybeFinish();
        return;
      case RECORD.PING:
        this.sendRecord(RECORD.PONG);
        return;
      case RECORD.PONG:
        return;
      default:
        throw new VpnError('INTEGRITY', 'unexpected CONFIG record');
    }
  };

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
        // A refusal the client can explain to its user: {"error": "..."} then CLOSE.
        const refusal = { error: answer.message, code: answer.code };
        this.sendRecord(RECORD.CONFIG, new TextEncoder().encode(JSON.stringify(refusal)));
        this.finish(answer, true);
        return;
      }
      this.sendRecord(RECORD.CONFIG, new TextEncoder().encode(JSON.stringify(answer)));
    } else if (typeof peer.error === 'string') {
      const code = peer.code === 'NETWORK' ? 'NETWORK' : 'USAGE';
      this.finish(new VpnError(code, `the server refused the session: ${peer.error.slice(0, 200)}`));
      return;
    }
    clearTimeout(this.hsTimer);
    this.phase = 'open';
    this.opened = true;
    this.lastRecv = Date.now();
    if (this.o.keepaliveMs > 0) this.kaTimer = setInterval(this.keepalive, Math.max(50, this.o.keepaliveMs / 4));
    this.app.onOpen(this, peer);
  }

  private keepalive = (): void => {
    const now = Date.now();
    const k = this.o.keepaliveMs;
    if (!this.pausedIn && now - this.lastRecv >= 3 * k) {
      this.finish(new VpnError('DEAD_PEER', `nothing heard from the peer for ${(3 * k) / 1000} s`));
      return;
    }
    if (now - this.lastSend >= k && this.out.empty) this.sendRecord(RECORD.PING);
  };

  private send(bytes: Uint8Array): boolean {
    this.lastSend = Date.now();
    return this.out.write(bytes);
  }

  private sendRecord(type: RecordType, payload?: Uint8Array): boolean {
    return this.send(this.sender!.seal(type, payload));
  }

  /**
   * Send application bytes (split into records of at most MAX_PAYLOAD). Returns false when the source should pause
   * until `onWritable`. Bytes written after `close()` or after the end are a caller bug and are refused.
   */
  write(data: Uint8Array): boolean {
    if (this.phase !== 'open' || this.sentClose) return false;
    let ok = true;
    for (let off = 0; off < data.length; off += MAX_PAYLOAD) {
      const part = data.subarray(off, Math.min(off + MAX_PAYLOAD, data.length));
      this.bytesOut += part.length;
      ok = this.sendRecord(RECORD.DATA, part);
    }
    if (!ok) this.wantWritable = true;
    return ok;
  }

  /** Send one record holding exactly `data` (TUN: one IP packet per record). */
  writeRecord(data: Uint8Array): boolean {
    if (this.phase !== 'open' || this.sentClose || data.length > MAX_PAYLOAD) return false;
    this.bytesOut += data.length;
    const ok = this.sendRecord(RECORD.DATA, data);
    if (!ok) this.wantWritable = true;
    return ok;
  }

  /** Half-close: send CLOSE; we send no more data. The session ends once the peer's CLOSE has arrived too. */
  close(): void {
    if (this.phase !== 'open' || this.sentClose) return;
    this.sentClose = true;
    this.sendRecord(RECORD.CLOSE);
    this.maybeFinish();
  }

  /** The application's sink is full: stop reading from the tunnel socket. */
  pauseInbound(): void {
    if (this.pausedIn || this.phase === 'done') return;
    this.pausedIn = true;
    this.socket.pause();
  }

  resumeInbound(): void {
    if (!this.pausedIn || this.phase === 'done') return;
    this.pausedIn = false;
    this.lastRecv = Date.now();
    while (this.held.length > 0 && !this.pausedIn && (this.phase as Phase) !== 'done') {
      const c = this.held.shift()!;
      this.onSocketData(c);
    }
    if (this.held.length === 0 && (this.phase as Phase) !== 'done') {
      if (this.endPending) {
        this.endPending = false;
        this.onSocketEnd();
      }
      if (this.closePending) {
        const { err } = this.closePending;
        this.closePending = null;
        this.onSocketClose(err);
      }
    }
    if (!this.pausedIn && (this.phase as Phase) !== 'done') this.socket.resume();
  }

  /** Outbound bytes waiting for the socket. */
  get queued(): number {
    return this.out.queued;
  }

  private maybeFinish(): void {
    if (this.phase === 'open' && this.sentClose && this.peerClosed && this.out.empty) this.finish(null);
  }

  /** End the session now: `null` for a clean end, else the reason. Idempotent. */
  finish(err: VpnError | null, refused = false): void {
    if (this.phase === 'done') return;
    this.phase = 'done';
    clearTimeout(this.hsTimer);
    clearInterval(this.kaTimer);
    this.hsBuf = new Uint8Array(0);
    this.out.sendGathered(false); // a refusal or CLOSE gathered in this very call goes out before the end
    if (err && !refused) {
      this.closeSocket();
    } else {
      // A clean end (or a refusal the client should read): half-close and keep reading until the peer's FIN, since
      // closing with unread input makes the kernel send RST, and an RST makes the peer's kernel throw away
      // whatever it has not read yet — possibly our last frames. Closed for good on the FIN or after LINGER_MS.
      try {
        this.socket.shutdown();
        if (this.pausedIn) this.socket.resume();
      } catch {
        // already closed
      }
      this.lingerTimer = setTimeout(() => this.closeSocket(), LINGER_MS);
      this.lingerTimer.unref?.();
    }
    this.app.onEnd(err);
  }

  private closeSocket(): void {
    clearTimeout(this.lingerTimer);
    try {
      this.socket.end();
    } catch {
      // already closed
    }
  }
}

export function describePeer(socket: Socket<any>): string {
  const a = socket.remoteAddress;
  if (!a) return 'unix';
  return a.includes(':') ? `[${a}]:${socket.remotePort}` : `${a}:${socket.remotePort}`;
}

/** Socket handlers that route every event to the Session stored in `socket.data`. */
export const sessionHandler: SocketHandler<{ session?: Session }> = {
  data(socket, chunk) {
    const s = socket.data.session;
    if (s) corked(() => s.onSocketData(chunk)); // records opened from one read: one write each way
  },
  drain(socket) {
    socket.data.session?.onSocketDrain();
  },
  end(socket) {
    socket.data.session?.onSocketEnd();
  },
  close(socket, err) {
    socket.data.session?.onSocketClose(err);
  },
  error(socket, err) {
    socket.data.session?.onSocketClose(err);
  },
};
