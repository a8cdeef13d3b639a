"""A multi-process run whose peer dies ends, on every survivor, in one line saying what to do.

JAX's coordination service (`jax.distributed`) already notices a dead process: the service,
which runs inside process 0, counts a process as dead once it sends no heartbeat for
`heartbeat_timeout_seconds`, and every other process's client then aborts natively
(LOG(FATAL), then a C++ and Python stack dump). When process 0 itself dies, the others' clients
lose the service and abort at once. Neither abort can be caught in Python: jaxlib 0.12's
`missed_heartbeat_callback` dies converting its status (std::bad_cast) before reaching Python,
and `jax_enable_recoverability` keeps the survivors alive only when the dead process is not
process 0. So `python -m hvt_jax.main` in a multi-process run keeps JAX's detection and
abort and reads them from outside: it runs itself again as a child (`supervise`), relays the
child's stderr, and when the child aborts with the coordination service's verdict it prints one
line instead of the dump: which process stopped answering, the step this one had reached (the
loop records it, `reached`) and the last complete checkpoint to resume from.

Saved work is safe: Orbax writes each checkpoint into a temporary directory that process 0
renames only after every process has written its part, so a save under way when a process
dies stays temporary and the earlier checkpoints stay the latest.
"""
from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time

# Set in the child: the file descriptor of the record the supervisor reads after the child ends,
# and the supervisor's pid.
RECORD_FD = 'HVT_JAX_PEERS_RECORD_FD'
SUPERVISOR = 'HVT_JAX_PEERS_SUPERVISOR'
_RECORD_BYTES = 4096

# What the coordination client logs as it aborts (xla/pjrt/distributed/client.h); the
# status that follows says why.
FATAL = b'Terminating process because the JAX distributed service detected fatal errors'
# An absl/glog line from C++: `E1201 21:40:21.153837   11369 coordination_service.cc:1518] ...`.
_NATIVE = re.compile(rb'[IWEF]\d{4} [\d:.]+ +\d+ [^ \]]+:\d+\] ')
# Native lines come in bursts: the errors that precede the abort are logged by the same thread
# just before it. Lines held for this long with no further native line were not part of one.
QUIET_SECONDS = 2.0

_record: dict = {}
_record_fd: int | None = None  # set in a supervised child


def note(**values) -> None:
  """Adds to the record the supervisor reads once this process has ended (a no-op unless
  supervised). Rewritten in place at a fixed size, so it costs one write and never blocks."""
  if _record_fd is None:
    return
  _record.update(values)
  data = json.dumps(_record).encode()[:_RECORD_BYTES]
  os.pwrite(_record_fd, data.ljust(_RECORD_BYTES), 0)


def reached(step: int) -> None:
  """The training loop's progress: `step` steps done."""
  if _record_fd is not None:
    note(step=step)


def _multi_process(argv: list[str]) -> bool:
  """True if the command line asks for several processes (flags of hvt_jax.main)."""
  for arg in argv:
    if not arg.startswith('-'):
      continue
    name, _, value = arg.lstrip('-').partition('=')
    if name == 'coordinator_address' or (name == 'distributed' and
                                         value.lower() not in ('false', '0', 'no')):
      return True
  return False


def _verbose(argv: list[str]) -> bool:
  return any(a.startswith(('--verbosity', '-v')) for a in argv)


def supervise() -> None:
  """In a multi-process run on Linux, runs this program (same interpreter and arguments) as a
  child, relays its output and exits with its status, replacing a dead-peer abort by one line.
  Returns at once in the child, in single-process runs and elsewhere."""
  global _record_fd
  if RECORD_FD in os.environ:
    # Out of the environment, so that no process this one starts takes itself for supervised.
    _record_fd = int(os.environ.pop(RECORD_FD))
    _follow_parent(os.environ.pop(SUPERVISOR, ''))
    return
  if not sys.platform.startswith('linux') or not _multi_process(sys.argv[1:]):
    return
  sys.exit(_run_child([sys.executable, *sys.orig_argv[1:]], _verbose(sys.argv[1:])))


def _follow_parent(supervisor: str) -> None:
  """A killed supervisor takes its child with it: whoever kills the process they started
  (a scheduler preempting a host, kill -9) kills the one that trains."""
  import ctypes
  pr_set_pdeathsig = 1
  ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
  if str(os.getppid()) != supervisor:  # it died before prctl took effect
    os._exit(1)


def _run_child(cmd: list[str], verbose: bool) -> int:
  with tempfile.TemporaryFile() as record:
    record.write(b' ' * _RECORD_BYTES)
    record.flush()
    env = {**os.environ, RECORD_FD: str(record.fileno()), SUPERVISOR: str(os.getpid())}
    child = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, pass_fds=(record.fileno(),))
    # SIGTERM (preemption notice) reaches the child, which saves and exits. Ctrl-C reaches it
    # through the terminal's process group.
    signal.signal(signal.SIGTERM, lambda sig, _: child.send_signal(sig))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    relay = Relay(hold=not verbose)
    _pump(child.stderr.fileno(), relay, sys.stderr.buffer)
    code = child.wait()
    if relay.report is None:
      return code if code >= 0 else 128 - code  # as a shell reports a signal
    record.seek(0)
    try:
      progress = json.loads(record.read().decode() or '{}')
    except ValueError:  # the child died writing it
      progress = {}
  workdir = progress.get('workdir')
  try:
    latest = last_checkpoint(workdir) if workdir else None
  except Exception:  # the line matters more than this detail: print it without
    latest = None
  print(dead_peer_line(relay.report.decode(errors='replace'), progress, latest),
        file=sys.stderr, flush=True)
  return 1


