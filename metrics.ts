/**
 * What a server counts, and `serve --metrics HOST:PORT`: the counters in the Prometheus text exposition format,
 * version 0.0.4 (prometheus.io/docs/instrumenting/exposition_formats), on `GET /metrics`.
 *
 * One ServerStats per `serve`. The skeleton (server.ts) calls it at each event — a record verified or sealed, a
 * handshake's outcome, a connection dropped — and each call is a few additions on numbers that already exist: no
 * allocation per record or byte. Gauges (sessions open, handshakes in progress, queued bytes) are computed when
 * scraped or asked for (`status`, control.ts), from the live sessions. Every label value comes from a fixed set
 * (record types, error codes, the drop reasons below), never from a peer, so a peer cannot grow the exposition.
 */
import { parseIPv4 } from './address.ts';
import { RECORD } from './channel.ts';
import type { ErrorCode } from './errors.ts';
import { VpnError } from './errors.ts';
import type { Session } from './session.ts';

/** Record type code → its label value (`data`, `close`, …). */
export const TYPE_NAMES: string[] = [];
for (const [name, code] of Object.entries(RECORD)) TYPE_NAMES[code] = name.toLowerCase();

const ERROR_CODES: readonly ErrorCode[] = ['USAGE', 'NETWORK', 'DEAD_PEER', 'AUTH_FAILED', 'HANDSHAKE_TIMEOUT', 'PFS_REQUIRED', 'INTEGRITY', 'TRUNCATED'];

/**
 * Why a connection or session was dropped (vpn_drops_total{reason}); a session that ended with an error after it
 * opened counts under its error code in lower case (`integrity`, `truncated`, `dead_peer`, `network`).
 */
export const DROP_REASONS = {
  /** --max-conns sessions open: refused at accept, or after the handshake */
  max_conns: 'sessions full (--max-conns)',
  /** a source that has not authenticated lately opened more than its rate of new connections */
  preauth_rate: 'pre-auth rate of a source',
  /** a source already had its share of handshakes in progress */
  preauth_source: 'pre-auth share of a source',
  /** the table of handshakes in progress was full */
  preauth_full: 'pre-auth table full',
  /** a handshake in progress dropped to make room for a newer one */
  preauth_evicted: 'handshake evicted to make room',
  /** --accept-proxy: no valid PROXY protocol header */
  proxy_header: 'no valid PROXY header',
  /** the server refused the client's CONFIG (a mode it does not serve, a TUN address it cannot give, …) */
  refused: 'CONFIG refused',
} as const;
export type DropReason = keyof typeof DROP_REASONS;

/** One live connection of a server, as status and the gauges see it. */
export interface LiveSession {
  readonly session: Session;
  /** the mode the session runs in (from the CONFIG answer), once known */
  mode: string | null;
  /** when the last record was verified (ms since the epoch), 0 for none */
  lastRecordAt: number;
}

/** What a server tells about itself: set once by serve(), shown by status. */
export interface ServerInfo {
  listeners: string[];
  control: string | null;
  metrics: string | null;
  limits: Record<string, number | boolean>;
}

export class ServerStats {
  readonly startedAt = Date.now();
  /** DATA payload bytes: [in (from clients), out (to clients)] */
  readonly bytes = [0, 0];
  /** records by direction (0 in, 1 out) and type code */
  readonly records = [new Array<number>(TYPE_NAMES.length).fill(0), new Array<number>(TYPE_NAMES.length).fill(0)];
  readonly handshakes = new Map<string, number>();
  readonly drops = new Map<string, number>();
  sessionsTotal = 0;
  readonly live = new Set<LiveSession>();
  info: ServerInfo = { listeners: [], control: null, metrics: null, limits: {} };
  /** connections still in the handshake (the pre-auth table) and waiting for a PROXY header */
  inProgress: () => number = () => 0;

  constructor() {
    for (const o of ['ok', ...ERROR_CODES.map((c) => c.toLowerCase())]) this.handshakes.set(o, 0);
    for (const r of [...Object.keys(DROP_REASONS), ...ERROR_CODES.map((c) => c.toLowerCase())]) this.drops.set(r, 0);
  }

  /** A record verified (`out` false) or sealed (`out` true) on `entry`'s session; `bytes` its payload length. */
  record(entry: LiveSession, out: boolean, type: number, bytes: number): void {
    const d = out ? 1 : 0;
    if (type < TYPE_NAMES.length) this.records[d]![type]!++;
    if (type === RECORD.DATA) this.bytes[d]! += bytes;
    if (!out) entry.lastRecordAt = Date.now();
  }

  /** A handshake's outcome: 'ok', or the code of the error that ended it. */
  handshake(outcome: 'ok' | ErrorCode): void {
    const k = outcome.toLowerCase();
    this.handshakes.set(k, (this.handshakes.get(k) ?? 0) + 1);
  }

