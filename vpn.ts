#!/usr/bin/env bun
/**
 * vpn — a shared-secret VPN over TCP. The command line: `keygen`, `serve`, `connect`. It turns argv into typed
 * options (one parser per kind of value, with the allowed range in its message), finds the secret, and hands each
 * mode to the skeleton in server.ts; nothing below it sees argv. The protocol is in handshake.ts and channel.ts
 * (PROTOCOL.md); the modes are in stdio.ts, forward.ts and tun.ts; the sockets in net.ts.
 */
import { randomBytes } from '@noble/ciphers/utils.js';
import { existsSync } from 'node:fs';
import { type Address, type Cidr, type Cidr6, DEFAULT_HOST, DEFAULT_PORT, formatPrefix, isCidr6, parseAddress, parseAnyRoute, parsePrefix, type Prefix } from './address.ts';
import { ENGINE_NAMES, getEngine } from './engine.ts';
import { asVpnError, EXIT_OK, EXIT_USAGE, VpnError } from './errors.ts';
import { type Config, flagsToArgs, locate, mergeFlags, readConfig } from './config.ts';
import { forwardMode, localMode } from './forward.ts';
import { keysFromKeyFile, keysFromPassphrase, KEYFILE_LEN, type LongTermKeys, VERSION_1, VERSION_2, VERSION_3 } from './handshake.ts';
import { addClient, type KeyFile, KeyringFile, TunBindings, MODES as KEY_MODES, parseKeyFile, readPrivateFile, writeNewPrivateFile } from './keyring.ts';
import { log } from './log.ts';
import { CAP_NET_ADMIN, CAP_NET_BIND_SERVICE, type DropPlan, dropPrivileges, planDrop } from './privileges.ts';
import { REKEY_AFTER_MS } from './rekey.ts';
import { connectOne, serve, serveLocal } from './server.ts';
import { defaultControlPath, formatStatus, queryAll, queryEvery, STATUS_FORMAT } from './control.ts';
import { isLoopback } from './metrics.ts';
import type { SessionBase } from './session.ts';
import { StdioBridge, stdioMode } from './stdio.ts';
import { AddressPool, AddressPool6, DEFAULT_MTU, MAX_MTU, MAX_ROUTES, MIN_MTU, MIN_MTU6, openTunClient, openTunServer } from './tun.ts';
import { checkIfName, checkTunSupport, DEFAULT_NAME } from './tundevice.ts';
import { keyringFromSupervisor, keysFromSupervisor, MAX_WORKERS, superviseWorkers, workerIndex } from './workers.ts';
import pkg from './package.json' with { type: 'json' };

export const VERSION: string = pkg.version;

const USAGE_MAIN = `vpn ${VERSION} — a shared-secret VPN over TCP

Usage:
  bun vpn.ts keygen PATH                   write a new random 256-bit key to PATH (mode 0600)
  bun vpn.ts keygen --client NAME --keyring FILE OUT.key
                                           a key for one client of a server's keyring
  bun vpn.ts serve   [options]             accept tunnels (default 127.0.0.1:${DEFAULT_PORT})
  bun vpn.ts connect [HOST:PORT] [options] open a tunnel to a server
  bun vpn.ts status  [--control PATH]      show running servers' sessions and counters
  bun vpn.ts help COMMAND | COMMAND --help | --version

Both ends must share a secret: a key file from keygen (best) or a passphrase;
or the server holds a keyring with one key per client (serve --keyring).
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
  (terminal)             prompted for, without echo, when stdin is a terminal
  --insecure-key-file    use a --key file that group or others can read, or that another
                         user owns (refused by default, as ssh refuses such a key; warns)
  A passphrase under 12 characters, only digits or one repeated character gets a warning:
  the salt is fixed, so use keygen for a key that cannot be guessed.`;

const COMMON_HELP = `Common options:
  --engine noble|native  crypto engine: noble (pure JS, default) or native (Bun's built-in BoringSSL)
  --handshake-timeout S  seconds a peer has to complete the handshake (default 5)
  --keepalive S          send PING after S idle seconds; end the session after 3*S of silence, or
                         when the peer has not read what we sent for 3*S; 0 = off (default 25)
  --grace S              on SIGINT/SIGTERM: stop accepting, let open sessions run up to S seconds
                         (chat and TUN send CLOSE first), then reset the rest and exit 1;
                         exit 0 when all ended in time; a second signal resets at once (default 10)
  -v, --verbose          trace every handshake field and frame on stderr (PRINTS SECRET KEYS)
  --step                 with -v, on a terminal: wait for Enter before each handshake message
                         (a teaching aid; the handshake timeout waits too)
  --quiet                log errors only
  --config FILE          take options from a TOML file: its keys are the long flags without --
                         (listen = "0.0.0.0:32694", workers = 2, route = ["10.0.0.0/8"]);
                         connect's HOST:PORT is server = "HOST:PORT"; flags on the command line
                         override the file's values
  --user NAME            with --tun, as root: once the interface is up, run as user NAME (and
  --group NAME           its group, or --group NAME), keeping only CAP_NET_ADMIN (a client's
                         routes) or, on a port below 1024, CAP_NET_BIND_SERVICE (a server)
  -h, --help             this help`;

