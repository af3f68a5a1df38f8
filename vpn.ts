#!/usr/bin/env bun
/**
 * vpn — a shared-secret VPN over TCP. The command line: `keygen`, `serve`, `connect`; flag parsing, where the
 * secret comes from, and the wiring of sessions to Bun's sockets. The protocol itself is in handshake.ts and
 * channel.ts (PROTOCOL.md); the modes are in stdio.ts, forward.ts and tun.ts.
 */
import { randomBytes } from '@noble/ciphers/utils.js';
import { existsSync, openSync, readFileSync, statSync, writeSync, closeSync, constants as fsc } from 'node:fs';
import { parseArgs } from 'node:util';
import { type Address, DEFAULT_HOST, DEFAULT_PORT, formatAddress, parseAddress } from './address.ts';
import { ENGINE_NAMES, getEngine } from './engine.ts';
import { asVpnError, EXIT_OK, EXIT_USAGE, VpnError } from './errors.ts';
import { keysFromKeyFile, keysFromPassphrase, KEYFILE_LEN, type LongTermKeys, VERSION_1, VERSION_2 } from './handshake.ts';
import { connectLocal, serveForward } from './forward.ts';
import { boundAddress, listenOn, logSessionEnd } from './server.ts';
import { log } from './log.ts';
import type { Socket } from 'bun';
import { Session, sessionHandler, type SessionOptions } from './session.ts';
import { StdioBridge } from './stdio.ts';
import { keysFromSupervisor, parseWorkers, superviseWorkers, workerIndex } from './workers.ts';
import { connectTun, DEFAULT_MTU, serveTun, wantsTun } from './tun.ts';

export const VERSION = '0.1.0';

const USAGE_MAIN = `vpn ${VERSION} — a shared-secret VPN over TCP

Usage:
  bun vpn.ts keygen PATH                   write a new random 256-bit key to PATH (mode 0600)
  bun vpn.ts serve   [options]             accept tunnels (default 127.0.0.1:${DEFAULT_PORT})
  bun vpn.ts connect [HOST:PORT] [options] open a tunnel to a server
  bun vpn.ts help COMMAND | COMMAND --help | --version

Both ends must share a secret: a key file from keygen (best) or a passphrase.
By default a tunnel joins stdin/stdout to the peer: a line chat on a terminal,
a byte pipe like nc otherwise.

Exit statuses:
  0  clean end (both sides closed the stream)
  1  network or I/O error (refused, reset, DNS, dead peer)
  2  usage or configuration error
  3  authentication failed (wrong secret, not a vpn peer, or forward secrecy required)
  4  integrity failure (tampered, replayed, reordered or truncated stream)
`;

const SECRET_HELP = `Secret (first found wins):
  --key PATH             key file written by keygen (recommended)
  --secret TEXT          passphrase on the command line (visible to other local users via ps)
  VPN_SECRET=TEXT        passphrase from the environment
  (terminal)             prompted for, without echo, when stdin is a terminal`;

const COMMON_HELP = `Common options:
  --engine noble|native  crypto engine: noble (pure JS, default) or native (Bun's built-in BoringSSL)
  --handshake-timeout S  seconds a peer has to complete the handshake (default 5)
  --keepalive S          send PING after S idle seconds; close after 3*S of silence; 0 = off (default 25)
  -v, --verbose          trace every handshake field and frame on stderr (PRINTS SECRET KEYS)
  --step                 with -v: wait for Enter before each handshake message (teaching aid)
  --quiet                log errors only
  -h, --help             this help`;

