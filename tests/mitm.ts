/**
 * Adversarial helpers for the tests (issue #5), in one place:
 *
 * - `StreamEditor` and `MitmProxy`: a man-in-the-middle TCP proxy placed between `connect` and `serve` that, in
 *   either direction, at a chosen byte offset (or at the first frame boundary after it), flips one bit, drops,
 *   duplicates, swaps or rewrites bytes or whole frames, injects bytes, ends the direction with a forged FIN,
 *   black-holes it, or resets the connection. It can also record the first bytes of each direction (to replay a
 *   real message 1 later).
 * - Junk: a TLS ClientHello, an HTTP request, bare length prefixes, random bytes; `RawClient` to throw it.
 * - `PatternSource` / `HashSink`: a stream of random-looking bytes of any length (a 1 MiB random block with a
 *   counter mixed in) and an incremental SHA-256, so a 1 GiB soak never holds 1 GiB in memory.
 * - `feedQuietly`: feed a process's stdin, stopping quietly when it has gone away.
 *
 * Network namespaces (the impaired link between two of them) are in `netns.ts`.
 * Everything listens on 127.0.0.1 and is bounded in count, time and memory.
 */
import { createHash, randomBytes } from 'node:crypto';
import type { FileSink, Socket, Subprocess, TCPSocketListener } from 'bun';

// ---- Wire layout the editor needs to find frame boundaries (PROTOCOL.md §3, §6) ----
/** Handshake bytes before the first frame, protocol version 2 (the default): message 1 + message 3, and message 2. */
export const V2_C2S_HANDSHAKE = 113 + 32;
export const V2_S2C_HANDSHAKE = 96;
export const V2_MSG1 = { start: 0, len: 113 } as const; // c2s
export const V2_MSG2 = { start: 0, len: 96 } as const; // s2c
export const V2_MSG3 = { start: 113, len: 32 } as const; // c2s
/** Frame = length (4) ‖ IV (16) ‖ ciphertext (length) ‖ chain (32). */
const FRAME_OVERHEAD = 4 + 16 + 32;

export type Dir = 'c2s' | 's2c';

export type Action =
  /** flip one bit (default the lowest) of the byte at the offset */
  | { kind: 'flip'; bit?: number }
  /** remove `n` bytes (or frames) */
  | { kind: 'drop'; n: number }
  /** send `n` bytes (or frames) twice in a row: a replay */
  | { kind: 'dup'; n: number }
  /** send the `m` bytes (or frames) that follow the first `n` before them: a reorder (m defaults to n) */
  | { kind: 'swap'; n: number; m?: number }
  /** insert bytes; with `stall`, forward nothing more in this direction afterwards (and send no FIN either) */
  | { kind: 'inject'; bytes: Uint8Array; stall?: boolean }
  /** replace the next `n` bytes (or frames) by what `fn` makes of them (any length): a rewrite */
  | { kind: 'rewrite'; n: number; fn: (window: Uint8Array) => Uint8Array }
  /** a black hole: forward nothing more in this direction, with no FIN and no reset (a dead path) */
  | { kind: 'blackhole' }
  /** forged FIN: end this direction here, discard the rest */
  | { kind: 'fin' }
  /** reset the whole connection (RST on both sides) */
  | { kind: 'reset' };