const USAGE_SERVE = `Usage: bun vpn.ts serve [--listen HOST:PORT] [--key PATH | --secret TEXT] [options]

Accept tunnels. In stdio mode (the default) it serves one session at a time and
keeps listening; each session's bytes go to stdout and come from stdin.

  --listen ADDR          HOST:PORT, [IPv6]:PORT or unix:/path (default ${DEFAULT_HOST}:${DEFAULT_PORT};
                         port 0 picks a free port). Prints "listening on HOST:PORT" once ready.
  --once                 stdio: exit after the first session, with that session's exit status
  --forward ADDR         forward mode: each session gets its own new connection to ADDR
                         (HOST:PORT or unix:/path, resolved per session), instead of stdio
  --proxy-protocol       with --forward: send a PROXY protocol v1 header to ADDR first,
                         naming the tunnel client's address and port
  --accept-proxy         behind a TCP load balancer (haproxy send-proxy or send-proxy-v2): every
                         connection must open with a PROXY protocol v1 or v2 header, within the
                         handshake timeout, or it is dropped; the client's address it names is
                         then used for logs, limits and --proxy-protocol. Only with a front you
                         trust: whoever reaches the port directly could claim any address
  --control PATH         the unix socket bun vpn.ts status asks (mode 0600); default
                         /run/vpn/HOST_PORT.sock as root, else $XDG_RUNTIME_DIR/vpn/… or
                         /tmp/vpn-UID/…; with --workers one per worker, PATH-wN.sock;
                         none: no control socket
  --metrics HOST:PORT    serve counters on http://HOST:PORT/metrics in the Prometheus text
                         format; loopback addresses only unless --metrics-public
  --max-conns N          sessions at most, in every mode; more are refused at accept
                         (default 100); handshakes in progress have a budget of their own
  --workers N            with --forward: N worker processes share the TCP port (SO_REUSEPORT),
                         so that one server uses N cores; --max-conns counts per worker
  --require-pfs          refuse clients that offer protocol version 1 (--no-pfs)
  --keyring FILE         a key per client instead of --key: FILE lists the clients by name, one
                         per line (keygen --client adds one); logs name each client, a TUN
                         client gets the address bound to its key (tun=, or one derived from
                         its name); SIGHUP re-reads FILE and ends the sessions of removed keys
                         (a bad file keeps the old keyring); mode 0600 like a key file
  --tun ADDR/PREFIX      TUN mode (Linux, root): a layer-3 VPN; this server is ADDR on a new
                         interface and hands each client a free address of the subnet. Give
                         it twice for dual-stack, one IPv4 and one IPv6 prefix
                         (--tun 10.66.0.1/24 --tun fd00:66::1/64), or an IPv6 one alone
  --tun-name NAME        interface name (default vpn%d: the kernel picks vpn0, vpn1, …)
  --no-offload           with --tun: no kernel offloads (one IP packet per record, as versions
                         before them did); also VPN_TUN_OFFLOAD=off in the environment
  --mtu N                interface MTU (default ${DEFAULT_MTU}: a 1500-byte path less TCP/IP and frame overhead);
                         ${MIN_MTU} to ${MAX_MTU}, at least ${MIN_MTU6} with IPv6 in the tunnel
  --route CIDR           with --tun, repeatable: push a route (IPv4 or IPv6) through the tunnel to
                         every client; at most ${MAX_ROUTES} of each family

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
line chat; otherwise stdin goes to the peer and the peer's bytes to stdout — against a
--forward server too, where it is a pipe into the forwarded service (a chat is refused there).

  --no-pfs               speak protocol version 1 (the original handshake, no forward secrecy)
  --rekey-after S        new traffic keys from a fresh X25519 exchange inside the session every S
                         seconds (and every GiB); the server must support it; 0 = never (default 120)
  --local [HOST:]PORT    forward mode: listen on HOST:PORT (host default 127.0.0.1, or
                         unix:/path); each accepted connection gets its own tunnel session
  --max-conns N          with --local: open local connections at most (default 100)
  --tun auto|ADDR[/PREFIX]
                         TUN mode (Linux, root): a layer-3 VPN on a new interface, with
                         the addresses the server hands out (auto: one of each family the
                         server has) or the one asked for (IPv4 or IPv6; give --tun twice
                         to ask for one of each)
  --tun-name NAME        interface name (default vpn%d: the kernel picks vpn0, vpn1, …)
  --no-offload           with --tun: no kernel offloads (one IP packet per record, as versions
                         before them did); also VPN_TUN_OFFLOAD=off in the environment
  --mtu N                interface MTU (default: the server's, normally ${DEFAULT_MTU}); below
                         ${MIN_MTU6} the client asks for IPv4 only
  --route CIDR           with --tun, repeatable: send CIDR (IPv4 or IPv6) through the tunnel;
                         0.0.0.0/0 (::/0) sends everything, as two halves that leave the
                         default route in place; routes are added, never replace one
  --accept-routes        with --tun: install the routes the server pushes (default: ignored),
                         never a default route nor one overlapping this host's routes or
                         addresses
  --no-reconnect         with --tun: exit when the connection to the server ends; by default the
                         interface, its addresses and routes stay up and the client reconnects
                         (backoff 1 s doubling to 30 s, with jitter) and asks for the same addresses

${SECRET_HELP}

${COMMON_HELP}

Examples:
  bun vpn.ts connect --key vpn.key                        chat with a server on 127.0.0.1:32694
  tar c dir | bun vpn.ts connect host:32694 --key vpn.key send bytes, like nc
  bun vpn.ts connect host:32694 --local 15432 --key vpn.key
                                                          reach the server's --forward target on 127.0.0.1:15432
  ssh -o 'ProxyCommand bun vpn.ts connect host:32694 --key vpn.key' user@host
                                                          a pipe into a --forward server (like spipe): here
                                                          ssh through a server that forwards to port 22
`;

const USAGE_STATUS = `Usage: bun vpn.ts status [--control PATH | --listen ADDR] [--json]

Show running servers' sessions and counters, as wg show does: per session the
client's name (with a keyring), address, mode, protocol version, since when, the last
record received, bytes each way and bytes queued; for the server its listeners,
limits, handshakes by outcome and drops by reason. Asks over the server's control
socket (serve --control), which only the server's user can open.

  --control PATH         the server's control socket
  --listen ADDR          the --listen the server was started with: its default control socket
                         is asked
  (neither)              every server of this user with a default control socket
  --json                 the same as JSON with stable keys (README "status"): one server's
                         snapshot, or {"format": 1, "servers": [...]} without --control/--listen
  -h, --help             this help

Exit status 0 with an answer, 1 when no server answers there.
`;

