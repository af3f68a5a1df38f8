/**
 * `serve --forward … --workers N`: N processes accept on one TCP port (SO_REUSEPORT), so that one server uses every
 * core. The kernel spreads new connections over the workers by a hash of their addresses; a session lives and dies
 * in the worker that accepted it. `--max-conns` applies to each worker.
 *
 * The process the user started supervises and serves nothing itself:
 *   1. it checks the port: a fixed port that is in use fails here, once, exactly as without --workers (the check binds
 *      without SO_REUSEPORT, so a second `serve --workers` on the same port is refused instead of silently sharing
 *      it); port 0 is bound here with SO_REUSEPORT to learn which port the kernel picks, and that socket is held
 *      until every worker listens on the same port, then closed (nobody has been told the port yet, so it accepts
 *      nothing);
 *   2. it derives the long-term keys once (one key file read, one scrypt, one prompt) and hands them to each worker
 *      on its stdin, never in argv or the environment: a worker's argv has no --secret (workerArgs), and its
 *      environment is workerEnv's, PATH and a few harmless variables, never VPN_SECRET;
 *   3. it starts N workers running its own command line without --workers and --secret and with --listen naming the
 *      port, with VPN_WORKER=i in the environment, waits for each one's "listening on" line, and prints the one
 *      "listening on HOST:PORT" line itself;
 *   4. it passes every other line a worker logs through, prefixed "[worker i pid P] ";
 *   5. it passes SIGINT and SIGTERM to every worker (each shuts down gracefully, --grace) and exits with the worst of
 *      their statuses. A worker that exits on its own takes the others down and the supervisor exits with its
 *      status (1 if that was 0): a service manager then restarts the whole set, rather than the port being served by
 *      fewer workers than asked for without anyone noticing.
 *
 * Workers run in their own session, so a terminal's Ctrl-C reaches them once, through the supervisor. They watch
 * their stdin: when the supervisor dies, even by SIGKILL, the pipe closes and each worker shuts down gracefully
 * instead of serving on unsupervised.
 */
import type { Subprocess } from 'bun';
import { type Address, formatAddress } from './address.ts';
import { claimPort } from './net.ts';
import { EXIT_NETWORK, EXIT_OK, VpnError } from './errors.ts';
import type { LongTermKeys } from './handshake.ts';
import { KEY_LEN } from './handshake.ts';

/** Most workers a server may start. */
export const MAX_WORKERS = 64;
/** How long the supervisor waits for all workers to listen. */
const START_TIMEOUT_MS = 60_000;
/** Extra time, past --grace, that workers get to exit before they are killed. */
const STOP_SLACK_MS = 5_000;

/** The worker number this process was started as by a supervisor (VPN_WORKER), or 0 for none. */
export function workerIndex(): number {
  const n = Number(process.env.VPN_WORKER ?? '0');
  return Number.isInteger(n) && n > 0 ? n : 0;
}

/**
 * `args` (the command line after the command) without --workers and without --secret and its value (a worker gets
 * the keys on stdin; argv is readable by every local user), with --listen set to `listen`.
 */
export function workerArgs(args: readonly string[], listen: string): string[] {
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--') {
      out.push(...args.slice(i));
      break;
    }
    if (a === '--workers' || a === '--listen' || a === '--secret') {
      i++; // and its value
      continue;
    }
    if (a.startsWith('--workers=') || a.startsWith('--listen=') || a.startsWith('--secret=')) continue;
    out.push(a);
  }
  return ['--listen', listen, ...out];
}

/**
 * The command line that runs this program again: `[bun, /path/vpn.ts]` under `bun vpn.ts`, or just the executable
 * built by `bun build --compile` (`bun run build`), whose argv[1] is its entry point's path inside the executable
 * (/$bunfs/root/vpn; B:/~BUN/root/vpn on Windows), which it would take for a command.
 */
export function selfCommand(argv: readonly string[] = process.argv, execPath: string = process.execPath): string[] {
  const script = argv[1];
  return script === undefined || /^(\/\$bunfs\/|[A-Za-z]:[\\/]~BUN[\\/])/.test(script) ? [execPath] : [execPath, script];
}

/** The variables a worker inherits, when set: none of them secret (VPN_SECRET never is one). */
const WORKER_ENV = ['PATH', 'HOME', 'TMPDIR', 'TZ', 'LANG', 'LC_ALL', 'NO_COLOR'];