const USAGE_SERVE = `Usage: bun vpn.ts serve [--listen HOST:PORT] [--key PATH | --secret TEXT] [options]

Accept tunnels. In stdio mode (the default) it serves one session at a time and
keeps listening; each session's bytes go to stdout and come from stdin.

  --listen ADDR          HOST:PORT, [IPv6]:PORT or unix:/path (default ${DEFAULT_HOST}:${DEFAULT_PORT};
                         port 0 picks a free port). Prints "listening on HOST:PORT" once ready.
  --once                 exit after the first session, with that session's exit status
  --forward ADDR         forward mode: each session gets its own new connection to ADDR
                         (HOST:PORT or unix:/path, resolved per session), instead of stdio
  --proxy-protocol       with --forward: send a PROXY protocol v1 header to ADDR first,
                         naming the tunnel client's address and port
  --max-conns N          open connections at most; more are refused (default 100)
  --workers N            with --forward: N worker processes share the TCP port (SO_REUSEPORT),
                         so that one server uses N cores; --max-conns counts per worker
  --grace S              on SIGINT/SIGTERM: send CLOSE on every session, wait up to S
                         seconds for them to end, exit 0 (default 10)
  --require-pfs          refuse clients that offer protocol version 1 (--no-pfs)
  --tun ADDR/PREFIX      TUN mode (Linux, root): a layer-3 VPN; this server is ADDR on a new
                         interface and hands each client a free address of the subnet
  --tun-name NAME        interface name (default vpn%d: the kernel picks vpn0, vpn1, …)
  --mtu N                interface MTU (default ${DEFAULT_MTU}: a 1500-byte path less TCP/IP and frame overhead)
  --route CIDR           with --tun, repeatable: push a route through the tunnel to every client

${SECRET_HELP}

${COMMON_HELP}

Examples:
  bun vpn.ts serve --key vpn.key                          chat with one client at a time
  bun vpn.ts serve --key vpn.key --once > file            receive one file, then exit
  bun vpn.ts serve --listen 0.0.0.0:32694 --forward 127.0.0.1:5432 --key vpn.key
                                                          expose a local service to tunnel clients
`;

const USAGE_CONNECT = `Usage: bun vpn.ts connect [HOST:PORT] [--key PATH | --secret TEXT] [options]

Open a tunnel to a server (default ${DEFAULT_HOST}:${DEFAULT_PORT}). With a terminal on stdin it is a
line chat; otherwise stdin goes to the peer and the peer's bytes to stdout.

  --no-pfs               speak protocol version 1 (the original handshake, no forward secrecy)
  --local [HOST:]PORT    forward mode: listen on HOST:PORT (host default 127.0.0.1, or
                         unix:/path); each accepted connection gets its own tunnel session
  --max-conns N          with --local: open local connections at most (default 100)
  --grace S              with --local: on SIGINT/SIGTERM wait up to S seconds (default 10)
  --tun auto|ADDR[/PREFIX]
                         TUN mode (Linux, root): a layer-3 VPN on a new interface, with
                         the address the server hands out (auto) or the one asked for
  --tun-name NAME        interface name (default vpn%d: the kernel picks vpn0, vpn1, …)
  --mtu N                interface MTU (default: the server's, normally ${DEFAULT_MTU})
  --route CIDR           with --tun, repeatable: send CIDR through the tunnel

${SECRET_HELP}

${COMMON_HELP}

Examples:
  bun vpn.ts connect --key vpn.key                        chat with a server on 127.0.0.1:32694
  tar c dir | bun vpn.ts connect host:32694 --key vpn.key send bytes, like nc
  bun vpn.ts connect host:32694 --local 15432 --key vpn.key
                                                          reach the server's --forward target on 127.0.0.1:15432
`;

const USAGE_KEYGEN = `Usage: bun vpn.ts keygen PATH

Write a fresh random 256-bit key (64 hex digits) to PATH with mode 0600.
Refuses to overwrite an existing file. Copy PATH to the other machine over a
channel you trust (scp, a password manager) and pass it to both ends with --key.
`;

/** Every flag of every command; each command checks which ones it accepts. */
const OPTIONS = {
  listen: { type: 'string' },
  key: { type: 'string' },
  secret: { type: 'string' },
  once: { type: 'boolean' },
  verbose: { type: 'boolean', short: 'v' },
  step: { type: 'boolean' },
  quiet: { type: 'boolean' },
  engine: { type: 'string' },
  'no-pfs': { type: 'boolean' },
  'require-pfs': { type: 'boolean' },
  'handshake-timeout': { type: 'string' },
  keepalive: { type: 'string' },
  help: { type: 'boolean', short: 'h' },
  forward: { type: 'string' },
  local: { type: 'string' },
  'max-conns': { type: 'string' },
  grace: { type: 'string' },
  'proxy-protocol': { type: 'boolean' },
  workers: { type: 'string' },
  tun: { type: 'string' },
  'tun-name': { type: 'string' },
  mtu: { type: 'string' },
  route: { type: 'string', multiple: true },
  version: { type: 'boolean' },
} as const;

