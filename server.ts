/**
 * The connection skeleton every mode runs on (spiped's accept loop and `proto_conn`, once):
 *
 *   serve        listen → admit (the pre-auth budget) → one server Session per socket → handshake → count it
 *                against --max-conns → the mode's CONFIG answer and app
 *   connectOne   dial → one client Session → the mode's app              (stdio and TUN clients)
 *   serveLocal   listen → admit → dial a client Session per local socket  (`connect --local`)
 *
 * and around each, the same life: the `listening on` line, one log line when a session opens and one when it
 * ends, and graceful shutdown as nginx, haproxy and sshd mean it — on the first SIGINT/SIGTERM stop accepting,
 * drop handshakes in progress, let open sessions run on for up to --grace seconds (a mode whose sessions carry no
 * stream, chat and TUN, sends CLOSE first), then *abort* what is left with a reset, never a clean end that would
 * make a cut stream look complete. Exit 0 when every session ended by itself, 1 when one had to be aborted. A second
 * signal aborts everything at once.
 */
import type { Address } from './address.ts';
import { formatAddress } from './address.ts';
import { asVpnError, EXIT_NETWORK, EXIT_OK, VpnError } from './errors.ts';
import { log } from './log.ts';
import { dial, type Link, listen } from './net.ts';
import { type Keyring, type KeyringEntry, KeyringFile } from './keyring.ts';
import { escapeText, type Json, Session, type SessionApp, type SessionBase } from './session.ts';
import { startOps } from './control.ts';
import { type DropReason, type LiveSession, ServerStats } from './metrics.ts';
import { ProxyAcceptor } from './proxy.ts';

/** What a mode supplies: its CONFIG, its app, and what its open sessions do when the process shuts down. */
export interface Mode {
  /** server: the answer to the client's CONFIG, or a refusal. client: the CONFIG to send (`peer` is {}). */
  config(peer: Json, session: Session): Json | VpnError;
  /** The application side of one session (`link` is its transport, for PROXY headers). */
  app(session: Session, link: Link): SessionApp;
  /** On shutdown: 'wait' lets an open session run to its own end (streams); 'close' sends CLOSE first. */
  readonly onShutdown: 'wait' | 'close';
  /** A line of its own when a session opened (the skeleton logs `session opened` first). */
  describe?(session: Session): string | undefined;
  /** client: check the server's CONFIG answer; a VpnError refuses it (§8: CLOSE with the reason, then the end). */
  accept?(answer: Json): VpnError | null;
}

/** A peer's `mode` field, quoted and made safe for a sentence. */
export function modeName(mode: unknown): string {
  return typeof mode === 'string' ? `"${escapeText(mode, 20)}"` : 'no mode';
}

/** The client side's onOpen: the mode checks the server's answer first, and refuses it cleanly if it cannot use it. */
function acceptAnswer(mode: { accept?(answer: Json): VpnError | null }, s: Session, cfg: Json, open: () => void): void {
  const bad = mode.accept?.(cfg);
  if (bad) s.refuse(bad);
  else open();
}

/** One line for the end of a session: a failed handshake (rate-limited per address), a refusal, or its figures. */
export function logSessionEnd(session: Session, err: VpnError | null, refused = false): void {
  const peer = who(session);
  const host = peer.replace(/:\d+$/, '');
  if (refused && err) {
    log.limited('warn', `refused|${host}|${err.code}`, `session refused ${peer}: ${err.message}`);
    return;
  }
  if (!session.opened && err) {
    log.limited('warn', `handshake failed|${host}|${err.code}`, `handshake failed ${peer}: ${err.message}`);
    return;
  }
  const secs = ((Date.now() - session.startedAt) / 1000).toFixed(1);
  const line = `session closed ${peer} after ${secs} s, ${session.bytesIn} bytes in, ${session.bytesOut} bytes out: ${err ? err.message : 'clean end'}`;
  if (err) log.limited('error', `session closed|${host}|${err.code}`, line);
  else log.info(line);
}

