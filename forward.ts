/**
 * Port forwarding, like spiped or `ssh -L`:
 *
 *   app ──TCP── connect --local [HOST:]PORT ══tunnel══ serve --forward HOST:PORT ──TCP── target
 *
 * Every accepted local connection gets its own tunnel session; every authenticated session gets its own new
 * connection to the target (made only after the handshake verified the client, resolved per session).
 * Half-close is carried end to end (FIN → CLOSE → shutdown of the write side), backpressure too (a write side
 * above HIGH_WATER pauses the reading side), so memory per session stays bounded whatever the peers do.
 */
import type { Socket, SocketHandler } from 'bun';
import { type Address, formatAddress } from './address.ts';
import { EXIT_OK, VpnError } from './errors.ts';
import { log } from './log.ts';
import { ConnLimiter, boundAddress, exitOnSignals, listenOn, logSessionEnd, TunnelServer } from './server.ts';
import { HIGH_WATER, type Json, Session, type SessionApp, sessionHandler, type SessionOptions, WriteQueue } from './session.ts';

export type Base = Omit<SessionOptions, 'role' | 'config'>;

type TcpData = { bridge?: Bridge };

/** Per-session memory bound (README "Limits"): two queues at the high-water mark plus one read chunk each, plus one frame. */
export const SESSION_BUFFER_BOUND = 2 * (HIGH_WATER + 256 * 1024) + 65 * 1024;

/**
 * Joins one Session to one plain TCP socket (the local app on the client, the target on the server).
 * The TCP socket may arrive later than the session (the server connects to the target after the handshake);
 * until then tunnel data waits in the queue and the tunnel is paused.
 */
export class Bridge implements SessionApp {
  session: Session | null = null;
  tcp: Socket<TcpData> | null = null;
  private toTcp: WriteQueue | null = null;
  private pending: Uint8Array[] = [];
  private peerClosed = false;
  private tcpShut = false;
  private tcpReadDone = false;
  private ended = false;
  private tcpPaused = false;
  private endAfterFlush = false;
  private early: Uint8Array[] = [];
  /** called once when the session is over (after the TCP side is closed too) */
  onDone?: (err: VpnError | null) => void;
  /** the server side opens the target here; the client side already has its socket */
  onOpened?: (session: Session, peerConfig: Json) => void;

  attachTcp(tcp: Socket<TcpData>): void {
    this.tcp = tcp;
    tcp.data.bridge = this;
    try {
      tcp.setNoDelay(true);
    } catch {
      // unix sockets
    }
    this.toTcp = new WriteQueue(tcp, () => this.onTcpDrain());
    for (const p of this.pending) this.toTcp.write(p);
    this.pending = [];
    if (this.ended) {
      tcp.terminate();
      return;
    }
    if (this.peerClosed) this.shutTcp();
    this.session?.resumeInbound();
  }

  // ---- tunnel → TCP ----

  onOpen(session: Session, peerConfig: Json): void {
    this.session = session;
    this.onOpened?.(session, peerConfig);
    const early = this.early;
    this.early = [];
    for (const c of early) this.onTcpData(c);
    if (this.tcpReadDone) session.close(); // the app sent FIN before the tunnel was up
    else if (this.tcp && !this.tcpPaused) this.tcp.resume();
  }

  onData(payload: Uint8Array): void {
    if (this.tcpReadDone && this.tcpShut) return;
    if (!this.toTcp) {
      this.pending.push(payload);
      this.session?.pauseInbound();
      return;
    }
    if (!this.toTcp.write(payload)) this.session?.pauseInbound();
  }

  onPeerClose(): void {
    this.peerClosed = true;
    if (this.toTcp?.empty) this.shutTcp();
  }

  private shutTcp(): void {
    if (this.tcpShut || !this.tcp) return;
    this.tcpShut = true;
    try {
      // FIN to the app: the peer sends no more. Bun 1.4's shutdown() with no argument is shutdown(SHUT_WR) and
      // keeps reading; shutdown(true) also stops reading (tests/forward.test.ts checks the reply still arrives).
      this.tcp.shutdown();
    } catch {
      // already closed
    }
  }

