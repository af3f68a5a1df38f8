/**
 * Keys at rest: the private files that hold them (key files, client key files, the server's keyring) and the
 * keyring itself (PROTOCOL.md §4, §4.1).
 *
 * - A **key file** (`keygen PATH`) holds 64 hex digits: one key shared by two machines.
 * - A **client key file** (`keygen --client NAME --keyring FILE OUT.key`) holds one client's key and its name:
 *
 *       # vpn client key of alice (written by keygen --client); keep it private
 *       name alice
 *       key  3f1c…(64 hex digits)
 *
 *   `connect --key OUT.key` then speaks protocol version 3 (§3), whose message 1 carries a hint by which the server
 *   finds the key; the name never goes on the wire.
 * - A **keyring** (`serve --keyring FILE`) lists the clients a server accepts, one per line, as sshd's
 *   authorized_keys does:
 *
 *       # NAME  KEY  [tun=IPv4] [tun6=IPv6] [modes=tun,forward,stdio,chat]
 *       alice   3f1c…  tun=10.66.0.2 modes=tun
 *       bob     9a07…
 *
 *   Names, keys and addresses are unique; `tun=`/`tun6=` bind a TUN address to the key (WireGuard's AllowedIPs);
 *   `modes=` limits what the key may be used for. Any mistake is an error naming the file and the line.
 *
 * Every such file is opened once and its open descriptor checked (fstat): a regular file that neither group nor
 * others may read or write and that this user owns, or it is refused — as ssh refuses a private key — unless the
 * user opts out (`--insecure-key-file`).
 */
import { equalBytes, randomBytes } from '@noble/ciphers/utils.js';
import { _SHA256, sha256 } from '@noble/hashes/sha2.js';
import { closeSync, fstatSync, openSync, readFileSync, type Stats, unlinkSync, writeSync, constants as fsc } from 'node:fs';
import { type Cidr, type Cidr6, formatIPv4, formatIPv6, parseIPv4, parseIPv6 } from './address.ts';
import { VpnError } from './errors.ts';
import { type ClientKey, KEYFILE_LEN, keysFromKeyFile, type LongTermKeys, type ServerKeys } from './handshake.ts';
import { log } from './log.ts';

// ---- private files ----

/**
 * Read a private file (`what` names it in errors: "key file", "keyring"): opened once, the descriptor checked and
 * read, so what is checked is what is read. Throws USAGE naming the file and the problem.
 */
export function readPrivateFile(path: string, insecure: boolean, what: string): string {
  const { text, st } = readFileOnce(path, what, MAX_FILE);
  const uid = process.getuid?.() ?? st.uid;
  const problems = privacyProblems(st);
  if (problems.length > 0) {
    const fix = `chmod 600 ${path}${st.uid !== uid ? ` and chown it to this user (or make your own copy)` : ''}`;
    if (!insecure) throw new VpnError('USAGE', `${what} ${path} ${problems.join(' and ')}; ${fix}, or pass --insecure-key-file to use it anyway`);
    log.warn(`warning: ${what} ${path} ${problems.join(' and ')}; using it because of --insecure-key-file (${fix})`);
  }
  return text;
}

/**
 * Open `path` once, check the open descriptor (a regular file of at most `max` bytes) and read it: what is checked
 * is what is read. Returns the text and the fstat (for callers' own checks, privacyProblems). Throws USAGE naming
 * `what` and the file.
 */
export function readFileOnce(path: string, what: string, max: number): { text: string; st: Stats } {
  const failed = (e: unknown) => new VpnError('USAGE', `cannot read ${what} ${path} (${(e as NodeJS.ErrnoException).code ?? 'error'})`);
  let fd: number;
  try {
    fd = openSync(path, fsc.O_RDONLY | fsc.O_NOCTTY | fsc.O_NONBLOCK);
  } catch (e) {
    throw failed(e);
  }
  try {
    let st: Stats;
    try {
      st = fstatSync(fd);
    } catch (e) {
      throw failed(e);
    }
    if (!st.isFile()) throw new VpnError('USAGE', `${what} ${path} is not a regular file`);
    if (st.size > max) throw new VpnError('USAGE', `${what} ${path} is larger than ${max >= 1 << 20 ? `${max >> 20} MiB` : `${max} bytes`}; it is not a ${what}`);
    try {
      return { text: readFileSync(fd, 'utf8'), st };
    } catch (e) {
      throw failed(e);
    }
  } finally {
    closeSync(fd);
  }
}