/** `alice 198.51.100.7:51234` for a keyring client, the address alone otherwise: how logs name a session's peer. */
export function who(session: Session): string {
  const name = session.clientName;
  return name === null ? session.peer : `${name} ${session.peer}`;
}

/** The keyring entry's `modes=` against the mode the client asked for (§8): a refusal, or null. */
function modeAllowed(session: Session, peer: Json): VpnError | null {
  const modes = (session.clientKey as KeyringEntry | null)?.modes;
  if (!modes) return null;
  const asked = typeof peer.mode === 'string' ? peer.mode : '';
  if (modes.includes(asked)) return null;
  return new VpnError('USAGE', `the key of ${session.clientName} may not be used for ${modeName(peer.mode)} here (its keyring entry allows ${modes.join(', ')})`);
}

/**
 * SIGHUP on a keyring server: read the keyring again. A bad file keeps the old keyring (logged with file and line);
 * otherwise every open session whose key was removed or changed ends at once — told why in an authenticated CLOSE —
 * and the others go on untouched.
 */
function watchKeyring(keys: KeyringFile, life: Lifecycle): () => void {
  const onHup = () => {
    let prev: Keyring;
    try {
      prev = keys.reload();
    } catch (e) {
      log.error(`keyring reload failed, keeping the keyring loaded before: ${asVpnError(e).message}`);
      return;
    }
    const next = keys.current;
    let ended = 0;
    for (const s of life.sessions()) {
      const name = s.clientName;
      if (name === null || prev.sameKey(name, next)) continue;
      const why = next.get(name) ? 'was replaced by a new key' : 'was removed from the keyring';
      log.warn(`session of ${name} (${s.peer}) ends: its key ${why} (SIGHUP)`);
      const err = new VpnError('AUTH_FAILED', `the server revoked this client key (the key of ${name} ${why})`);
      // Open and still sending: say why in a CLOSE. Otherwise (a handshake in progress, or our CLOSE already sent)
      // nothing more may be sent: reset.
      if (s.opened && s.sending) s.refuse(err);
      else s.abort(err);
      ended++;
    }
    log.info(`keyring ${keys.path} reloaded: ${next.size} client key${next.size === 1 ? '' : 's'}${ended ? `, ${ended} session(s) of removed keys ended` : ''}`);
  };
  process.on('SIGHUP', onHup);
  return () => process.off('SIGHUP', onHup);
}

/**
 * Refuses connections beyond a limit, warning once per burst (when the limit is first hit, and again only after
 * the count has dropped below it).
 */
export class ConnLimiter {
  open = 0;
  private warned = false;
  constructor(
    readonly max: number,
    private readonly what: string,
  ) {}
  get full(): boolean {
    return this.open >= this.max;
  }
  /** Warn, once per burst, that `peer` was refused because the limit is reached. */
  refuse(peer: string): void {
    if (this.warned) return;
    this.warned = true;
    log.warn(`connection limit reached (--max-conns ${this.max}): refusing new ${this.what} connections, first from ${peer}`);
  }
  /** Count a new connection in; false (and a warning once per burst) when at the limit. */
  admit(peer: string): boolean {
    if (this.full) {
      this.refuse(peer);
      return false;
    }
    this.open++;
    return true;
  }
  release(): void {
    this.open--;
    if (this.warned && this.open < this.max) {
      this.warned = false;
      log.info(`below the connection limit again (${this.open}/${this.max}): accepting ${this.what} connections`);
    }
  }
}

// ---- Tuning constants: the pre-auth budget (connections still in the handshake, apart from --max-conns) ----
/**
 * Handshakes in progress, all sources together. Each costs one descriptor and a few KiB; a good client needs a slot
 * for one round trip and a few ms of CPU. At the default 5 s handshake timeout, 512 slots hold 100 slow connections
 * a second without evicting any; beyond that the oldest is evicted, so a slot still lives 512/rate seconds (2.5 s
 * at 200/s, 50 ms at 10,000/s) — far longer than a good handshake.
 */