const USAGE_KEYGEN = `Usage: bun vpn.ts keygen PATH
       bun vpn.ts keygen --client NAME --keyring FILE [--tun-address ADDR] [--modes LIST] OUT.key

Write a fresh random 256-bit key (64 hex digits) to PATH with mode 0600.
Refuses to overwrite an existing file. Copy PATH to the other machine over a
channel you trust (scp, a password manager) and pass it to both ends with --key.

With --client: a key for the client NAME of a server's keyring (serve --keyring FILE).
It is added to FILE (created with mode 0600 if absent) and written, with NAME, to OUT.key
(mode 0600), which the client uses as its --key; the server never needs OUT.key. Send the
server SIGHUP to load the new key. A name or address FILE has already is refused.
  --client NAME          letters, digits, ".", "_", "-"; up to 32 characters; what logs call it
  --keyring FILE         the server's keyring
  --tun-address ADDR     bind this TUN address to the key (repeat for one IPv4 and one IPv6);
                         without it a TUN server gives the client an address derived from NAME
  --modes LIST           what the key may be used for: a comma list of tun, forward, stdio, chat
                         (default: everything)
  --insecure-key-file    accept a FILE that group or others can read (warns)
`;

// ---- argv → typed options ----

type Kind = 'string' | 'boolean' | 'list';
/** Every flag of every command: its kind, and its short form. Each command says which ones it accepts. */
const OPTIONS: Record<string, { kind: Kind; short?: string }> = {
  listen: { kind: 'string' },
  key: { kind: 'string' },
  secret: { kind: 'string' },
  once: { kind: 'boolean' },
  verbose: { kind: 'boolean', short: 'v' },
  step: { kind: 'boolean' },
  quiet: { kind: 'boolean' },
  engine: { kind: 'string' },
  'no-pfs': { kind: 'boolean' },
  'require-pfs': { kind: 'boolean' },
  'handshake-timeout': { kind: 'string' },
  keepalive: { kind: 'string' },
  help: { kind: 'boolean', short: 'h' },
  config: { kind: 'string' },
  user: { kind: 'string' },
  group: { kind: 'string' },
  forward: { kind: 'string' },
  local: { kind: 'string' },
  'max-conns': { kind: 'string' },
  grace: { kind: 'string' },
  'proxy-protocol': { kind: 'boolean' },
  workers: { kind: 'string' },
  tun: { kind: 'list' },
  'tun-name': { kind: 'string' },
  mtu: { kind: 'string' },
  route: { kind: 'list' },
  'rekey-after': { kind: 'string' },
  'no-reconnect': { kind: 'boolean' },
  'accept-routes': { kind: 'boolean' },
  'no-offload': { kind: 'boolean' },
  'insecure-key-file': { kind: 'boolean' },
  keyring: { kind: 'string' },
  client: { kind: 'string' },
  'tun-address': { kind: 'list' },
  modes: { kind: 'string' },
  control: { kind: 'string' },
  metrics: { kind: 'string' },
  'metrics-public': { kind: 'boolean' },
  'accept-proxy': { kind: 'boolean' },
  json: { kind: 'boolean' },
};

const COMMON = ['key', 'secret', 'insecure-key-file', 'verbose', 'step', 'quiet', 'engine', 'handshake-timeout', 'keepalive', 'grace', 'help', 'tun', 'tun-name', 'mtu', 'route', 'max-conns', 'no-offload'];
const COMMAND_FLAGS: Record<string, string[]> = {
  serve: [...COMMON, 'listen', 'once', 'require-pfs', 'forward', 'proxy-protocol', 'workers', 'keyring'],
  connect: [...COMMON, 'no-pfs', 'local', 'rekey-after', 'no-reconnect', 'accept-routes'],
  keygen: ['help', 'client', 'keyring', 'tun-address', 'modes', 'insecure-key-file'],
};
for (const c of ['serve', 'connect']) COMMAND_FLAGS[c]!.push('config', 'user', 'group'); // config.ts; privileges.ts (TUN)
COMMAND_FLAGS.serve!.push('control', 'metrics', 'metrics-public', 'accept-proxy'); // control.ts, metrics.ts, proxy.ts
COMMAND_FLAGS.status = ['help', 'control', 'listen', 'json'];
export { COMMAND_FLAGS, OPTIONS }; // config.ts's keys, for tests/ops-config.test.ts
const COMMANDS = Object.keys(COMMAND_FLAGS);

interface Flags {
  [name: string]: string | boolean | string[] | undefined;
}
interface ParsedArgs {
  flags: Flags;
  positionals: string[];
}

