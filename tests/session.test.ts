/**
 * Session in-process, over a fake transport (the crypto is real): the handshake and CONFIG, CLOSE both ways,
 * half-close, inbound held while paused, refusals, the handshake and keepalive timeouts, backpressure both ways,
 * truncation and abort. The fake plays net.ts's Link: ordered inbound events, held while paused; writes counted as
 * queued until the peer has taken them.
 */
import { describe, expect, test } from 'bun:test';
import { nobleEngine } from '../engine.ts';
import { VpnError } from '../errors.ts';
import { ChannelSender, RECORD } from '../channel.ts';
import { ClientHandshake, keysFromKeyFile } from '../handshake.ts';
import { type Json, Session, type SessionApp, type SessionOptions, type Transport } from '../session.ts';
import { random, spied, until } from './helpers.ts';

type Ev = { kind: 'data'; chunk: Uint8Array; from: FakeLink } | { kind: 'end' } | { kind: 'close'; err?: Error };

/** Bytes a fake transport may have in flight before `write` says "pause". */
const FAKE_HIGH_WATER = 64 * 1024;

class FakeLink implements Transport {
  peerLink!: FakeLink;
  session: Session | null = null;
  private inbox: Ev[] = [];
  private paused = false;
  private closed = false;
  private sentFin = false;
  /** bytes written and not yet taken by the other side */
  queued = 0;
  /** a dead path: nothing written arrives, nothing is reported */
  dead = false;
  /** a man in the middle that forges a FIN after this many bytes: later writes are dropped */
  cutAfter = Infinity;
  /** a man in the middle that may rewrite each write */
  tamper?: (data: Uint8Array) => Uint8Array;
  private written = 0;
  readonly log: string[] = [];
  pauses = 0;
  constructor(readonly peer: string) {}

  get empty(): boolean {
    return this.queued === 0;
  }
  write(data: Uint8Array): boolean {
    if (this.closed || this.sentFin) return false;
    if (this.dead) return true;
    if (this.written + data.length > this.cutAfter) {
      if (this.written <= this.cutAfter) this.peerLink.deliver({ kind: 'end' });
      this.written = this.cutAfter + 1;
      return true;
    }
    this.written += data.length;
    this.queued += data.length;
    this.peerLink.deliver({ kind: 'data', chunk: this.tamper ? this.tamper(data.slice()) : data.slice(), from: this });
    return this.queued < FAKE_HIGH_WATER;
  }
  pause(): void {
    this.paused = true;
    this.pauses++;
  }
  resume(): void {
    this.paused = false;
    this.schedule();
  }
  shutdown(): void {
    this.log.push('shutdown');
    if (this.sentFin || this.closed) return;
    this.sentFin = true;
    if (!this.dead) this.peerLink.deliver({ kind: 'end' });
  }
  close(): void {
    this.log.push('close');
    this.end(undefined);
  }
  abort(): void {
    this.log.push('abort');
    this.end(new Error('ECONNRESET'));
  }
  private end(err?: Error): void {
    if (this.closed) return;
    this.closed = true;
    if (!this.dead) this.peerLink.deliver({ kind: 'close', err });
    this.deliver({ kind: 'close' });
  }
  deliver(ev: Ev): void {
    this.inbox.push(ev);
    this.schedule();
  }
  private scheduled = false;
  private schedule(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    queueMicrotask(() => {
      this.scheduled = false;
      this.pump();
    });
  }
  private gotClose = false;
  private pump(): void {
    while (!this.paused && this.inbox.length > 0 && this.session) {
      const ev = this.inbox.shift()!;
      if (ev.kind === 'data') {
        ev.from.queued -= ev.chunk.length;
        this.session.onData(ev.chunk);
        if (ev.from.queued === 0) ev.from.session?.onDrain();
      } else if (ev.kind === 'end') {
        this.session.onEnd();
      } else if (!this.gotClose) {
        this.gotClose = true;
        this.session.onClose(ev.err);
      }
    }
  }
}