def _pump(fd: int, relay: 'Relay', out) -> None:
  while True:
    ready, _, _ = select.select([fd], [], [], 0.5)
    if ready:
      data = os.read(fd, 1 << 16)
      if not data:
        break
      out.write(relay.feed(data, time.monotonic()))
    else:
      out.write(relay.tick(time.monotonic()))
    out.flush()
  out.write(relay.close())
  out.flush()


class Relay:
  """Passes a child's stderr through, except a dead-peer abort: from the coordination client's
  fatal line on, everything is kept in `report`; the native error lines just before it are held
  back (up to QUIET_SECONDS) and dropped with it. With `hold=False` (--verbosity) everything
  passes through and `report` is still kept."""

  def __init__(self, hold: bool):
    self.hold = hold
    self.report: bytes | None = None
    self._partial = b''  # a line still being written
    self._held: list[bytes] = []
    self._release_at: float | None = None

  def feed(self, data: bytes, now: float) -> bytes:
    if self.report is not None:
      self.report += data
      return b'' if self.hold else data
    lines = (self._partial + data).split(b'\n')
    self._partial = lines.pop()
    out = []
    for i, line in enumerate(lines):
      if FATAL in line:
        rest = b'\n'.join([line, *lines[i + 1:], self._partial])
        self.report, self._partial, self._held = rest, b'', []
        return b''.join(out) + (b'' if self.hold else rest)
      line += b'\n'
      if self.hold and (self._release_at is not None or _NATIVE.match(line)):
        if _NATIVE.match(line):
          self._release_at = now + QUIET_SECONDS
        self._held.append(line)
      else:
        out.append(line)
    # A partial line passes at once (a progress bar) unless it may become a native one.
    if self._partial and self._release_at is None and not (
        self.hold and (len(self._partial) < 2 or re.match(rb'[IWEF]\d', self._partial))):
      out.append(self._partial)
      self._partial = b''
    return b''.join(out)

  def tick(self, now: float) -> bytes:
    if self.report is None and self._release_at is not None and now >= self._release_at:
      out, self._held, self._release_at = b''.join(self._held), [], None
      return out
    return b''

  def close(self) -> bytes:
    if self.report is not None:
      return b''
    out, self._held, self._partial = b''.join(self._held) + self._partial, [], b''
    return out


def dead_processes(report: str) -> list[int] | None:
  """The processes the coordination service's abort names as dead, or None if it names none."""
  if 'Failed to send RPC to coordination service' in report:
    return [0]  # the service, in process 0, is gone
  found = re.search(r'stopped sending heartbeats\):\n(.*?)\nThe tasks have crashed', report, re.S)
  if found:  # one task a line: `1`, or `/job:jax_worker/replica:0/task:1`
    return [int(m) for m in re.findall(r'(\d+)\s*$', found[1], re.M)]
  return None


def last_checkpoint(workdir: str) -> int | None:
  """The latest step of `workdir` that Orbax finalized: what a rerun resumes from."""
  from absl import logging
  from hvt_jax.training import checkpoint
  if '://' not in workdir and not os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINTS_DIR)):
    return None
  logging.set_verbosity(logging.ERROR)  # a read-only manager warns that it is read-only
  return checkpoint.manager(workdir, read_only=True).latest_step()


def dead_peer_line(report: str, progress: dict, latest: int | None) -> str:
  """`main: error: process 1 of 2 stopped answering at step 13; ...` for the supervisor."""
  dead = dead_processes(report)
  of = f' of {progress["processes"]}' if 'processes' in progress else ''
  if dead:
    who = (f'process {dead[0]}{of}' if len(dead) == 1 else
           f'processes {", ".join(map(str, dead))}{of}')
    what = f'{who} stopped answering'
  else:  # another error the service propagated: its first line
    status = report.partition('absl::Status: ')[2].strip().splitlines()
    what = f'the JAX distributed service stopped the run ({status[0] if status else "no reason"})'
  if 'step' in progress:
    what += f' at step {progress["step"]}'
  else:
    what += ' before this process finished a step'
  if latest is None:
    return f'main: error: {what}; no checkpoint is complete, so rerunning the same command on ' \
           'every process starts over.'
  from hvt_jax.training import checkpoint
  workdir = progress['workdir']
  workdir = workdir if '://' in workdir else os.path.abspath(workdir)
  where = f'{workdir.rstrip("/")}/{checkpoint.CHECKPOINTS_DIR}/{latest}'
  return (f'main: error: {what}; rerun the same command on every process to resume from the '
          f'last complete checkpoint, step {latest} ({where}).')


# How a step, a barrier or a save fails when another process is gone: gloo's socket errors,
# and the coordination service's when a barrier or key-value wait runs out (Orbax saves wait
# on those). Which one a survivor sees depends on where it was when its peer died.
_PEER_LOST = ('Connection reset by peer', 'Connection closed by peer', 'Broken pipe',
              'Connection refused', 'Gloo', 'gloo', 'coordination service', 'DEADLINE_EXCEEDED',
              'UNAVAILABLE', 'Barrier', 'barrier')


def lost_peer(error: BaseException) -> bool:
  """True if `error` is a collective failing because another process is gone."""
  return any(text in str(error) for text in _PEER_LOST)


def await_verdict(heartbeat_timeout: float) -> None:
  """Waits for the coordination service's abort that names the dead process (it comes within
  `heartbeat_timeout` of the death), so that a collective's error, which names none, is not
  what this process ends with. Returns if none comes: the caller then raises that error."""
  time.sleep(2 * heartbeat_timeout + 10)
