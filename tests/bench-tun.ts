/**
 * The bench's TUN section (`bun run bench --only tun`), in its own module so that tests/bench.ts only calls it:
 * two network namespaces this module creates (and removes) joined by a veth pair, and over it, one after the other,
 *
 *   raw veth         iperf3 straight over the veth: what the namespaces can move at all
 *   ours, native     serve --tun / connect --tun, --engine native (offloads on unless BENCH_TUN_FLAGS says otherwise)
 *   ours, noble      the same with the pure-JS engine (the default)
 *   OpenVPN          2.6 static key over TCP (AES-256-CBC + HMAC-SHA256, as ours), Debian's `openvpn`
 *   wireguard-go     Debian's `wireguard-go` + `wg` (UDP, ChaCha20-Poly1305)
 *
 * each measured as iperf3 throughput client → server and server → client (one TCP stream, `-t` seconds), ping RTT
 * (median of 20) and CPU per side (utime + stime of each tunnel process over the transfer, % of one core). The
 * packages are installed with apt-get when we are root; otherwise (or when that fails) their rows say absent.
 * Addresses: 192.168.78.0/24 on the veth, 10.78.0.0/24 ours, 10.79.0.0/24 wireguard-go, 10.80.0.0/24 OpenVPN —
 * all inside the namespaces; nothing outside them is touched.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Proc, VPN } from './helpers.ts';
import { inNetns, Namespaces, netnsUnavailable, sh } from './netns.ts';

type Record_ = (section: string, name: string, value: number | null, unit: string, note?: string) => void;

const SRV_ADDR = '192.168.78.1';
const CLI_ADDR = '192.168.78.2';

function cpuMs(pid: number): number {
  try {
    const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
    return ((Number(f[11]) + Number(f[12])) * 1000) / 100;
  } catch {
    return NaN;
  }
}

/** Install `pkgs` with apt-get when a command of theirs is missing and we are root; which commands exist after. */
function ensure(cmds: Record<string, string>): Record<string, boolean> {
  const have = (c: string) => sh(['sh', '-c', `command -v ${c}`]).ok;
  const missing = Object.entries(cmds).filter(([c]) => !have(c));
  if (missing.length && process.getuid?.() === 0) {
    sh(['sh', '-c', `apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ${[...new Set(missing.map(([, p]) => p))].join(' ')}`], 300_000);
  }
  return Object.fromEntries(Object.keys(cmds).map((c) => [c, have(c)]));
}

/** iperf3 from the client namespace to `dst` for `secs`; Mbit/s received, and CPU ms of `pids` over it. */
function iperf(ns: string, dst: string, secs: number, reverse: boolean, pids: number[]): { mbps: number; cpu: number[] } {
  const before = pids.map(cpuMs);
  const t0 = performance.now();
  const r = sh(inNetns(ns, ['iperf3', '-c', dst, '-t', String(secs), '-J', '--connect-timeout', '3000', ...(reverse ? ['-R'] : [])]), (secs + 15) * 1000);
  const wall = performance.now() - t0;
  const cpu = pids.map((p, i) => ((cpuMs(p) - before[i]!) / wall) * 100);
  if (!r.ok) return { mbps: NaN, cpu };
  const j = JSON.parse(r.out) as { end: { sum_received: { bits_per_second: number } } };
  return { mbps: j.end.sum_received.bits_per_second / 1e6, cpu };
}

/** Median ping RTT (ms) of `count` echoes from `ns` to `dst`, `interval` seconds apart. */
function pingMs(ns: string, dst: string, count = 20, interval = '0.05'): number {
  const each = sh(inNetns(ns, ['ping', '-n', '-c', String(count), '-i', interval, '-W', '2', dst]), 30_000)
    .out.split('\n')
    .map((l) => /time=([\d.]+)/.exec(l)?.[1])
    .filter((x) => x !== undefined)
    .map(Number)
    .sort((a, b) => a - b);
  return each.length ? each[Math.floor(each.length / 2)]! : NaN;
}

async function waitUntil(cond: () => boolean, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (cond()) return true;
    await Bun.sleep(100);
  }
  return cond();
}