/**
 * Why a file with this fstat is not private to this user, as phrases ("has mode 0644, which lets …", "is owned by
 * uid N, …"); empty when it is: no group or other bits, and this user's.
 */
export function privacyProblems(st: { mode: number; uid: number }): string[] {
  const uid = process.getuid?.() ?? st.uid;
  const mode = (st.mode & 0o7777).toString(8).padStart(4, '0');
  const problems: string[] = [];
  if ((st.mode & 0o077) !== 0) problems.push(`has mode ${mode}, which lets ${(st.mode & 0o070) !== 0 && (st.mode & 0o007) !== 0 ? 'group and others' : (st.mode & 0o070) !== 0 ? 'its group' : 'others'} read or write it`);
  if (st.uid !== uid) problems.push(`is owned by uid ${st.uid}, not by this user (uid ${uid})`);
  return problems;
}

/** Larger than any keyring of MAX_KEYS lines. */
const MAX_FILE = 4 << 20;

/** Create `path` (mode 0600, never over an existing file) holding `text`. */
export function writeNewPrivateFile(path: string, text: string): void {
  let fd: number;
  try {
    fd = openSync(path, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL, 0o600);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new VpnError('USAGE', code === 'EEXIST' ? `${path} already exists; keygen never overwrites a key` : `cannot create ${path} (${code ?? 'error'})`);
  }
  try {
    writeSync(fd, text);
  } finally {
    closeSync(fd);
  }
}

// ---- key files ----

const HEX64 = /^[0-9a-fA-F]{64}$/;
/** A client's name: what logs, status and metrics call it. Letters, digits, `.`, `_`, `-`; 1 to 32 characters. */
export const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$/;

/** What a key file holds: the 32-byte key, and the client's name for a client key file (else null). */
export interface KeyFile {
  key: Uint8Array;
  name: string | null;
}

/**
 * Parse a key file: 64 hex digits alone (keygen PATH; white space around them ignored), or a client key file's
 * `name` and `key` lines (comments `#` and blank lines ignored).
 */
export function parseKeyFile(text: string, path: string): KeyFile {
  const bare = text.trim();
  if (HEX64.test(bare)) return { key: hexKey(bare), name: null };
  let name: string | null = null;
  let key: Uint8Array | null = null;
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.trim();
    if (line === '' || line.startsWith('#')) continue;
    const [field, value, ...rest] = line.split(/\s+/);
    const at = `key file ${path}, line ${i + 1}`;
    if (rest.length > 0 || value === undefined) throw new VpnError('USAGE', `${at}: expected "name NAME" or "key HEX"`);
    if (field === 'name' && name === null && NAME_RE.test(value)) name = value;
    else if (field === 'key' && key === null && HEX64.test(value)) key = hexKey(value);
    else throw new VpnError('USAGE', `${at}: ${field === 'name' || field === 'key' ? `a bad or repeated ${field}` : `unknown field "${safe(field!)}"`}`);
  }
  if (!key) throw new VpnError('USAGE', `key file ${path} does not hold a key written by keygen (expected 64 hex digits, or the name and key lines of keygen --client)`);
  return { key, name };
}

const hexKey = (hex: string) => new Uint8Array(Buffer.from(hex, 'hex'));
/** File text for an error message: printable, short. */
const safe = (t: string) => (t.length > 40 ? `${t.slice(0, 40)}…` : t).replace(/[^\x20-\x7e]/g, '?');

/** The text of a client key file. */
export function clientKeyFileText(name: string, key: Uint8Array): string {
  return `# vpn client key of ${name} (written by keygen --client); keep it private\nname ${name}\nkey ${Buffer.from(key).toString('hex')}\n`;
}