export interface Tamper {
  dir: Dir;
  /** offset in this direction's byte stream, counting from its first byte */
  at: number;
  /** 'frame': act at the first frame boundary at or after `at`, and count `n`/`m` in whole frames */
  unit?: 'byte' | 'frame';
  /** with unit 'frame': where the first frame starts in this direction (the handshake bytes before it) */
  framesFrom?: number;
  action: Action;
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  if (a.length === 0) return b.slice();
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

/** Finds frame boundaries in one direction's stream from the cleartext length fields. */
class FrameScanner {
  /** frame boundaries at or after `from`, in order (the start of each frame, and the end of the last one parsed) */
  readonly starts: number[] = [];
  private next: number;
  private hdr = new Uint8Array(4);
  private have = 0;
  constructor(
    first: number,
    private readonly from: number,
    private readonly want: number,
  ) {
    this.next = first;
  }
  feed(chunkStart: number, chunk: Uint8Array): void {
    while (this.starts.length < this.want) {
      const i = this.next + this.have - chunkStart;
      if (i >= chunk.length || i < 0) return;
      this.hdr[this.have++] = chunk[i]!;
      if (this.have < 4) continue;
      this.have = 0;
      const len = new DataView(this.hdr.buffer).getUint32(0);
      // A header at p tells two boundaries: p itself and p + the frame's size (which may be the end of the stream).
      if (this.next >= this.from && this.starts.length === 0) this.starts.push(this.next);
      this.next += FRAME_OVERHEAD + len;
      if (this.starts.length > 0 || this.next >= this.from) this.starts.push(this.next);
    }
  }
}

export interface EditResult {
  out: Uint8Array[];
  /** what the proxy must do after sending `out` */
  signal?: 'fin' | 'reset';
}

/**
 * One direction's stream transformer: passes bytes through unchanged, holds the window the tamper needs, edits it
 * once, then passes the rest (or discards it after a FIN, a reset or a stall). Pure: no sockets, so it is easy to
 * check on its own.
 */
export class StreamEditor {
  private inPos = 0;
  private hold: Uint8Array = new Uint8Array(0);
  private holdStart = 0;
  private state: 'wait' | 'done' | 'discard' = 'wait';
  private readonly scanner: FrameScanner | null;
  /** true once the tamper has been applied */
  fired = false;
  /** input offset where the tamper was applied (frame unit: the frame boundary chosen) */
  firedAt = -1;

  constructor(readonly t: Tamper | null) {
    if (!t) this.state = 'done';
    if (t?.unit === 'frame') {
      if (t.framesFrom === undefined) throw new Error('unit "frame" needs framesFrom');
      this.scanner = new FrameScanner(t.framesFrom, t.at, this.countAfter() + 1);
    } else this.scanner = null;
  }

  /** How many bytes (or frames) after the start the edit needs to see. */
  private countAfter(): number {
    const a = this.t!.action;
    switch (a.kind) {
      case 'flip':
        return 1;
      case 'drop':
      case 'dup':
      case 'rewrite':
        return a.n;
      case 'swap':
        return a.n + (a.m ?? a.n);
      default:
        return 0;
    }
  }

  /** [start, end) of the window to edit, once known. */
  private window(): [number, number] | null {
    const t = this.t!;
    const k = this.countAfter();
    if (!this.scanner) return [t.at, t.at + k];
    const s = this.scanner.starts;
    if (s.length < 1) return null;
    if (t.action.kind === 'flip') return [s[0]!, s[0]! + 1];
    if (s.length < k + 1) return [s[0]!, Number.POSITIVE_INFINITY];
    return [s[0]!, s[k]!];
  }

  push(chunk: Uint8Array): EditResult {
    const start = this.inPos;
    this.inPos += chunk.length;
    if (this.state === 'discard') return { out: [] };
    if (this.state === 'done') return { out: [chunk] };
    this.scanner?.feed(start, chunk);
    this.hold = concat(this.hold, chunk);
    const out: Uint8Array[] = [];
    const w = this.window();
    // Everything before the window (or before `at` while the window is unknown) goes through untouched.
    const safe = Math.min(w ? w[0] : this.t!.at, this.inPos);
    if (safe > this.holdStart) {
      out.push(this.hold.slice(0, safe - this.holdStart));
      this.hold = this.hold.slice(safe - this.holdStart);
      this.holdStart = safe;
    }
    if (!w || this.inPos < w[1]) return { out };
    return this.apply(w, out);
  }