const COMMAND_FLAGS: Record<string, string[]> = {
  serve: ['listen', 'key', 'secret', 'once', 'verbose', 'step', 'quiet', 'engine', 'require-pfs', 'handshake-timeout', 'keepalive', 'help', 'forward', 'proxy-protocol', 'max-conns', 'workers', 'grace', 'tun', 'tun-name', 'mtu', 'route'],
  connect: ['key', 'secret', 'verbose', 'step', 'quiet', 'engine', 'no-pfs', 'handshake-timeout', 'keepalive', 'help', 'local', 'max-conns', 'grace', 'tun', 'tun-name', 'mtu', 'route'],
  keygen: ['help'],
};

type Flags = { [K in keyof typeof OPTIONS]?: (typeof OPTIONS)[K]['type'] extends 'string' ? string : boolean };

function seconds(flags: Flags, name: 'handshake-timeout' | 'keepalive' | 'grace', dflt: number): number {
  const v = flags[name];
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isFinite(n) || n < 0 || n > 86400 || (name === 'handshake-timeout' && n === 0)) {
    throw new VpnError('USAGE', `--${name}: expected a number of seconds, got "${v}"`);
  }
  return n;
}

function count(flags: Flags, name: 'max-conns', dflt: number): number {
  const v = flags[name];
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1 || n > 1_000_000) throw new VpnError('USAGE', `--${name}: expected a positive whole number, got "${v}"`);
  return n;
}

// ---- secrets ----

/** Read a key file written by keygen: 64 hex digits (whitespace around them is ignored). */
export function readKeyFile(path: string): Uint8Array {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new VpnError('USAGE', `cannot read key file ${path} (${(e as NodeJS.ErrnoException).code ?? 'error'})`);
  }
  const hexText = text.trim();
  if (!/^[0-9a-fA-F]{64}$/.test(hexText)) {
    throw new VpnError('USAGE', `key file ${path} does not hold a key written by keygen (expected 64 hex digits)`);
  }
  try {
    if ((statSync(path).mode & 0o077) !== 0) log.warn(`warning: key file ${path} is readable by other users; chmod 600 it`);
  } catch {
    // stat failing after a successful read is not worth stopping for
  }
  return new Uint8Array(Buffer.from(hexText, 'hex'));
}

async function promptHidden(question: string): Promise<string> {
  process.stderr.write(question);
  const stdin = process.stdin;
  stdin.setRawMode(true);
  stdin.resume();
  return await new Promise<string>((resolve, reject) => {
    let buf = '';
    const onData = (d: Buffer) => {
      for (const ch of d.toString('utf8')) {
        if (ch === '\r' || ch === '\n' || ch === '\u0004') {
          finish();
          resolve(buf);
          return;
        }
        if (ch === '\u0003') {
          finish();
          reject(new VpnError('USAGE', 'interrupted'));
          return;
        }
        if (ch === '\u007f' || ch === '\b') buf = buf.slice(0, -1);
        else buf += ch;
      }
    };
    const finish = () => {
      stdin.off('data', onData);
      stdin.setRawMode(false);
      stdin.pause();
      process.stderr.write('\n');
    };
    stdin.on('data', onData);
  });
}

/** The secret, in the documented order: --key, --secret, VPN_SECRET, a prompt on a terminal; else USAGE. */
async function loadKeys(flags: Flags): Promise<LongTermKeys> {
  if (workerIndex() > 0) return await keysFromSupervisor(() => process.kill(process.pid, 'SIGTERM')); // serve --workers
  if (flags.key !== undefined && flags.secret !== undefined) throw new VpnError('USAGE', 'give either --key or --secret, not both');
  if (flags.key !== undefined) {
    const raw = readKeyFile(flags.key);
    const keys = keysFromKeyFile(raw);
    raw.fill(0);
    return keys;
  }
  if (flags.secret !== undefined) {
    log.warn('warning: --secret is visible to other local users (ps, /proc); prefer --key or VPN_SECRET');
    return keysFromPassphrase(flags.secret);
  }
  const env = process.env.VPN_SECRET;
  if (env !== undefined && env !== '') return keysFromPassphrase(env);
  if (process.stdin.isTTY) return keysFromPassphrase(await promptHidden('passphrase: '));
  throw new VpnError('USAGE', 'no secret given: use --key PATH (from keygen), --secret TEXT, or the VPN_SECRET environment variable');
}

// ---- commands ----

