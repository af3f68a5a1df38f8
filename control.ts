/**
 * `bun vpn.ts status`, like `wg show`: a running server answers over a unix control socket it creates (never TCP),
 * mode 0600 in a directory only its user can write to, so only that user (and root) can ask.
 *
 *   request   one JSON line, at most CONTROL_REQUEST_MAX bytes: {"command":"status"}
 *   response  one JSON line: the snapshot below (statusSnapshot), or {"error": TEXT}; then the server closes
 *
 * The server never waits on a status client: at most CONTROL_CLIENTS at once, each answered from one snapshot
 * written as the socket takes it, and cut off after CONTROL_TIMEOUT_MS whatever it did. The snapshot holds counters,
 * addresses, names and modes — never key material. Peer-supplied text (a CONFIG's mode, a client name) is escaped
 * when printed (formatStatus), never trusted.
 *
 * Where the socket lives by default (controlDir, defaultControlPath): $RUNTIME_DIRECTORY (systemd's
 * RuntimeDirectory=), else /run/vpn when root and /run is writable, else $XDG_RUNTIME_DIR/vpn, else /tmp/vpn-UID; the
 * file is named after the listen address, `127.0.0.1_32694.sock`, so `status` finds the server started with the same
 * --listen without being told. Each worker of `serve --workers` has its own, `…-wN.sock` (workerPath).
 */
import type { Socket } from 'bun';
import { createHash } from 'node:crypto';
import { accessSync, chmodSync, constants, lstatSync, mkdirSync, readdirSync, readFileSync, unlinkSync } from 'node:fs';
import { dirname, isAbsolute, join } from 'node:path';
import type { Address } from './address.ts';
import { VpnError } from './errors.ts';
import { log } from './log.ts';
import { type ServerStats, serveMetrics, TYPE_NAMES } from './metrics.ts';
import { escapeText } from './session.ts';
import { MAX_WORKERS } from './workers.ts';

// ---- Tuning constants ----
/** Largest request line. */
export const CONTROL_REQUEST_MAX = 1024;
/** Status clients served at once; more are closed at accept. */
export const CONTROL_CLIENTS = 8;
/** A status client that has not sent its request and read the answer by then is cut off. */
export const CONTROL_TIMEOUT_MS = 5000;
/** Sessions listed in one answer at most (the counts cover all of them); bounds the answer to a few MB. */
export const STATUS_MAX_SESSIONS = 10_000;
/** status without --control/--listen: how long each server in the directory gets to answer. */
const EVERY_TIMEOUT_MS = 2000;
/** Largest answer the status command reads. */
const RESPONSE_MAX = 32 << 20;
/** The snapshot's format; bumped only when a key changes meaning. */
export const STATUS_FORMAT = 1;

// ---- where the socket is ----

/** The directory of default control sockets for this user (see the file comment). */
export function controlDir(): string {
  const uid = process.getuid?.() ?? 0;
  // systemd's RuntimeDirectory=vpn: /run/vpn, made for the unit's user, even without root
  const rt = process.env.RUNTIME_DIRECTORY?.split(':')[0];
  if (rt && isAbsolute(rt)) return rt;
  if (uid === 0) {
    try {
      accessSync('/run', constants.W_OK);
      return '/run/vpn';
    } catch {
      // fall through: a container without a writable /run
    }
  }
  const xdg = process.env.XDG_RUNTIME_DIR;
  if (xdg && isAbsolute(xdg)) return join(xdg, 'vpn');
  return `/tmp/vpn-${uid}`;
}

/** The default control socket of a server listening on `listen`: `<controlDir>/<host>_<port>.sock`. */
export function defaultControlPath(listen: Address): string {
  let name = listen.kind === 'unix' ? `unix${listen.path}` : `${listen.host}_${listen.port}`;
  name = name.replace(/[^A-Za-z0-9._-]/g, '_');
  if (name.length > 64) name = `${name.slice(0, 40)}-${createHash('sha256').update(name).digest('hex').slice(0, 16)}`;
  return join(controlDir(), `${name}.sock`);
}