  private apply([a, b]: [number, number], out: Uint8Array[]): EditResult {
    const t = this.t!;
    const win = this.hold.slice(0, b - a);
    const rest = this.hold.slice(b - a);
    this.hold = new Uint8Array(0);
    this.fired = true;
    this.firedAt = a;
    this.state = 'done';
    const act = t.action;
    // Offsets of the parts inside the window, in bytes (frame unit: from the boundaries found).
    const cut = (i: number) => (this.scanner ? this.scanner.starts[i]! - a : i);
    switch (act.kind) {
      case 'flip':
        win[0]! ^= 1 << (act.bit ?? 0);
        out.push(win, rest);
        break;
      case 'drop':
        out.push(rest);
        break;
      case 'dup':
        out.push(win, win.slice(), rest);
        break;
      case 'swap': {
        const n = cut(act.n);
        out.push(win.slice(n), win.slice(0, n), rest);
        break;
      }
      case 'inject':
        out.push(act.bytes.slice());
        if (act.stall) {
          this.state = 'discard';
          break;
        }
        out.push(rest);
        break;
      case 'rewrite':
        out.push(act.fn(win), rest);
        break;
      case 'blackhole':
        this.state = 'discard';
        break;
      case 'fin':
        this.state = 'discard';
        return { out, signal: 'fin' };
      case 'reset':
        this.state = 'discard';
        return { out, signal: 'reset' };
    }
    return { out: out.filter((o) => o.length > 0) };
  }

  /** The source ended: whatever is still held goes out unchanged (the window was never complete). */
  end(): Uint8Array[] {
    if (this.state === 'discard') return [];
    const h = this.hold;
    this.hold = new Uint8Array(0);
    return h.length > 0 ? [h] : [];
  }

  /** True once nothing more may be forwarded in this direction (after a forged FIN, a reset or a stall). */
  get discarding(): boolean {
    return this.state === 'discard';
  }
}

// ---- the proxy ----

/** Above this many queued bytes toward one side, reading from the other side pauses. */
const PROXY_HIGH_WATER = 512 * 1024;

type SockData = { conn?: MitmConn; side?: 'client' | 'server' };

/** One direction of one proxied connection: editor + write queue toward the destination socket. */
class Pipe {
  private q: Uint8Array[] = [];
  private queued = 0;
  private endPending = false;
  private ended = false;
  private paused = false;
  /** bytes received from the source (before editing) */
  bytesIn = 0;
  /** the first bytes from the source, as received (up to the proxy's `capture`) */
  captured: Uint8Array = new Uint8Array(0);
  src: Socket<SockData> | null = null;
  dst: Socket<SockData> | null = null;

  constructor(
    private readonly conn: MitmConn,
    readonly editor: StreamEditor,
    private readonly capture: number,
  ) {}

  fromSrc(chunk: Uint8Array): void {
    this.bytesIn += chunk.length;
    if (this.captured.length < this.capture) {
      this.captured = concat(this.captured, chunk.subarray(0, this.capture - this.captured.length));
    }
    const r = this.editor.push(chunk);
    for (const o of r.out) this.enqueue(o);
    if (r.signal === 'reset') {
      this.flush();
      this.conn.reset();
      return;
    }
    if (r.signal === 'fin') this.endPending = true;
    this.flush();
    if (this.queued > PROXY_HIGH_WATER && !this.paused && this.src) {
      this.paused = true;
      this.src.pause();
    }
  }

  /** the source sent FIN (or closed) */
  srcDone = false;

  srcEnded(): void {
    if (!this.srcDone) {
      this.srcDone = true;
      if (this.src) this.conn.maybeClose(this.src);
    }
    if (this.endPending) return;
    for (const o of this.editor.end()) this.enqueue(o);
    // A stalled direction sends no FIN either: the attacker just goes quiet.
    if (!this.editor.discarding) this.endPending = true;
    this.flush();
  }

  private enqueue(b: Uint8Array): void {
    if (b.length === 0 || this.ended) return;
    this.q.push(b);
    this.queued += b.length;
  }