export const PREAUTH_MAX = 512;
/**
 * Handshakes in progress from one source (an IPv4 address, an IPv6 /64) that has not authenticated lately, and at
 * most --max-conns: a source cannot use more handshakes at once than sessions it could hold. 64 lets one machine
 * open a browser's worth of `connect --local` connections at once.
 */
export const PREAUTH_PER_SOURCE = 64;
/** New connections from a source that has not authenticated lately: a token bucket of 64, refilled at 32 a second. */
export const NEW_BURST = 64;
export const NEW_PER_SEC = 32;
/** A source whose client completed a handshake is "known" this long: no rate limit, and evicted last. */
const KNOWN_MS = 10 * 60_000;
/** Sources tracked at once (buckets and known sources alike); the oldest idle entry is dropped first. */
const SOURCES_MAX = 4096;

/** The source of a connection for the pre-auth budget: IPv4 address, IPv6 /64 prefix, or "unix" (local). */
export function sourceOf(link: Link): string {
  const a = link.origin?.source.address ?? link.socket.remoteAddress; // behind --accept-proxy: the real client's
  if (!a) return 'unix';
  const v4 = /^(?:::ffff:)?(\d+\.\d+\.\d+\.\d+)$/i.exec(a);
  if (v4) return v4[1]!;
  const parts = a.split('::');
  const head = parts[0]!.split(':').filter(Boolean);
  const tail = parts.length > 1 ? parts[1]!.split(':').filter(Boolean) : [];
  const groups = [...head, ...Array(Math.max(0, 8 - head.length - tail.length)).fill('0'), ...tail];
  return `${groups.slice(0, 4).map((g) => g.toLowerCase().replace(/^0+(?=.)/, '')).join(':')}::/64`;
}

/** One connection in the pre-auth table. */
interface PreAuthEntry {
  readonly source: string;
  readonly known: boolean;
  /** drop it to make room (the table is full) */
  evict(): void;
}

type SourceState = { inFlight: number; tokens: number; at: number; knownUntil: number };

/**
 * The pre-auth budget of a server: every accepted connection is counted here until its handshake and CONFIG are
 * done (then it counts against --max-conns instead) or it ends. Per source: at most min(PREAUTH_PER_SOURCE,
 * --max-conns) handshakes at once and NEW_PER_SEC new connections a second (burst NEW_BURST), unless the source
 * authenticated within KNOWN_MS. In total: at most PREAUTH_MAX; when full, the oldest handshake from a source that is
 * not known is evicted to make room (a known source's newcomer may evict a known one too), so a flood of
 * unauthenticated connections never keeps a good client out. Refusals and evictions are logged rate-limited.
 */
export class PreAuth {
  private readonly table = new Set<PreAuthEntry>();
  private readonly sources = new Map<string, SourceState>();
  /** why the last `admit` that returned null refused (for the drop counters) */
  lastRefusal: DropReason = 'preauth_full';
  constructor(
    private readonly maxConns: number,
    private readonly now: () => number = Date.now,
  ) {}

  get size(): number {
    return this.table.size;
  }

  /** Admit a new connection from `source`: its entry, or null (and a log line, rate-limited) when refused. */
  admit(source: string, peer: string, evict: () => void): PreAuthEntry | null {
    const now = this.now();
    const st = this.source(source, now);
    const known = source === 'unix' || st.knownUntil > now;
    if (!known) {
      st.tokens = Math.min(NEW_BURST, st.tokens + ((now - st.at) * NEW_PER_SEC) / 1000);
      st.at = now;
      if (st.tokens < 1) {
        this.lastRefusal = 'preauth_rate';
        log.limited('warn', `preauth rate|${source}`, `refusing ${peer}: more than ${NEW_PER_SEC} new connections a second from ${source}, which has not authenticated lately`);
        return null;
      }
      const cap = Math.min(PREAUTH_PER_SOURCE, this.maxConns);
      if (st.inFlight >= cap) {
        this.lastRefusal = 'preauth_source';
        log.limited(
          'warn',
          `preauth source|${source}`,
          cap === this.maxConns
            ? `connection limit reached (--max-conns ${cap}) for handshakes from ${source}: refusing ${peer} until one of them completes`
            : `handshake limit reached for ${source} (${cap} in progress from one address): refusing ${peer} until one of them completes`,
        );
        return null;
      }
      st.tokens--;
    }
    if (this.table.size >= PREAUTH_MAX) {
      const victim = this.victim(known);
      if (!victim) {
        this.lastRefusal = 'preauth_full';
        log.limited('warn', 'preauth full', `handshake table full (${PREAUTH_MAX} in progress): refusing ${peer}`);
        return null;
      }
      log.limited('warn', 'preauth full', `handshake table full (${PREAUTH_MAX} in progress): dropping the oldest, from ${victim.source}, to make room for ${peer}`);
      this.release(victim);
      victim.evict();
    }
    const entry: PreAuthEntry = { source, known, evict };
    this.table.add(entry);
    st.inFlight++;
    return entry;
  }