/**
 * Make the default directory (mode 0700) if needed, and refuse one that another user owns or that others may write
 * to: someone else could otherwise put their own socket where status looks. (Others may see the socket in a 0755
 * directory, but its mode 0600 keeps them from connecting.)
 */
function privateDir(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const st = lstatSync(dir);
  const uid = process.getuid?.() ?? 0;
  if (!st.isDirectory()) throw new VpnError('USAGE', `control socket directory ${dir} is not a directory`);
  if (st.uid !== uid) throw new VpnError('USAGE', `control socket directory ${dir} belongs to another user (uid ${st.uid}); give --control PATH`);
  if ((st.mode & 0o022) !== 0) throw new VpnError('USAGE', `control socket directory ${dir} is writable by other users (mode ${(st.mode & 0o777).toString(8)}); chmod 700 it or give --control PATH`);
}

/** A socket file nobody accepts on (a killed server's) is removed; a live one or any other file is an error. */
async function clearStale(path: string): Promise<void> {
  let st;
  try {
    st = lstatSync(path);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new VpnError('USAGE', `--control ${path}: a file that is not a socket is in the way; remove it or choose another path`);
  if (await answers(path)) throw new VpnError('USAGE', `--control ${path}: another server answers there; stop it or choose another path (--control PATH)`);
  try {
    unlinkSync(path);
  } catch {
    // removed meanwhile
  }
}

/** Most leftovers looked at per start (each costs one connect attempt). */
const SWEEP_MAX = 64;

/**
 * Remove the sockets of killed servers from the default directory (a SIGKILL leaves its file behind). A `*.sock`
 * there that this network namespace's /proc/net/unix does not list as bound is only a candidate — a server in
 * another namespace shares the directory but not that list — and is removed only when connecting to it is refused
 * and it is still the same file (inode) afterwards. At most SWEEP_MAX per start; without /proc nothing is removed.
 */
async function sweepStale(dir: string, keep: string): Promise<void> {
  let candidates: string[];
  try {
    const names = readdirSync(dir).filter((n) => n.endsWith('.sock'));
    if (names.length === 0) return;
    // Read after the directory: a socket bound meanwhile is listed, never taken for a leftover.
    const bound = new Set(readFileSync('/proc/net/unix', 'latin1').split('\n').map((l) => /^\S+:(?:\s+\S+){6}\s+(\/.*)$/.exec(l)?.[1] ?? ''));
    candidates = names.map((n) => join(dir, n)).filter((p) => p !== keep && !bound.has(p)).slice(0, SWEEP_MAX);
  } catch {
    return;
  }
  await Promise.all(
    candidates.map(async (p) => {
      try {
        const before = lstatSync(p);
        if (!before.isSocket() || (await answers(p))) return;
        if (lstatSync(p).ino === before.ino) unlinkSync(p);
      } catch {
        // gone meanwhile
      }
    }),
  );
}

/** Whether something accepts connections on the unix socket at `path`. */
async function answers(path: string): Promise<boolean> {
  return await Bun.connect({ unix: path, socket: { data() {}, open: (s) => void s.end(), error() {} } }).then(
    (s) => (s.end(), true),
    () => false,
  );
}

/** The control socket of worker `n` of serve --workers: `PATH-wN.sock` (`PATH.sock` → `PATH-wN.sock`); PATH for 0. */
export function workerPath(path: string, n: number): string {
  if (n <= 0) return path;
  return path.endsWith('.sock') ? `${path.slice(0, -5)}-w${n}.sock` : `${path}-w${n}`;
}

// ---- the snapshot ----

const iso = (ms: number) => new Date(ms).toISOString();

/** What `status --json` prints: stable keys (README "status"); times in ISO 8601 UTC, byte counts as numbers. */
export function statusSnapshot(s: ServerStats): Record<string, unknown> {
  const now = Date.now();
  const sessions: Record<string, unknown>[] = [];
  let open = 0;
  for (const e of s.open()) {
    open++;
    if (sessions.length >= STATUS_MAX_SESSIONS) continue;
    const x = e.session;
    sessions.push({
      peer: x.clientName ?? null,
      address: x.peer,
      mode: e.mode,
      tunnel: x.tunnel,
      protocol: x.version,
      since: iso(x.startedAt),
      last_record: e.lastRecordAt ? iso(e.lastRecordAt) : null,
      bytes_in: x.bytesIn,
      bytes_out: x.bytesOut,
      queued_bytes: x.queued,
      rekeys: x.rekeyCount,
    });
  }
  const byType = (d: number) => Object.fromEntries(s.records[d]!.map((n, code) => [TYPE_NAMES[code] ?? String(code), n]));
  return {
    format: STATUS_FORMAT,
    time: iso(now),
    server: {
      pid: process.pid,
      started_at: iso(s.startedAt),
      uptime_s: Math.floor((now - s.startedAt) / 1000),
      listeners: s.info.listeners,
      control: s.info.control,
      metrics: s.info.metrics,
      limits: s.info.limits,
      sessions_open: open,
      sessions_total: s.sessionsTotal,
      handshakes_in_progress: s.inProgress(),
      queued_bytes: s.queuedBytes,
      bytes: { in: s.bytes[0], out: s.bytes[1] },
      records: { in: byType(0), out: byType(1) },
      handshakes: Object.fromEntries(s.handshakes),
      drops: Object.fromEntries(s.drops),
    },
    sessions,
    sessions_truncated: open > sessions.length,
  };
}

// ---- the server side ----

type ControlData = { buf: string; answered: boolean; counted: boolean; out: Uint8Array | null; timer: ReturnType<typeof setTimeout> | null };

/**
 * Create the control socket at `path` (default: defaultControlPath) and answer status requests from `stats`.
 * The socket is bound with umask 0177 and chmod 0600 before anything is accepted; a stale socket file is replaced.
 * Returns its path and a stop function (closes it and removes the file). Throws USAGE when it cannot be created.
 */
export async function startControl(path: string, isDefault: boolean, stats: ServerStats): Promise<{ path: string; stop(): void }> {
  if (path.length > 107) throw new VpnError('USAGE', `--control ${path}: the path is too long for a unix socket (107 bytes at most)`);
  if (isDefault) {
    privateDir(dirname(path));
    await sweepStale(dirname(path), path);
  }
  await clearStale(path);
  let clients = 0;
  const finish = (s: Socket<ControlData>) => {
    if (s.data.timer) clearTimeout(s.data.timer);
    s.data.timer = null;
  };
  const flush = (s: Socket<ControlData>) => {
    const out = s.data.out;
    if (!out) return;
    const n = s.write(out);
    if (n >= out.length) {
      s.data.out = null;
      s.end();
    } else s.data.out = out.subarray(Math.max(0, n));
  };
  const answer = (s: Socket<ControlData>, body: unknown) => {
    s.data.answered = true;
    s.data.out = new TextEncoder().encode(JSON.stringify(body) + '\n');
    flush(s);
  };
  const old = process.umask(0o177); // the socket file is created 0600: nobody else can connect between bind and chmod
  let listener;
  try {
    listener = Bun.listen<ControlData>({
      unix: path,
      socket: {
        open(s) {
          s.data = { buf: '', answered: false, counted: false, out: null, timer: null };
          if (clients >= CONTROL_CLIENTS) {
            s.terminate();
            return;
          }
          clients++;
          s.data.counted = true;
          s.data.timer = setTimeout(() => s.terminate(), CONTROL_TIMEOUT_MS);
        },
        data(s, chunk) {
          if (s.data.answered) return;
          const nl = chunk.indexOf(0x0a);
          const part = chunk.subarray(0, nl < 0 ? chunk.length : nl);
          if (s.data.buf.length + part.length > CONTROL_REQUEST_MAX) {
            answer(s, { error: `request longer than ${CONTROL_REQUEST_MAX} bytes` });
            return;
          }
          s.data.buf += part.toString('latin1'); // the request is ASCII JSON; anything else fails to parse
          if (nl < 0) return;
          const text = s.data.buf;
          let cmd: unknown;
          try {
            cmd = (JSON.parse(text) as { command?: unknown }).command;
          } catch {
            cmd = undefined;
          }
          if (cmd === 'status') answer(s, statusSnapshot(stats));
          else answer(s, { error: 'unknown request (expected {"command":"status"})' });
        },
        drain: flush,
        close(s) {
          finish(s);
          if (s.data.counted) clients--;
          s.data.counted = false;
        },
        error(s) {
          finish(s);
          if (s.data.counted) clients--;
          s.data.counted = false;
        },
      },
    });
  } catch (e) {
    const msg = (e as Error).message ?? String(e);
    throw new VpnError('USAGE', `--control ${path}: cannot create the control socket (${/EACCES|permission/i.test(msg) ? 'permission denied' : /ENOENT|no such/i.test(msg) ? 'the directory does not exist' : msg})`);
  } finally {
    process.umask(old);
  }
  try {
    chmodSync(path, 0o600);
  } catch {
    // it was just created by us; umask already made it 0600
  }
  let stopped = false;
  return {
    path,
    stop() {
      if (stopped) return;
      stopped = true;
      listener.stop(true);
      try {
        unlinkSync(path);
      } catch {
        // gone already
      }
    },
  };
}

// ---- the client side: bun vpn.ts status ----

/** Ask the server at `path` for its status within `ms`; resolves with the parsed answer. Throws NETWORK with a sentence. */
export async function queryStatus(path: string, ms = CONTROL_TIMEOUT_MS + 1000): Promise<Record<string, unknown>> {
  const chunks: Uint8Array[] = [];
  let size = 0;
  const done = Promise.withResolvers<void>();
  let failure: string | null = null;
  try {
    await Bun.connect({
      unix: path,
      socket: {
        open: (s) => void s.write('{"command":"status"}\n'),
        data: (s, d) => {
          size += d.length;
          if (size > RESPONSE_MAX) {
            failure = `the answer is larger than ${RESPONSE_MAX} bytes`;
            s.terminate();
            return;
          }
          chunks.push(new Uint8Array(d));
        },
        close: () => done.resolve(),
        error: (_s, e) => {
          failure = e.message;
          done.resolve();
        },
      },
    });
  } catch (e) {
    const code = (e as { code?: string }).code ?? (e as Error).message;
    const why = /ENOENT|no such/i.test(code)
      ? 'no such socket (is the server running? give --control PATH or the --listen it was started with)'
      : /ECONNREFUSED|refused/i.test(code)
        ? 'nobody answers there (a server that was killed left it behind)'
        : /EACCES|EPERM|permission/i.test(code)
          ? 'permission denied (the socket is mode 0600: run status as the user the server runs as)'
          : code;
    throw new VpnError('NETWORK', `status: cannot connect to the control socket ${path}: ${why}`);
  }
  const timer = setTimeout(() => {
    failure = `no answer within ${ms / 1000} s`;
    done.resolve();
  }, ms);
  await done.promise;
  clearTimeout(timer);
  if (failure) throw new VpnError('NETWORK', `status: ${path}: ${failure}`);
  let v: unknown;
  try {
    v = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch {
    throw new VpnError('NETWORK', `status: ${path} did not answer with JSON (is it a vpn control socket?)`);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new VpnError('NETWORK', `status: ${path} answered something that is not a status`);
  const j = v as Record<string, unknown>;
  if (typeof j.error === 'string') throw new VpnError('NETWORK', `status: the server says: ${safe(j.error)}`);
  return j;
}

/**
 * Ask the server at `path`, or, when nothing is there, the workers of a serve --workers started with that path
 * (workerPath, numbers 1 up to the first missing one): every answer, in worker order. Throws as queryStatus does
 * when there is neither.
 */
export async function queryAll(path: string): Promise<Record<string, unknown>[]> {
  try {
    lstatSync(path);
  } catch {
    const workers: string[] = [];
    for (let n = 1; n <= MAX_WORKERS; n++) {
      try {
        lstatSync(workerPath(path, n));
      } catch {
        break;
      }
      workers.push(workerPath(path, n));
    }
    if (workers.length > 0) return await Promise.all(workers.map((w) => queryStatus(w)));
  }
  return [await queryStatus(path)];
}

/**
 * Ask every server of this user that has a socket in the default directory (controlDir), workers included, in name
 * order; sockets nobody answers on are skipped. Throws NETWORK naming the directory when none answers.
 */
export async function queryEvery(): Promise<Record<string, unknown>[]> {
  const dir = controlDir();
  let names: string[] = [];
  try {
    names = readdirSync(dir).filter((n) => n.endsWith('.sock')).sort().slice(0, 1024);
  } catch {
    // no directory: no server
  }
  // A server answers in milliseconds; one that does not within EVERY_TIMEOUT_MS is hung and left out.
  const answers = await Promise.all(names.map((n) => queryStatus(join(dir, n), EVERY_TIMEOUT_MS).catch(() => null)));
  const servers = answers.filter((a): a is Record<string, unknown> => a !== null);
  if (servers.length === 0) throw new VpnError('NETWORK', `status: no server answers in ${dir} (is one running? give --control PATH, or the --listen it was started with)`);
  return servers;
}

/** Text from the socket made safe for a terminal: escapeText, and no bidi controls either. */
function safe(v: unknown, max = 200): string {
  return escapeText(String(v), max).replace(/[\u200e\u200f\u202a-\u202e\u2066-\u2069]/g, '?');
}

const num = (v: unknown) => (typeof v === 'number' && Number.isFinite(v) ? v : 0);

/** 1234567 → "1.18 MiB". */
export function bytesText(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${v} B` : `${v.toFixed(2)} ${units[u]}`;
}

/** How long ago `when` (ISO) was, from `now`, as "3 minutes, 2 seconds ago". */
function ago(when: unknown, now: number): string {
  if (typeof when !== 'string') return 'never';
  const t = Date.parse(when);
  if (!Number.isFinite(t)) return 'never';
  let s = Math.max(0, Math.round((now - t) / 1000));
  const parts: string[] = [];
  for (const [unit, len] of [['day', 86400], ['hour', 3600], ['minute', 60]] as const) {
    if (s >= len) {
      const k = Math.floor(s / len);
      parts.push(`${k} ${unit}${k === 1 ? '' : 's'}`);
      s -= k * len;
    }
  }
  if (s > 0 || parts.length === 0) parts.push(`${s} second${s === 1 ? '' : 's'}`);
  return `${parts.slice(0, 2).join(', ')} ago`;
}

/** Counters that are not zero, as "ok 3, auth_failed 1" ("none" when all are). */
function nonZero(m: unknown): string {
  if (typeof m !== 'object' || m === null) return 'none';
  const parts = Object.entries(m as Record<string, unknown>)
    .filter(([, v]) => num(v) > 0)
    .map(([k, v]) => `${safe(k, 40)} ${num(v)}`);
  return parts.length ? parts.join(', ') : 'none';
}

/** The human form of a status snapshot, as `wg show` prints an interface and its peers. */
export function formatStatus(j: Record<string, unknown>): string {
  const now = typeof j.time === 'string' && Number.isFinite(Date.parse(j.time)) ? Date.parse(j.time) : Date.now();
  const srv = (j.server ?? {}) as Record<string, unknown>;
  const lines: string[] = [];
  const listeners = Array.isArray(srv.listeners) ? srv.listeners.map((l) => safe(l)) : [];
  lines.push(`server: ${listeners.join(', ') || '-'}`);
  lines.push(`  pid: ${num(srv.pid)}, up since ${safe(srv.started_at)} (${ago(srv.started_at, now).replace(/ ago$/, '')})`);
  if (srv.control) lines.push(`  control: ${safe(srv.control)}`);
  if (srv.metrics) lines.push(`  metrics: http://${safe(srv.metrics)}/metrics`);
  const limits = (srv.limits ?? {}) as Record<string, unknown>;
  const limit = ([k, v]: [string, unknown]) => {
    const name = safe(k, 40).replace(/_s$/, '').replace(/_/g, '-');
    if (typeof v === 'boolean') return v ? name : null;
    return `${name} ${safe(v, 40)}${k.endsWith('_s') ? ' s' : ''}`;
  };
  lines.push(`  limits: ${Object.entries(limits).map(limit).filter((x) => x !== null).join(', ') || '-'}`);
  lines.push(`  sessions: ${num(srv.sessions_open)} open, ${num(srv.sessions_total)} since start, ${num(srv.handshakes_in_progress)} handshake(s) in progress`);
  const b = (srv.bytes ?? {}) as Record<string, unknown>;
  lines.push(`  transfer: ${bytesText(num(b.in))} received, ${bytesText(num(b.out))} sent; ${bytesText(num(srv.queued_bytes))} queued`);
  lines.push(`  handshakes: ${nonZero(srv.handshakes)}`);
  lines.push(`  drops: ${nonZero(srv.drops)}`);
  const sessions = Array.isArray(j.sessions) ? (j.sessions as Record<string, unknown>[]) : [];
  for (const s of sessions) {
    lines.push('');
    lines.push(`session: ${safe(s.address)}`);
    lines.push(`  peer: ${s.peer == null ? '-' : safe(s.peer, 64)}`);
    lines.push(`  mode: ${s.mode == null ? '-' : safe(s.mode, 20)}, protocol v${num(s.protocol)}`);
    if (Array.isArray(s.tunnel)) lines.push(`  tunnel: ${s.tunnel.map((a) => safe(a, 50)).join(', ')}`);
    lines.push(`  since: ${safe(s.since)} (${ago(s.since, now)})`);
    lines.push(`  last record: ${ago(s.last_record, now)}`);
    lines.push(`  transfer: ${bytesText(num(s.bytes_in))} received, ${bytesText(num(s.bytes_out))} sent`);
    lines.push(`  queued: ${bytesText(num(s.queued_bytes))}`);
  }
  if (j.sessions_truncated === true) lines.push('', `(only the first ${sessions.length} sessions are listed)`);
  return lines.join('\n') + '\n';
}

/** Warn once that the default control socket could not be made (an explicit --control fails the start instead). */
export function controlUnavailable(path: string, e: unknown): void {
  log.warn(`warning: no control socket (bun vpn.ts status will not reach this server): ${(e as Error).message ?? String(e)} [${path}]`);
}

/** What serve() asks of the operations side: the control socket and the metrics listener. */
export interface OpsOptions {
  /** a path; null for none; undefined for defaultControlPath(listen), whose failure only warns */
  control?: string | null;
  /** serve --workers: this worker's number (its socket is workerPath(PATH, n)); 0 for none */
  controlWorker?: number;
  metrics?: { host: string; port: number };
}

/**
 * Start the control socket and the metrics listener of a server listening on `listen`, and record where they are
 * in `stats.info`. Returns a function that stops both (and removes the socket file). Throws USAGE when an explicit
 * --control or --metrics cannot be used.
 */
export async function startOps(stats: ServerStats, listen: Address, o: OpsOptions): Promise<() => void> {
  const stops: (() => void)[] = [];
  const stopAll = () => {
    for (const s of stops.splice(0)) s();
  };
  try {
    if (o.metrics) {
      const m = serveMetrics(o.metrics.host, o.metrics.port, stats);
      stats.info.metrics = m.address;
      stops.push(m.stop);
      log.info(`metrics on http://${m.address}/metrics`);
    }
    if (o.control !== null) {
      const path = workerPath(o.control ?? defaultControlPath(listen), o.controlWorker ?? 0);
      try {
        const c = await startControl(path, o.control === undefined, stats);
        stats.info.control = c.path;
        stops.push(c.stop);
      } catch (e) {
        if (o.control !== undefined) throw e;
        controlUnavailable(path, e);
      }
    }
  } catch (e) {
    stopAll();
    throw e;
  }
  return stopAll;
}