/** every tunnel process started: whatever fails, `measure` kills what is left */
const spawned: Proc[] = [];
const track = (p: Proc) => (spawned.push(p), p);

async function stopProc(p: Proc): Promise<void> {
  p.kill('SIGTERM');
  const t = setTimeout(() => p.kill('SIGKILL'), 4000);
  await p.exit(10_000).catch(() => {});
  clearTimeout(t);
}

/** One system's figures; `up` starts both ends and returns the server's tunnel address and the two processes. */
async function measure(record: Record_, label: string, spaces: { s: string; c: string }, secs: number, up: () => Promise<{ dst: string; pids: [number, number]; stop: () => Promise<void> } | string>) {
  let started: Awaited<ReturnType<typeof up>> | null = null;
  try {
    started = await up();
    if (typeof started === 'string') {
      record('tun', `${label}: client → server`, null, 'Mbit/s', started);
      return;
    }
    const { dst, pids } = started;
    const srvIperf = track(new Proc(inNetns(spaces.s, ['iperf3', '-s', '-B', dst, '-1'])));
    await Bun.sleep(300);
    const fwd = iperf(spaces.c, dst, secs, false, pids);
    await srvIperf.exit(5000).catch(() => srvIperf.kill('SIGKILL'));
    const srvIperf2 = track(new Proc(inNetns(spaces.s, ['iperf3', '-s', '-B', dst, '-1'])));
    await Bun.sleep(300);
    const rev = iperf(spaces.c, dst, secs, true, pids);
    await srvIperf2.exit(5000).catch(() => srvIperf2.kill('SIGKILL'));
    const rtt = pingMs(spaces.c, dst);
    // Back to back: what a packet costs once the processes are awake (50 ms apart, each echo also wakes them).
    const busy = pingMs(spaces.c, dst, 500, '0.002');
    const cpuNote = (r: { cpu: number[] }) => (pids[0] ? `client ${r.cpu[1]!.toFixed(0)}% / server ${r.cpu[0]!.toFixed(0)}% of a core` : '');
    record('tun', `${label}: client → server`, fwd.mbps, 'Mbit/s', `iperf3 -t ${secs}, 1 stream; ${cpuNote(fwd)}`);
    record('tun', `${label}: server → client`, rev.mbps, 'Mbit/s', cpuNote(rev));
    record('tun', `${label}: ping RTT, median`, rtt, 'ms', '20 echoes, 50 ms apart');
    record('tun', `${label}: ping RTT 2 ms apart, median`, busy, 'ms', '500 echoes');
  } catch (e) {
    record('tun', `${label}: client → server`, null, 'Mbit/s', `failed: ${(e as Error).message.slice(0, 120)}`);
  } finally {
    if (started && typeof started !== 'string') await started.stop();
    for (const p of spawned.splice(0)) {
      p.kill('SIGKILL');
      await p.exit(5000).catch(() => {});
    }
  }
}

/**
 * Run the TUN section: `secs` per iperf3 transfer. Returns the figures it recorded under `tun`. Marks everything
 * absent when namespaces cannot be made here.
 */