  /** The connection's handshake is over (it authenticated, or it ended). Idempotent. */
  release(entry: PreAuthEntry | null): void {
    if (!entry || !this.table.delete(entry)) return;
    const st = this.sources.get(entry.source);
    if (st) st.inFlight--;
  }

  /** A client from `source` completed its handshake: known for KNOWN_MS. */
  authenticated(source: string): void {
    const st = this.source(source, this.now());
    st.knownUntil = this.now() + KNOWN_MS;
    this.sources.delete(source); // re-inserted last: the most recently used entry is the last to be dropped
    this.sources.set(source, st);
  }

  /** The oldest entry from a source that is not known; for a known newcomer, else the oldest of all. */
  private victim(newcomerKnown: boolean): PreAuthEntry | null {
    let oldest: PreAuthEntry | null = null;
    for (const e of this.table) {
      if (!e.known) return e;
      oldest ??= e;
    }
    return newcomerKnown ? oldest : null;
  }

  private source(source: string, now: number): SourceState {
    let st = this.sources.get(source);
    if (st) return st;
    if (this.sources.size >= SOURCES_MAX) {
      for (const [k, v] of this.sources) {
        if (v.inFlight === 0 && (v.knownUntil < now || this.sources.size >= SOURCES_MAX)) {
          this.sources.delete(k);
          if (this.sources.size < SOURCES_MAX) break;
        }
      }
    }
    st = { inFlight: 0, tokens: NEW_BURST, at: now, knownUntil: 0 };
    this.sources.set(source, st);
    return st;
  }
}

/** What the skeleton tracks per connection: its session, once there is one, and how to end it at once. */
interface Conn {
  readonly session: Session | null;
  abort(err: VpnError): void;
}

/** The live connections of a process and its graceful shutdown. */
class Lifecycle {
  private readonly conns = new Set<Conn>();
  private state: 'running' | 'stopping' | 'aborting' = 'running';
  /** made when shutdown begins; resolved once the last connection is gone (or by the grace timer) */
  private allGone: PromiseWithResolvers<void> | null = null;
  private readonly signalled = Promise.withResolvers<string>();
  private removeHandlers: () => void = () => {};

  constructor(
    private readonly graceMs: number,
    private readonly onShutdown: 'wait' | 'close',
  ) {}

  get stopping(): boolean {
    return this.state !== 'running';
  }

  get size(): number {
    return this.conns.size;
  }

  add(c: Conn): void {
    this.conns.add(c);
  }

  /** The sessions of the live connections. */
  sessions(): Session[] {
    return [...this.conns].map((c) => c.session).filter((s): s is Session => s !== null);
  }

  remove(c: Conn): void {
    this.conns.delete(c);
    if (this.conns.size === 0) this.allGone?.resolve();
  }

  /** Resolves with the signal's name on the first SIGINT/SIGTERM; a second one aborts everything at once. */
  watchSignals(): Promise<string> {
    const h = (sig: NodeJS.Signals) => {
      if (this.state === 'running') this.signalled.resolve(sig);
      else this.abortAll(`a second ${sig}`);
    };
    process.on('SIGINT', h);
    process.on('SIGTERM', h);
    this.removeHandlers = () => {
      process.off('SIGINT', h);
      process.off('SIGTERM', h);
    };
    return this.signalled.promise;
  }