/** Parse `args` for `command`: `--name VALUE`, `--name=VALUE`, `-v`, `--` ends the options. Throws USAGE. */
export function parseCommandLine(command: string, args: readonly string[]): ParsedArgs {
  const allowed = COMMAND_FLAGS[command]!;
  const flags: Flags = {};
  const positionals: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--') {
      positionals.push(...args.slice(i + 1));
      break;
    }
    if (!a.startsWith('-') || a === '-') {
      positionals.push(a);
      continue;
    }
    let name: string;
    let inline: string | undefined;
    if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      name = eq < 0 ? a.slice(2) : a.slice(2, eq);
      inline = eq < 0 ? undefined : a.slice(eq + 1);
    } else {
      const short = Object.entries(OPTIONS).find(([, o]) => o.short === a.slice(1));
      if (!short) throw new VpnError('USAGE', `unknown option ${printable(a)} for ${command}`);
      name = short[0];
    }
    const spec = OPTIONS[name];
    if (!spec) throw new VpnError('USAGE', `unknown option --${printable(name)} for ${command}`);
    if (!allowed.includes(name)) throw new VpnError('USAGE', `${command} does not take --${name}`);
    if (spec.kind === 'boolean') {
      if (inline !== undefined) throw new VpnError('USAGE', `--${name} takes no value`);
      flags[name] = true;
      continue;
    }
    let value = inline;
    if (value === undefined) {
      if (i + 1 >= args.length) throw new VpnError('USAGE', `--${name} needs a value`);
      value = args[++i]!;
    }
    if (spec.kind === 'list') flags[name] = [...((flags[name] as string[] | undefined) ?? []), value];
    else if (flags[name] !== undefined) throw new VpnError('USAGE', `--${name} is given twice`);
    else flags[name] = value;
  }
  return { flags, positionals };
}

/** A value from the command line, safe to print in a message (control characters shown as `?`). */
function printable(text: string): string {
  const t = text.length > 60 ? `${text.slice(0, 60)}…` : text;
  return t.replace(/[^\x20-\x7e\u00a0-\uffff]/g, '?');
}

/** A whole number from `min` to `max` for `--flag` (digits only: no 1e3, no 0x10). Throws USAGE naming the range. */
export function integer(flag: string, text: string | undefined, dflt: number, min: number, max: number): number {
  if (text === undefined) return dflt;
  const n = Number(text);
  if (!/^\d{1,9}$/.test(text) || n < min || n > max) {
    throw new VpnError('USAGE', `--${flag}: expected a whole number from ${min} to ${max}, got "${printable(text)}"`);
  }
  return n;
}

/** A number of seconds from `min` to `max` for `--flag` (`1`, `0.5`); returns milliseconds. Throws USAGE naming the range. */
export function seconds(flag: string, text: string | undefined, dflt: number, min: number, max: number, zero = true): number {
  if (text === undefined) return dflt * 1000;
  const n = Number(text);
  if (!/^\d{1,6}(\.\d{1,3})?$/.test(text) || n < min || n > max || (!zero && n === 0)) {
    throw new VpnError('USAGE', `--${flag}: expected a number of seconds from ${zero ? min : `more than ${min}`} to ${max}, got "${printable(text)}"`);
  }
  return n * 1000;
}

// ---- limits: the same defaults, bounds and messages in every mode ----
const LIMITS = {
  maxConns: { dflt: 100, min: 1, max: 100_000 },
  graceS: { dflt: 10, min: 0, max: 86_400 },
  handshakeTimeoutS: { dflt: 5, min: 0, max: 3_600 },
  keepaliveS: { dflt: 25, min: 0, max: 86_400 },
  rekeyAfterS: { dflt: REKEY_AFTER_MS / 1000, min: 0, max: 86_400 },
} as const;

const str = (f: Flags, name: string) => f[name] as string | undefined;

function maxConns(f: Flags): number {
  const l = LIMITS.maxConns;
  return integer('max-conns', str(f, 'max-conns'), l.dflt, l.min, l.max);
}

function graceMs(f: Flags): number {
  const l = LIMITS.graceS;
  return seconds('grace', str(f, 'grace'), l.dflt, l.min, l.max);
}

/** Refuse every flag of `names` that was given, with `why`. */
function refuse(f: Flags, names: string[], why: (flag: string) => string): void {
  for (const n of names) if (f[n] !== undefined) throw new VpnError('USAGE', why(`--${n}`));
}

// ---- TUN options ----

const TUN_ONLY = ['tun-name', 'mtu', 'route', 'user', 'group', 'no-offload'];

function tunName(f: Flags): string {
  return checkIfName(str(f, 'tun-name') ?? DEFAULT_NAME);
}

function mtu(f: Flags): number | undefined {
  const t = str(f, 'mtu');
  return t === undefined ? undefined : integer('mtu', t, 0, MIN_MTU, MAX_MTU);
}

function routes(f: Flags): Prefix[] {
  const list = ((f.route as string[] | undefined) ?? []).map((t) => parseAnyRoute(t));
  const n6 = list.filter(isCidr6).length;
  for (const [n, family] of [[list.length - n6, 'IPv4'], [n6, 'IPv6']] as const) {
    if (n > MAX_ROUTES) throw new VpnError('USAGE', `--route: at most ${MAX_ROUTES} ${family} routes, got ${n}`);
  }
  return list;
}

/** The --tun values other than `auto`: at most one prefix of each family. `bare` as in parsePrefix. */
function tunPrefixes(values: string[], what: string, bare?: number): { v4: Cidr | null; v6: Cidr6 | null } {
  const out: { v4: Cidr | null; v6: Cidr6 | null } = { v4: null, v6: null };
  for (const t of values) {
    const c = parsePrefix(t, what, bare);
    const prev = isCidr6(c) ? out.v6 : out.v4;
    if (prev) throw new VpnError('USAGE', `--tun: one IPv4 and one IPv6 address at most, got two ${isCidr6(c) ? 'IPv6' : 'IPv4'} ones (${printable(t)} after ${formatPrefix(prev)})`);
    if (isCidr6(c)) out.v6 = c;
    else out.v4 = c;
  }
  return out;
}

/** The sentence for an MTU too small for IPv6. */
const mtuTooSmallFor6 = (m: number, why: string) =>
  new VpnError('USAGE', `--mtu ${m} is below ${MIN_MTU6}, the smallest MTU IPv6 allows (RFC 8200), and ${why}: use --mtu ${MIN_MTU6} or more, or leave IPv6 out`);