export async function tunBench(record: Record_, secs: number, only = process.env.BENCH_TUN_ONLY?.split(',')): Promise<void> {
  const why = netnsUnavailable();
  if (why) {
    record('tun', 'ours native: client → server', null, 'Mbit/s', `no network namespaces: ${why}`);
    return;
  }
  const tools = ensure({ iperf3: 'iperf3', ping: 'iputils-ping', openvpn: 'openvpn', 'wireguard-go': 'wireguard-go', wg: 'wireguard-tools' });
  if (!tools.iperf3) {
    record('tun', 'ours native: client → server', null, 'Mbit/s', 'iperf3 absent (apt-get install iperf3)');
    return;
  }
  const want = (k: string) => !only || only.includes(k);
  const ns = new Namespaces();
  const spaces = { s: ns.add(ns.name('S')), c: ns.add(ns.name('C')) };
  const dir = mkdtempSync(join(tmpdir(), 'vpn-bench-tun-'));
  try {
    ns.veth(spaces.s, 'bs0', spaces.c, 'bc0', { a: `${SRV_ADDR}/24`, b: `${CLI_ADDR}/24` });
    const key = join(dir, 'vpn.key');
    sh(['bun', VPN, 'keygen', key]);
    const extraFlags = (process.env.BENCH_TUN_FLAGS ?? '').split(' ').filter(Boolean);

    if (want('raw')) await measure(record, 'raw veth', spaces, secs, async () => ({ dst: SRV_ADDR, pids: [0, 0], stop: async () => {} }));

    let port = 41000;
    for (const engine of ['native', 'noble'] as const) {
      if (!want(engine)) continue;
      await measure(record, `ours ${engine}`, spaces, secs, async () => {
        const p = port++;
        const srv = track(new Proc(inNetns(spaces.s, ['bun', VPN, 'serve', '--listen', `${SRV_ADDR}:${p}`, '--tun', '10.78.0.1/24', '--tun-name', 'bt%d', '--key', key, '--engine', engine, ...extraFlags])));
        await srv.waitFor(/^listening on /m);
        const cli = track(new Proc(inNetns(spaces.c, ['bun', VPN, 'connect', `${SRV_ADDR}:${p}`, '--tun', 'auto', '--tun-name', 'bt%d', '--key', key, '--engine', engine, ...extraFlags])));
        await cli.waitFor(/^tunnel up: /m);
        return { dst: '10.78.0.1', pids: [srv.pid, cli.pid], stop: async () => (await stopProc(cli), await stopProc(srv)) };
      });
    }

    if (want('openvpn')) {
      await measure(record, 'OpenVPN static key, TCP', spaces, secs, async () => {
        if (!tools.openvpn) return 'openvpn absent (apt-get install openvpn)';
        const sk = join(dir, 'ovpn.key');
        sh(['openvpn', '--genkey', 'secret', sk]);
        const common = ['--dev', 'bo0', '--dev-type', 'tun', '--secret', sk, '--cipher', 'AES-256-CBC', '--auth', 'SHA256', '--verb', '1', '--tun-mtu', '1371'];
        const srv = track(new Proc(inNetns(spaces.s, ['openvpn', '--proto', 'tcp-server', '--local', SRV_ADDR, '--lport', '41190', '--ifconfig', '10.80.0.1', '10.80.0.2', ...common])));
        await Bun.sleep(500);
        const cli = track(new Proc(inNetns(spaces.c, ['openvpn', '--proto', 'tcp-client', '--remote', SRV_ADDR, '41190', '--ifconfig', '10.80.0.2', '10.80.0.1', ...common])));
        const ok = await waitUntil(() => sh(inNetns(spaces.c, ['ping', '-c', '1', '-W', '1', '10.80.0.1'])).ok, 15_000);
        if (!ok) {
          await stopProc(cli);
          await stopProc(srv);
          return 'OpenVPN did not come up';
        }
        return { dst: '10.80.0.1', pids: [srv.pid, cli.pid], stop: async () => (await stopProc(cli), await stopProc(srv)) };
      });
    }

    if (want('wireguard')) {
      await measure(record, 'wireguard-go', spaces, secs, async () => {
        if (!tools['wireguard-go'] || !tools.wg) return 'wireguard-go or wg absent (apt-get install wireguard-go wireguard-tools)';
        const keys = ['s', 'c'].map((n) => {
          const priv = sh(['wg', 'genkey']).out.trim();
          const pub = Bun.spawnSync(['wg', 'pubkey'], { stdin: new TextEncoder().encode(priv + '\n') }).stdout.toString().trim();
          writeFileSync(join(dir, `wg-${n}.key`), priv + '\n', { mode: 0o600 });
          return { priv: join(dir, `wg-${n}.key`), pub };
        });
        const pids: number[] = [];
        const procs: Proc[] = [];
        for (const [i, where] of [spaces.s, spaces.c].entries()) {
          // wireguard-go -f stays in the foreground, so that its pid is the one we measure; each end its own name,
          // since the UAPI socket (/var/run/wireguard/NAME.sock) is outside the namespaces
          const dev = i === 0 ? 'bws0' : 'bwc0';
          const p = track(new Proc(inNetns(where, ['wireguard-go', '-f', dev])));
          procs.push(p);
          pids.push(p.pid);
          await waitUntil(() => sh(['ip', '-n', where, 'link', 'show', dev]).ok && sh(['wg', 'show', dev]).ok, 5000);
          const peer = keys[1 - i]!;
          const args = ['wg', 'set', dev, 'private-key', keys[i]!.priv, 'peer', peer.pub, 'allowed-ips', i === 0 ? '10.79.0.2/32' : '10.79.0.1/32'];
          if (i === 0) args.splice(5, 0, 'listen-port', '41191');
          else args.push('endpoint', `${SRV_ADDR}:41191`);
          const set = sh(inNetns(where, args));
          if (!set.ok) process.stderr.write(`wg set: ${set.err}\n`);
          sh(['ip', '-n', where, 'addr', 'add', i === 0 ? '10.79.0.1/24' : '10.79.0.2/24', 'dev', dev]);
          sh(['ip', '-n', where, 'link', 'set', dev, 'mtu', '1420', 'up']);
        }
        const ok = await waitUntil(() => sh(inNetns(spaces.c, ['ping', '-c', '1', '-W', '1', '10.79.0.1'])).ok, 10_000);
        const stop = async () => {
          for (const p of procs) await stopProc(p);
        };
        if (!ok) {
          await stop();
          return 'wireguard-go did not come up';
        }
        return { dst: '10.79.0.1', pids: [pids[0]!, pids[1]!], stop };
      });
    }
  } finally {
    ns.remove();
    rmSync(dir, { recursive: true, force: true });
  }
}