  unwatchSignals(): void {
    this.removeHandlers();
  }

  /**
   * Graceful shutdown: handshakes in progress are dropped, open sessions run on (or get CLOSE, per the mode) for
   * up to the grace period, then what is left is aborted. Resolves true when every session ended by itself.
   */
  async shutdown(why: string): Promise<boolean> {
    if (this.state === 'running') this.state = 'stopping';
    const allGone = (this.allGone = Promise.withResolvers<void>());
    const open = [...this.conns].filter((c) => c.session?.opened);
    log.info(`shutting down (${why}): ${open.length} session(s) open, waiting up to ${this.graceMs / 1000} s for them to end`);
    for (const c of [...this.conns]) {
      if (!c.session?.opened) c.abort(new VpnError('NETWORK', 'shutting down'));
      else if (this.onShutdown === 'close') c.session.close();
    }
    if (this.conns.size === 0) return true;
    const timer = setTimeout(() => allGone.resolve(), this.graceMs);
    await allGone.promise;
    clearTimeout(timer);
    if (this.conns.size === 0) return this.state !== 'aborting';
    this.abortAll(`the grace period (--grace ${this.graceMs / 1000}) is over`);
    return false;
  }

  /** Abort every connection now with a reset. */
  abortAll(why: string): void {
    if (this.conns.size > 0) log.warn(`${why}: aborting ${this.conns.size} session(s)`);
    this.state = 'aborting';
    for (const c of [...this.conns]) c.abort(new VpnError('NETWORK', `aborted: ${why} and the session was still open`));
    this.allGone?.resolve();
  }
}

export interface ServeOptions {
  listen: Address;
  /** open sessions at most; more are refused (handshakes in progress have their own budget: PreAuth) */
  maxConns: number;
  /** how long a graceful shutdown lets open sessions run */
  graceMs: number;
  /** share the port with sibling worker processes (SO_REUSEPORT) */
  reusePort?: boolean;
  /** exit after the first authenticated session that was not refused, with its exit status */
  once?: boolean;
  /** before exiting (stdio: until stdout has drained) */
  beforeExit?: () => Promise<void>;
  /** the control socket for `status` (control.ts): a path, null for none, undefined for the default path */
  control?: string | null;
  /** serve --workers: this worker's number, which its control socket's name carries (control.ts workerPath) */
  controlWorker?: number;
  /** serve the counters in the Prometheus format on this address (metrics.ts) */
  metrics?: { host: string; port: number };
  /** every connection opens with a PROXY protocol header from a trusted front (proxy.ts); its address counts */
  acceptProxy?: boolean;
}

/**
 * Accept tunnels: one server Session per socket, the mode's CONFIG answer and app on each. Runs until a signal
 * (or, with `once`, the first session's end); resolves with the exit status. Throws when it cannot listen.
 */
