/**
 * `--user`/`--group` (privileges.ts): a TUN server and client drop root once their interface is up. They run from
 * README's TUN example config files (a server with a keyring, a client of it; `user` is nobody here), in two network
 * namespaces this test creates (192.168.79.0/24 between them; in the tunnel the examples' 10.66.0.0/24 and
 * fd00:66::/64, and their routes 192.168.10.0/24 and 10.77.0.0/16; all removed afterwards): every thread runs as the
 * user, the server keeps no capability, the client only CAP_NET_ADMIN (also ambient, for its `ip` children), ping
 * crosses the tunnel, the client sets its addresses and routes after the drop, keeps them through a server restart
 * and removes them at exit. Plus the refusals.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from 'bun:test';
import { chmodSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CAP_NET_ADMIN } from '../privileges.ts';
import { Proc, tempDir, VPN, VpnProcess } from './helpers.ts';
import { execIn, inNetns, Namespaces, netnsUnavailable } from './netns.ts';
import { readmeExample } from './readme.ts';

setDefaultTimeout(20_000);

const USER = 'nobody';
const spaces = new Namespaces();
const NS = { srv: spaces.name('s'), cli: spaces.name('c') };
const SERVER = '192.168.79.1';
const PORT = 32_794; // fixed, so that the restarted server is where the client reconnects; only in the namespace
const skipReason = process.getuid?.() !== 0 ? 'not root' : netnsUnavailable();
if (skipReason) console.log(`privileges.test.ts: skipping the namespace tests: ${skipReason}`);
const nobody = /^nobody:[^:]*:(\d+):(\d+):/m.exec(readFileSync('/etc/passwd', 'utf8'));

/** /proc/PID/status fields of every thread of `pid`: their Uid and Gid lines and capability sets. */
function creds(pid: number) {
  return readdirSync(`/proc/${pid}/task`).map((t) => {
    const s = readFileSync(`/proc/${pid}/task/${t}/status`, 'utf8');
    const f = (k: string) => new RegExp(`^${k}:\\s*(.*)$`, 'm').exec(s)?.[1]!.trim().split(/\s+/);
    return { uid: f('Uid'), gid: f('Gid'), groups: f('Groups') ?? [], eff: BigInt(`0x${f('CapEff')![0]}`), prm: BigInt(`0x${f('CapPrm')![0]}`), amb: BigInt(`0x${f('CapAmb')![0]}`) };
  });
}

/** One ICMP echo round from namespace `ns` to `dst`: whether a reply came (ping(8), 3 tries, 2 s each). */
const pings = (ns: string, dst: string) => execIn(ns, ['ping', '-n', '-c', '3', '-W', '2', dst]).ok;

const vpnIn = (ns: string, args: string[]) => new Proc(inNetns(ns, ['bun', VPN, ...args]));

const dir = tempDir();
const serverConfig = join(dir.path, 'tun-server.toml');
const clientConfig = join(dir.path, 'tun-client.toml');

beforeAll(async () => {
  if (skipReason) return;
  // README's keyring: one client key, added by keygen --client.
  const keyring = join(dir.path, 'keyring');
  const clientKey = join(dir.path, 'laptop.key');
  const kg = new VpnProcess(['keygen', '--client', 'laptop', '--keyring', keyring, clientKey]);
  if ((await kg.exit()) !== 0) throw new Error(`keygen --client failed: ${kg.stderr}`);
  writeFileSync(serverConfig, readmeExample('/etc/vpn/tun-server.toml', { listen: `${SERVER}:${PORT}`, keyring, user: USER, grace: '1' }));
  writeFileSync(clientConfig, readmeExample('/etc/vpn/tun-client.toml', { server: `${SERVER}:${PORT}`, key: clientKey, user: USER }));
  spaces.add(NS.srv);
  spaces.add(NS.cli);
  spaces.veth(NS.srv, 'vt0', NS.cli, 'vt0', { a: `${SERVER}/24`, b: '192.168.79.2/24' });
});

afterAll(() => {
  spaces.remove();
  dir[Symbol.dispose]();
});