function pair(): [FakeLink, FakeLink] {
  const a = new FakeLink('client-side');
  const b = new FakeLink('server-side');
  a.peerLink = b;
  b.peerLink = a;
  return [a, b];
}

/** An app that records what it was told, and can pause on data. */
class Recorder implements SessionApp {
  opened: Json | null = null;
  data: Uint8Array[] = [];
  peerClosed = false;
  ended: VpnError | null | undefined = undefined;
  writable = 0;
  readonly done = Promise.withResolvers<VpnError | null>();
  onDataHook?: (p: Uint8Array) => void;
  onOpen(_s: Session, cfg: Json): void {
    this.opened = cfg;
  }
  onData(p: Uint8Array): void {
    this.data.push(p.slice());
    this.onDataHook?.(p);
  }
  onPeerClose(): void {
    this.peerClosed = true;
  }
  onEnd(err: VpnError | null): void {
    this.ended = err;
    this.done.resolve(err);
  }
  onWritable(): void {
    this.writable++;
  }
  get bytes(): Uint8Array {
    return new Uint8Array(Buffer.concat(this.data));
  }
}

const SECRET = keysFromKeyFile(random(32));

function rig(o: { server?: Partial<SessionOptions>; client?: Partial<SessionOptions>; serverKeys?: typeof SECRET } = {}) {
  const [cl, sl] = pair();
  const capp = new Recorder();
  const sapp = new Recorder();
  const base = { keys: SECRET, engine: nobleEngine, handshakeTimeoutMs: 2000, keepaliveMs: 0 };
  const server = new Session(sl, { ...base, keys: o.serverKeys ?? SECRET, role: 'server', config: () => ({ mode: 'test' }), ...o.server }, sapp);
  const client = new Session(cl, { ...base, role: 'client', config: () => ({ mode: 'test' }), ...o.client }, capp);
  cl.session = client;
  sl.session = server;
  server.start();
  client.start();
  return { client, server, capp, sapp, cl, sl };
}

const opened = (r: ReturnType<typeof rig>) => until(() => r.client.phase === 'open' && r.server.phase === 'open', 5000);

describe('opening (§3, §8)', () => {
  test('the handshake and both CONFIG records open the session on both sides, each with the other\'s CONFIG', async () => {
    const r = rig({ server: { config: (peer) => ({ mode: 'answer', saw: peer.mode }) }, client: { config: () => ({ mode: 'asked' }) } });
    expect(await opened(r)).toBe(true);
    expect(r.capp.opened).toEqual({ mode: 'answer', saw: 'asked', ack: true, rekey: true });
    expect(r.sapp.opened).toEqual({ mode: 'asked', ack: true, rekey: true });
    expect(r.client.acknowledgedClose && r.server.acknowledgedClose).toBe(true);
    expect([r.client.version, r.server.version]).toEqual([2, 2]);
    expect(r.client.authenticated && r.server.authenticated).toBe(true);
  });

  test('a wrong secret ends both sides with AUTH_FAILED, nothing opened, and the server never unwraps a session key', async () => {
    const s = spied(nobleEngine);
    const r = rig({ serverKeys: keysFromKeyFile(random(32)), server: { engine: s.engine } });
    const [ce, se] = await Promise.all([r.capp.done.promise, r.sapp.done.promise]);
    expect(ce?.code).toBe('AUTH_FAILED');
    expect(se?.code).toBe('AUTH_FAILED');
    expect(r.capp.opened ?? r.sapp.opened).toBeNull();
    expect(s.decrypts()).toBe(0);
  });

  test('a refusal in the server\'s CONFIG answer ends the client with its sentence and opens nothing', async () => {
    const r = rig({ server: { config: () => new VpnError('NETWORK', 'busy: one at a time') } });
    const ce = await r.capp.done.promise;
    expect(ce?.code).toBe('NETWORK');
    expect(ce?.message).toBe('the server refused the session: busy: one at a time');
    expect((await r.sapp.done.promise)?.message).toBe('busy: one at a time');
    expect(r.capp.opened).toBeNull();
    expect(r.sapp.opened).toBeNull();
    expect(r.sl.log[0]).toBe('shutdown'); // the refusal is half-closed, so the client reads it before the end
  });

  test('a peer that never answers is ended by the handshake timeout', async () => {
    const [, sl] = pair();
    const app = new Recorder();
    const s = new Session(sl, { keys: SECRET, engine: nobleEngine, handshakeTimeoutMs: 100, keepaliveMs: 0, role: 'server', config: () => ({}) }, app);
    sl.session = s;
    s.start();
    const err = await app.done.promise;
    expect(err?.code).toBe('HANDSHAKE_TIMEOUT');
    expect(sl.log).toContain('close');
  });

  test('--step suspends the handshake timeout while it waits', async () => {
    const busyWait = () => {
      const t = Date.now();
      while (Date.now() - t < 250) {
        // the prompt blocks the thread, as Bun's prompt() does
      }
    };
    const r = rig({ client: { step: busyWait, handshakeTimeoutMs: 150 }, server: { handshakeTimeoutMs: 5000 } });
    expect(await opened(r)).toBe(true);
  });
});