  flush(): void {
    const d = this.dst;
    if (!d || this.conn.isReset) return;
    while (this.q.length > 0) {
      const head = this.q[0]!;
      const n = d.write(head);
      const w = n < 0 ? 0 : n;
      this.queued -= w;
      if (w < head.length) {
        this.q[0] = head.subarray(w);
        return;
      }
      this.q.shift();
    }
    if (this.paused) {
      this.paused = false;
      this.src?.resume();
    }
    if (this.endPending && !this.ended) {
      this.ended = true;
      try {
        // A real half-close: in Bun, shutdown() is shutdown(SHUT_WR) and keeps reading, while end() closes the
        // descriptor (and a close with unread input becomes a reset, losing what was still in flight).
        d.shutdown();
      } catch {
        // already closed
      }
      this.conn.maybeClose(d);
    }
  }

  /** FIN has been sent toward the destination. */
  get finSent(): boolean {
    return this.ended;
  }

  /** The destination is gone: drop what was queued for it. */
  dstGone(): void {
    this.q = [];
    this.queued = 0;
    this.ended = true;
    if (this.paused) {
      this.paused = false;
      this.src?.resume();
    }
  }
}

/** One connection through the proxy. */
export class MitmConn {
  readonly c2s: Pipe;
  readonly s2c: Pipe;
  client: Socket<SockData> | null = null;
  server: Socket<SockData> | null = null;
  isReset = false;
  private closedSides = new Set<string>();
  private readonly closed = Promise.withResolvers<void>();

  constructor(
    readonly index: number,
    tampers: Tamper[],
    capture: number,
  ) {
    const pick = (d: Dir) => {
      const ts = tampers.filter((t) => t.dir === d);
      if (ts.length > 1) throw new Error(`one tamper per direction, got ${ts.length} for ${d}`);
      return new StreamEditor(ts[0] ?? null);
    };
    this.c2s = new Pipe(this, pick('c2s'), capture);
    this.s2c = new Pipe(this, pick('s2c'), capture);
  }

  /** Did every tamper of this connection happen? */
  get fired(): boolean {
    return [this.c2s, this.s2c].every((p) => !p.editor.t || p.editor.fired);
  }

  /** Close a socket once FIN went both ways through it (Bun's end() closes the descriptor). */
  maybeClose(sock: Socket<SockData>): void {
    const [toIt, fromIt] = sock === this.client ? [this.s2c, this.c2s] : [this.c2s, this.s2c];
    if (toIt.finSent && fromIt.srcDone) {
      try {
        sock.end();
      } catch {
        // already closed
      }
    }
  }

  /** RST both sides now. */
  reset(): void {
    if (this.isReset) return;
    this.isReset = true;
    for (const s of [this.client, this.server]) {
      try {
        s?.terminate();
      } catch {
        // already closed
      }
    }
  }

  onClose(side: 'client' | 'server', err?: Error): void {
    if (this.closedSides.has(side)) return;
    this.closedSides.add(side);
    // Toward the closed side nothing can go any more; from it nothing more will come.
    (side === 'client' ? this.s2c : this.c2s).dstGone();
    (side === 'client' ? this.c2s : this.s2c).srcEnded();
    if (err) this.reset(); // carry a reset through, as a router would
    if (this.closedSides.size === 2 || (this.isReset && this.closedSides.size >= 1)) {
      const other = side === 'client' ? this.server : this.client;
      if (this.isReset) {
        try {
          other?.terminate();
        } catch {
          // already closed
        }
      }
    }
    if (this.closedSides.size === 2) this.closed.resolve();
  }

  /** Resolves once both sockets are closed. */
  get done(): Promise<void> {
    return this.closed.promise;
  }

  /** Force both sockets closed (test teardown). */
  destroy(): void {
    this.reset();
    this.closed.resolve();
  }
}

export interface MitmOptions {
  /** where `serve` listens */
  target: { host?: string; port: number };
  /** tampers for each accepted connection (by index, from 0); at most one per direction */
  tamper?: Tamper[] | ((conn: number) => Tamper[]);
  /** bytes of each direction to record per connection (default 0) */
  capture?: number;
}

/**
 * A man-in-the-middle TCP proxy on 127.0.0.1:0. Each accepted connection gets its own upstream connection to
 * `target`, with backpressure both ways and half-close carried through. Use with `using`.
 */
export class MitmProxy {
  readonly conns: MitmConn[] = [];
  private listener: TCPSocketListener<SockData> | null = null;
  private readonly o: MitmOptions;