  onTcpDrain(): void {
    if (!this.toTcp) return;
    if (this.toTcp.flush()) {
      if (this.endAfterFlush) {
        this.tcp?.end();
        return;
      }
      if (this.peerClosed) this.shutTcp();
      else this.session?.resumeInbound();
    }
  }

  // ---- TCP → tunnel ----

  onTcpData(chunk: Uint8Array): void {
    const s = this.session;
    if (!s) {
      // Read before the tunnel is open (the socket is paused, but reads under way still arrive): keep for onOpen.
      this.early.push(chunk);
      this.tcp?.pause();
      return;
    }
    if (s.phase !== 'open' || s.sentClose) return;
    if (!s.write(chunk) && !this.tcpPaused) {
      this.tcpPaused = true;
      this.tcp?.pause();
    }
  }

  onWritable(): void {
    if (this.tcpPaused) {
      this.tcpPaused = false;
      this.tcp?.resume();
    }
  }

  onTcpEnd(): void {
    this.tcpReadDone = true;
    this.session?.close(); // the app sent FIN: CLOSE our direction of the tunnel
  }

  onTcpClose(err?: Error): void {
    this.tcpReadDone = true;
    const s = this.session;
    if (this.ended) return;
    if (!s) {
      this.tcpShut = true; // the app left before the tunnel was up; onOpen sends CLOSE at once
      return;
    }
    if (err) {
      s.finish(new VpnError('NETWORK', `the TCP connection failed (${err.message})`));
      return;
    }
    // Closed for good: nothing more to read, nowhere to write. Close our direction and let the peer finish.
    this.tcpShut = true;
    s.close();
  }

  onEnd(err: VpnError | null): void {
    this.ended = true;
    const tcp = this.tcp;
    if (tcp) {
      try {
        // An error resets the app's connection so that a truncated stream never looks like a clean end.
        if (err) tcp.terminate();
        else if (this.toTcp && !this.toTcp.empty) this.endAfterFlush = true; // the last bytes are still queued
        else tcp.end();
      } catch {
        // already closed
      }
    }
    this.onDone?.(err);
  }
}

const tcpHandler: SocketHandler<TcpData> = {
  data: (s, chunk) => s.data.bridge?.onTcpData(chunk),
  drain: (s) => s.data.bridge?.onTcpDrain(),
  end: (s) => s.data.bridge?.onTcpEnd(),
  close: (s, err) => s.data.bridge?.onTcpClose(err),
  error: (s, err) => s.data.bridge?.onTcpClose(err),
};

/** Connect a plain TCP (or unix) socket; resolves with the socket or rejects with a NETWORK error. */
export async function connectTcp(addr: Address, data: TcpData, handler: SocketHandler<TcpData> = tcpHandler): Promise<Socket<TcpData>> {
  try {
    if (addr.kind === 'unix') return await Bun.connect<TcpData>({ unix: addr.path, allowHalfOpen: true, data, socket: handler });
    return await Bun.connect<TcpData>({ hostname: addr.host, port: addr.port, allowHalfOpen: true, data, socket: handler });
  } catch (e) {
    throw new VpnError('NETWORK', `cannot connect to ${formatAddress(addr)} (${(e as Error).message})`);
  }
}

/** PROXY protocol v1 header (haproxy's proxy-protocol.txt §2.1) describing the tunnel client's connection. */
export function proxyHeader(session: Session): string {
  const s = session.socket;
  const src = s.remoteAddress;
  const dst = s.localAddress;
  if (!src || !dst) return 'PROXY UNKNOWN\r\n';
  const v6 = src.includes(':');
  const strip = (a: string) => (v6 ? a : a.replace(/^::ffff:/, ''));
  return `PROXY ${v6 ? 'TCP6' : 'TCP4'} ${strip(src)} ${strip(dst)} ${s.remotePort} ${s.localPort}\r\n`;
}