function keygen(positionals: string[]): number {
  const path = positionals[0];
  if (!path || positionals.length > 1) throw new VpnError('USAGE', 'keygen takes exactly one PATH');
  if (existsSync(path)) throw new VpnError('USAGE', `${path} already exists; keygen never overwrites a key`);
  const key = randomBytes(KEYFILE_LEN);
  let fd: number;
  try {
    fd = openSync(path, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL, 0o600);
  } catch (e) {
    throw new VpnError('USAGE', `cannot create ${path} (${(e as NodeJS.ErrnoException).code ?? 'error'})`);
  }
  writeSync(fd, Buffer.from(key).toString('hex') + '\n');
  closeSync(fd);
  key.fill(0);
  log.info(`wrote a new 256-bit key to ${path}; copy it to the other end over a trusted channel`);
  return EXIT_OK;
}

/** Settings every session of this process shares. */
export interface Settings {
  keys: LongTermKeys;
  flags: Flags;
  base: Omit<SessionOptions, 'role' | 'config'>;
}

async function settings(flags: Flags, role: 'client' | 'server'): Promise<Settings> {
  let engine;
  try {
    engine = getEngine(flags.engine ?? 'noble');
  } catch {
    throw new VpnError('USAGE', `--engine: expected one of ${ENGINE_NAMES.join(', ')}, got "${flags.engine}"`);
  }
  if (flags.step && !flags.verbose) throw new VpnError('USAGE', '--step needs -v');
  const handshakeTimeoutMs = seconds(flags, 'handshake-timeout', 5) * 1000;
  const keepaliveMs = seconds(flags, 'keepalive', 25) * 1000;
  log.quiet = flags.quiet === true;
  const keys = await loadKeys(flags);
  let trace: ((line: string) => void) | undefined;
  let step: ((what: string) => Promise<void>) | undefined;
  if (flags.verbose) {
    process.stderr.write('WARNING: -v prints secret key material (session and traffic keys); never share this output\n');
    trace = (line) => process.stderr.write(`[${role}] ${line}\n`);
  }
  if (flags.step) {
    step = async (what) => {
      prompt(`[${role}] press Enter to ${what}`);
    };
  }
  return {
    keys,
    flags,
    base: {
      keys,
      engine,
      version: flags['no-pfs'] ? VERSION_1 : VERSION_2,
      requirePfs: flags['require-pfs'] === true,
      handshakeTimeoutMs,
      keepaliveMs,
      trace,
      step,
    },
  };
}

function reportEnd(err: VpnError | null, who: string): number {
  if (!err) return EXIT_OK;
  log.error(`vpn: ${who}: ${err.sentence}`);
  return err.exitStatus;
}

async function serveStdio(s: Settings, listen: Address): Promise<number> {
  const bridge = new StdioBridge();
  // Handshakes run in parallel; the one stdio stream belongs to one authenticated session at a time.
  let active: Session | null = null;
  const { promise: onceDone, resolve: onceResolve } = Promise.withResolvers<number>();
  const handler = {
    ...sessionHandler,
    open(socket: Socket<{ session?: Session }>) {
      socket.data = { session: undefined };
      const app = bridge.app((err) => {
        if (active === session) active = null;
        logSessionEnd(session, err);
        if (s.flags.once && (session.version !== 0 || !err)) onceResolve(err ? err.exitStatus : EXIT_OK);
      });
      const config = () => {
        if (active) return new VpnError('NETWORK', 'busy: this stdio server serves one session at a time; try again later');
        active = session;
        return { mode: 'stdio' };
      };
      const session: Session = new Session(socket, { ...s.base, role: 'server', config }, {
        ...app,
        onOpen: (sess, cfg) => {
          log.info(`session opened ${sess.peer} (protocol v${sess.version})`);
          app.onOpen(sess, cfg);
        },
      });
      socket.data.session = session;
    },
  };
  const server = listenOn(listen, {}, handler);
  process.stderr.write(`listening on ${formatAddress(boundAddress(listen, server))}\n`);
  if (!s.flags.once) return await new Promise<number>(() => {});
  const status = await onceDone;
  server.stop(true);
  return status;
}