  private constructor(o: MitmOptions) {
    this.o = o;
  }

  static start(o: MitmOptions): MitmProxy {
    const p = new MitmProxy(o);
    p.listen();
    return p;
  }

  get port(): number {
    return this.listener!.port;
  }

  private listen(): void {
    const self = this;
    const side = (s: Socket<SockData>, which: 'client' | 'server') => (which === 'client' ? s.data.conn!.c2s : s.data.conn!.s2c);
    this.listener = Bun.listen<SockData>({
      hostname: '127.0.0.1',
      port: 0,
      allowHalfOpen: true,
      data: {},
      socket: {
        open(client) {
          const i = self.conns.length;
          const t = self.o.tamper;
          const conn = new MitmConn(i, typeof t === 'function' ? t(i) : (t ?? []), self.o.capture ?? 0);
          self.conns.push(conn);
          client.data = { conn, side: 'client' };
          conn.client = client;
          conn.c2s.src = client;
          conn.s2c.dst = client;
          void self.connectUpstream(conn);
        },
        data: (s, chunk) => side(s, 'client').fromSrc(new Uint8Array(chunk)),
        drain: (s) => s.data.conn!.s2c.flush(),
        end: (s) => s.data.conn!.c2s.srcEnded(),
        close: (s, err) => s.data.conn?.onClose('client', err),
        error: (s, err) => s.data.conn?.onClose('client', err),
      },
    });
  }

  private async connectUpstream(conn: MitmConn): Promise<void> {
    try {
      const server = await Bun.connect<SockData>({
        hostname: this.o.target.host ?? '127.0.0.1',
        port: this.o.target.port,
        allowHalfOpen: true,
        data: { conn, side: 'server' },
        socket: {
          data: (s, chunk) => s.data.conn!.s2c.fromSrc(new Uint8Array(chunk)),
          drain: (s) => s.data.conn!.c2s.flush(),
          end: (s) => s.data.conn!.s2c.srcEnded(),
          close: (s, err) => s.data.conn?.onClose('server', err),
          error: (s, err) => s.data.conn?.onClose('server', err),
        },
      });
      conn.server = server;
      conn.s2c.src = server;
      conn.c2s.dst = server;
      if (conn.isReset) server.terminate();
      else conn.c2s.flush();
    } catch {
      conn.reset();
    }
  }

  /** Stop listening and reset every connection still open. */
  stop(): void {
    this.listener?.stop(true);
    this.listener = null;
    for (const c of this.conns) c.destroy();
  }

  [Symbol.dispose](): void {
    this.stop();
  }
}

// ---- junk ----

/** A plausible TLS 1.3 ClientHello record for `host` (what a browser or curl sends first). */
export function tlsClientHello(host = 'example.com'): Uint8Array {
  const u16 = (n: number) => [(n >> 8) & 0xff, n & 0xff];
  const name = [...new TextEncoder().encode(host)];
  const sni = [0x00, 0x00, ...u16(name.length + 5), ...u16(name.length + 3), 0x00, ...u16(name.length), ...name];
  const versions = [0x00, 0x2b, ...u16(3), 2, 0x03, 0x04];
  const groups = [0x00, 0x0a, ...u16(4), ...u16(2), 0x00, 0x1d];
  const exts = [...sni, ...versions, ...groups];
  const body = [
    0x03, 0x03, // legacy_version TLS 1.2
    ...randomBytes(32), // random
    32, ...randomBytes(32), // legacy_session_id
    ...u16(6), 0x13, 0x01, 0x13, 0x02, 0x13, 0x03, // cipher suites
    1, 0x00, // compression methods: null
    ...u16(exts.length), ...exts,
  ];
  const hs = [0x01, (body.length >> 16) & 0xff, ...u16(body.length), ...body];
  return new Uint8Array([0x16, 0x03, 0x01, ...u16(hs.length), ...hs]);
}

/** An HTTP/1.1 request, as a browser pointed at the tunnel port would send. */
export function httpRequest(host = '127.0.0.1'): Uint8Array {
  return new TextEncoder().encode(`GET / HTTP/1.1\r\nHost: ${host}\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n`);
}

/** A 4-byte big-endian length prefix `n`, followed by `extra` random bytes. */
export function lengthPrefix(n: number, extra = 0): Uint8Array {
  const b = new Uint8Array(4 + extra);
  new DataView(b.buffer).setUint32(0, n >>> 0);
  b.set(randomBytes(extra), 4);
  return b;
}

/** `n` random bytes. */
export function junk(n: number): Uint8Array {
  return new Uint8Array(randomBytes(n));
}

/**
 * A raw TCP client for junk: connects, optionally writes, and records what it receives and how it ended.
 * `closed` resolves with the time (ms since connect) the socket closed.
 */
export class RawClient {
  /** the first MiB received */
  received: Uint8Array = new Uint8Array(0);
  /** everything received, hashed */
  readonly sink = new HashSink();
  error: string | null = null;
  gotEnd = false;
  readonly openedAt = Date.now();
  closedAt = 0;
  private readonly closedP = Promise.withResolvers<number>();
  private drained: (() => void) | null = null;
  socket!: Socket<undefined>;