/** The TUN flags without --tun: say how to ask for TUN mode. */
function tunFlagsAlone(f: Flags, how: string): void {
  const given = TUN_ONLY.filter((n) => f[n] !== undefined).map((n) => `--${n}`);
  if (given.length > 0) throw new VpnError('USAGE', `${given.join(', ')} only ${given.length > 1 ? 'apply' : 'applies'} in TUN mode; add ${how}`);
}

/** --user/--group: whom a TUN process becomes once its interface is up (privileges.ts), or null. */
function privilegeDrop(f: Flags): DropPlan | null {
  const user = str(f, 'user');
  if (user === undefined) {
    refuse(f, ['group'], () => '--group needs --user (the user to run as once the interface is up)');
    return null;
  }
  return planDrop(user, str(f, 'group'));
}

// ---- secrets ----

/**
 * Read a key file written by keygen (64 hex digits) or keygen --client (its name and key). The file is opened once
 * and the open descriptor checked and read (keyring.ts readPrivateFile): one that group or others may read, or that
 * another user owns, is refused (USAGE), as ssh refuses such a key, unless `insecure` (then it warns).
 */
export function readKeyFile(path: string, insecure = false): KeyFile {
  return parseKeyFile(readPrivateFile(path, insecure, 'key file'), path);
}

/**
 * Why `passphrase` is weak, or null: fewer than 12 characters, only digits, or one character repeated. The rule is
 * deliberately simple; it catches the passphrases a fixed salt makes cheapest to guess, not every weak one.
 */
export function weakPassphrase(passphrase: string): string | null {
  const chars = [...passphrase];
  if (chars.length < MIN_PASSPHRASE) return `is shorter than ${MIN_PASSPHRASE} characters`;
  if (/^[0-9]+$/.test(passphrase)) return 'is only digits';
  if (new Set(chars).size === 1) return 'is one character repeated';
  return null;
}
const MIN_PASSPHRASE = 12;

