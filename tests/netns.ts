/**
 * Network namespaces for the tests, in one place: the only code that creates and removes them.
 *
 * - `sh`, `must`, `inNetns`, `execIn`: run a command (here, or inside a namespace) and collect its output.
 * - `netnsUnavailable`: why namespaces cannot be made here (not Linux, no `ip`, not root…), for a skip message.
 * - `Namespaces`: a set of namespaces named `vt<tag><suffix>`, each with its loopback up, joined by veth pairs, all
 *   removed together on `remove()` / dispose and, should the run die first, when the process exits.
 * - `Netns`: two namespaces A and B joined by one link with `delay`/`loss` impairment — a veth pair with
 *   `tc … netem`, or, on kernels without netem, a TUN pair joined by a user-space relay (`netem-relay` below).
 *
 * Names carry a random tag, so parallel runs never collide, and nothing is configured outside the namespaces.
 */
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { Proc, until, VPN } from './helpers.ts';

// ---- commands ----

/** Run `argv` to completion (SIGKILL after `timeoutMs`): exit code (-1 if killed), stdout, stderr. */
export function sh(argv: string[], timeoutMs = 100_000): { code: number; ok: boolean; out: string; err: string } {
  const r = Bun.spawnSync(argv, { stdin: 'ignore', stdout: 'pipe', stderr: 'pipe', timeout: timeoutMs, killSignal: 'SIGKILL' });
  const code = r.exitCode ?? -1;
  return { code, ok: code === 0, out: r.stdout.toString(), err: r.stderr.toString() };
}

/** Run `argv`; throw with its stderr when it fails. Returns stdout. */
export function must(argv: string[]): string {
  const r = sh(argv);
  if (!r.ok) throw new Error(`${argv.join(' ')} failed: ${(r.err || r.out).trim()}`);
  return r.out;
}

/** `argv` as a command run inside namespace `ns`. */
export const inNetns = (ns: string, argv: string[]): string[] => ['ip', 'netns', 'exec', ns, ...argv];

/** Run `argv` inside namespace `ns` to completion. */
export const execIn = (ns: string, argv: string[]) => sh(inNetns(ns, argv));

/**
 * Make sure `tools` (from iproute2) exist; as root, install iproute2 when they do not. Returns a reason when
 * impossible.
 */