// ---- the keyring ----

/** Most keys in a keyring: S1 tries every one for each message 1 (two SHA-256 compressions each). */
export const MAX_KEYS = 10_000;
/** The modes a keyring entry may name (`modes=`), as a client's CONFIG names them (§8). */
export const MODES = ['stdio', 'chat', 'forward', 'tun'] as const;

export interface KeyringEntry extends ClientKey {
  readonly name: string;
  readonly keys: LongTermKeys;
  /** the TUN addresses bound to this key (`tun=`, `tun6=`), or null: then the server derives one from the name */
  readonly tun: number | null;
  readonly tun6: bigint | null;
  /** the modes this key may use, or null for every mode */
  readonly modes: readonly string[] | null;
  /** where it was defined, for messages */
  readonly line: number;
}

interface Parsed {
  name: string;
  key: Uint8Array;
  tun: number | null;
  tun6: bigint | null;
  modes: string[] | null;
  line: number;
}

/** Parse keyring text; throws USAGE `keyring FILE, line N: …` at the first mistake. */
export function parseKeyringText(text: string, file: string): Parsed[] {
  const out: Parsed[] = [];
  const names = new Map<string, number>();
  const keys = new Map<string, number>();
  const tuns = new Map<string, number>();
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.replace(/\r$/, '').trim();
    if (line === '' || line.startsWith('#')) continue;
    const n = i + 1;
    const bad = (why: string): never => {
      throw new VpnError('USAGE', `keyring ${file}, line ${n}: ${why}`);
    };
    if (out.length >= MAX_KEYS) bad(`more than ${MAX_KEYS} keys`);
    const [name, hex, ...opts] = line.split(/\s+/) as [string, string | undefined, ...string[]];
    if (!NAME_RE.test(name)) bad(`"${safe(name)}" is not a client name (letters, digits, ".", "_", "-"; 1 to 32 characters, not starting with a punctuation mark)`);
    if (names.has(name)) bad(`the name ${name} is already used on line ${names.get(name)}`);
    if (hex === undefined) bad(`no key after the name ${name} (expected 64 hex digits)`);
    if (!HEX64.test(hex!)) bad(`the key of ${name} is not 64 hex digits`);
    const k = hex!.toLowerCase();
    if (keys.has(k)) bad(`the key of ${name} is the key of line ${keys.get(k)} too; every client needs its own (keygen --client)`);
    const p: Parsed = { name, key: hexKey(k), tun: null, tun6: null, modes: null, line: n };
    for (const opt of opts) {
      const eq = opt.indexOf('=');
      const field = eq > 0 ? opt.slice(0, eq) : opt;
      const value = eq > 0 ? opt.slice(eq + 1) : '';
      if (field === 'tun' && p.tun === null) {
        const a = parseIPv4(value.replace(/\/32$/, ''));
        if (a === null) bad(`tun=${safe(value)} is not an IPv4 address`);
        p.tun = a;
      } else if (field === 'tun6' && p.tun6 === null) {
        const a = parseIPv6(value.replace(/\/128$/, ''));
        if (a === null) bad(`tun6=${safe(value)} is not an IPv6 address`);
        p.tun6 = a;
      } else if (field === 'modes' && p.modes === null) {
        const modes = value.split(',');
        for (const m of modes) if (!(MODES as readonly string[]).includes(m)) bad(`modes=${safe(value)}: "${safe(m)}" is not a mode (${MODES.join(', ')})`);
        p.modes = modes;
      } else if (field === 'tun' || field === 'tun6' || field === 'modes') {
        bad(`${field}= is given twice`);
      } else {
        bad(`unknown option "${safe(opt)}" (expected tun=, tun6= or modes=)`);
      }
    }
    for (const a of [p.tun === null ? null : formatIPv4(p.tun), p.tun6 === null ? null : formatIPv6(p.tun6)]) {
      if (a === null) continue;
      if (tuns.has(a)) bad(`the address ${a} of ${name} is bound to the key of line ${tuns.get(a)} already`);
      tuns.set(a, n);
    }
    names.set(name, n);
    keys.set(k, n);
    out.push(p);
  }
  return out;
}