/** A worker's whole environment: WORKER_ENV from `env` and VPN_WORKER=`index`; nothing else of `env`. */
export function workerEnv(index: number, env: Record<string, string | undefined> = process.env): Record<string, string> {
  const out: Record<string, string> = {};
  for (const k of WORKER_ENV) if (env[k] !== undefined) out[k] = env[k];
  out.VPN_WORKER = String(index);
  return out;
}

/**
 * K_wrap ‖ K_auth (‖ K_hint, for a key file: version 3 clients holding the same key, PROTOCOL.md §4.1) in hex; or,
 * for `--keyring` (null), the word `keyring`: each worker reads the keyring file itself (its path is in argv).
 */
function keysLine(keys: LongTermKeys | null): string {
  if (keys === null) return `${KEYRING_LINE}\n`;
  return [keys.wrap, keys.auth, ...(keys.hint ? [keys.hint] : [])].map((k) => Buffer.from(k).toString('hex')).join('') + '\n';
}

/**
 * Worker side: read the long-term keys the supervisor sends as the first line of stdin, then keep watching stdin and
 * call `orphaned` once it closes (the supervisor is gone). Throws USAGE on anything but a key line.
 */
export async function keysFromSupervisor(orphaned: () => void): Promise<LongTermKeys> {
  const { line, reader } = await supervisorLine();
  if (line === KEYRING_LINE) throw new VpnError('USAGE', 'the supervisor serves a keyring, and this worker was started without --keyring');
  if (!/^[0-9a-f]+$/.test(line) || (line.length !== 4 * KEY_LEN && line.length !== 6 * KEY_LEN)) {
    throw new VpnError('USAGE', 'VPN_WORKER is set but stdin did not bring the keys (VPN_WORKER is for serve --workers only)');
  }
  const raw = Buffer.from(line, 'hex');
  const keys: LongTermKeys = {
    wrap: new Uint8Array(raw.subarray(0, KEY_LEN)),
    auth: new Uint8Array(raw.subarray(KEY_LEN, 2 * KEY_LEN)),
    ...(raw.length === 3 * KEY_LEN ? { hint: new Uint8Array(raw.subarray(2 * KEY_LEN)) } : {}),
  };
  raw.fill(0);
  watchSupervisor(reader, orphaned);
  return keys;
}

const KEYRING_LINE = 'keyring';

/** Worker side of `serve --keyring --workers`: the supervisor's first line says so; then watch stdin as above. */
export async function keyringFromSupervisor(orphaned: () => void): Promise<void> {
  const { line, reader } = await supervisorLine();
  if (line !== KEYRING_LINE) throw new VpnError('USAGE', 'VPN_WORKER is set but stdin did not say the supervisor serves a keyring (VPN_WORKER is for serve --workers only)');
  watchSupervisor(reader, orphaned);
}

type StdinReader = { read(): Promise<{ done: boolean; value?: Uint8Array }> };

/** The first line the supervisor sent (read up to 6 keys' worth of hex, never more). */
async function supervisorLine(): Promise<{ line: string; reader: StdinReader }> {
  const reader = Bun.stdin.stream().getReader();
  let text = '';
  const limit = 6 * KEY_LEN + 1;
  while (!text.includes('\n') && text.length <= limit) {
    const { value, done } = await reader.read();
    if (done) break;
    text += Buffer.from(value).toString('latin1');
  }
  return { line: text.split('\n')[0]!, reader };
}

/** Keep reading stdin; call `orphaned` once it closes (the supervisor is gone). */
function watchSupervisor(reader: StdinReader, orphaned: () => void): void {
  void (async () => {
    try {
      while (!(await reader.read()).done) {
        // the supervisor never writes more; just wait for the end
      }
    } catch {
      // a broken pipe is an end too
    }
    orphaned();
  })();
}

interface Worker {
  index: number;
  proc: Subprocess<'pipe', 'inherit', 'pipe'>;
  listening: Promise<void>;
}

export interface SuperviseOptions {
  workers: number;
  listen: Address;
  /** the shared key, or null for `--keyring` (each worker reads the file; SIGHUP is passed on to them) */
  keys: LongTermKeys | null;
  /** the command line after the command name (`serve`), as the user gave it */
  args: readonly string[];
  graceMs: number;
}

