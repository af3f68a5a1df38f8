/**
 * Everything that touches Bun's sockets: `listen` and `dial` for TCP and unix sockets, and `Link`, the one adapter
 * between a Bun socket and what consumes it — a Session for a tunnel socket, a forward Bridge for a plain one.
 *
 * A Link gives its consumer two guarantees that Bun's raw handlers do not:
 *   inbound   one ordered queue of events (data, end, close). `pause()` holds back everything behind it: Bun may
 *             still deliver a read that was under way when `socket.pause()` was called, and the end or close that
 *             follows it; a paused Link keeps them, in order, and replays them on `resume()`. So a consumer never
 *             sees an event while paused, and never an end before the bytes that came first.
 *   outbound  a write queue with a high-water mark: what the socket does not take now is kept and flushed on
 *             `drain`; `write` returns false above the mark and `onDrain` follows once the queue is empty. Small
 *             writes made while one inbound event is handled are gathered into one socket write (`corked`), so
 *             many small records opened from one read become one write to the app, and many small records sealed
 *             in one go (TUN packets from one read) one write to the tunnel. `shutdown` and `end` wait for the
 *             queue, so a FIN never overtakes queued bytes.
 */
import type { Socket, SocketHandler, SocketListener } from 'bun';
import { lstatSync, readdirSync, readFileSync, unlinkSync } from 'node:fs';
import { type Address, formatAddress } from './address.ts';
import { VpnError } from './errors.ts';
import { log } from './log.ts';
import type { ProxyEndpoint } from './proxy.ts';

// ---- Tuning constants (not part of the protocol) ----
/** Above this many queued outbound bytes, `write` asks the source to pause; it resumes once the queue is empty. */
export const HIGH_WATER = 256 * 1024;
/** Writes of at most this many bytes made inside `corked` are gathered into one socket write. */
const GATHER_MAX_WRITE = 16 * 1024;
/** A gathered batch goes out as soon as it holds this much. */
const GATHER_BATCH = 64 * 1024;

// ---- write coalescing ----
let corkDepth = 0;
let gathering: WriteQueue[] = [];

/**
 * Run `fn` with small writes gathered: each WriteQueue written to inside `fn` sends what it gathered as one socket
 * write when the outermost `corked` returns. Every inbound event a Link delivers runs inside it.
 */
export function corked<T>(fn: () => T): T {
  corkDepth++;
  try {
    return fn();
  } finally {
    if (--corkDepth === 0) uncork();
  }
}

/** The list `gathering` is swapped with while its queues send (one allocation less per event on the data path). */
let spareGathering: WriteQueue[] = [];
let uncorking = false;

/** The outermost `corked` ended: every queue written to sends what it gathered. */
function uncork(): void {
  if (gathering.length === 0) return;
  const queues = gathering;
  const nested = uncorking; // a queue's onDrained may run a corked() of its own
  gathering = nested ? [] : spareGathering;
  uncorking = true;
  try {
    for (const q of queues) q.sendGathered(true);
  } finally {
    uncorking = nested;
    if (!nested) {
      queues.length = 0;
      spareGathering = queues;
    }
  }
}

/** The part of a Bun socket a WriteQueue writes to (tests give it a fake). */
export interface ByteSink {
  write(data: Uint8Array): number;
}

/**
 * A queue in front of a socket: what `write` did not take is kept and flushed on `drain`. Inside `corked`, small
 * writes are gathered instead and sent together; `onDrained` runs when sending them left nothing queued (there is no
 * `drain` event then, and someone may be waiting for `empty`).
 */
export class WriteQueue {
  private q: Uint8Array[] = [];
  private queuedBytes = 0;
  private gathered: Uint8Array[] = [];
  private gatheredBytes = 0;
  constructor(
    private readonly socket: ByteSink,
    private readonly onDrained?: () => void,
  ) {}

  /** Queue or write `data`; returns true while the queue is below the high-water mark. */
  write(data: Uint8Array): boolean {
    if (corkDepth > 0 && this.q.length === 0 && data.length <= GATHER_MAX_WRITE) {
      if (this.gathered.length === 0) gathering.push(this);
      this.gathered.push(data);
      this.gatheredBytes += data.length;
      if (this.gatheredBytes >= GATHER_BATCH) this.sendGathered(false);
      return this.queuedBytes + this.gatheredBytes < HIGH_WATER;
    }
    if (this.gathered.length > 0) this.sendGathered(false); // what was gathered goes first
    this.writeNow(data);
    return this.queuedBytes < HIGH_WATER;
  }

