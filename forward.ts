/**
 * Port forwarding, like spiped or `ssh -L`:
 *
 *   app ──TCP── connect --local [HOST:]PORT ══tunnel══ serve --forward HOST:PORT ──TCP── target
 *
 * Every accepted local connection gets its own tunnel session; every authenticated session gets its own new
 * connection to the target (made only after the handshake verified the client, resolved per session).
 * Half-close is carried end to end (FIN → CLOSE → FIN), backpressure too (a write side above HIGH_WATER pauses
 * the reading side), so memory per session stays bounded whatever the peers do. An error resets the app's
 * connection, so a cut stream never looks complete. This file is the app only: accepting, dialling, limits, logs
 * and shutdown are server.ts's; the sockets are net.ts's Links.
 */
import { type Address, formatAddress } from './address.ts';
import { VpnError } from './errors.ts';
import { log } from './log.ts';
import { dial, type Link, type LinkEvents } from './net.ts';
import { type LocalMode, type Mode, modeName } from './server.ts';
import type { Json, Session, SessionApp } from './session.ts';

/**
 * Joins one Session to one plain socket (the local app on the client, the target on the server). The socket may
 * arrive later than the session (the server connects to the target after the handshake); until then tunnel data
 * waits here and the tunnel is paused.
 */
export class Bridge implements SessionApp {
  private session: Session | null = null;
  private tcp: Link | null = null;
  private pending: Uint8Array[] = [];
  private peerClosed = false;
  private ended = false;
  private tcpPaused = false;

  constructor(
    /** called once when the session is over (the TCP side is closed, or reset, too) */
    private readonly onDone?: (err: VpnError | null) => void,
    /** the server side opens the target here */
    private readonly onOpened?: (session: Session, peerConfig: Json) => void,
  ) {}

  /** Join the plain socket: what the tunnel sent meanwhile goes first. */
  attachTcp(tcp: Link): void {
    this.tcp = tcp;
    if (this.ended) {
      tcp.abort();
      return;
    }
    for (const p of this.pending) tcp.write(p);
    this.pending = [];
    if (this.peerClosed) tcp.shutdown();
    tcp.attach(this.fromTcp);
    this.session?.resumeInbound();
  }

  // ---- tunnel → TCP ----

  onOpen(session: Session, peerConfig: Json): void {
    this.session = session;
    this.onOpened?.(session, peerConfig);
    if (!this.tcpPaused) this.tcp?.resume(); // the client side paused its local socket until now
  }

  onData(payload: Uint8Array): void {
    if (this.tcp?.isClosed) return; // the app is gone both ways: nowhere to write, and the tunnel must not stall
    if (!this.tcp) {
      this.pending.push(payload);
      this.session?.pauseInbound();
      return;
    }
    if (!this.tcp.write(payload)) this.session?.pauseInbound();
  }

  onPeerClose(): void {
    this.peerClosed = true;
    this.tcp?.shutdown(); // FIN to the app once the queued bytes are out: the peer sends no more
  }

  onEnd(err: VpnError | null): void {
    this.ended = true;
    // An error resets the app's connection so that a truncated stream never looks like a clean end.
    if (err) this.tcp?.abort();
    else this.tcp?.end();
    this.onDone?.(err);
  }

  onWritable(): void {
    if (this.tcpPaused) {
      this.tcpPaused = false;
      this.tcp?.resume();
    }
  }

  // ---- TCP → tunnel: the plain socket's Link events ----

  private readonly fromTcp: LinkEvents = {
    onData: (chunk) => {
      const s = this.session;
      if (!s || !s.sending) return;
      if (!s.write(chunk) && !this.tcpPaused) {
        this.tcpPaused = true;
        this.tcp?.pause();
      }
    },
    onDrain: () => {
      if (!this.peerClosed) this.session?.resumeInbound();
    },
    // The app sent FIN: CLOSE our direction of the tunnel.
    onEnd: () => this.session?.close(),
    onClose: (err) => {
      const s = this.session;
      if (this.ended || !s) return;
      if (err) s.finish(new VpnError('NETWORK', `the TCP connection failed (${err.message})`));
      else s.close(); // closed for good: nothing more to read; close our direction and let the peer finish
    },
  };
}

/**
 * PROXY protocol v1 header (haproxy's proxy-protocol.txt §2.1) describing the tunnel client's connection: the
 * socket's addresses, or behind a trusted front (serve --accept-proxy) the ones its header named.
 */
export function proxyHeader(link: Link): string {
  const s = link.socket;
  const o = link.origin;
  const src = o ? o.source.address : s.remoteAddress;
  const dst = o ? o.destination?.address : s.localAddress;
  if (!src || !dst || src.includes(':') !== dst.includes(':')) return 'PROXY UNKNOWN\r\n';
  const v6 = src.includes(':');
  const strip = (a: string) => (v6 ? a : a.replace(/^::ffff:/, ''));
  return `PROXY ${v6 ? 'TCP6' : 'TCP4'} ${strip(src)} ${strip(dst)} ${o ? o.source.port : s.remotePort} ${o ? o.destination!.port : s.localPort}\r\n`;
}

/** `serve --forward TARGET`: each authenticated session gets a fresh connection to the target. */
export function forwardMode(target: Address, proxyProtocol: boolean): Mode {
  return {
    onShutdown: 'wait',
    config: (peer) => {
      if (peer.mode === 'chat') {
        return new VpnError('USAGE', 'this server forwards to a TCP port, and a terminal chat would type into that service; pipe data in instead (connect < file), or use connect --local PORT');
      }
      if (peer.mode !== 'forward' && peer.mode !== 'stdio') {
        return new VpnError('USAGE', `this server forwards to a TCP port; a ${modeName(peer.mode)} client cannot use it`);
      }
      return { mode: 'forward' };
    },
    app: (_session, link) => {
      const bridge: Bridge = new Bridge(undefined, (session) => {
        session.pauseInbound(); // until the target is connected
        dial(target).then(
          (tcp) => {
            if (proxyProtocol) tcp.write(proxyHeader(link));
            bridge.attachTcp(tcp);
          },
          (e: VpnError) => {
            log.limited('warn', `target|${formatAddress(target)}`, `target unreachable for ${session.peer}: ${e.message}`);
            session.finish(new VpnError('NETWORK', `target ${formatAddress(target)} unreachable`));
          },
        );
      });
      return bridge;
    },
  };
}

/** `connect --local`: the local socket of each accepted connection, bridged to its own session. */
export const localMode: LocalMode = {
  config: () => ({ mode: 'forward' }),
  accept: (answer) =>
    answer.mode === 'forward' ? null : new VpnError('USAGE', `the server answered ${modeName(answer.mode)}, not port forwarding; start it with serve --forward HOST:PORT`),
  bridge: (local, done) => {
    const b = new Bridge(done);
    b.attachTcp(local); // paused by serveLocal until the session is open
    return b;
  },
};