/** Run the supervisor until every worker has exited; resolves with the exit status. */
export async function superviseWorkers(o: SuperviseOptions): Promise<number> {
  if (o.listen.kind !== 'tcp') throw new VpnError('USAGE', '--workers needs a TCP --listen address (workers share a TCP port)');
  // A fixed port is bound once without SO_REUSEPORT to check it; port 0 with it, to learn the port (module header).
  const claim = claimPort(o.listen, o.listen.port === 0);
  if (o.listen.port !== 0) claim.release();
  const shown = formatAddress({ ...o.listen, port: claim.port });
  const args = workerArgs(o.args, shown);
  const workers: Worker[] = [];
  let stopping = false;
  let status = EXIT_OK;
  const signalAll = (sig: NodeJS.Signals) => {
    for (const w of workers) {
      try {
        w.proc.kill(sig);
      } catch {
        // already gone
      }
    }
  };
  /** Pass `sig` to every worker; the first time, also arm the kill of whatever is left after --grace and some slack. */
  const stopAll = (sig: NodeJS.Signals) => {
    if (!stopping) setTimeout(() => signalAll('SIGKILL'), o.graceMs + STOP_SLACK_MS).unref();
    stopping = true;
    signalAll(sig);
  };
  const { promise: startFailed, reject: failStart } = Promise.withResolvers<never>();
  startFailed.catch(() => {});

  for (let i = 1; i <= o.workers; i++) {
    const proc = Bun.spawn([...selfCommand(), 'serve', ...args], {
      stdin: 'pipe',
      stdout: 'inherit',
      stderr: 'pipe',
      env: workerEnv(i),
      detached: true,
    }) as Subprocess<'pipe', 'inherit', 'pipe'>;
    proc.stdin.write(keysLine(o.keys));
    proc.stdin.flush();
    const { promise: listening, resolve } = Promise.withResolvers<void>();
    const w: Worker = { index: i, proc, listening };
    workers.push(w);
    void relay(w, resolve);
    void proc.exited.then((code) => {
      const s = proc.signalCode !== null || code === null ? EXIT_NETWORK : code; // killed by a signal: a network-class failure
      if (!stopping) {
        process.stderr.write(`worker ${i} (pid ${proc.pid}) exited with status ${s}; stopping the other workers\n`);
        status = s === EXIT_OK ? EXIT_NETWORK : s;
        stopAll('SIGTERM');
        failStart(new Error(`worker ${i} exited`));
      } else if (s !== EXIT_OK && status === EXIT_OK) {
        status = s;
      }
    });
  }
  process.on('SIGINT', () => stopAll('SIGINT'));
  process.on('SIGTERM', () => stopAll('SIGTERM'));
  if (o.keys === null) process.on('SIGHUP', () => signalAll('SIGHUP')); // every worker re-reads the keyring

  const timer = setTimeout(() => failStart(new Error('start timeout')), START_TIMEOUT_MS);
  try {
    await Promise.race([Promise.all(workers.map((w) => w.listening)), startFailed]);
    // The claim (port 0) listens in the same SO_REUSEPORT group and resets what it accepts: gone before anyone is
    // told to connect, or the kernel hands it some first connections (a client saw ECONNRESET).
    claim.release();
    process.stderr.write(`listening on ${shown}\n`);
  } catch (e) {
    if (!stopping) {
      process.stderr.write(`the workers did not all listen within ${START_TIMEOUT_MS / 1000} s (${(e as Error).message}); stopping them\n`);
      status = EXIT_NETWORK;
      stopAll('SIGTERM');
    }
  } finally {
    clearTimeout(timer);
    claim.release();
  }
  await Promise.all(workers.map((w) => w.proc.exited));
  return status;
}

/** Copy a worker's stderr to ours line by line, prefixed; its "listening on" line resolves `listening` instead. */
async function relay(w: Worker, listening: () => void): Promise<void> {
  const prefix = `[worker ${w.index} pid ${w.proc.pid}] `;
  const dec = new TextDecoder();
  let buf = '';
  let seen = false;
  for await (const chunk of w.proc.stderr) {
    buf += dec.decode(chunk, { stream: true });
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (!seen && line.startsWith('listening on ')) {
        seen = true;
        listening();
        continue;
      }
      process.stderr.write(prefix + line + '\n');
    }
  }
  if (buf) process.stderr.write(prefix + buf + '\n');
}