  private writeNow(data: Uint8Array): void {
    if (this.q.length > 0) {
      this.q.push(data);
      this.queuedBytes += data.length;
      return;
    }
    const n = this.socket.write(data);
    const w = n < 0 ? 0 : n;
    if (w < data.length) {
      const rest = data.subarray(w);
      this.q.push(rest);
      this.queuedBytes += rest.length;
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
    parts.length = 0; // its bytes are in `data` now
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
      this.queuedBytes -= w;
      if (w < head.length) {
        this.q[0] = head.subarray(w);
        return false;
      }
      this.q.shift();
    }
    return true;
  }

  /** Outbound bytes not yet taken by the socket (gathered ones included). */
  get queued(): number {
    return this.queuedBytes + this.gatheredBytes;
  }

  get empty(): boolean {
    return this.q.length === 0 && this.gathered.length === 0;
  }
}

/** A read at least this large ends this socket's turn (Link.yieldAfter). */
const YIELD_READ = 64 * 1024;
// ---- Link: one Bun socket, ordered inbound events, queued outbound bytes ----

/** What a Link delivers to its consumer, in order, never while paused. */
export interface LinkEvents {
  onData(chunk: Uint8Array): void;
  /** the outbound queue is empty again */
  onDrain(): void;
  /** the peer sent FIN: no more bytes will come (the socket may still be written to) */
  onEnd(): void;
  /** the socket is gone; `err` when it failed. Delivered once, last. */
  onClose(err?: Error): void;
}

type Inbound = { kind: 'data'; chunk: Uint8Array } | { kind: 'end' } | { kind: 'close'; err?: Error };

export type LinkData = { link?: Link };

export class Link {
  private events: LinkEvents | null = null;
  private readonly out: WriteQueue;
  private paused = false;
  private held: Inbound[] = [];
  private closed = false;
  /** after the queue drains: 'shutdown' sends FIN, 'end' closes */
  private afterFlush: 'shutdown' | 'end' | null = null;
  /** the peer's address as text, for logs; behind a trusted front (serve --accept-proxy), the one its header named */
  peer: string;
  /** serve --accept-proxy: the client's addresses as the front's PROXY header named them (proxy.ts); null: the socket's */
  origin: { source: ProxyEndpoint; destination: ProxyEndpoint | null } | null = null;

  constructor(readonly socket: Socket<LinkData>) {
    liveSockets++;
    socket.data = { link: this };
    this.out = new WriteQueue(socket, () => this.drained());
    this.peer = describePeer(socket);
    try {
      socket.setNoDelay(true);
    } catch {
      // unix sockets have no Nagle to turn off
    }
  }

  /** Start delivering events to `events` (events that came before are held until then). */
  attach(events: LinkEvents): void {
    this.events = events;
    if (!this.paused) this.replay();
  }

  // ---- outbound ----

  /** Queue or write `data`; false once the queue is above HIGH_WATER (onDrain follows when it is empty). */
  write(data: Uint8Array | string): boolean {
    if (this.closed || this.afterFlush) return false;
    return this.out.write(typeof data === 'string' ? new TextEncoder().encode(data) : data);
  }

  get queued(): number {
    return this.out.queued;
  }

  get empty(): boolean {
    return this.out.empty;
  }

  /** Half-close: FIN once every queued byte is out; reading goes on. */
  shutdown(): void {
    this.whenFlushed('shutdown');
  }

  /** Close once every queued byte is out (a clean end of a plain socket whose peer has finished sending). */
  end(): void {
    this.whenFlushed('end');
  }

  /** Close now; queued bytes are dropped. */
  close(): void {
    if (this.closed) return;
    try {
      this.socket.end();
    } catch {
      // already closed
    }
  }

  /** Reset now (RST): the peer sees an error, never a clean end. */
  abort(): void {
    if (this.closed) return;
    try {
      this.socket.terminate();
    } catch {
      // already closed
    }
  }

  private whenFlushed(what: 'shutdown' | 'end'): void {
    if (this.closed) return;
    if (this.afterFlush === 'end') return;
    this.afterFlush = what;
    this.out.sendGathered(false);
    if (this.out.empty) this.finishFlush();
  }

  private finishFlush(): void {
    const what = this.afterFlush;
    try {
      if (what === 'shutdown') this.socket.shutdown();
      else if (what === 'end') this.socket.end();
    } catch {
      // already closed
    }
  }

  private drained(): void {
    if (this.afterFlush) {
      this.finishFlush();
      return;
    }
    this.events?.onDrain();
  }

  // ---- inbound ----

  /** Stop delivering events until `resume`. */
  pause(): void {
    if (this.paused) return;
    this.paused = true;
    if (!this.closed) this.socket.pause();
  }