/**
 * The keys of `serve --keyring`: every client by name. `find` (S1) tries every key whatever it finds — the time a
 * message 1 takes does not tell which key, if any, it named — and compares each hint in constant time.
 */
export class Keyring implements ServerKeys {
  readonly shared = null;
  readonly entries: readonly KeyringEntry[];
  private readonly hints: HintTable;
  private readonly byName = new Map<string, KeyringEntry>();

  constructor(
    readonly file: string,
    parsed: Parsed[],
  ) {
    this.entries = parsed.map((p) => {
      const e: KeyringEntry = { name: p.name, keys: keysFromKeyFile(p.key), tun: p.tun, tun6: p.tun6, modes: p.modes, line: p.line };
      p.key.fill(0);
      return e;
    });
    this.hints = new HintTable(this.entries.map((e) => e.keys.hint!));
    for (const e of this.entries) this.byName.set(e.name, e);
  }

  get size(): number {
    return this.entries.length;
  }

  get(name: string): KeyringEntry | undefined {
    return this.byName.get(name);
  }

  find(ra: Uint8Array, h: Uint8Array): KeyringEntry | null {
    const i = this.hints.find(ra, h);
    return i < 0 ? null : this.entries[i]!;
  }

  /** Whether `other` still holds `name` with the same key (a reload keeps that client's sessions). */
  sameKey(name: string, other: Keyring): boolean {
    const a = this.byName.get(name);
    const b = other.byName.get(name);
    return a !== undefined && b !== undefined && equalBytes(a.keys.auth, b.keys.auth) && equalBytes(a.keys.wrap, b.keys.wrap);
  }
}

/**
 * The hint check of S1.3a for every key at once: HMAC-SHA256(K_hint_i, R_A)[0:16] = H for which i. HMAC (RFC 2104)
 * over a 32-byte message is two SHA-256 compressions once each key's inner and outer states (after its ipad and opad
 * blocks) are computed at load; this runs exactly those two compressions per key, on noble's SHA-256 compression
 * function, with the padding of FIPS 180-4 §5.1.1 laid out once per message 1 — about a third of the cost of
 * cloning a keyed HMAC per key. Every key is tried, whatever matches, and each comparison is branch-free.
 * tests/keyring.test.ts checks it against node:crypto's HMAC and against handshake.ts keyHint.
 */
export class HintTable {
  /** per key: the 8 words of its inner state, then the 8 of its outer state */
  private readonly states: Uint32Array;
  private readonly work = new _SHA256();
  /** block 1: R_A ‖ 0x80 ‖ 0… ‖ bit length of ipad block + R_A (768); block 2: the inner digest ‖ the same padding */
  private readonly block1 = new DataView(new ArrayBuffer(64));
  private readonly block2 = new DataView(new ArrayBuffer(64));
  readonly size: number;

  constructor(keys: readonly Uint8Array[]) {
    this.size = keys.length;
    this.states = new Uint32Array(keys.length * 16);
    keys.forEach((k, i) => {
      if (k.length !== 32) throw new Error('K_hint must be 32 bytes');
      for (const [pad, at] of [[0x36, 0], [0x5c, 8]] as const) {
        const block = new Uint8Array(64).fill(pad);
        for (let j = 0; j < 32; j++) block[j]! ^= k[j]!;
        const h = new _SHA256();
        h.update(block); // one whole block: processed at once, nothing left buffered
        this.states.set(stateOf(h), i * 16 + at);
        block.fill(0);
        h.destroy();
      }
    });
    for (const b of [this.block1, this.block2]) {
      b.setUint8(32, 0x80);
      b.setUint32(60, (64 + 32) * 8);
    }
  }