export async function serve(base: SessionBase, o: ServeOptions, mode: Mode): Promise<number> {
  const limiter = new ConnLimiter(o.maxConns, 'tunnel');
  const preauth = new PreAuth(o.maxConns);
  const life = new Lifecycle(o.graceMs, mode.onShutdown);
  const first = Promise.withResolvers<number>();
  const signal = life.watchSignals(); // before the `listening on` line: whoever reads it may signal at once
  const unwatchKeyring = base.keys instanceof KeyringFile ? watchKeyring(base.keys, life) : () => {};
  const stats = new ServerStats(); // counters for status and --metrics (metrics.ts)
  // `early`: with --accept-proxy, the bytes that came right after the PROXY header (the tunnel's first).
  const accept = (link: Link, early?: Uint8Array) => {
    // Sessions full: nobody can get in, so no handshake is worth its CPU. Else the pre-auth budget decides.
    if (life.stopping || limiter.full) {
      if (!life.stopping) {
        limiter.refuse(link.peer);
        stats.drop('max_conns');
      }
      link.abort();
      return;
    }
    const source = sourceOf(link);
    const pre = preauth.admit(source, link.peer, () => {
      stats.drop('preauth_evicted');
      session.abort(new VpnError('NETWORK', 'handshake dropped to make room: too many handshakes in progress'));
    });
    if (!pre) {
      stats.drop(preauth.lastRefusal);
      link.abort();
      return;
    }
    let app: SessionApp | null = null;
    let refused = false;
    let counted = false;
    // The handshake verified and the client's CONFIG came: from here it counts against --max-conns, not pre-auth.
    const config = (peer: Json) => {
      preauth.release(pre);
      preauth.authenticated(source);
      stats.handshake('ok');
      if (!limiter.admit(link.peer)) {
        refused = true;
        stats.drop('max_conns');
        return new VpnError('NETWORK', `connection limit reached (--max-conns ${limiter.max}); try again later`);
      }
      counted = true;
      const notHere = modeAllowed(session, peer);
      if (notHere) {
        refused = true;
        stats.drop('refused');
        return notHere;
      }
      const answer = mode.config(peer, session);
      if (answer instanceof VpnError) {
        refused = true;
        stats.drop('refused');
      } else entry.mode = typeof answer.mode === 'string' ? answer.mode : typeof peer.mode === 'string' ? peer.mode : null;
      return answer;
    };
    const conn: Conn = { session: null, abort: (err) => session.abort(err) };
    const onRecord = (out: boolean, type: number, n: number) => stats.record(entry, out, type, n);
    const session: Session = new Session(link, { ...base, role: 'server', config, onRecord }, {
      onOpen: (s, cfg) => {
        stats.sessionsTotal++;
        log.info(`session opened ${who(s)} (protocol v${s.version})`);
        const line = mode.describe?.(s);
        if (line) log.info(line);
        app!.onOpen(s, cfg);
      },
      onData: (p) => app!.onData(p),
      onPeerClose: () => app!.onPeerClose(),
      onWritable: () => app!.onWritable?.(),
      onEnd: (err) => {
        preauth.release(pre);
        if (counted) limiter.release();
        stats.live.delete(entry);
        if (err && !session.authenticated) stats.handshake(err.code);
        else if (err && !refused) stats.drop(err.code); // a refusal was counted when it was made
        logSessionEnd(session, err, refused);
        app!.onEnd(err);
        life.remove(conn);
        if (o.once && session.authenticated && !refused) first.resolve(err ? err.exitStatus : EXIT_OK);
      },
    });
    const entry: LiveSession = { session, mode: null, lastRecordAt: 0 };
    stats.live.add(entry);
    (conn as { session: Session | null }).session = session;
    app = mode.app(session, link);
    life.add(conn);
    link.attach(session);
    session.start();
    if (early && early.length > 0) session.onData(early);
  };
  // --accept-proxy: a connection's PROXY header first (within the handshake timeout), then `accept` as its client.
  const proxied = o.acceptProxy
    ? new ProxyAcceptor(base.handshakeTimeoutMs, accept, (link, why) => {
        stats.drop('proxy_header');
        log.limited('warn', `proxy header|${link.peer.replace(/:\d+$/, '')}`, `dropping connection from ${link.peer}: ${why} (--accept-proxy: every connection must come through the load balancer, with a PROXY protocol header)`);
      })
    : null;
  stats.inProgress = () => preauth.size + (proxied?.waiting ?? 0);
  const listener = await listen(o.listen, (link) => (proxied ? proxied.accept(link) : accept(link)), { reusePort: o.reusePort });
  stats.info = {
    listeners: [formatAddress(listener.address)],
    control: null,
    metrics: null,
    limits: { max_conns: o.maxConns, handshake_timeout_s: base.handshakeTimeoutMs / 1000, keepalive_s: base.keepaliveMs / 1000, grace_s: o.graceMs / 1000, preauth_max: PREAUTH_MAX, preauth_per_source: Math.min(PREAUTH_PER_SOURCE, o.maxConns), accept_proxy: o.acceptProxy === true },
  };
  let stopOps: () => void;
  try {
    stopOps = await startOps(stats, listener.address, o); // before the `listening on` line: status works once it is out
  } catch (e) {
    listener.stop();
    life.unwatchSignals();
    unwatchKeyring();
    throw e;
  }
  process.stderr.write(`listening on ${formatAddress(listener.address)}\n`);
  const status = await Promise.race([first.promise, signal.then(async (sig) => {
    listener.stop();
    return (await life.shutdown(sig)) ? EXIT_OK : EXIT_NETWORK;
  })]);
  listener.stop();
  stopOps();
  life.unwatchSignals();
  unwatchKeyring();
  await o.beforeExit?.();
  return status;
}