  resume(): void {
    if (!this.paused) return;
    this.paused = false;
    this.replay();
    if (!this.paused && !this.closed) this.socket.resume();
  }

  get isPaused(): boolean {
    return this.paused;
  }

  /** the socket is gone (its close may still be held behind a pause) */
  get isClosed(): boolean {
    return this.closed;
  }

  private replay(): void {
    while (this.held.length > 0 && !this.paused && this.events) this.dispatch(this.held.shift()!);
  }

  /** From Bun's handlers: deliver now, or hold behind a pause or earlier held events. */
  receive(ev: Inbound): void {
    if (ev.kind === 'close') {
      if (this.closed) return;
      this.closed = true;
      liveSockets--;
    }
    if (this.paused || !this.events || this.held.length > 0) {
      this.held.push(ev);
      if (ev.kind === 'data' && !this.closed) this.socket.pause(); // re-assert: Bun delivered a read under way
      return;
    }
    this.dispatch(ev);
  }

  /** Bun's `data`: `receive` without an event object when nothing is held (the common case, once per read). */
  receiveData(chunk: Uint8Array): void {
    if (this.paused || !this.events || this.held.length > 0) this.receive({ kind: 'data', chunk });
    else this.dispatchData(chunk);
  }

  /** As `corked(() => onData(chunk))`, without a closure per read. */
  private dispatchData(chunk: Uint8Array): void {
    corkDepth++;
    try {
      this.events!.onData(chunk);
    } finally {
      if (--corkDepth === 0) uncork();
    }
    this.yieldAfter(chunk.length);
  }

  private dispatch(ev: Inbound): void {
    const e = this.events!;
    if (ev.kind === 'data') this.dispatchData(ev.chunk);
    else if (ev.kind === 'end') corked(() => e.onEnd());
    else corked(() => e.onClose(ev.err));
  }

  private yielding = false;
  /**
   * After a large read, stop reading this socket until the event loop has gone round once: Bun reads a socket again
   * at once while its buffer came back full, so one peer that keeps its socket full (a flood of small frames, each
   * verified) would otherwise hold the loop for seconds, and every other session, timer and accept with it.
   */
  private yieldAfter(n: number): void {
    if (n < YIELD_READ || this.yielding || this.paused || this.closed) return;
    this.yielding = true;
    this.socket.pause();
    setImmediate(() => {
      this.yielding = false;
      if (!this.paused && !this.closed) this.socket.resume();
    });
  }

  /** Bun's `drain`. */
  flush(): void {
    if (this.out.flush()) this.drained();
  }
}

export function describePeer(socket: Socket<unknown>): string {
  const a = socket.remoteAddress;
  if (!a) return 'unix';
  return a.includes(':') ? `[${a}]:${socket.remotePort}` : `${a}:${socket.remotePort}`;
}

/** Bun socket handlers that route every event to the socket's Link; `open` is the caller's. */
function handler(open?: (link: Link) => void): SocketHandler<LinkData> {
  return {
    open(socket) {
      const link = new Link(socket);
      open?.(link);
    },
    data: (s, chunk) => s.data.link?.receiveData(chunk),
    drain: (s) => s.data.link?.flush(),
    end: (s) => s.data.link?.receive({ kind: 'end' }),
    close: (s, err) => s.data.link?.receive({ kind: 'close', err }),
    error: (s, err) => s.data.link?.receive({ kind: 'close', err }),
  };
}

// ---- listen ----

export interface Listener {
  /** the address really bound (port 0 resolved) */
  readonly address: Address;
  /** stop accepting; open connections go on */
  stop(): void;
}

// ---- descriptors: accept only while some are left ----

/** Links whose socket is open (accepted and dialled alike): one descriptor each. */
let liveSockets = 0;
/** How often a paused listener looks whether descriptors came back, and a running one re-counts what else is open. */
const FD_POLL_MS = 250;

/** The soft limit on open files (RLIMIT_NOFILE) from /proc/self/limits; Infinity when it cannot be read. */
function fdLimit(): number {
  try {
    const m = /^Max open files\s+(\d+|unlimited)/m.exec(readFileSync('/proc/self/limits', 'utf8'));
    return m && m[1] !== 'unlimited' ? Number(m[1]) : Infinity;
  } catch {
    return Infinity;
  }
}

/** Descriptors open in this process right now, or Infinity when even that cannot be found out (none left). */
function fdsInUse(): number {
  try {
    return readdirSync('/proc/self/fd').length - 1; // less the one readdir itself opened
  } catch (e) {
    return errCode(e) === 'EMFILE' || errCode(e) === 'ENFILE' ? Infinity : liveSockets;
  }
}