  /**
   * Connect to host:port. With `allowRefused`, a connection the server resets before Bun reports it open comes back
   * as an already closed client (with `error` set) instead of a rejection.
   */
  static async connect(port: number, host = '127.0.0.1', o: { allowRefused?: boolean } = {}): Promise<RawClient> {
    const c = new RawClient();
    try {
      await c.open(port, host);
    } catch (e) {
      if (!o.allowRefused) throw e;
      c.onClose(e as Error);
    }
    return c;
  }

  private async open(port: number, host: string): Promise<void> {
    const c = this;
    c.socket = await Bun.connect({
      hostname: host,
      port,
      allowHalfOpen: true,
      socket: {
        data: (_s, d) => {
          c.sink.update(d);
          if (c.received.length < 1 << 20) c.received = concat(c.received, new Uint8Array(d));
        },
        drain: () => {
          const r = c.drained;
          c.drained = null;
          r?.();
        },
        end: (s) => {
          c.gotEnd = true;
          s.end();
        },
        close: (_s, err) => c.onClose(err),
        error: (_s, err) => c.onClose(err),
      },
    });
  }

  private onClose(err?: Error): void {
    if (this.closedAt) return;
    if (err) this.error = (err as NodeJS.ErrnoException).code ?? err.message;
    this.closedAt = Date.now();
    this.closedP.resolve(this.closedAt - this.openedAt);
  }

  /** Write what the socket takes now (junk does not care about the rest). */
  write(b: Uint8Array): void {
    if (!this.isClosed) this.socket.write(b);
  }

  /**
   * Send all of `src` with backpressure, then half-close (FIN) unless `end` is false. Stops early, without
   * throwing, when the socket closes. `onProgress` sees the running total after each piece.
   */
  async sendStream(src: PatternSource, o: { end?: boolean; onProgress?: (sent: number) => void } = {}): Promise<void> {
    let piece: Uint8Array | null;
    while (!this.isClosed && (piece = src.next(1 << 18))) {
      let off = 0;
      while (off < piece.length) {
        if (this.isClosed) return;
        const w = this.socket.write(piece.subarray(off));
        off += Math.max(0, w);
        if (off < piece.length) {
          const { promise, resolve } = Promise.withResolvers<void>();
          this.drained = resolve;
          // Wake up on drain or on close, whichever comes first.
          await Promise.race([promise, this.closedP.promise]);
        }
      }
      o.onProgress?.(src.produced);
    }
    if (o.end !== false && !this.isClosed) this.socket.shutdown(); // FIN, and keep reading the reply
  }

  get isClosed(): boolean {
    return this.closedAt !== 0;
  }