describe('ends (§7)', () => {
  test('CLOSE both ways is a clean end on both sides; each half-closes and closes on the peer\'s FIN', async () => {
    const r = rig();
    await opened(r);
    r.client.write(new TextEncoder().encode('from client'));
    r.server.write(new TextEncoder().encode('from server'));
    r.client.close();
    r.server.close();
    expect(await r.capp.done.promise).toBeNull();
    expect(await r.sapp.done.promise).toBeNull();
    expect(new TextDecoder().decode(r.sapp.bytes)).toBe('from client');
    expect(new TextDecoder().decode(r.capp.bytes)).toBe('from server');
    expect(r.cl.log[0]).toBe('shutdown');
    expect(r.sl.log[0]).toBe('shutdown');
    expect(await until(() => r.cl.log.includes('close') && r.sl.log.includes('close'), 3000)).toBe(true);
  });

  test('half-close: after the client\'s CLOSE the server still sends, and the client still receives', async () => {
    const r = rig();
    await opened(r);
    r.client.close();
    await until(() => r.sapp.peerClosed);
    expect(r.client.phase).toBe('sentClose');
    expect(r.server.phase).toBe('peerClosed');
    expect(r.client.write(new Uint8Array(1))).toBe(false); // nothing more from the side that closed
    const reply = random(200_000);
    r.server.write(reply);
    r.server.close();
    expect(await r.capp.done.promise).toBeNull();
    expect(await r.sapp.done.promise).toBeNull();
    expect(Buffer.compare(r.capp.bytes, reply)).toBe(0);
  });

  test('a transport that closes without CLOSE is a truncation, never a clean end', async () => {
    const r = rig();
    await opened(r);
    r.client.write(random(1000));
    await until(() => r.sapp.data.length > 0);
    r.cl.close(); // the connection goes away, no CLOSE record
    expect((await r.sapp.done.promise)?.code).toBe('TRUNCATED');
  });

  test('abort resets the transport and the peer sees an error', async () => {
    const r = rig();
    await opened(r);
    r.server.abort(new VpnError('NETWORK', 'aborted at shutdown'));
    expect(r.sl.log).toEqual(['abort']);
    expect((await r.sapp.done.promise)?.message).toBe('aborted at shutdown');
    expect((await r.capp.done.promise)?.code).toBe('TRUNCATED');
  });

  test('keepalive ends a session whose peer went silent (a dead path) within three intervals', async () => {
    const r = rig({ client: { keepaliveMs: 60 }, server: { keepaliveMs: 0 } });
    await opened(r);
    const t0 = Date.now();
    r.cl.dead = true;
    r.sl.dead = true;
    const err = await r.capp.done.promise;
    expect(err?.code).toBe('DEAD_PEER');
    expect(Date.now() - t0).toBeLessThan(2000);
  });
});