/**
 * Listen on a TCP or unix address; `onAccept` gets a Link per accepted socket (events held until it attaches).
 * A unix socket file left behind by a dead server (nothing accepts on it) is replaced; any other file is not.
 * Throws USAGE when the address cannot be used here (in use, not this machine's, permission), NETWORK otherwise.
 *
 * Descriptors: when accept fails for lack of them, Bun's listener neither reports it nor backs off — the pending
 * connection stays readable and the process spins at 100% CPU (measured with `ulimit -n 64`). So the listener never
 * gets there: it counts its own sockets on top of what else the process holds (re-counted every FD_POLL_MS), and
 * when fewer than a reserve (an eighth of the limit, 8 to 64) would be left it closes the listening socket, logs one
 * line, looks again every FD_POLL_MS, and listens again on the same address once twice the reserve is free.
 * Connections that arrive meanwhile are refused by the kernel (ECONNREFUSED), which a client sees at once.
 */
export async function listen(addr: Address, onAccept: (link: Link) => void, o: { reusePort?: boolean } = {}): Promise<Listener> {
  const limit = fdLimit();
  const reserve = Math.min(64, Math.max(8, Math.floor(limit / 8)));
  let others = 0; // descriptors that are not live sockets: stdio, the event loop, files, a TUN device
  const recount = () => {
    const n = fdsInUse();
    others = n === Infinity ? limit : Math.max(0, n - liveSockets);
  };
  let paused = false;
  let stopped = false;
  let poll: ReturnType<typeof setInterval> | null = null;
  const used = () => others + liveSockets;
  const socket = handler((link) => {
    onAccept(link);
    if (!paused && used() >= limit - reserve) pause();
  });
  const bind = (): SocketListener<LinkData> & { port?: number } => {
    if (addr.kind === 'unix') return Bun.listen<LinkData>({ unix: addr.path, allowHalfOpen: true, data: {}, socket });
    return Bun.listen<LinkData>({ hostname: addr.host, port, allowHalfOpen: true, data: {}, socket, ...(o.reusePort ? { reusePort: true } : {}) } as never);
  };
  let port = addr.kind === 'tcp' ? addr.port : 0;
  if (addr.kind === 'unix') await removeStaleUnixSocket(addr.path);
  let l: SocketListener<LinkData> & { port?: number };
  try {
    l = bind();
  } catch (e) {
    throw listenError(addr, e);
  }
  port = l.port ?? port; // port 0: listen again on the port first chosen
  const address: Address = addr.kind === 'unix' ? addr : { ...addr, port };
  const unlinkUnix = () => {
    if (addr.kind !== 'unix') return;
    try {
      unlinkSync(addr.path);
    } catch {
      // gone already
    }
  };
  function pause(): void {
    paused = true;
    poll?.ref?.(); // with no listening socket, this timer is what keeps the process alive
    l.stop(false);
    unlinkUnix();
    log.warn(`out of file descriptors (${used()} of ${limit} in use): not accepting connections until some close`);
  }
  function resume(): void {
    try {
      l = bind();
    } catch {
      return; // not yet (or the address was taken meanwhile): look again at the next poll
    }
    paused = false;
    poll?.unref?.();
    log.info(`file descriptors free again (${used()} of ${limit} in use): accepting connections`);
  }
  if (limit !== Infinity) {
    recount();
    poll = setInterval(() => {
      recount();
      if (paused && used() < limit - 2 * reserve) resume();
      else if (!paused && used() >= limit - reserve) pause();
    }, FD_POLL_MS);
    poll.unref?.();
  }
  return {
    address,
    stop() {
      if (stopped) return;
      stopped = true;
      if (poll) clearInterval(poll);
      if (!paused) l.stop(false);
      unlinkUnix();
    },
  };
}

/**
 * Bind `addr` once without serving, to check it or (port 0) to learn the port; `reusePort` lets workers share it.
 * Returns the port and a release function. Throws as `listen` does.
 */
export function claimPort(addr: Address & { kind: 'tcp' }, reusePort: boolean): { port: number; release: () => void } {
  const socket = { open: (s: { terminate(): void }) => s.terminate(), data() {} };
  try {
    const l = Bun.listen({ hostname: addr.host, port: addr.port, socket, ...(reusePort ? { reusePort: true } : {}) } as never) as { port: number; stop(force: boolean): void };
    let held = true;
    return {
      port: l.port,
      release: () => {
        if (held) l.stop(true);
        held = false;
      },
    };
  } catch (e) {
    throw listenError(addr, e);
  }
}