  /** The index of the key whose hint over `ra` (32 bytes) is `h` (HINT_LEN bytes), or -1. */
  find(ra: Uint8Array, h: Uint8Array): number {
    if (ra.length !== 32 || h.length !== 16) return -1;
    const b1 = this.block1;
    const b2 = this.block2;
    for (let j = 0; j < 32; j++) b1.setUint8(j, ra[j]!);
    const hv = new DataView(h.buffer, h.byteOffset, 16);
    const h0 = hv.getUint32(0) | 0;
    const h1 = hv.getUint32(4) | 0;
    const h2 = hv.getUint32(8) | 0;
    const h3 = hv.getUint32(12) | 0;
    const w = this.work as unknown as Sha256State;
    const st = this.states;
    let found = -1;
    for (let i = 0, o = 0; i < this.size; i++, o += 16) {
      w.set(st[o]!, st[o + 1]!, st[o + 2]!, st[o + 3]!, st[o + 4]!, st[o + 5]!, st[o + 6]!, st[o + 7]!);
      w.process(b1, 0);
      b2.setUint32(0, w.A);
      b2.setUint32(4, w.B);
      b2.setUint32(8, w.C);
      b2.setUint32(12, w.D);
      b2.setUint32(16, w.E);
      b2.setUint32(20, w.F);
      b2.setUint32(24, w.G);
      b2.setUint32(28, w.H);
      w.set(st[o + 8]!, st[o + 9]!, st[o + 10]!, st[o + 11]!, st[o + 12]!, st[o + 13]!, st[o + 14]!, st[o + 15]!);
      w.process(b2, 0);
      const diff = (w.A ^ h0) | (w.B ^ h1) | (w.C ^ h2) | (w.D ^ h3);
      // found = i when diff is 0 and nothing was found yet, else unchanged: no branch on secret-dependent data
      const hit = ((diff | -diff) >>> 31) ^ 1; // 1 when diff === 0
      const first = found >>> 31; // 1 while found === -1
      const take = -(hit & first); // all ones when both
      found = (found & ~take) | (i & take);
    }
    w.set(0, 0, 0, 0, 0, 0, 0, 0);
    w.roundClean(); // the message schedule noble keeps between calls
    for (let j = 0; j < 32; j++) {
      b1.setUint8(j, 0);
      b2.setUint8(j, 0);
    }
    return found;
  }
}

/** noble's SHA-256 state and compression function (protected in its types, public in its code). */
interface Sha256State {
  A: number;
  B: number;
  C: number;
  D: number;
  E: number;
  F: number;
  G: number;
  H: number;
  set(A: number, B: number, C: number, D: number, E: number, F: number, G: number, H: number): void;
  process(view: DataView, offset: number): void;
  roundClean(): void;
}

function stateOf(h: _SHA256): number[] {
  const s = h as unknown as Sha256State;
  return [s.A, s.B, s.C, s.D, s.E, s.F, s.G, s.H].map((x) => x >>> 0);
}

/** Read and check `serve --keyring FILE`; throws USAGE naming the file (and the line). An empty keyring is refused. */
export function loadKeyring(path: string, insecure = false): Keyring {
  const parsed = parseKeyringText(readPrivateFile(path, insecure, 'keyring'), path);
  if (parsed.length === 0) throw new VpnError('USAGE', `keyring ${path} holds no keys; add one with bun vpn.ts keygen --client NAME --keyring ${path} NAME.key`);
  return new Keyring(path, parsed);
}

/** The text of one keyring line. */
export function keyringLine(name: string, key: Uint8Array, tun: number | null, tun6: bigint | null, modes: readonly string[] | null): string {
  const opts = [tun === null ? '' : ` tun=${formatIPv4(tun)}`, tun6 === null ? '' : ` tun6=${formatIPv6(tun6)}`, modes === null ? '' : ` modes=${modes.join(',')}`].join('');
  return `${name} ${Buffer.from(key).toString('hex')}${opts}\n`;
}

const KEYRING_HEADER = '# vpn keyring (serve --keyring): one client per line; add clients with bun vpn.ts keygen --client NAME --keyring FILE OUT.key\n# NAME  KEY  [tun=IPv4] [tun6=IPv6] [modes=tun,forward,stdio,chat]\n';

export interface NewClient {
  name: string;
  keyring: string;
  out: string;
  tun: Cidr | null;
  tun6: Cidr6 | null;
  modes: string[] | null;
  insecure?: boolean;
}