describe('backpressure', () => {
  test('inbound: an app that pauses gets nothing until it resumes, then everything in order, then the CLOSE and the end', async () => {
    const r = rig();
    await opened(r);
    let paused = false;
    r.sapp.onDataHook = () => {
      if (!paused) {
        paused = true;
        r.server.pauseInbound();
      }
    };
    const parts = [random(1000), random(2000), random(3000)];
    for (const p of parts) r.client.write(p);
    r.client.close();
    await Bun.sleep(50);
    expect(r.sapp.data.length).toBe(1); // the first record paused it: the rest is held, CLOSE and FIN included
    expect(r.sapp.peerClosed).toBe(false);
    expect(r.sl.pauses).toBeGreaterThan(0);
    r.server.resumeInbound();
    await until(() => r.sapp.peerClosed);
    expect(Buffer.compare(r.sapp.bytes, Buffer.concat(parts))).toBe(0);
    r.server.close();
    expect(await r.sapp.done.promise).toBeNull();
    expect(await r.capp.done.promise).toBeNull();
  });

  test('outbound: write says "pause" once the peer stops taking bytes, the queue stays bounded, and onWritable follows the drain', async () => {
    const r = rig();
    await opened(r);
    r.sapp.onDataHook = () => r.server.pauseInbound(); // the server's app is stuck
    const chunk = random(16 * 1024);
    let writes = 0;
    while (r.client.write(chunk) && writes < 1000) writes++;
    expect(writes).toBeLessThan(10); // asked to pause within the fake's high-water mark
    expect(r.client.queued).toBeLessThan(FAKE_HIGH_WATER + 2 * chunk.length);
    const before = r.capp.writable;
    r.server.resumeInbound();
    r.sapp.onDataHook = undefined;
    expect(await until(() => r.capp.writable > before)).toBe(true);
    expect(r.client.queued).toBe(0);
  });
});

describe('a key holder that floods PINGs and never reads', () => {
  test('gets at most one PONG queued, however many PINGs it sends, and is ended as stalled within three keepalive intervals', async () => {
    const r = rig({ server: { keepaliveMs: 60 } });
    await opened(r);
    r.client.pauseInbound(); // the flooder never reads what the server sends
    const ping = () => (r.client as unknown as { sendRecord(t: number): boolean }).sendRecord(RECORD.PING);
    const t0 = Date.now();
    let maxQueued = 0;
    while (r.server.phase !== 'done' && Date.now() - t0 < 3000) {
      for (let i = 0; i < 100; i++) ping();
      await Bun.sleep(5);
      maxQueued = Math.max(maxQueued, r.server.queued);
    }
    const err = await r.sapp.done.promise;
    expect(err?.code).toBe('DEAD_PEER');
    expect(err?.message).toMatch(/stopped reading/);
    expect(Date.now() - t0).toBeLessThan(1000); // 3 × 60 ms, checked every 50 ms
    expect(maxQueued).toBeLessThanOrEqual(68); // one PONG frame: 4 + 16 + 16 + 32 bytes
  });
});