  drop(reason: DropReason | ErrorCode): void {
    const k = reason.toLowerCase();
    this.drops.set(k, (this.drops.get(k) ?? 0) + 1);
  }

  /** The live sessions that opened (handshake and CONFIG done) and have not ended. */
  *open(): Generator<LiveSession> {
    for (const e of this.live) if (e.session.opened && e.session.phase !== 'done') yield e;
  }

  get sessionsOpen(): number {
    let n = 0;
    for (const _ of this.open()) n++;
    return n;
  }

  /** Outbound tunnel bytes queued, all live sessions together. */
  get queuedBytes(): number {
    let n = 0;
    for (const e of this.live) n += e.session.queued;
    return n;
  }
}

// ---- the exposition ----

const esc = (v: string) => v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');

/** The Prometheus text exposition (0.0.4) of `s`: HELP and TYPE before each family, label values escaped. */
export function exposition(s: ServerStats): string {
  const out: string[] = [];
  const family = (name: string, type: 'counter' | 'gauge', help: string, samples: [string, number][]) => {
    out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
    for (const [labels, v] of samples) out.push(`${name}${labels} ${v}`);
  };
  const one = (v: number): [string, number][] => [['', v]];
  const labelled = (label: string, m: Map<string, number>): [string, number][] => [...m].map(([k, v]) => [`{${label}="${esc(k)}"}`, v]);
  family('vpn_sessions_open', 'gauge', 'Sessions open now (handshake and CONFIG exchange done, not yet ended).', one(s.sessionsOpen));
  family('vpn_sessions_total', 'counter', 'Sessions opened since the server started.', one(s.sessionsTotal));
  family('vpn_handshakes_in_progress', 'gauge', 'Connections in the handshake (or waiting for their PROXY header).', one(s.inProgress()));
  family('vpn_bytes_total', 'counter', 'Application bytes (DATA payloads) carried, by direction: in from clients, out to clients.', [
    ['{direction="in"}', s.bytes[0]!],
    ['{direction="out"}', s.bytes[1]!],
  ]);
  const rec: [string, number][] = [];
  for (const [d, dir] of [[0, 'in'], [1, 'out']] as const) TYPE_NAMES.forEach((t, code) => rec.push([`{direction="${dir}",type="${t}"}`, s.records[d]![code]!]));
  family('vpn_records_total', 'counter', 'Records verified (in) and sealed (out), by record type.', rec);
  family('vpn_handshakes_total', 'counter', 'Handshakes by outcome: ok, or the error code that ended them.', labelled('outcome', s.handshakes));
  family('vpn_drops_total', 'counter', 'Connections and sessions the server dropped, by reason.', labelled('reason', s.drops));
  family('vpn_queue_bytes', 'gauge', 'Outbound tunnel bytes queued for the network, all sessions together.', one(s.queuedBytes));
  family('vpn_start_time_seconds', 'gauge', 'When the server started, in seconds since the epoch.', one(Math.floor(s.startedAt / 1000)));
  return out.join('\n') + '\n';
}

// ---- the listener ----

/** The host of `--metrics`: loopback (127.0.0.0/8, ::1, localhost) unless `--metrics-public`. */
export function isLoopback(host: string): boolean {
  if (host === 'localhost' || host === '::1' || host === '0:0:0:0:0:0:0:1') return true;
  const n = parseIPv4(host);
  return n !== null && n >>> 24 === 127;
}

export const METRICS_CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8';

/**
 * Serve `GET /metrics` (and HEAD) on HOST:PORT with Bun.serve; anything else is 404 or 405. Requests are tiny and
 * bounded (no body is read); a slow scraper is Bun's to time out (10 s idle). Returns the bound address and a stop
 * function. Throws USAGE when the address cannot be used.
 */
export function serveMetrics(host: string, port: number, stats: ServerStats): { address: string; stop(): void } {
  let server: ReturnType<typeof Bun.serve>;
  try {
    server = Bun.serve({
      hostname: host,
      port,
      maxRequestBodySize: 1024,
      idleTimeout: 10,
      fetch(req) {
        if (new URL(req.url).pathname !== '/metrics') return new Response('not found: the metrics are at /metrics\n', { status: 404 });
        if (req.method !== 'GET' && req.method !== 'HEAD') return new Response('method not allowed\n', { status: 405, headers: { allow: 'GET, HEAD' } });
        return new Response(exposition(stats), { headers: { 'content-type': METRICS_CONTENT_TYPE } });
      },
      error: () => new Response('internal error\n', { status: 500 }),
    });
  } catch (e) {
    const msg = (e as Error).message ?? String(e);
    const where = host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
    throw new VpnError('USAGE', `--metrics: cannot listen on ${where}: ${/in use/i.test(msg) ? 'address already in use' : msg}`);
  }
  const h = server.hostname ?? host;
  return { address: h.includes(':') ? `[${h}]:${server.port}` : `${h}:${server.port}`, stop: () => void server.stop(true) };
}
