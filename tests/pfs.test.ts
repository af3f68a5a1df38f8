/**
 * Forward secrecy end to end (issue #4): version negotiation between real processes, `--require-pfs`, and a man in
 * the middle that rewrites the version byte or replaces an ephemeral key in flight.
 */
import { describe, expect, setDefaultTimeout, test } from 'bun:test';
import { MSG1_V1_LEN, MSG1_V2_LEN } from '../handshake.ts';
import { feedStdin, keygen, tempDir, VpnProcess } from './helpers.ts';
import { MitmProxy } from './mitm.ts';

// These tests spawn real processes and move megabytes; bun test's 5 s default is too short for some. A test that
// needs longer still says so itself.
setDefaultTimeout(20_000);

async function server(extra: string[] = []) {
  const dir = tempDir();
  const key = await keygen(dir.path);
  const srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--once', '--key', key, ...extra], { stdin: 'pipe' });
  const port = await srv.listeningPort();
  return { dir, key, srv, port };
}

describe('forward secrecy between real processes', () => {
  test('a default client and server speak version 2', async () => {
    const { dir, key, srv, port } = await server();
    using _d = dir;
    using _s = srv;
    using cli = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', key], { stdin: 'pipe' });
    await Promise.all([feedStdin(srv, new Uint8Array(0)), feedStdin(cli, new TextEncoder().encode('v2'))]);
    expect([await cli.exit(), await srv.exit()]).toEqual([0, 0]);
    expect(srv.stderr).toContain('(protocol v2)');
    expect(new TextDecoder().decode(await srv.stdoutBytes)).toBe('v2');
  });

  test('--require-pfs refuses a --no-pfs client: it exits 3 saying the server requires forward secrecy', async () => {
    const { dir, key, srv, port } = await server(['--require-pfs']);
    using _d = dir;
    using _s = srv;
    using cli = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', key, '--no-pfs'], { stdin: 'pipe' });
    await feedStdin(cli, new TextEncoder().encode('must not arrive'));
    expect(await cli.exit()).toBe(3);
    expect(cli.stderr).toContain('the server requires forward secrecy');
    await srv.waitFor(/handshake failed .*--require-pfs/);
    // The server is still there for a client that speaks version 2.
    using good = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', key], { stdin: 'pipe' });
    await Promise.all([feedStdin(srv, new Uint8Array(0)), feedStdin(good, new TextEncoder().encode('ok'))]);
    expect(await good.exit()).toBe(0);
    expect(new TextDecoder().decode(await srv.stdoutBytes)).toBe('ok');
  });

  test('a man in the middle who rewrites the version byte to 1 (a downgrade) is detected', async () => {
    const { dir, key, srv, port } = await server();
    using _d = dir;
    using _s = srv;
    // The client's first byte, its version: 2 becomes 1.
    using proxy = MitmProxy.start({
      target: { port },
      tamper: [{ dir: 'c2s', at: 0, action: { kind: 'rewrite', n: 1, fn: (v) => (v[0] === 2 ? new Uint8Array([1]) : v) } }],
    });
    using cli = new VpnProcess(['connect', `127.0.0.1:${proxy.port}`, '--key', key], { stdin: 'pipe' });
    await feedStdin(cli, new TextEncoder().encode('must not arrive'));
    expect(await cli.exit()).toBe(3);
    await srv.waitFor(/handshake failed/);
    expect(srv.stderr).not.toContain('session opened');
    expect(await cli.stdoutBytes).toHaveLength(0);
  });

  test("a man in the middle who replaces the client's ephemeral key is detected", async () => {
    const { dir, key, srv, port } = await server();
    using _d = dir;
    using _s = srv;
    const mitmKey = new Uint8Array(32).fill(9); // the X25519 base point: a valid public key the attacker controls
    // Message 1 bytes [MSG1_V1_LEN, MSG1_V2_LEN) are the client's ephemeral public key E_C.
    using proxy = MitmProxy.start({
      target: { port },
      tamper: [{ dir: 'c2s', at: MSG1_V1_LEN, action: { kind: 'rewrite', n: MSG1_V2_LEN - MSG1_V1_LEN, fn: () => mitmKey.slice() } }],
    });
    using cli = new VpnProcess(['connect', `127.0.0.1:${proxy.port}`, '--key', key], { stdin: 'pipe' });
    await feedStdin(cli, new TextEncoder().encode('must not arrive'));
    expect(await cli.exit()).toBe(3);
    expect(cli.stderr).toContain('message 2 failed verification');
    expect(srv.stderr).not.toContain('session opened');
  });
});