describe('session set-up and end as PROTOCOL.md §8 says', () => {
  test('a pipelined first flight — message 3, CONFIG and 200 KiB of DATA in one write — is accepted and delivered in order', async () => {
    const [cl, sl] = pair();
    const sapp = new Recorder();
    const server = new Session(sl, { keys: SECRET, engine: nobleEngine, handshakeTimeoutMs: 2000, keepaliveMs: 0, role: 'server', config: () => ({ mode: 'stdio' }) }, sapp);
    sl.session = server;
    server.start();
    // The client is written by hand: the protocol's own pieces, no Session, so it can pipeline.
    const hs = new ClientHandshake(SECRET, 2, { engine: nobleEngine });
    const fromServer: Uint8Array[] = [];
    cl.session = { onData: (c: Uint8Array) => void fromServer.push(c), onDrain() {}, onEnd() {}, onClose() {} } as unknown as Session;
    cl.write(hs.createMessage1());
    await until(() => fromServer.reduce((n, c) => n + c.length, 0) >= 96);
    const m2 = new Uint8Array(Buffer.concat(fromServer)).subarray(0, 96);
    const m3 = hs.consumeMessage2(m2);
    const sender = new ChannelSender(nobleEngine, hs.keys!.send);
    const payload = random(200 * 1024);
    const parts = [m3, sender.seal(RECORD.CONFIG, new TextEncoder().encode('{"mode":"stdio"}'))];
    for (let off = 0; off < payload.length; off += 65536) parts.push(sender.seal(RECORD.DATA, payload.subarray(off, off + 65536)));
    parts.push(sender.seal(RECORD.CLOSE));
    cl.write(new Uint8Array(Buffer.concat(parts)));
    expect(await until(() => sapp.peerClosed, 5000)).toBe(true);
    expect(sapp.opened).toEqual({ mode: 'stdio' });
    expect(Buffer.compare(sapp.bytes, payload)).toBe(0);
    expect(server.acknowledgedClose).toBe(false); // this client did not offer it: the end means what it meant before
  });

  test('a client that cannot use the answer refuses it with a CLOSE that says why: the server ends with that reason, not a truncation', async () => {
    const r = rig({ server: { config: () => ({ mode: 'tun' }) } });
    r.capp.onOpen = (s) => s.refuse(new VpnError('USAGE', 'the server answered "tun", which a stdio client cannot use'));
    const [ce, se] = await Promise.all([r.capp.done.promise, r.sapp.done.promise]);
    expect(ce?.code).toBe('USAGE');
    expect(se?.code).toBe('USAGE');
    expect(se?.message).toBe('the client refused the session: the server answered "tun", which a stdio client cannot use');
    expect(r.cl.log[0]).toBe('shutdown'); // the refusal goes out before the end
  });

  test('a refusal text from the peer reaches logs with its control characters shown as "?"', async () => {
    const r = rig({ server: { config: () => new VpnError('USAGE', 'bad\u001b[31m red\nsession opened forged') } });
    const ce = await r.capp.done.promise;
    expect(ce?.message).toBe('the server refused the session: bad?[31m red?session opened forged');
  });

  for (const first of ['client', 'server'] as const) {
    test(`the end when the ${first} sends CLOSE first: both clean, each FIN after its own CLOSE, each closes on the peer's FIN`, async () => {
      const r = rig();
      await opened(r);
      const [a, b] = first === 'client' ? [r.client, r.server] : [r.server, r.client];
      const [aApp, bApp] = first === 'client' ? [r.capp, r.sapp] : [r.sapp, r.capp];
      a.write(new TextEncoder().encode('last words'));
      a.close();
      await until(() => bApp.peerClosed);
      expect(a.phase).toBe('sentClose');
      expect(b.phase).toBe('peerClosed');
      b.write(new TextEncoder().encode('reply'));
      b.close();
      expect(await aApp.done.promise).toBeNull();
      expect(await bApp.done.promise).toBeNull();
      expect(new TextDecoder().decode(bApp.bytes)).toBe('last words');
      expect(new TextDecoder().decode(aApp.bytes)).toBe('reply');
      expect(await until(() => r.cl.log.join() === 'shutdown,close' && r.sl.log.join() === 'shutdown,close', 3000)).toBe(true);
    });
  }
});