export function ensureIproute2(tools: readonly string[] = ['ip', 'tc']): string | null {
  const have = () => sh(['sh', '-c', tools.map((t) => `command -v ${t}`).join(' && ')]).ok;
  if (have()) return null;
  const names = tools.join('/');
  if (process.getuid?.() !== 0) return `${names} (iproute2) missing and we are not root to install them`;
  sh(['sh', '-c', 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2']);
  return have() ? null : `${names} (iproute2) missing and could not be installed`;
}

/**
 * Null when this machine lets us create a network namespace, else the reason it does not (for a skip message).
 * `check`, given a fresh namespace, can name a further reason (a missing qdisc, say); the namespace is removed after.
 */
export function netnsUnavailable(check?: (ns: string) => string | null): string | null {
  if (process.platform !== 'linux') return `not Linux (${process.platform})`;
  const missing = ensureIproute2(['ip']);
  if (missing) return missing;
  const probe = new Namespaces();
  try {
    const ns = probe.add(probe.name('p'));
    return check?.(ns) ?? null;
  } catch (e) {
    return `cannot create a network namespace (${(e as Error).message})`;
  } finally {
    probe.remove();
  }
}

// ---- namespaces ----

/**
 * Network namespaces created together and removed together. `name(suffix)` gives `vt<tag><suffix>` (the tag is
 * random, so `ip netns list` shows whether any of them is left); `add` creates one with its loopback up; `veth`
 * joins two. `remove()` (also on dispose, and at process exit if a run dies before its cleanup) deletes them all,
 * which takes their interfaces (and routes, and addresses) with them.
 */
export class Namespaces {
  readonly tag: string;
  /** every namespace this set created, removed or not */
  readonly names: string[] = [];
  private live: string[] = [];
  private hooked = false;
  private readonly onExit = () => this.remove();

  constructor(tag = randomBytes(3).toString('hex')) {
    this.tag = tag;
  }

  name(suffix: string): string {
    return `vt${this.tag}${suffix}`;
  }

  /** Create namespace `ns` with its loopback up; returns `ns`. Throws with the failing command. */
  add(ns: string): string {
    must(['ip', 'netns', 'add', ns]);
    this.names.push(ns);
    this.live.push(ns);
    if (!this.hooked) {
      this.hooked = true;
      process.on('exit', this.onExit); // even if the run dies before its cleanup
    }
    must(['ip', '-n', ns, 'link', 'set', 'lo', 'up']);
    return ns;
  }

  /**
   * A veth pair: `devA` in namespace `a`, `devB` in namespace `b`. With addresses (`ADDR/PREFIX`), each end gets
   * its address and is brought up; without, the ends are left down and unaddressed (see `address`).
   */
  veth(a: string, devA: string, b: string, devB: string, cidrs?: { a: string; b: string }): void {
    must(['ip', '-n', a, 'link', 'add', devA, 'type', 'veth', 'peer', 'name', devB, 'netns', b]);
    if (cidrs) {
      this.address(a, devA, cidrs.a);
      this.address(b, devB, cidrs.b);
    }
  }

  /**
   * Give `dev` in namespace `ns` the address `cidr` (ADDR/PREFIX, IPv4 or IPv6) and bring it up. An IPv6 address
   * skips duplicate address detection (nodad), so that it is usable at once, not after a second or two.
   */
  address(ns: string, dev: string, cidr: string): void {
    must(['ip', '-n', ns, 'addr', 'add', cidr, 'dev', dev, ...(cidr.includes(':') ? ['nodad'] : [])]);
    must(['ip', '-n', ns, 'link', 'set', dev, 'up']);
  }

  /** Delete every namespace of this set (retrying one that is still listed). Idempotent. */
  remove(): void {
    for (const ns of this.live.splice(0)) {
      for (let i = 0; i < 10; i++) {
        if (!sh(['ip', 'netns', 'del', ns]).ok || !sh(['ip', 'netns', 'list']).out.includes(ns)) break;
        Bun.sleepSync(100);
      }
    }
    if (this.hooked) {
      this.hooked = false;
      process.off('exit', this.onExit);
    }
  }

  /** Whether every namespace this set created is gone. */
  get removed(): boolean {
    const list = sh(['ip', 'netns', 'list']).out;
    return this.names.every((ns) => !list.includes(ns));
  }

  [Symbol.dispose](): void {
    this.remove();
  }
}

// ---- two namespaces and an impaired link ----

/** Impairment of the link between the two namespaces, in each direction. */
export interface Impairment {
  delayMs: number;
  lossPct: number;
  /** MTU of the relayed TUN link, when the relay is used (default RELAY_MTU) */
  mtu?: number;
}

/**
 * Two network namespaces, A and B, joined by one link with `subnet`.1 in A and `subnet`.2 in B. With an
 * impairment, the link is a veth pair with `tc qdisc … netem delay D loss L` on both ends; where the kernel has no
 * netem (some VM kernels ship without sch_netem), it is a pair of TUN interfaces joined by `netemRelay` below, a
 * user-space process that applies the same delay and loss to every packet. `link` says which one is in use.
 * Names carry a random suffix; `remove` (also on dispose) kills the relay and deletes the namespaces, which takes
 * their interfaces with them.
 */
export class Netns {
  readonly a: string;
  readonly b: string;
  readonly devA: string;
  readonly devB: string;
  readonly addrA: string;
  readonly addrB: string;
  /** how A and B are joined, for the test log */
  link = 'veth';
  private readonly spaces = new Namespaces();
  private relay: Proc | null = null;

  private constructor(subnet: string) {
    const id = this.spaces.tag;
    this.a = this.spaces.name('a');
    this.b = this.spaces.name('b');
    this.devA = `vpa${id}`;
    this.devB = `vpb${id}`;
    this.addrA = `${subnet}.1`;
    this.addrB = `${subnet}.2`;
  }

  /** Null when this machine lets us create the namespaces and impair their link, else the reason it does not. */
  static probe(): string | null {
    return netnsUnavailable((ns) => {
      const missing = ensureIproute2(); // tc as well as ip
      if (missing) return missing;
      // Impairment needs netem, or TUN for the user-space relay.
      const netem = execIn(ns, ['tc', 'qdisc', 'add', 'dev', 'lo', 'root', 'netem', 'delay', '1ms']).ok;
      return !netem && !existsSync('/dev/net/tun') ? 'this kernel has neither the netem qdisc nor /dev/net/tun to impair a link with' : null;
    });
  }

  /** Create the namespaces and the link. Throws with the failing command; cleans up what it made first. */
  static async create(o: { subnet?: string; impair?: Impairment } = {}): Promise<Netns> {
    const missing = ensureIproute2();
    if (missing) throw new Error(missing);
    const n = new Netns(o.subnet ?? '192.168.78');
    try {
      n.spaces.add(n.a);
      n.spaces.add(n.b);
      n.spaces.veth(n.a, n.devA, n.b, n.devB);
      let netem = true;
      if (o.impair) {
        const spec = ['delay', `${o.impair.delayMs}ms`, 'loss', `${o.impair.lossPct}%`];
        const r = execIn(n.a, ['tc', 'qdisc', 'add', 'dev', n.devA, 'root', 'netem', ...spec]);
        if (r.ok) {
          must(inNetns(n.b, ['tc', 'qdisc', 'add', 'dev', n.devB, 'root', 'netem', ...spec]));
          n.link = `veth with tc netem ${spec.join(' ')} on both ends`;
        } else if (/qdisc kind is unknown|No such file/i.test(r.out + r.err)) {
          netem = false;
        } else throw new Error(`tc qdisc add … netem failed: ${(r.err || r.out).trim()}`);
      }
      if (!netem) {
        // No netem in this kernel: replace the veth pair by two TUN interfaces and the user-space relay.
        must(['ip', '-n', n.a, 'link', 'del', n.devA]);
        await n.startRelay(o.impair!);
      }
      n.spaces.address(n.a, n.devA, `${n.addrA}/24`);
      n.spaces.address(n.b, n.devB, `${n.addrB}/24`);
    } catch (e) {
      n.remove();
      throw e;
    }
    return n;
  }

  private async startRelay(imp: Impairment): Promise<void> {
    // The relay creates both TUN interfaces in this (the root) namespace; they are then moved into A and B, and
    // keep their file descriptors, so the relay joins the two namespaces from outside.
    const mtu = imp.mtu ?? RELAY_MTU;
    // stdin is a pipe only so that the relay notices when this process dies (EOF) and exits with it.
    const relay = new Proc([process.execPath, import.meta.path, 'netem-relay', this.devA, this.devB, String(imp.delayMs), String(imp.lossPct / 100)], { stdin: 'pipe' });
    this.relay = relay;
    await relay.waitFor(/^ready$/m, 10000);
    must(['ip', 'link', 'set', this.devA, 'netns', this.a]);
    must(['ip', 'link', 'set', this.devB, 'netns', this.b]);
    for (const [ns, dev] of [[this.a, this.devA], [this.b, this.devB]] as const) must(['ip', '-n', ns, 'link', 'set', dev, 'mtu', String(mtu)]);
    this.link = `TUN pair through a user-space relay: delay ${imp.delayMs}ms loss ${imp.lossPct}% each way, MTU ${mtu} (this kernel has no netem)`;
  }

  /** Packets the relay forwarded and dropped so far (null with netem, which keeps its own counters). */
  async relayStats(): Promise<{ forwarded: number; dropped: number } | null> {
    const r = this.relay;
    if (!r) return null;
    r.kill('SIGUSR1');
    const before = r.stderr.length;
    await until(() => /stats .*\n/.test(r.stderr.slice(before)), 3000);
    const m = /stats forwarded=(\d+) dropped=(\d+)/.exec(r.stderr.slice(before));
    return m ? { forwarded: Number(m[1]), dropped: Number(m[2]) } : null;
  }

  /** `bun vpn.ts …` inside namespace `ns`. */
  vpn(ns: string, args: string[], opts: { stdin?: 'pipe' | 'ignore' } = {}): Proc {
    return new Proc(inNetns(ns, [process.execPath, VPN, ...args]), opts);
  }

  /** `tc qdisc show` of both ends (to check the impairment is in place). */
  qdiscs(): string {
    return [[this.a, this.devA], [this.b, this.devB]].map(([ns, dev]) => {
      const r = execIn(ns!, ['tc', 'qdisc', 'show', 'dev', dev!]);
      return `${r.out}${r.err}`.trim();
    }).join('\n');
  }

  /** Kill the relay and delete both namespaces (their interfaces go with them). Idempotent. */
  remove(): void {
    this.relay?.kill('SIGKILL');
    this.relay = null;
    this.spaces.remove();
  }

  /** Whether both namespaces are gone. */
  get removed(): boolean {
    return this.spaces.removed;
  }

  [Symbol.dispose](): void {
    this.remove();
  }
}

// ---- netem in user space ----

/** MTU of the relayed TUN link: an Ethernet's, so every 1500-byte packet takes its own chance of being lost. */
const RELAY_MTU = 1500;
const TUNSETIFF = 0x400454ca;
const IFF_TUN = 0x0001;
const IFF_NO_PI = 0x1000;

/**
 * `bun tests/netns.ts netem-relay DEV_A DEV_B DELAY_MS LOSS`: create two TUN interfaces and copy every IP packet
 * from one to the other after DELAY_MS, dropping each with probability LOSS (0…1) — netem's `delay D loss L`, per
 * direction. Prints `ready` once both exist; on SIGUSR1 prints `stats forwarded=N dropped=N`. Reads are blocking
 * reads on the thread pool (fs.read), so packets of any size up to 64 KiB arrive whole.
 */
async function netemRelay(argv: string[]): Promise<void> {
  const [devA, devB, delayText, lossText] = argv;
  const delayMs = Number(delayText);
  const loss = Number(lossText);
  const { dlopen, FFIType, ptr } = await import('bun:ffi');
  const { openSync, read, writeSync, constants } = await import('node:fs');
  const libc = dlopen('libc.so.6', { ioctl: { args: [FFIType.i32, FFIType.u64, FFIType.ptr], returns: FFIType.i32 } });
  const openTun = (name: string) => {
    const fd = openSync('/dev/net/tun', constants.O_RDWR);
    const ifr = new Uint8Array(40);
    ifr.set(new TextEncoder().encode(name));
    new DataView(ifr.buffer).setUint16(16, IFF_TUN | IFF_NO_PI, true);
    if (libc.symbols.ioctl(fd, TUNSETIFF, ptr(ifr)) < 0) throw new Error(`TUNSETIFF ${name} failed`);
    return fd;
  };
  const stats = { forwarded: 0, dropped: 0 };
  const pump = (from: number, to: number) => {
    const queue: { due: number; pkt: Uint8Array }[] = [];
    let timer: ReturnType<typeof setTimeout> | null = null;
    const deliver = () => {
      timer = null;
      const now = performance.now();
      while (queue.length > 0 && queue[0]!.due <= now) {
        try {
          writeSync(to, queue.shift()!.pkt);
          stats.forwarded++;
        } catch {
          stats.dropped++; // the far interface is down or gone: as a wire would, lose it
        }
      }
      if (queue.length > 0) timer = setTimeout(deliver, Math.max(0, queue[0]!.due - now));
    };
    const next = () => {
      const buf = Buffer.allocUnsafe(1 << 16);
      read(from, buf, 0, buf.length, null, (err, n) => {
        if (err) return; // the interface went away with its namespace
        if (Math.random() < loss) stats.dropped++;
        else {
          queue.push({ due: performance.now() + delayMs, pkt: buf.subarray(0, n) });
          timer ??= setTimeout(deliver, delayMs);
        }
        next();
      });
    };
    next();
  };
  const a = openTun(devA!);
  const b = openTun(devB!);
  process.on('SIGUSR1', () => process.stderr.write(`stats forwarded=${stats.forwarded} dropped=${stats.dropped}\n`));
  // The parent holds our stdin open; EOF means it is gone, and the interfaces must go with us.
  void (async () => {
    for await (const _ of Bun.stdin.stream()) {
      // nothing is ever sent
    }
    process.exit(0);
  })();
  process.stderr.write('ready\n');
  pump(a, b);
  pump(b, a);
}

if (import.meta.main && process.argv[2] === 'netem-relay') {
  netemRelay(process.argv.slice(3)).catch((e) => {
    process.stderr.write(`netem-relay: ${(e as Error).message}\n`);
    process.exit(1);
  });
}