export interface ForwardServerOptions {
  listen: Address;
  target: Address;
  maxConns: number;
  graceMs: number;
  proxyProtocol: boolean;
  reusePort?: boolean;
}

/** `serve --forward`: each authenticated session gets a fresh connection to the target. Resolves with the exit status. */
export async function serveForward(base: Base, o: ForwardServerOptions): Promise<number> {
  const server = new TunnelServer(base, { listen: o.listen, maxConns: o.maxConns, graceMs: o.graceMs, reusePort: o.reusePort }, {
    config: (peer) => {
      if (peer.mode !== 'forward' && peer.mode !== 'stdio') {
        return new VpnError('USAGE', `this server forwards to a TCP port; a "${String(peer.mode)}" client cannot use it`);
      }
      return { mode: 'forward' };
    },
    app: () => {
      const bridge = new Bridge();
      bridge.onOpened = (session) => {
        session.pauseInbound(); // until the target is connected
        connectTcp(o.target, {})
          .then((tcp) => {
            if (o.proxyProtocol) tcp.write(proxyHeader(session));
            bridge.attachTcp(tcp);
          })
          .catch((e: VpnError) => {
            log.limited('warn', `target|${formatAddress(o.target)}`, `target unreachable for ${session.peer}: ${e.message}`);
            session.finish(new VpnError('NETWORK', `target ${formatAddress(o.target)} unreachable`));
          });
      };
      return bridge;
    },
  });
  server.start();
  exitOnSignals(() => server.shutdown());
  return await new Promise<number>(() => {});
}

export interface LocalClientOptions {
  local: Address;
  server: Address;
  maxConns: number;
  graceMs: number;
}

/** `connect --local`: listen locally; each accepted connection gets its own tunnel session to the server. */
export async function connectLocal(base: Base, o: LocalClientOptions): Promise<number> {
  const limiter = new ConnLimiter(o.maxConns, 'local');
  const bridges = new Set<Bridge>();
  let stopping = false;
  const allEnded = Promise.withResolvers<void>();
  const listener = listenOn<TcpData>(o.local, {}, {
    ...tcpHandler,
    open(local: Socket<TcpData>) {
      local.data = {};
      const from = local.remoteAddress || 'unix';
      if (stopping || !limiter.admit(from)) {
        local.terminate();
        return;
      }
      local.pause(); // nothing is read until the tunnel is open
      const bridge = new Bridge();
      bridges.add(bridge);
      bridge.attachTcp(local);
      let session: Session | null = null;
      bridge.onDone = (err) => {
        bridges.delete(bridge);
        limiter.release();
        if (session) logSessionEnd(session, err);
        if (stopping && bridges.size === 0) allEnded.resolve();
      };
      const opened = bridge.onOpened;
      bridge.onOpened = (s, cfg) => {
        log.info(`session opened ${formatAddress(o.server)} for ${from} (protocol v${s.version})`);
        opened?.(s, cfg);
      };
      connectTcp(o.server, {}, sessionHandler as unknown as SocketHandler<TcpData>)
        .then((sock) => {
          const data = sock.data as unknown as { session?: Session };
          session = new Session(sock as unknown as Socket<{ session?: Session }>, { ...base, role: 'client', config: () => ({ mode: 'forward' }) }, bridge);
          data.session = session;
        })
        .catch((e: VpnError) => {
          log.limited('warn', `server|${formatAddress(o.server)}`, `closing local connection from ${from}: ${e.message}`);
          bridge.onEnd(e);
        });
    },
  });
  process.stderr.write(`listening on ${formatAddress(boundAddress(o.local, listener))}\n`);
  exitOnSignals(async () => {
    stopping = true;
    listener.stop(false);
    for (const b of bridges) {
      if (b.session?.phase === 'open') b.session.close();
      else b.session?.finish(new VpnError('NETWORK', 'shutting down'));
    }
    if (bridges.size === 0) allEnded.resolve();
    const t = setTimeout(() => allEnded.resolve(), o.graceMs);
    await allEnded.promise;
    clearTimeout(t);
    return EXIT_OK;
  });
  return await new Promise<number>(() => {});
}
