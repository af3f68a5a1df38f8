/**
 * `--user NAME [--group NAME]` in TUN mode: give up root once the interface exists, as spiped `-u` and OpenVPN
 * `--user/--group` do, keeping only the capabilities the process still needs (capabilities(7)).
 *
 * Bun's process.setuid would also drop every capability, and a TUN client still needs CAP_NET_ADMIN after its
 * device is made: its addresses and routes come with each session's CONFIG (and again on every reconnect), and at
 * exit it removes the host route it pinned to its server, all through `ip` children. So the steps are libc calls
 * through bun:ffi, in this order:
 *   1. prctl(PR_SET_KEEPCAPS, 1): the permitted set survives the change of user ID;
 *   2. setgroups([gid]), setresgid(gid ×3), setresuid(uid ×3): glibc applies each to every thread of the process
 *      (its set*id calls are process-wide, not only the caller's thread), so no Bun thread stays root; real, effective
 *      and saved IDs all change, so root cannot be taken back;
 *   3. capset: effective = permitted = inheritable = the capabilities kept, nothing else;
 *   4. prctl(PR_CAP_AMBIENT_RAISE, cap) for each: an `ip` child (not set-user-ID, no file capabilities) inherits them;
 *   5. prctl(PR_SET_KEEPCAPS, 0), then a check that setresuid(0) now fails.
 * A server keeps nothing (its interface needs no change after it is up) unless it listens on a port below 1024,
 * which it may need to bind again (net.ts re-listens after running out of descriptors): then CAP_NET_BIND_SERVICE.
 *
 * Linux only, 64-bit glibc (struct passwd/group offsets below are those of x86-64 and aarch64).
 */
import { readFileSync } from 'node:fs';
import { VpnError } from './errors.ts';
import { log } from './log.ts';

// linux/capability.h
export const CAP_SETGID = 6;
export const CAP_SETUID = 7;
export const CAP_NET_BIND_SERVICE = 10;
export const CAP_NET_ADMIN = 12;
const CAP_NAMES: Record<number, string> = { [CAP_NET_BIND_SERVICE]: 'CAP_NET_BIND_SERVICE', [CAP_NET_ADMIN]: 'CAP_NET_ADMIN' };
const LINUX_CAPABILITY_VERSION_3 = 0x20080522;
// linux/prctl.h
const PR_SET_KEEPCAPS = 8;
const PR_CAP_AMBIENT = 47;
const PR_CAP_AMBIENT_RAISE = 2;
// struct passwd { char *pw_name; char *pw_passwd; uid_t pw_uid; gid_t pw_gid; … }, struct group { char *gr_name;
// char *gr_passwd; gid_t gr_gid; … } on LP64
const PW_UID_OFF = 16;
const PW_GID_OFF = 20;
const GR_GID_OFF = 16;

/** Whom to become: resolved and checked before anything is created. */
export interface DropPlan {
  user: string;
  uid: number;
  gid: number;
}

let libc: ReturnType<typeof loadLibc> | undefined;
function loadLibc() {
  const { dlopen, FFIType } = require('bun:ffi') as typeof import('bun:ffi');
  return dlopen('libc.so.6', {
    prctl: { args: [FFIType.i32, FFIType.u64, FFIType.u64, FFIType.u64, FFIType.u64], returns: FFIType.i32 },
    setgroups: { args: [FFIType.u64, FFIType.ptr], returns: FFIType.i32 },
    setresgid: { args: [FFIType.u32, FFIType.u32, FFIType.u32], returns: FFIType.i32 },
    setresuid: { args: [FFIType.u32, FFIType.u32, FFIType.u32], returns: FFIType.i32 },
    capset: { args: [FFIType.ptr, FFIType.ptr], returns: FFIType.i32 },
    getpwnam: { args: [FFIType.cstring], returns: FFIType.ptr },
    getpwuid: { args: [FFIType.u32], returns: FFIType.ptr },
    getgrnam: { args: [FFIType.cstring], returns: FFIType.ptr },
    __errno_location: { args: [], returns: FFIType.ptr },
  });
}

function errno(): number {
  const { read } = require('bun:ffi') as typeof import('bun:ffi');
  const p = libc!.symbols.__errno_location();
  return p ? read.i32(p, 0) : 0;
}

const cstr = (s: string) => Buffer.from(`${s}\0`, 'utf8');
const ID_RE = /^\d{1,9}$/;
const NAME_RE = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?$/;

/** This process's effective capabilities (/proc/self/status CapEff), or null without /proc. */
function capEff(): bigint | null {
  try {
    const m = /^CapEff:\s*([0-9a-fA-F]+)$/m.exec(readFileSync('/proc/self/status', 'utf8'));
    return m ? BigInt(`0x${m[1]}`) : null;
  } catch {
    return null;
  }
}