/**
 * `keygen --client NAME --keyring FILE OUT.key`: a fresh key for NAME, appended to FILE (created 0600 when absent)
 * and written alone with the name to OUT.key (0600). Refuses a name or address the keyring has, and an existing
 * OUT.key; FILE is checked like every private file. Nothing is written unless everything checks out.
 */
export function addClient(c: NewClient): void {
  if (!NAME_RE.test(c.name)) throw new VpnError('USAGE', `"${safe(c.name)}" is not a client name (letters, digits, ".", "_", "-"; 1 to 32 characters)`);
  let existing = '';
  let exists = true;
  try {
    existing = readPrivateFile(c.keyring, c.insecure === true, 'keyring');
  } catch (e) {
    if (!(e instanceof VpnError && /\(ENOENT\)$/.test(e.message))) throw e;
    exists = false;
  }
  const key = randomBytes(KEYFILE_LEN);
  const line = keyringLine(c.name, key, c.tun?.addr ?? null, c.tun6?.addr ?? null, c.modes);
  // Check the new line as part of the file, so that every rule (name, address, key) is the parser's own.
  const sep = existing === '' || existing.endsWith('\n') ? '' : '\n';
  try {
    parseKeyringText(existing + sep + line, c.keyring);
    writeNewPrivateFile(c.out, clientKeyFileText(c.name, key));
    try {
      if (!exists) writeNewPrivateFile(c.keyring, KEYRING_HEADER + line);
      else {
        const fd = openSync(c.keyring, fsc.O_WRONLY | fsc.O_APPEND);
        try {
          writeSync(fd, sep + line);
        } finally {
          closeSync(fd);
        }
      }
    } catch (e) {
      unlinkSync(c.out); // no client key the keyring does not hold
      throw e;
    }
  } finally {
    key.fill(0);
  }
}

/**
 * `serve --keyring FILE` as the server's ServerKeys: the keyring read at start-up, replaced by `reload` (SIGHUP).
 * Message 1s are looked up in whichever keyring is current when they arrive.
 */
export class KeyringFile implements ServerKeys {
  readonly shared = null;
  private now: Keyring;
  /** checks a mode adds (TUN: every bound address fits its subnet); a reload that fails one keeps the old keyring */
  private readonly checks: ((ring: Keyring) => void)[] = [];

  constructor(
    readonly path: string,
    private readonly insecure: boolean,
  ) {
    this.now = loadKeyring(path, insecure);
  }

  /** Run `check` on the current keyring now (it throws USAGE to refuse it) and on every reloaded one. */
  addCheck(check: (ring: Keyring) => void): void {
    check(this.now);
    this.checks.push(check);
  }

  get current(): Keyring {
    return this.now;
  }

  find(ra: Uint8Array, h: Uint8Array): KeyringEntry | null {
    return this.now.find(ra, h);
  }

  /**
   * Read the file again. On success returns the previous keyring (to compare with) and makes the new one current;
   * on any mistake throws USAGE (naming file and line) and keeps the current one.
   */
  reload(): Keyring {
    const next = loadKeyring(this.path, this.insecure);
    for (const check of this.checks) check(next);
    const prev = this.now;
    this.now = next;
    return prev;
  }
}

// ---- TUN addresses bound to keys ----

/** A TUN subnet as far as binding cares: its network, prefix and the server's own address (tun.ts AddressPool). */
export interface Subnet<A extends number | bigint> {
  readonly network: A;
  readonly prefix: number;
  readonly server: A;
  isHost(addr: A): boolean;
}

/** The host number a name prefers (§8.5): SHA-256("vpn.ts tun address" ‖ name), its first 8 bytes, mod `hosts`. */
function preferredHost(name: string, hosts: bigint): bigint {
  const h = sha256(new TextEncoder().encode(`vpn.ts tun address\0${name}`));
  return new DataView(h.buffer, h.byteOffset, 8).getBigUint64(0) % hosts;
}