export interface ConnectOptions {
  /** before exiting (stdio: until stdout has drained) */
  beforeExit?: () => Promise<void>;
  /**
   * TUN: after an end that is not final — a lost connection, a server that stopped or restarted, a dead peer — dial
   * again with exponential backoff plus jitter, keeping the mode's state (the interface, its addresses and routes).
   * A verified refusal, a failed handshake message or a signal still end the run.
   */
  reconnect?: boolean;
  /**
   * TUN: sessions carry packets, not a stream. An end the user did not ask for is then a lost server, not a clean
   * end (exit 1, so that a service manager restarts the client) and not a possibly incomplete stream.
   */
  packets?: boolean;
}

/** How a packet VPN's session end reads: no "data may be incomplete" for a server that went away. */
function packetEnd(err: VpnError | null): VpnError {
  if (!err) return new VpnError('NETWORK', 'the server closed the tunnel (it stopped or is restarting)');
  if (err.code === 'TRUNCATED') return new VpnError('NETWORK', `the connection to the server was lost (${err.message})`);
  return err;
}

/** Reconnect backoff: 1 s, doubling to RECONNECT_MAX_MS, each ±25 % jitter; back to the start after a session opened. */
const RECONNECT_FIRST_MS = 1000;
export const RECONNECT_MAX_MS = 30_000;

function backoff(attempt: number): number {
  const base = Math.min(RECONNECT_MAX_MS, RECONNECT_FIRST_MS * 2 ** attempt);
  return Math.round(base * (0.75 + Math.random() * 0.5));
}

/**
 * Dial `target` and run one client Session with the mode's app until it ends (with `reconnect`, one after another).
 * On SIGINT/SIGTERM the session is shut down as a server's would be (`graceMs`). Resolves with the exit status; throws
 * NETWORK when it cannot dial (without `reconnect`).
 */
export async function connectOne(base: SessionBase, target: Address, graceMs: number, mode: Mode, o: ConnectOptions = {}): Promise<number> {
  const life = new Lifecycle(graceMs, mode.onShutdown);
  const signal = life.watchSignals();
  const stopped = signal.then((sig) => life.shutdown(sig)); // whatever it aborted ends its session with an error
  const where = formatAddress(target);
  try {
    for (let attempt = 0; ; attempt++) {
      let err: VpnError | null;
      let opened = false;
      try {
        const r = await runClientSession(base, target, mode, life);
        err = r.err;
        opened = r.opened;
      } catch (e) {
        if (!o.reconnect || life.stopping) throw e;
        err = asVpnError(e); // could not dial: the server is down or restarting
      }
      if (life.stopping) {
        await o.beforeExit?.();
        if (!err) return EXIT_OK;
        log.error(`vpn: ${where}: ${opened ? err.message : 'interrupted before the session was up'}`);
        return EXIT_NETWORK;
      }
      const final = err?.final === true || err?.code === 'USAGE';
      if (!o.reconnect || final) {
        await o.beforeExit?.();
        const why = o.packets ? packetEnd(err) : err;
        if (!why) return EXIT_OK;
        log.error(`vpn: ${where}: ${why.sentence}`);
        return why.exitStatus;
      }
      if (opened) attempt = 0;
      const delay = backoff(attempt);
      log.warn(`${packetEnd(err).message}; reconnecting to ${where} in ${(delay / 1000).toFixed(1)} s`);
      await Promise.race([Bun.sleep(delay), stopped]);
      if (life.stopping) {
        await stopped;
        return EXIT_OK;
      }
    }
  } finally {
    life.unwatchSignals();
  }
}