async function connectStdio(s: Settings, target: Address): Promise<number> {
  const bridge = new StdioBridge();
  const { promise, resolve } = Promise.withResolvers<number>();
  const handler = {
    ...sessionHandler,
    open(socket: any) {
      socket.data = { session: undefined };
      socket.data.session = new Session(socket, { ...s.base, role: 'client', config: () => ({ mode: 'stdio' }) }, bridge.app((err) => resolve(reportEnd(err, formatAddress(target)))));
    },
  };
  try {
    if (target.kind === 'unix') await Bun.connect({ unix: target.path, allowHalfOpen: true, data: {}, socket: handler });
    else await Bun.connect({ hostname: target.host, port: target.port, allowHalfOpen: true, data: {}, socket: handler });
  } catch (e) {
    throw new VpnError('NETWORK', `cannot connect to ${formatAddress(target)} (${(e as Error).message})`);
  }
  return await promise;
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === undefined || command === '--help' || command === '-h' || command === 'help') {
    const topic = rest[0];
    const text = topic === 'serve' ? USAGE_SERVE : topic === 'connect' ? USAGE_CONNECT : topic === 'keygen' ? USAGE_KEYGEN : USAGE_MAIN;
    process.stdout.write(text);
    return command === undefined ? EXIT_USAGE : EXIT_OK;
  }
  if (command === '--version' || command === 'version') {
    process.stdout.write(`vpn ${VERSION}\n`);
    return EXIT_OK;
  }
  const allowed = COMMAND_FLAGS[command];
  if (!allowed) throw new VpnError('USAGE', `unknown command "${command}" (expected keygen, serve or connect)`);
  let parsed;
  try {
    parsed = parseArgs({ args: rest, options: OPTIONS, allowPositionals: true, strict: true });
  } catch (e) {
    throw new VpnError('USAGE', (e as Error).message.replace(/^Unknown option/, 'unknown option').split('. To specify')[0]!);
  }
  const flags = parsed.values as Flags;
  for (const name of Object.keys(flags)) {
    if (!allowed.includes(name)) throw new VpnError('USAGE', `${command} does not take --${name}`);
  }
  if (flags.help) {
    process.stdout.write(command === 'serve' ? USAGE_SERVE : command === 'connect' ? USAGE_CONNECT : USAGE_KEYGEN);
    return EXIT_OK;
  }
  if (command === 'keygen') return keygen(parsed.positionals);
  if (command === 'serve') {
    if (parsed.positionals.length > 0) throw new VpnError('USAGE', `serve takes no positional arguments (did you mean --listen ${parsed.positionals[0]}?)`);
    const listen = parseAddress(flags.listen ?? `${DEFAULT_HOST}:${DEFAULT_PORT}`, '--listen');
    if (flags.workers !== undefined && flags.forward === undefined) throw new VpnError('USAGE', '--workers needs --forward (stdio and TUN servers run in one process)');
    if (wantsTun(flags)) return await serveTun(await settings(flags, 'server'), listen);
    if (flags['proxy-protocol'] && flags.forward === undefined) throw new VpnError('USAGE', '--proxy-protocol needs --forward');
    if (flags.forward !== undefined) {
      const target = parseAddress(flags.forward, '--forward');
      const maxConns = count(flags, 'max-conns', 100);
      const graceMs = seconds(flags, 'grace', 10) * 1000;
      const workers = parseWorkers(flags.workers);
      if (workers > 1 && flags.step) throw new VpnError('USAGE', '--workers cannot be used with --step');
      const s = await settings(flags, 'server');
      if (workers > 1) return await superviseWorkers({ workers, listen, keys: s.keys, args: rest, graceMs });
      return await serveForward(s.base, { listen, target, maxConns, graceMs, proxyProtocol: flags['proxy-protocol'] === true, reusePort: workerIndex() > 0 });
    }
    const s = await settings(flags, 'server');
    return await serveStdio(s, listen);
  }
  if (parsed.positionals.length > 1) throw new VpnError('USAGE', 'connect takes at most one address');
  const target = parseAddress(parsed.positionals[0] ?? `${DEFAULT_HOST}:${DEFAULT_PORT}`, 'address');
  if (wantsTun(flags)) return await connectTun(await settings(flags, 'client'), target);
  if (flags.local !== undefined) {
    const local = parseAddress(flags.local, '--local', DEFAULT_HOST);
    const maxConns = count(flags, 'max-conns', 100);
    const graceMs = seconds(flags, 'grace', 10) * 1000;
    const s = await settings(flags, 'client');
    return await connectLocal(s.base, { local, server: target, maxConns, graceMs });
  }
  const s = await settings(flags, 'client');
  return await connectStdio(s, target);
}

if (import.meta.main) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (e) => {
      const err = asVpnError(e, 'USAGE');
      log.error(`vpn: ${err.sentence}`);
      process.exit(err.exitStatus === EXIT_OK ? EXIT_USAGE : err.exitStatus);
    },
  );
}