describe('acknowledged close (§7 ACK)', () => {
  test('both sides confirm what they verified: a clean end on each side means the peer verified every byte it was sent', async () => {
    const r = rig();
    await opened(r);
    const up = random(300_000);
    const down = random(200_000);
    r.client.write(up);
    r.server.write(down);
    r.client.close();
    r.server.close();
    expect(await r.capp.done.promise).toBeNull();
    expect(await r.sapp.done.promise).toBeNull();
    expect(Buffer.compare(r.sapp.bytes, up)).toBe(0);
    expect(Buffer.compare(r.capp.bytes, down)).toBe(0);
  });

  test('a FIN forged into an upload: the receiver reports a truncation, and the sender does not end cleanly — it says how much was unconfirmed', async () => {
    const r = rig();
    await opened(r);
    r.cl.cutAfter = 100_000; // everything the client writes after this is dropped, and the server sees a FIN
    r.client.write(random(400_000));
    r.client.close();
    const se = await r.sapp.done.promise;
    expect(se?.code).toBe('TRUNCATED');
    const ce = await r.capp.done.promise;
    expect(ce?.code).toBe('TRUNCATED');
    expect(ce?.message).toMatch(/the peer did not confirm receipt: \d+ bytes unconfirmed/);
  });
});

describe('rekeying inside the session (§7 REKEY)', () => {
  test('rekeys every 30 ms during a full-duplex transfer: nothing lost or reordered either way, and the keys really change', async () => {
    const traces: string[] = [];
    const r = rig({ client: { rekeyAfterMs: 30, trace: (l) => traces.push(l) } });
    await opened(r);
    const up = random(6 << 20);
    const down = random(5 << 20);
    const pump = async (s: Session, data: Uint8Array) => {
      for (let off = 0; off < data.length; off += 64 * 1024) {
        s.write(data.subarray(off, off + 64 * 1024));
        await Bun.sleep(1);
      }
      s.close();
    };
    await Promise.all([pump(r.client, up), pump(r.server, down)]);
    expect(await r.capp.done.promise).toBeNull();
    expect(await r.sapp.done.promise).toBeNull();
    expect(Buffer.compare(r.sapp.bytes, up)).toBe(0);
    expect(Buffer.compare(r.capp.bytes, down)).toBe(0);
    expect(r.client.rekeyCount).toBeGreaterThanOrEqual(3);
    expect(r.server.rekeyCount).toBe(r.client.rekeyCount);
    const c2s = traces.filter((l) => l.startsWith('rekey: new c2s keys')).map((l) => l.split('enc=')[1]);
    expect(new Set(c2s).size).toBe(c2s.length); // every rekey gave new keys
    expect(traces).toContain('rekeying: on');
  });

  test('a flipped bit in a REKEY record ends the session as INTEGRITY on the side that receives it', async () => {
    const r = rig({ client: { rekeyAfterMs: 20 } });
    await opened(r);
    let flipped = false;
    r.cl.tamper = (d) => {
      // The client is idle, so its first write after opening is the INIT frame: 4 + 16 + 48 + 32 = 100 bytes.
      if (!flipped && d.length === 100) {
        flipped = true;
        d[30]! ^= 0x01;
      }
      return d;
    };
    const se = await r.sapp.done.promise;
    expect(flipped).toBe(true);
    expect(se?.code).toBe('INTEGRITY');
    expect(se?.exitStatus).toBe(4);
  });

  test('a peer that did not offer rekeying never gets a REKEY, and a REKEY it did not agree to is INTEGRITY', async () => {
    const r = rig({ client: { rekeyAfterMs: 20, version: 1 } }); // version 1: no X25519, so no rekeying
    await opened(r);
    await Bun.sleep(100);
    expect(r.client.rekeyCount).toBe(0);
    (r.client as unknown as { rekeying: boolean }).rekeying = true; // force one anyway
    r.client.startRekey();
    expect((await r.sapp.done.promise)?.message).toMatch(/REKEY record although rekeying was not agreed/);
  });
});