  /** Resolves with ms from connect to close, or rejects after `ms`. */
  async closed(ms = 10000): Promise<number> {
    let t: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<number>((_, rej) => (t = setTimeout(() => rej(new Error(`socket still open after ${ms} ms`)), ms)));
    try {
      return await Promise.race([this.closedP.promise, timeout]);
    } finally {
      clearTimeout(t);
    }
  }

  destroy(): void {
    try {
      this.socket?.terminate();
    } catch {
      // already closed
    }
  }
}

// ---- data streams ----

const PATTERN_BLOCK = 1 << 20;
const PATTERN_STRIDE = 512;

/**
 * `total` bytes generated as a stream: one random 1 MiB block, repeated, with the block number XOR-ed into every
 * 512 bytes so no two blocks (and no two 512-byte pieces of different blocks) are equal. Hashes as it goes.
 */
export class PatternSource {
  readonly hash = createHash('sha256');
  produced = 0;
  /** `block`: reuse another source's block to regenerate the same stream (say, the prefix a receiver got). */
  constructor(
    readonly total: number,
    readonly block: Uint8Array = new Uint8Array(randomBytes(PATTERN_BLOCK)),
  ) {}

  /** The next piece (at most `max` bytes), or null at the end. Pieces are fresh arrays. */
  next(max = PATTERN_BLOCK): Uint8Array | null {
    if (this.produced >= this.total) return null;
    const blockNo = Math.floor(this.produced / PATTERN_BLOCK);
    const inBlock = this.produced % PATTERN_BLOCK;
    const n = Math.min(max, PATTERN_BLOCK - inBlock, this.total - this.produced);
    const out = this.block.slice(inBlock, inBlock + n);
    for (let p = Math.ceil(inBlock / PATTERN_STRIDE) * PATTERN_STRIDE; p + 4 <= inBlock + n; p += PATTERN_STRIDE) {
      const i = p - inBlock;
      out[i]! ^= blockNo & 0xff;
      out[i + 1]! ^= (blockNo >>> 8) & 0xff;
      out[i + 2]! ^= (blockNo >>> 16) & 0xff;
      out[i + 3]! ^= (blockNo >>> 24) & 0xff;
    }
    this.hash.update(out);
    this.produced += n;
    return out;
  }

  digest(): string {
    return this.hash.digest('hex');
  }
}

/** Counts and hashes bytes as they arrive. */
export class HashSink {
  private readonly hash = createHash('sha256');
  bytes = 0;
  update(b: Uint8Array): void {
    this.hash.update(b);
    this.bytes += b.length;
  }
  digest(): string {
    return this.hash.digest('hex');
  }
}

/** True when `out` is a prefix of `sent` (strict: and shorter). Compares bytes, not hashes. */
export function isPrefix(out: Uint8Array, sent: Uint8Array, strict = false): boolean {
  if (out.length > sent.length || (strict && out.length === sent.length)) return false;
  return Buffer.from(out.buffer, out.byteOffset, out.length).equals(Buffer.from(sent.buffer, sent.byteOffset, out.length));
}

/**
 * Write `data` into a process's stdin in 64 KiB pieces, then close it (unless `end` is false: then the process's
 * direction of the tunnel stays open). Unlike `feedStdin` it stops quietly when the process has gone away (a
 * tampered session ends while its peer is still writing).
 */
export async function feedQuietly(
  proc: Subprocess<any, any, any>,
  data: Uint8Array,
  o: { chunk?: number; onProgress?: (fed: number) => void; end?: boolean } = {},
): Promise<void> {
  const sink = proc.stdin as FileSink;
  const chunk = o.chunk ?? 1 << 16;
  try {
    for (let off = 0; off < data.length; off += chunk) {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      // A write that cannot complete at once returns a promise: await it, or its EPIPE becomes an unhandled
      // rejection that bun test pins on whichever test runs next.
      const w = sink.write(data.subarray(off, Math.min(off + chunk, data.length)));
      if (w instanceof Promise) await w;
      await sink.flush();
      o.onProgress?.(Math.min(off + chunk, data.length));
    }
    if (o.end !== false) await sink.end();
  } catch {
    // EPIPE: the reader is gone, which is what these tests provoke
  }
}