/**
 * The user and group to drop to for `--user user [--group group]` (names or numeric IDs; the group defaults to the
 * user's own). Throws USAGE when the user or group does not exist, or this process could not change to them.
 */
export function planDrop(user: string, group: string | undefined, platform: string = process.platform): DropPlan {
  if (platform !== 'linux') throw new VpnError('USAGE', `--user works on Linux only (this is ${platform})`);
  if (!ID_RE.test(user) && !NAME_RE.test(user)) throw new VpnError('USAGE', `--user: expected a user name or a numeric user ID, got "${user.slice(0, 40).replace(/[^\x20-\x7e]/g, '?')}"`);
  if (group !== undefined && !ID_RE.test(group) && !NAME_RE.test(group)) throw new VpnError('USAGE', `--group: expected a group name or a numeric group ID, got "${group.slice(0, 40).replace(/[^\x20-\x7e]/g, '?')}"`);
  const caps = capEff();
  if (caps !== null && (caps & ((1n << BigInt(CAP_SETUID)) | (1n << BigInt(CAP_SETGID)))) !== ((1n << BigInt(CAP_SETUID)) | (1n << BigInt(CAP_SETGID)))) {
    throw new VpnError('USAGE', `--user needs root (CAP_SETUID and CAP_SETGID) to change user; this process runs as uid ${process.getuid?.()} without them (already unprivileged: leave --user out)`);
  }
  libc ??= loadLibc();
  const { read } = require('bun:ffi') as typeof import('bun:ffi');
  const pw = ID_RE.test(user) ? libc.symbols.getpwuid(Number(user)) : libc.symbols.getpwnam(cstr(user));
  if (!pw && !ID_RE.test(user)) throw new VpnError('USAGE', `--user ${user}: no such user`);
  const uid = pw ? read.u32(pw, PW_UID_OFF) : Number(user);
  let gid: number;
  if (group === undefined) {
    if (!pw) throw new VpnError('USAGE', `--user ${user}: no such user in the user database, so give its group too (--group)`);
    gid = read.u32(pw, PW_GID_OFF);
  } else if (ID_RE.test(group)) {
    gid = Number(group);
  } else {
    const gr = libc.symbols.getgrnam(cstr(group));
    if (!gr) throw new VpnError('USAGE', `--group ${group}: no such group`);
    gid = read.u32(gr, GR_GID_OFF);
  }
  if (uid === 0) throw new VpnError('USAGE', `--user ${user} is root (uid 0); name the unprivileged user to run as`);
  return { user, uid, gid };
}

/**
 * Become `plan`'s user and group for good, keeping only the capabilities `keep` (module header). Throws USAGE
 * naming the step that failed and its errno; the caller must then exit, not go on as root.
 */
export function dropPrivileges(plan: DropPlan, keep: readonly number[]): void {
  libc ??= loadLibc();
  const { ptr } = require('bun:ffi') as typeof import('bun:ffi');
  const s = libc.symbols;
  const check = (what: string, r: number) => {
    if (r !== 0) throw new VpnError('USAGE', `dropping root for --user ${plan.user} failed at ${what} (errno ${errno()}); not going on as root`);
  };
  const mask = keep.reduce((m, c) => m | (1 << c), 0); // every cap kept is below 32: the first u32 of each set
  check('prctl(PR_SET_KEEPCAPS)', s.prctl(PR_SET_KEEPCAPS, keep.length > 0 ? 1 : 0, 0, 0, 0));
  const groups = new Uint32Array([plan.gid]);
  check('setgroups', s.setgroups(1, ptr(groups)));
  check('setresgid', s.setresgid(plan.gid, plan.gid, plan.gid));
  check('setresuid', s.setresuid(plan.uid, plan.uid, plan.uid));
  const header = new Uint32Array([LINUX_CAPABILITY_VERSION_3, 0]);
  const data = new Uint32Array([mask, mask, mask, 0, 0, 0]); // { effective, permitted, inheritable } × 2
  check('capset', s.capset(ptr(header), ptr(data)));
  for (const c of keep) check(`prctl(PR_CAP_AMBIENT_RAISE, ${CAP_NAMES[c] ?? c})`, s.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, c, 0, 0));
  check('prctl(PR_SET_KEEPCAPS, 0)', s.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0));
  if (s.setresuid(0, 0, 0) === 0) throw new VpnError('USAGE', `dropping root for --user ${plan.user} did not hold (root could be taken back); not going on`);
  const kept = keep.map((c) => CAP_NAMES[c] ?? `capability ${c}`);
  log.info(`dropped root: now uid ${plan.uid} (${plan.user}), gid ${plan.gid}, ${kept.length ? `keeping only ${kept.join(' and ')}` : 'no capabilities'}`);
}