/** One client session to its end: dial, run, resolve with how it ended. Throws NETWORK when it cannot dial. */
async function runClientSession(base: SessionBase, target: Address, mode: Mode, life: Lifecycle): Promise<{ err: VpnError | null; opened: boolean }> {
  const link = await dial(target);
  const ended = Promise.withResolvers<VpnError | null>();
  let app: SessionApp | null = null;
  const session: Session = new Session(link, { ...base, role: 'client', config: (peer) => mode.config(peer, session) }, {
    onOpen: (s, cfg) => acceptAnswer(mode, s, cfg, () => app!.onOpen(s, cfg)),
    onData: (p) => app!.onData(p),
    onPeerClose: () => app!.onPeerClose(),
    onWritable: () => app!.onWritable?.(),
    onEnd: (err) => {
      app!.onEnd(err);
      life.remove(conn);
      ended.resolve(err);
    },
  });
  const conn: Conn = { session, abort: (err) => session.abort(err) };
  app = mode.app(session, link);
  life.add(conn);
  link.attach(session);
  session.start();
  const err = await ended.promise;
  return { err, opened: session.opened };
}

export interface LocalOptions {
  local: Address;
  server: Address;
  maxConns: number;
  graceMs: number;
}

/** What `serveLocal` needs of a mode: a session's app for one accepted local socket. */
export interface LocalMode {
  /** The app joining `local` to its session; `done` must run once when both sides are over. */
  bridge(local: Link, done: (err: VpnError | null) => void): SessionApp;
  config(): Json;
  accept?(answer: Json): VpnError | null;
}

/**
 * `connect --local`: listen locally; every accepted connection gets its own client Session to the server (dialled
 * then, so a server restart costs only the connections open at the time). Runs until a signal.
 */
export async function serveLocal(base: SessionBase, o: LocalOptions, mode: LocalMode): Promise<number> {
  const limiter = new ConnLimiter(o.maxConns, 'local');
  const life = new Lifecycle(o.graceMs, 'wait');
  const signal = life.watchSignals();
  const server = formatAddress(o.server);
  const listener = await listen(o.local, (local) => {
    const from = local.peer;
    if (life.stopping || !limiter.admit(from)) {
      local.abort();
      return;
    }
    local.pause(); // nothing is read until the tunnel is open
    let session: Session | null = null;
    const conn: Conn = {
      get session() {
        return session;
      },
      abort: (err) => (session ? session.abort(err) : local.abort()),
    };
    life.add(conn);
    let finished = false;
    const done = (err: VpnError | null) => {
      if (finished) return;
      finished = true;
      limiter.release();
      if (session) logSessionEnd(session, err);
      life.remove(conn);
    };
    const app = mode.bridge(local, done);
    dial(o.server).then(
      (link) => {
        if (life.stopping) {
          link.abort();
          local.abort();
          done(new VpnError('NETWORK', 'shutting down'));
          return;
        }
        session = new Session(link, { ...base, role: 'client', config: () => mode.config() }, {
          ...app,
          onOpen: (s, cfg) =>
            acceptAnswer(mode, s, cfg, () => {
              log.info(`session opened ${server} for ${from} (protocol v${s.version})`);
              app.onOpen(s, cfg);
            }),
          onData: (p) => app.onData(p),
          onPeerClose: () => app.onPeerClose(),
          onWritable: () => app.onWritable?.(),
          onEnd: (err) => app.onEnd(err),
        });
        link.attach(session);
        session.start();
      },
      (e: VpnError) => {
        log.limited('warn', `server|${server}`, `closing local connection from ${from}: ${e.message}`);
        local.abort();
        done(e);
      },
    );
  });
  process.stderr.write(`listening on ${formatAddress(listener.address)}\n`);
  const sig = await signal;
  listener.stop();
  const graceful = await life.shutdown(sig);
  life.unwatchSignals();
  return graceful ? EXIT_OK : EXIT_NETWORK;
}
