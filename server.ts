/**
 * The listener side of every server mode that holds many sessions at once (forward, tun): accepts sockets,
 * enforces `--max-conns`, starts one Session per socket, logs each session's life in one line per event, and
 * shuts down gracefully on SIGINT/SIGTERM.
 */
import type { Socket, SocketListener } from 'bun';
import { type Address, formatAddress } from './address.ts';
import { EXIT_OK, type VpnError, VpnError as VpnErrorClass } from './errors.ts';
import { log } from './log.ts';
import { type Json, Session, type SessionApp, sessionHandler, type SessionOptions } from './session.ts';

export type SocketData = { session?: Session };

/** One line for the end of a session: a failed handshake (rate-limited per address), or the closed session's figures. */
export function logSessionEnd(session: Session, err: VpnError | null): void {
  const peer = session.peer;
  if (!session.opened && err) {
    const host = peer.replace(/:\d+$/, '');
    log.limited('error', `handshake failed|${host}|${err.code}`, `handshake failed ${peer}: ${err.message}`);
    return;
  }
  const secs = ((Date.now() - session.startedAt) / 1000).toFixed(1);
  const line = `session closed ${peer} after ${secs} s, ${session.bytesIn} bytes in, ${session.bytesOut} bytes out: ${err ? err.message : 'clean end'}`;
  if (err) log.limited('error', `session closed|${peer.replace(/:\d+$/, '')}|${err.code}`, line);
  else log.info(line);
}

/** What a mode supplies per accepted socket: the server's answer to the client's CONFIG, and the session's app. */
export interface ModeHooks {
  config(peer: Json, session: Session): Json | VpnError;
  app(session: Session): SessionApp;
}

export interface ServerOptions {
  listen: Address;
  /** open sockets (handshaking or in session) at most; more are refused */
  maxConns: number;
  /** how long a graceful shutdown waits for sessions to end */
  graceMs: number;
  /** share the port with sibling worker processes (SO_REUSEPORT) */
  reusePort?: boolean;
}

/** Listen with Bun, for TCP or a unix socket. Throws NETWORK with the reason when the address is unusable. */
export function listenOn<D>(addr: Address, data: D, socket: import('bun').SocketHandler<D>, reusePort = false): SocketListener<D> & { port?: number } {
  try {
    if (addr.kind === 'unix') return Bun.listen<D>({ unix: addr.path, allowHalfOpen: true, data, socket });
    return Bun.listen<D>({ hostname: addr.host, port: addr.port, allowHalfOpen: true, data, socket, ...(reusePort ? { reusePort: true } : {}) } as never);
  } catch (e) {
    throw new VpnErrorClass('NETWORK', `cannot listen on ${formatAddress(addr)} (${(e as Error).message})`);
  }
}

/** The address a listener really bound (port 0 resolved). */
export function boundAddress(addr: Address, listener: { port?: number }): Address {
  return addr.kind === 'unix' ? addr : { ...addr, port: listener.port ?? addr.port };
}

/**
 * Refuses sockets beyond a limit, warning once per burst (when the limit is first hit, and again only after
 * the count has dropped below it). Shared by the server and the `--local` listener.
 */
export class ConnLimiter {
  open = 0;
  private warned = false;
  constructor(
    readonly max: number,
    private readonly what: string,
  ) {}
  /** Count a new socket in; false (and a warning once per burst) when at the limit. */
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

export class TunnelServer {
  readonly sessions = new Set<Session>();
  private listener: (SocketListener<SocketData> & { port?: number }) | null = null;
  private limiter: ConnLimiter;
  private stopping = false;
  private readonly allEnded = Promise.withResolvers<void>();

  constructor(
    private readonly base: Omit<SessionOptions, 'role' | 'config'>,
    private readonly opts: ServerOptions,
    private readonly mode: ModeHooks,
  ) {
    this.limiter = new ConnLimiter(opts.maxConns, 'tunnel');
  }

  /** Start listening; prints the one `listening on HOST:PORT` line. Returns the bound address. */
  start(): Address {
    const self = this;
    this.listener = listenOn<SocketData>(this.opts.listen, {}, {
      ...sessionHandler,
      open(socket: Socket<SocketData>) {
        self.accept(socket);
      },
    }, this.opts.reusePort);
    const bound = boundAddress(this.opts.listen, this.listener);
    process.stderr.write(`listening on ${formatAddress(bound)}\n`);
    return bound;
  }

  private accept(socket: Socket<SocketData>): void {
    socket.data = {};
    const peer = socket.remoteAddress || 'unix';
    if (this.stopping || !this.limiter.admit(peer)) {
      socket.terminate();
      return;
    }
    let app: SessionApp | null = null;
    const session: Session = new Session(
      socket,
      { ...this.base, role: 'server', config: (peerCfg) => this.mode.config(peerCfg, session) },
      {
        onOpen: (s, cfg) => {
          log.info(`session opened ${s.peer} (protocol v${s.version})`);
          app!.onOpen(s, cfg);
        },
        onData: (p) => app!.onData(p),
        onPeerClose: () => app!.onPeerClose(),
        onWritable: () => app!.onWritable?.(),
        onEnd: (err) => {
          this.sessions.delete(session);
          this.limiter.release();
          logSessionEnd(session, err);
          app!.onEnd(err);
          if (this.stopping && this.sessions.size === 0) this.allEnded.resolve();
        },
      },
    );
    app = this.mode.app(session);
    socket.data.session = session;
    this.sessions.add(session);
  }

  /** Stop accepting, send CLOSE on every open session, drop handshakes; resolve when all ended or after the grace period. */
  async shutdown(): Promise<number> {
    if (this.stopping) return EXIT_OK;
    this.stopping = true;
    this.listener?.stop(false);
    log.info(`shutting down: closing ${this.sessions.size} session(s), waiting up to ${this.opts.graceMs / 1000} s`);
    for (const s of [...this.sessions]) {
      if (s.phase === 'open') s.close();
      else s.finish(new VpnErrorClass('NETWORK', 'server shutting down'));
    }
    if (this.sessions.size === 0) this.allEnded.resolve();
    const timer = setTimeout(() => this.allEnded.resolve(), this.opts.graceMs);
    await this.allEnded.promise;
    clearTimeout(timer);
    if (this.sessions.size > 0) log.warn(`grace period over: ${this.sessions.size} session(s) still open, exiting`);
    return EXIT_OK;
  }
}

/** Run `shutdown` on the first SIGINT or SIGTERM, then exit with its status; a second signal exits at once. */
export function exitOnSignals(shutdown: () => Promise<number>): void {
  let once = false;
  const handler = () => {
    if (once) process.exit(1);
    once = true;
    void shutdown().then((code) => process.exit(code));
  };
  process.on('SIGINT', handler);
  process.on('SIGTERM', handler);
}