/** keysFromPassphrase, with a warning first when the passphrase is weak (weakPassphrase). */
function passphraseKeys(passphrase: string, from: string): LongTermKeys {
  const why = weakPassphrase(passphrase);
  if (why !== null) {
    log.warn(`warning: the passphrase from ${from} ${why}; the salt is fixed, so one guess tests it against every server: prefer a key file from keygen (bun vpn.ts keygen PATH, then --key PATH)`);
  }
  return keysFromPassphrase(passphrase);
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

/** The secret, and the client's name when the key file names one (keygen --client): then protocol version 3. */
interface Secret {
  keys: LongTermKeys;
  name: string | null;
}

/** Where a --secret value came from when a config file gave it (no "visible via ps" warning then), else null. */
let secretFromConfig: string | null = null;

/** The secret, in the documented order: --key, --secret, VPN_SECRET, a prompt on a terminal; else USAGE. */
async function loadKeys(flags: Flags): Promise<Secret> {
  if (workerIndex() > 0) return { keys: await keysFromSupervisor(() => process.kill(process.pid, 'SIGTERM')), name: null }; // serve --workers
  // Read and remove VPN_SECRET first, whichever secret wins: no child process inherits it (children also get a
  // minimal environment: workers.ts, tundevice.ts).
  const env = process.env.VPN_SECRET;
  delete process.env.VPN_SECRET;
  if (flags.key !== undefined && flags.secret !== undefined) throw new VpnError('USAGE', 'give either --key or --secret, not both');
  if (typeof flags.key === 'string') {
    const file = readKeyFile(flags.key, flags['insecure-key-file'] === true);
    const keys = keysFromKeyFile(file.key);
    file.key.fill(0);
    return { keys, name: file.name };
  }
  if (typeof flags.secret === 'string') {
    if (secretFromConfig === null) log.warn('warning: --secret is visible to other local users (ps, /proc); prefer --key or VPN_SECRET');
    return { keys: passphraseKeys(flags.secret, secretFromConfig ?? '--secret'), name: null };
  }
  if (env !== undefined && env !== '') return { keys: passphraseKeys(env, 'VPN_SECRET'), name: null };
  if (process.stdin.isTTY) return { keys: passphraseKeys(await promptHidden('passphrase: '), 'the prompt'), name: null };
  throw new VpnError('USAGE', 'no secret given: use --key PATH (from keygen), --secret TEXT, or the VPN_SECRET environment variable');
}

// ---- commands ----

function keygen(f: Flags, positionals: string[]): number {
  const path = positionals[0];
  if (!path || positionals.length > 1) throw new VpnError('USAGE', `keygen takes exactly one PATH${f.client !== undefined ? ' (the client key file to write)' : ''}`);
  const client = str(f, 'client');
  const keyring = str(f, 'keyring');
  if (client === undefined) {
    refuse(f, ['keyring', 'tun-address', 'modes'], (n) => `${n} needs --client NAME (a key for one client of a keyring)`);
    if (existsSync(path)) throw new VpnError('USAGE', `${path} already exists; keygen never overwrites a key`);
    const key = randomBytes(KEYFILE_LEN);
    writeNewPrivateFile(path, Buffer.from(key).toString('hex') + '\n');
    key.fill(0);
    log.info(`wrote a new 256-bit key to ${path}; copy it to the other end over a trusted channel`);
    return EXIT_OK;
  }
  if (keyring === undefined) throw new VpnError('USAGE', 'keygen --client NAME needs --keyring FILE (the server\'s keyring to add the key to)');
  const addrs = tunPrefixes((f['tun-address'] as string[] | undefined) ?? [], '--tun-address', -1);
  const modes = str(f, 'modes')?.split(',') ?? null;
  for (const m of modes ?? []) if (!(KEY_MODES as readonly string[]).includes(m)) throw new VpnError('USAGE', `--modes: "${printable(m)}" is not a mode (${KEY_MODES.join(', ')})`);
  if (existsSync(path)) throw new VpnError('USAGE', `${path} already exists; keygen never overwrites a key`);
  addClient({ name: client, keyring, out: path, tun: addrs.v4, tun6: addrs.v6, modes, insecure: f['insecure-key-file'] === true });
  log.info(`added ${client} to ${keyring} and wrote its key to ${path} (mode 0600); copy ${path} to ${client} over a trusted channel, then send the server SIGHUP (or restart it) to load the keyring`);
  return EXIT_OK;
}

/**
 * The options every session of this process shares, from the flags; checks them all before the secret is read
 * (a usage error never costs a passphrase prompt). Returns a function that loads the secret and completes them.
 */
function sessionBase(f: Flags, role: 'client' | 'server'): () => Promise<SessionBase> {
  let engine;
  try {
    engine = getEngine(str(f, 'engine') ?? 'noble');
  } catch {
    throw new VpnError('USAGE', `--engine: expected one of ${ENGINE_NAMES.join(', ')}, got "${printable(str(f, 'engine')!)}"`);
  }
  if (f.verbose && f.quiet) throw new VpnError('USAGE', '-v (trace everything) and --quiet (errors only) contradict each other; give one');
  if (f.step && !f.verbose) throw new VpnError('USAGE', '--step needs -v');
  if (f.step && !process.stdin.isTTY) throw new VpnError('USAGE', '--step needs a terminal on stdin (it waits for Enter there, and a pipe would lose its data to the prompts)');
  const h = LIMITS.handshakeTimeoutS;
  const handshakeTimeoutMs = seconds('handshake-timeout', str(f, 'handshake-timeout'), h.dflt, h.min, h.max, false);
  const k = LIMITS.keepaliveS;
  const keepaliveMs = seconds('keepalive', str(f, 'keepalive'), k.dflt, k.min, k.max);
  const r = LIMITS.rekeyAfterS;
  const rekeyAfterMs = seconds('rekey-after', str(f, 'rekey-after'), r.dflt, r.min, r.max);
  if (f['rekey-after'] !== undefined && f['no-pfs']) throw new VpnError('USAGE', '--rekey-after needs forward secrecy (protocol version 2): drop --no-pfs');
  log.quiet = f.quiet === true;
  const keyring = str(f, 'keyring');
  if (keyring !== undefined) {
    refuse(f, ['key', 'secret'], (n) => `give either --keyring (a key per client) or ${n} (one key for every client), not both`);
  }
  return async () => {
    let keys: LongTermKeys | KeyringFile;
    let version = f['no-pfs'] ? VERSION_1 : VERSION_2;
    if (keyring !== undefined) {
      // serve --workers: each worker reads the keyring itself (and again on the SIGHUP the supervisor passes on)
      if (workerIndex() > 0) await keyringFromSupervisor(() => process.kill(process.pid, 'SIGTERM'));
      keys = new KeyringFile(keyring, f['insecure-key-file'] === true);
      log.info(`keyring ${keyring}: ${keys.current.size} client key${keys.current.size === 1 ? '' : 's'}`);
    } else {
      const secret = await loadKeys(f);
      keys = secret.keys;
      if (secret.name !== null && role === 'client') {
        if (f['no-pfs']) throw new VpnError('USAGE', `--no-pfs: ${str(f, 'key')} is the client key of ${secret.name} (keygen --client), which always uses protocol version 3 (with forward secrecy)`);
        version = VERSION_3;
      }
    }
    let trace: ((line: string) => void) | undefined;
    if (f.verbose) {
      process.stderr.write('WARNING: -v prints secret key material (session and traffic keys); never share this output\n');
      trace = (line) => process.stderr.write(`[${role}] ${line}\n`);
    }
    const step = f.step ? (what: string) => void prompt(`[${role}] press Enter to ${what}`) : undefined;
    return {
      keys,
      engine,
      version,
      requirePfs: f['require-pfs'] === true,
      handshakeTimeoutMs,
      keepaliveMs,
      rekeyAfterMs,
      trace,
      step,
    };
  };
}

/** Each keyring key's TUN addresses in the server's subnets (the same host rules as tun.ts's pools). */
function tunBindings(keys: KeyringFile, v4: Cidr | null, v6: Cidr6 | null): TunBindings {
  const p4 = v4 ? new AddressPool(v4) : null;
  const p6 = v6 ? new AddressPool6(v6) : null;
  return new TunBindings(keys, p4, p6);
}

async function serveCommand(f: Flags, positionals: string[], rawArgs: readonly string[]): Promise<number> {
  if (positionals.length > 0) throw new VpnError('USAGE', `serve takes no positional arguments (did you mean --listen ${printable(positionals[0]!)}?)`);
  const listenAddr = parseAddress(str(f, 'listen') ?? `${DEFAULT_HOST}:${DEFAULT_PORT}`, '--listen');
  const limits = { listen: listenAddr, maxConns: maxConns(f), graceMs: graceMs(f), ...opsOptions(f) };
  const tun = f.tun as string[] | undefined;
  const forward = str(f, 'forward');
  if (tun !== undefined) {
    refuse(f, ['forward', 'proxy-protocol', 'workers'], (n) => `${n} belongs to port forwarding, not to TUN mode; use one or the other`);
    refuse(f, ['once'], () => '--once does not apply to --tun; a TUN server serves every client until it is stopped');
    if (tun.includes('auto')) throw new VpnError('USAGE', "serve --tun needs the server's tunnel address and subnet, as in --tun 10.66.0.1/24 (or --tun fd00:66::1/64)");
    const { v4, v6 } = tunPrefixes(tun, '--tun');
    const m = mtu(f) ?? DEFAULT_MTU;
    if (v6 && m < MIN_MTU6) throw mtuTooSmallFor6(m, `--tun ${formatPrefix(v6)} puts IPv6 in the tunnel`);
    const r = routes(f);
    for (const c of r) {
      if (isCidr6(c) ? !v6 : !v4) throw new VpnError('USAGE', `--route ${formatPrefix(c)} is ${isCidr6(c) ? 'IPv6' : 'IPv4'}, but the tunnel carries no ${isCidr6(c) ? 'IPv6' : 'IPv4'}; add --tun with such a prefix`);
    }
    const o = { address: v4, address6: v6, name: tunName(f), mtu: m, routes: r.filter((c): c is Cidr => !isCidr6(c)), routes6: r.filter(isCidr6) };
    const drop = privilegeDrop(f);
    const base = sessionBase(f, 'server');
    checkTunSupport();
    if (f['no-offload']) process.env.VPN_TUN_OFFLOAD = 'off'; // tun.ts offloadWanted
    const b = await base();
    const bindings = b.keys instanceof KeyringFile ? tunBindings(b.keys, v4, v6) : undefined;
    const t = openTunServer({ ...o, bindings });
    try {
      // Root is needed no more once the interface is up; a port below 1024 may have to be bound again (privileges.ts).
      if (drop) dropPrivileges(drop, limits.listen.kind === 'tcp' && limits.listen.port > 0 && limits.listen.port < 1024 ? [CAP_NET_BIND_SERVICE] : []);
      return await serve(b, limits, t.mode);
    } finally {
      t.close();
    }
  }
  tunFlagsAlone(f, '--tun ADDR/PREFIX');
  if (forward !== undefined) {
    refuse(f, ['once'], () => '--once does not apply to --forward; a forwarding server serves every client until it is stopped');
    const target = parseAddress(forward, '--forward');
    const workers = integer('workers', str(f, 'workers'), 1, 1, MAX_WORKERS);
    if (workers > 1 && f.step) throw new VpnError('USAGE', '--workers cannot be used with --step');
    if (workers > 1) refuse(f, ['metrics'], (n) => `${n} does not take --workers yet (each worker has counters of its own, and one port cannot show them all); use bun vpn.ts status, which asks every worker, or run one server per core behind a load balancer (--accept-proxy)`);
    const base = await sessionBase(f, 'server')();
    if (workers > 1) return await superviseWorkers({ workers, listen: listenAddr, keys: base.keys instanceof KeyringFile ? null : (base.keys as LongTermKeys), args: rawArgs, graceMs: limits.graceMs });
    return await serve(base, { ...limits, reusePort: workerIndex() > 0 }, forwardMode(target, f['proxy-protocol'] === true));
  }
  refuse(f, ['proxy-protocol', 'workers'], (n) => `${n} needs --forward (stdio and TUN servers run in one process)`);
  const base = await sessionBase(f, 'server')();
  const io = new StdioBridge();
  return await serve(base, { ...limits, once: f.once === true, beforeExit: () => io.drained() }, stdioMode(io, 'server'));
}

async function connectCommand(f: Flags, positionals: string[]): Promise<number> {
  if (positionals.length > 1) throw new VpnError('USAGE', 'connect takes at most one address');
  const target = parseAddress(positionals[0] ?? `${DEFAULT_HOST}:${DEFAULT_PORT}`, 'address');
  const grace = graceMs(f);
  const tun = f.tun as string[] | undefined;
  const local = str(f, 'local');
  if (local === undefined) refuse(f, ['max-conns'], () => '--max-conns applies to connect --local (a plain connect opens one session)');
  if (tun !== undefined) {
    refuse(f, ['local'], (n) => `${n} belongs to port forwarding, not to TUN mode; use one or the other`);
    if (tun.includes('auto') && tun.length > 1) throw new VpnError('USAGE', '--tun auto asks for every address the server has; give it alone, or give the addresses you want instead');
    // A bare ADDR gets the server's prefix: -1 stands for "whatever the subnet is".
    const { v4, v6 } = tun.includes('auto') ? { v4: null, v6: null } : tunPrefixes(tun, '--tun (auto, ADDR or ADDR/PREFIX)', -1);
    const m = mtu(f);
    const ipv6 = m === undefined || m >= MIN_MTU6;
    if (v6 && !ipv6) throw mtuTooSmallFor6(m!, `--tun ${printable(tun.find((t) => t.includes(':'))!)} asks for IPv6`);
    const r = routes(f);
    const r6 = r.find(isCidr6);
    if (r6 && !ipv6) throw mtuTooSmallFor6(m!, `--route ${formatPrefix(r6)} needs IPv6 in the tunnel`);
    const o = { request: v4, request6: v6, ipv6, name: tunName(f), mtu: m, routes: r, acceptRoutes: f['accept-routes'] === true };
    const drop = privilegeDrop(f);
    const base = sessionBase(f, 'client');
    checkTunSupport();
    if (f['no-offload']) process.env.VPN_TUN_OFFLOAD = 'off'; // tun.ts offloadWanted
    const b = await base();
    const t = openTunClient(o);
    try {
      if (drop) dropPrivileges(drop, [CAP_NET_ADMIN]); // addresses and routes come with each session's CONFIG
      return await connectOne(b, target, grace, t.mode, { reconnect: f['no-reconnect'] !== true, packets: true });
    } finally {
      t.close();
    }
  }
  tunFlagsAlone(f, '--tun auto (or --tun ADDR/PREFIX)');
  refuse(f, ['no-reconnect'], () => '--no-reconnect applies to connect --tun (other modes never reconnect: a stream cannot resume)');
  refuse(f, ['accept-routes'], () => '--accept-routes applies to connect --tun (the routes a TUN server pushes)');
  if (local !== undefined) {
    const localAddr = parseAddress(local, '--local', DEFAULT_HOST);
    const limits = { local: localAddr, server: target, maxConns: maxConns(f), graceMs: grace };
    return await serveLocal(await sessionBase(f, 'client')(), limits, localMode);
  }
  const base = await sessionBase(f, 'client')();
  const io = new StdioBridge();
  return await connectOne(base, target, grace, stdioMode(io, 'client'), { beforeExit: () => io.drained() });
}

/** `--control`, `--metrics` and `--accept-proxy` of serve, checked (control.ts, metrics.ts, proxy.ts). */
function opsOptions(f: Flags): { control?: string | null; controlWorker: number; metrics?: { host: string; port: number }; acceptProxy: boolean } {
  const m = str(f, 'metrics');
  if (f['metrics-public'] && m === undefined) throw new VpnError('USAGE', '--metrics-public needs --metrics HOST:PORT');
  let metrics: { host: string; port: number } | undefined;
  if (m !== undefined) {
    const a = parseAddress(m, '--metrics');
    if (a.kind !== 'tcp') throw new VpnError('USAGE', '--metrics takes HOST:PORT (Prometheus scrapes over TCP), not a unix socket');
    if (!isLoopback(a.host) && !f['metrics-public']) {
      throw new VpnError('USAGE', `--metrics ${printable(m)} is not a loopback address: anyone who can reach it would see the counters; add --metrics-public if that is what you want`);
    }
    metrics = { host: a.host, port: a.port };
  }
  const c = str(f, 'control');
  // Each worker of serve --workers has a socket of its own, PATH-wN.sock (status asks them all).
  return { control: c === 'none' ? null : c, controlWorker: workerIndex(), metrics, acceptProxy: f['accept-proxy'] === true };
}

async function statusCommand(f: Flags, positionals: string[]): Promise<number> {
  if (positionals.length > 0) throw new VpnError('USAGE', `status takes no positional arguments (give --control PATH, or the --listen the server was started with)`);
  const c = str(f, 'control');
  if (c === 'none') throw new VpnError('USAGE', '--control none turns the control socket off; status needs one');
  const listen = str(f, 'listen');
  if (c !== undefined && listen !== undefined) throw new VpnError('USAGE', 'give either --control PATH or --listen ADDR, not both');
  if (c === undefined && listen === undefined) {
    // Neither: every server of this user that answers in the default directory, as `wg show` shows every interface.
    const servers = await queryEvery();
    process.stdout.write(f.json ? `${JSON.stringify({ format: STATUS_FORMAT, servers }, null, 2)}\n` : servers.map(formatStatus).join('\n'));
    return EXIT_OK;
  }
  const answers = await queryAll(c ?? defaultControlPath(parseAddress(listen!, '--listen')));
  if (f.json) process.stdout.write(`${JSON.stringify(answers.length === 1 ? answers[0] : { format: answers[0]!.format, workers: answers }, null, 2)}\n`);
  else process.stdout.write(answers.map(formatStatus).join('\n'));
  return EXIT_OK;
}

function helpFor(command: string | undefined): string {
  if (command === 'status') return USAGE_STATUS;
  return command === 'serve' ? USAGE_SERVE : command === 'connect' ? USAGE_CONNECT : command === 'keygen' ? USAGE_KEYGEN : USAGE_MAIN;
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === undefined) {
    process.stderr.write(USAGE_MAIN);
    return EXIT_USAGE;
  }
  if (command === '--help' || command === '-h' || command === 'help') {
    const topic = rest[0];
    if (topic !== undefined && !COMMANDS.includes(topic)) throw new VpnError('USAGE', `help: unknown command "${printable(topic)}" (expected ${COMMANDS.join(', ')})`);
    process.stdout.write(helpFor(topic));
    return EXIT_OK;
  }
  if (command === '--version' || command === 'version') {
    process.stdout.write(`vpn ${VERSION}\n`);
    return EXIT_OK;
  }
  if (!COMMANDS.includes(command)) throw new VpnError('USAGE', `unknown command "${printable(command)}" (expected ${COMMANDS.join(', ')})`);
  let parsed: ParsedArgs;
  try {
    parsed = parseCommandLine(command, rest);
  } catch (e) {
    throw Object.assign(asVpnError(e, 'USAGE'), { command });
  }
  let { flags, positionals } = parsed;
  // --config FILE: the file's values, under the command line's (config.ts); workers get the merged flags as argv.
  let cfg: Config | null = null;
  let args: readonly string[] = rest;
  if (typeof flags.config === 'string' && !flags.help) {
    try {
      cfg = readConfig(flags.config, command, OPTIONS, COMMAND_FLAGS[command]!, flags['insecure-key-file'] === true);
    } catch (e) {
      throw Object.assign(asVpnError(e, 'USAGE'), { command });
    }
    ({ flags, positionals } = mergeFlags(cfg, flags, positionals));
    delete flags.config;
    args = flagsToArgs(flags, OPTIONS);
    if (cfg.lines.has('secret')) secretFromConfig = `config file ${cfg.path}`;
  }
  if (flags.help) {
    process.stdout.write(helpFor(command));
    return EXIT_OK;
  }
  try {
    if (command === 'keygen') return keygen(flags, positionals);
    if (command === 'serve') return await serveCommand(flags, positionals, args);
    if (command === 'status') return await statusCommand(flags, positionals);
    return await connectCommand(flags, positionals);
  } catch (e) {
    const err = asVpnError(e, 'USAGE');
    throw Object.assign(cfg ? locate(err, cfg) : err, { command });
  }
}

if (import.meta.main) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (e) => {
      const err = asVpnError(e, 'USAGE');
      log.error(`vpn: ${err.sentence}`);
      const command = (e as { command?: string }).command;
      if (err.code === 'USAGE') log.error(`(bun vpn.ts ${command ? `${command} ` : ''}--help lists the options)`);
      process.exit(err.exitStatus === EXIT_OK ? EXIT_USAGE : err.exitStatus);
    },
  );
}