// `bun tests/bench-tun.ts [SECS]`: this section alone, printed as it goes.
if (import.meta.main) {
  const rec: Record_ = (s, n, v, u, note) => process.stderr.write(`  ${s} ${n.padEnd(40)} ${v === null ? 'absent' : v.toFixed(v < 10 ? 2 : 0).padStart(8)} ${u}${note ? `  (${note})` : ''}\n`);
  await tunBench(rec, Number(process.argv[2] ?? 5));
}

/**
 * The TUN section's ratios for the bench's ratio table (issue 17's targets), each on the mean of both directions:
 * ours against OpenVPN and wireguard-go, against our own forward mode (MiB/s of the tunnel section, when it ran), and
 * OpenVPN's ping RTT over ours (≥ 1: ours is no slower).
 */
export function tunRatios(get: (section: string, name: string) => number | null, add: (name: string, value: number | null, min?: number) => void): void {
  const both = (label: string) => {
    const a = get('tun', `${label}: client → server`);
    const b = get('tun', `${label}: server → client`);
    return a !== null && b !== null && Number.isFinite(a) && Number.isFinite(b) ? (a + b) / 2 : null;
  };
  const div = (a: number | null, b: number | null) => (a !== null && b !== null && b > 0 ? a / b : null);
  const native = both('ours native');
  const noble = both('ours noble');
  const ovpn = both('OpenVPN static key, TCP');
  const wg = both('wireguard-go');
  const mbit = (mibps: number | null) => (mibps === null ? null : (mibps * 8 * 1048576) / 1e6);
  add('TUN native / OpenVPN static key TCP, throughput', div(native, ovpn), 3);
  add('TUN native / wireguard-go, throughput', div(native, wg), 2);
  add('TUN noble / OpenVPN static key TCP, throughput', div(noble, ovpn));
  add('TUN native / forward native (tunnel section)', div(native, mbit(get('tunnel', 'tunnel native'))), 0.8);
  add('TUN noble / forward noble (tunnel section)', div(noble, mbit(get('tunnel', 'tunnel noble'))), 0.8);
  add('OpenVPN ping RTT / TUN native ping RTT', div(get('tun', 'OpenVPN static key, TCP: ping RTT, median'), get('tun', 'ours native: ping RTT, median')), 1);
  add('OpenVPN ping RTT / TUN native ping RTT, 2 ms apart', div(get('tun', 'OpenVPN static key, TCP: ping RTT 2 ms apart, median'), get('tun', 'ours native: ping RTT 2 ms apart, median')));
}