describe('--user: dropping root in TUN mode', () => {
  test.skipIf(skipReason !== null || !nobody)(
    `README's TUN server (keyring) and client run as ${USER} after setup (server: no capability; client: only CAP_NET_ADMIN), and traffic, a reconnect and the cleanup still work`,
    async () => {
      const [uid, gid] = [nobody![1]!, nobody![2]!];
      const serverArgs = ['serve', '--config', serverConfig];
      let srv = vpnIn(NS.srv, serverArgs);
      const cli = vpnIn(NS.cli, ['connect', '--config', clientConfig, '--grace', '1']);
      try {
        await srv.listeningPort();
        expect(srv.stderr).toContain(`dropped root: now uid ${uid} (${USER}), gid ${gid}, no capabilities`);
        await cli.waitFor(/tunnel up: (vpn\d+) /);
        expect(cli.stderr).toContain(`dropped root: now uid ${uid} (${USER}), gid ${gid}, keeping only CAP_NET_ADMIN`);
        // `ip netns exec` is the parent; the vpn process is its exec'd self (same pid).
        for (const [p, caps] of [[srv, 0n], [cli, 1n << BigInt(CAP_NET_ADMIN)]] as const) {
          const threads = creds(p.pid);
          expect(threads.length).toBeGreaterThan(1); // Bun's threads too, not only the JavaScript one
          for (const t of threads) {
            expect(t.uid).toEqual([uid, uid, uid, uid]);
            expect(t.gid).toEqual([gid, gid, gid, gid]);
            expect(t.groups).toEqual([gid]);
            expect(t.eff & ~caps).toBe(0n); // no thread kept more than asked for
            expect(t.prm & ~caps).toBe(0n);
          }
          const main = threads[0]!;
          expect(main.eff).toBe(caps);
          expect(main.prm).toBe(caps);
          expect(main.amb).toBe(caps);
        }
        // The client's addresses and routes (its own and the pushed one) were set by ip children after the drop,
        // with the ambient capability.
        const dev = /tunnel up: (vpn\d+) /.exec(cli.stderr)![1]!;
        const routes = () => execIn(NS.cli, ['ip', 'route', 'show', 'dev', dev]).out;
        expect(routes()).toContain('10.77.0.0/16');
        expect(routes()).toContain('192.168.10.0/24');
        expect(execIn(NS.cli, ['ip', '-6', 'addr', 'show', 'dev', dev]).out).toContain('fd00:66::');
        expect(pings(NS.cli, '10.66.0.1')).toBe(true);
        expect(pings(NS.cli, 'fd00:66::1')).toBe(true);

        // The server restarts (SIGKILL, then again as root dropping to nobody); the client, unprivileged, reconnects.
        srv.kill('SIGKILL');
        await srv.exit();
        srv = vpnIn(NS.srv, serverArgs);
        await srv.listeningPort();
        await srv.waitFor(/is 10\.66\.0\.\d+/, 15_000);
        let back = false;
        for (let i = 0; i < 10 && !back; i++) back = pings(NS.cli, '10.66.0.1');
        expect(back).toBe(true);
        expect(routes()).toContain('10.77.0.0/16');

        cli.kill('SIGTERM');
        expect(await cli.exit()).toBe(0);
        expect(execIn(NS.cli, ['ip', 'route', 'show', '10.77.0.0/16']).out.trim()).toBe('');
        expect(execIn(NS.cli, ['ip', 'route', 'show', '192.168.10.0/24']).out.trim()).toBe('');
        expect(execIn(NS.cli, ['ip', 'link', 'show', dev]).ok).toBe(false);
        srv.kill('SIGTERM');
        expect(await srv.exit()).toBe(0);
        for (const p of [srv, cli]) expect(p.stderr).not.toMatch(/EPERM|EACCES|not permitted|failed/); // nothing it still did needed more
      } finally {
        cli.kill('SIGKILL');
        srv.kill('SIGKILL');
      }
    },
    40_000,
  );
});

describe('--user: refusals (exit 2, before anything is created)', () => {
  const cases: [string, string[], string][] = [
    ['--user without --tun', ['serve', '--listen', '127.0.0.1:0', '--user', USER, '--secret', 'long enough passphrase'], '--user only applies in TUN mode'],
    ['--group without --user', ['serve', '--listen', '127.0.0.1:0', '--tun', '10.79.0.1/24', '--group', 'nogroup', '--secret', 'long enough passphrase'], '--group needs --user'],
    ['a user that does not exist', ['connect', '127.0.0.1:1', '--tun', 'auto', '--user', 'no-such-user-vpn', '--secret', 'long enough passphrase'], '--user no-such-user-vpn: no such user'],
    ['a group that does not exist', ['connect', '127.0.0.1:1', '--tun', 'auto', '--user', USER, '--group', 'no-such-group-vpn', '--secret', 'long enough passphrase'], '--group no-such-group-vpn: no such group'],
    ['root as the user', ['connect', '127.0.0.1:1', '--tun', 'auto', '--user', 'root', '--secret', 'long enough passphrase'], 'is root (uid 0)'],
  ];
  for (const [what, args, message] of cases) {
    test.skipIf(process.getuid?.() !== 0)(`refuses ${what}`, async () => {
      const p = new VpnProcess(args);
      expect(await p.exit()).toBe(2);
      expect(p.stderr).toContain(message);
    });
  }

  test.skipIf(process.getuid?.() !== 0)('a process that is not root is told --user needs root', async () => {
    // nobody may not be able to read the checkout (a clone in a 0700 directory, as mktemp -d makes): run a bundle of
    // the same code from a directory it can read.
    const dir = mkdtempSync(join(tmpdir(), 'vpn-nobody-'));
    chmodSync(dir, 0o755);
    const bundle = join(dir, 'vpn.js');
    const b = Bun.spawnSync(['bun', 'build', VPN, '--target', 'bun', '--outfile', bundle]);
    expect(b.exitCode, b.stderr.toString()).toBe(0);
    chmodSync(bundle, 0o644);
    const p = new Proc(['setpriv', '--reuid', '65534', '--regid', '65534', '--clear-groups', 'bun', bundle, 'connect', '127.0.0.1:1', '--tun', 'auto', '--user', USER, '--secret', 'long enough passphrase']);
    expect(await p.exit()).toBe(2);
    expect(p.stderr).toContain('--user needs root (CAP_SETUID and CAP_SETGID)');
    rmSync(dir, { recursive: true, force: true });
  });
});
