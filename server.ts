/**
 * The connection skeleton every mode runs on (spiped's accept loop and `proto_conn`, once):
 *
 *   serve        listen → admit (--max-conns) → one server Session per socket → the mode's CONFIG answer and app
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
import { EXIT_NETWORK, EXIT_OK, VpnError } from './errors.ts';
import { log } from './log.ts';
import { dial, type Link, listen } from './net.ts';
import { escapeText, type Json, Session, type SessionApp, type SessionBase } from './session.ts';

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
  const peer = session.peer;
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
  /** Count a new connection in; false (and a warning once per burst) when at the limit. */
  admit(peer: string): boolean {
    if (this.open >= this.max) {
      if (!this.warned) {
        this.warned = true;
        log.warn(`connection limit reached (--max-conns ${this.max}): refusing new ${this.what} connections, first from ${peer}`);
      }
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
  /** connections (handshaking or in session) at most; more are refused */
  maxConns: number;
  /** how long a graceful shutdown lets open sessions run */
  graceMs: number;
  /** share the port with sibling worker processes (SO_REUSEPORT) */
  reusePort?: boolean;
  /** exit after the first authenticated session that was not refused, with its exit status */
  once?: boolean;
  /** before exiting (stdio: until stdout has drained) */
  beforeExit?: () => Promise<void>;
}

/**
 * Accept tunnels: one server Session per socket, the mode's CONFIG answer and app on each. Runs until a signal
 * (or, with `once`, the first session's end); resolves with the exit status. Throws when it cannot listen.
 */
export async function serve(base: SessionBase, o: ServeOptions, mode: Mode): Promise<number> {
  const limiter = new ConnLimiter(o.maxConns, 'tunnel');
  const life = new Lifecycle(o.graceMs, mode.onShutdown);
  const first = Promise.withResolvers<number>();
  const signal = life.watchSignals(); // before the `listening on` line: whoever reads it may signal at once
  const listener = await listen(
    o.listen,
    (link) => {
      if (life.stopping || !limiter.admit(link.peer)) {
        link.abort();
        return;
      }
      let app: SessionApp | null = null;
      let refused = false;
      const config = (peer: Json) => {
        const answer = mode.config(peer, session);
        if (answer instanceof VpnError) refused = true;
        return answer;
      };
      const conn: Conn = { session: null, abort: (err) => session.abort(err) };
      const session: Session = new Session(link, { ...base, role: 'server', config }, {
        onOpen: (s, cfg) => {
          log.info(`session opened ${s.peer} (protocol v${s.version})`);
          const line = mode.describe?.(s);
          if (line) log.info(line);
          app!.onOpen(s, cfg);
        },
        onData: (p) => app!.onData(p),
        onPeerClose: () => app!.onPeerClose(),
        onWritable: () => app!.onWritable?.(),
        onEnd: (err) => {
          limiter.release();
          logSessionEnd(session, err, refused);
          app!.onEnd(err);
          life.remove(conn);
          if (o.once && session.authenticated && !refused) first.resolve(err ? err.exitStatus : EXIT_OK);
        },
      });
      (conn as { session: Session | null }).session = session;
      app = mode.app(session, link);
      life.add(conn);
      link.attach(session);
      session.start();
    },
    { reusePort: o.reusePort },
  );
  process.stderr.write(`listening on ${formatAddress(listener.address)}\n`);
  const status = await Promise.race([first.promise, signal.then(async (sig) => {
    listener.stop();
    return (await life.shutdown(sig)) ? EXIT_OK : EXIT_NETWORK;
  })]);
  listener.stop();
  life.unwatchSignals();
  await o.beforeExit?.();
  return status;
}

/**
 * Dial `target` and run one client Session with the mode's app until it ends. On SIGINT/SIGTERM the session is
 * shut down as a server's would be (`graceMs`). Resolves with the exit status; throws NETWORK when it cannot dial.
 */
export async function connectOne(base: SessionBase, target: Address, graceMs: number, mode: Mode, beforeExit?: () => Promise<void>): Promise<number> {
  const life = new Lifecycle(graceMs, mode.onShutdown);
  const signal = life.watchSignals();
  try {
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
    let graceful = true;
    void signal.then(async (sig) => {
      graceful = await life.shutdown(sig);
    });
    const err = await ended.promise;
    await beforeExit?.();
    if (!err) return EXIT_OK;
    if (!graceful || life.stopping) {
      log.error(`vpn: ${formatAddress(target)}: ${session.opened ? err.message : 'interrupted before the session was up'}`);
      return EXIT_NETWORK;
    }
    log.error(`vpn: ${formatAddress(target)}: ${err.sentence}`);
    return err.exitStatus;
  } finally {
    life.unwatchSignals();
  }
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