function errCode(e: unknown): string {
  const err = e as { code?: string; errno?: number; message?: string };
  if (typeof err.code === 'string' && err.code.startsWith('E')) return err.code;
  const m = /\b(E[A-Z]+)\b/.exec(err.message ?? '');
  return m?.[1] ?? '';
}

/** A listen failure as a sentence that names the cause. */
function listenError(addr: Address, e: unknown): VpnError {
  const where = formatAddress(addr);
  const code = errCode(e);
  const msg = (e as Error).message ?? String(e);
  if (code === 'EADDRINUSE' || /in use/i.test(msg)) {
    return new VpnError('USAGE', `cannot listen on ${where}: address already in use (another server is running there; stop it or choose another ${addr.kind === 'unix' ? 'path' : 'port'})`);
  }
  if (code === 'EACCES' || code === 'EPERM') {
    return new VpnError('USAGE', `cannot listen on ${where}: permission denied${addr.kind === 'tcp' && addr.port < 1024 ? ' (ports below 1024 need root)' : ''}`);
  }
  if (code === 'EADDRNOTAVAIL') return new VpnError('USAGE', `cannot listen on ${where}: not an address of this machine`);
  if (code === 'ENOENT' && addr.kind === 'unix') return new VpnError('USAGE', `cannot listen on ${where}: the directory does not exist`);
  if (code === 'ENAMETOOLONG' || (addr.kind === 'unix' && addr.path.length > 107)) return new VpnError('USAGE', `cannot listen on ${where}: the path is too long for a unix socket`);
  if (code === 'EMFILE' || code === 'ENFILE') return new VpnError('NETWORK', `cannot listen on ${where}: out of file descriptors`);
  if (addr.kind === 'tcp' && code === '') {
    // Bun names no errno when the host does not resolve to an address it can bind.
    return new VpnError('USAGE', `cannot listen on ${where}: not an address of this machine (${msg})`);
  }
  return new VpnError('NETWORK', `cannot listen on ${where} (${code || msg})`);
}

/** A unix socket file nobody accepts on is a leftover of a killed server: remove it. Anything else stays. */
async function removeStaleUnixSocket(path: string): Promise<void> {
  let st;
  try {
    st = lstatSync(path);
  } catch {
    return; // nothing there
  }
  if (!st.isSocket()) {
    throw new VpnError('USAGE', `cannot listen on unix:${path}: a file that is not a socket is in the way; remove it or choose another path`);
  }
  if (await unixSocketAnswers(path)) return; // in use: Bun.listen reports EADDRINUSE
  try {
    unlinkSync(path);
  } catch {
    // someone else removed it
  }
}

/** Whether something accepts connections on the unix socket at `path`. */
async function unixSocketAnswers(path: string): Promise<boolean> {
  try {
    const s = await Bun.connect({ unix: path, socket: { data() {}, open(sock) { sock.end(); } } });
    s.end();
    return true;
  } catch {
    return false; // ECONNREFUSED: a leftover
  }
}

// ---- dial ----

/**
 * Connect to a TCP or unix address; resolves with a Link (its events held until it attaches). Throws NETWORK with
 * the cause in words ("connection refused", "no such host").
 */
export async function dial(addr: Address): Promise<Link> {
  const { promise, resolve } = Promise.withResolvers<Link>();
  const socket = handler(resolve);
  try {
    if (addr.kind === 'unix') await Bun.connect<LinkData>({ unix: addr.path, allowHalfOpen: true, data: {}, socket });
    else await Bun.connect<LinkData>({ hostname: addr.host, port: addr.port, allowHalfOpen: true, data: {}, socket });
  } catch (e) {
    throw new VpnError('NETWORK', `cannot connect to ${formatAddress(addr)}: ${dialCause(e)}`);
  }
  return await promise;
}

function dialCause(e: unknown): string {
  const code = errCode(e);
  const causes: Record<string, string> = {
    ECONNREFUSED: 'connection refused (is the server running, and on that port?)',
    ENOENT: 'no such socket file (is the server running?)',
    ETIMEDOUT: 'timed out',
    EHOSTUNREACH: 'host unreachable',
    ENETUNREACH: 'network unreachable',
    ECONNRESET: 'connection reset',
    EACCES: 'permission denied',
    ENOTFOUND: 'no such host',
    EAI_NONAME: 'no such host',
  };
  if (causes[code]) return causes[code]!;
  const msg = (e as Error).message ?? String(e);
  if (/refused/i.test(msg)) return causes.ECONNREFUSED!;
  if (/DNS|getaddrinfo|resolve/i.test(msg)) return 'no such host';
  return code || msg;
}