/**
 * Every key's address in one family's subnet. `tun=`/`tun6=` where given (it must be a host address of the subnet and
 * not the server's: else USAGE naming file and line); otherwise the address `previous` gave the name (a reload keeps
 * it while it is still free), else the one its name prefers, probing upward past taken ones. Explicit addresses are
 * placed first, then the rest in file order, so a name's address depends only on the file (and is the same after a
 * restart) and an appended name never moves another one.
 */
export function bindAddresses<A extends number | bigint>(
  ring: Keyring,
  net: Subnet<A>,
  explicit: (e: KeyringEntry) => A | null,
  format: (a: A) => string,
  previous?: ReadonlyMap<string, A>,
): Map<string, A> {
  const out = new Map<string, A>();
  const taken = new Set<A>([net.server]);
  const v6 = typeof net.network === 'bigint';
  const bits = (v6 ? 128 : 32) - net.prefix;
  const size = 1n << BigInt(bits);
  const add = (base: A, i: bigint) => (v6 ? ((base as bigint) + i) : (((base as number) + Number(i)) >>> 0)) as A;
  for (const e of ring.entries) {
    const a = explicit(e);
    if (a === null) continue;
    if (!net.isHost(a) || a === net.server) {
      throw new VpnError('USAGE', `keyring ${ring.file}, line ${e.line}: the address ${format(a)} of ${e.name} is ${a === net.server ? "the server's own address" : `not a host address of the tunnel subnet ${format(net.network)}/${net.prefix}`}`);
    }
    taken.add(a);
    out.set(e.name, a);
  }
  // Host numbers 1 .. size-2 (not the network, not the broadcast or, for IPv6, not the last); the probe is bounded by
  // the subnet's size and by the number of keys (at most MAX_KEYS + 1 addresses are ever taken).
  const hosts = size - 2n;
  for (const e of ring.entries) {
    if (out.has(e.name)) continue;
    const prev = previous?.get(e.name);
    if (prev !== undefined && net.isHost(prev) && !taken.has(prev)) {
      taken.add(prev);
      out.set(e.name, prev);
      continue;
    }
    if (hosts < 1n) break;
    let i = preferredHost(e.name, hosts);
    let found: A | null = null;
    for (let steps = 0n; steps < hosts && steps <= BigInt(taken.size); steps++) {
      const a = add(net.network, i + 1n);
      if (!taken.has(a) && net.isHost(a)) {
        found = a;
        break;
      }
      i = (i + 1n) % hosts;
    }
    if (found === null) throw new VpnError('USAGE', `keyring ${ring.file}: the tunnel subnet ${format(net.network)}/${net.prefix} has no address left for ${e.name} (line ${e.line}); use a larger subnet`);
    taken.add(found);
    out.set(e.name, found);
  }
  return out;
}

/** What a TUN server needs from the keyring: each key's bound addresses, in the subnets it serves. */
export class TunBindings {
  private readonly maps = new WeakMap<Keyring, { v4: Map<string, number> | null; v6: Map<string, bigint> | null }>();
  private last: { v4: Map<string, number> | null; v6: Map<string, bigint> | null } | null = null;

  constructor(
    private readonly keys: KeyringFile,
    private readonly v4: Subnet<number> | null,
    private readonly v6: Subnet<bigint> | null,
  ) {
    keys.addCheck((ring) => this.compute(ring));
    this.last = this.compute(keys.current);
  }

  private compute(ring: Keyring) {
    let m = this.maps.get(ring);
    if (m) return m;
    const v4 = this.v4 ? bindAddresses(ring, this.v4, (e) => e.tun, formatIPv4, this.last?.v4 ?? undefined) : null;
    const v6 = this.v6 ? bindAddresses(ring, this.v6, (e) => e.tun6, formatIPv6, this.last?.v6 ?? undefined) : null;
    m = { v4, v6 };
    this.maps.set(ring, m);
    return m;
  }

  /** The addresses bound to `name` in the current keyring (null for a family the tunnel does not carry). */
  of(name: string): { v4: number | null; v6: bigint | null } {
    const m = this.compute(this.keys.current);
    this.last = m;
    return { v4: m.v4?.get(name) ?? null, v6: m.v6?.get(name) ?? null };
  }
}
