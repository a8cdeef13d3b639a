"""A run of two processes whose peer is killed: the survivor stops in one line, soon, and keeps
every complete checkpoint (hvt_jax/training/peers.py)."""
import os
import re
import threading
import time

import pytest

from hvt_jax import loading
from hvt_jax.training import checkpoint, peers
from tests import helpers

# Real stderr of survivors under jax/jaxlib 0.12.0.1 (trimmed stack dumps): process 0 when
# process 1 was killed (the coordination service's heartbeat verdict), then process 1 of
# the test script `2 processes summing in a loop` when process 0, which runs the service, was.
SURVIVOR_OF_1 = r"""step 4/138  epoch 0.09  loss 2.2996  lr 2.00e-03  2 img/s  input wait 0%  ETA ?
step 8/138  epoch 0.17  loss 2.2655  lr 1.99e-03  124 img/s  input wait 10%  ETA 2m53s
eval at step 8: top-1 21.00%  top-5 67.00%  loss 2.2176 | EMA top-1 12.33%  top-5 58.33%  loss 2.2873
step 12/138  epoch 0.26  loss 2.2545  lr 1.98e-03  144 img/s  input wait 24%  ETA 6m14s
E1201 21:40:21.153837   11369 coordination_service.cc:1518] [16695433888063460597] Use error polling to propagate the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) to debug further. [type.googleapis.com/tensorflow.CoordinationServiceError='']
=== Source Location Trace: ===
external/xla+/xla/pjrt/distributed/coordination/coordination_service.cc:232

E1201 21:40:21.160235   11380 coordination_service_agent.cc:288] Polled an error from coordination service (this can be an error from this or another task).
F1201 21:40:21.160352   11380 client.h:86] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. Disable Python buffering, i.e. `python -u`, to be sure to see all the previous output. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) to debug further.

RPC: /xla.coordination.CoordinationService/PollForError [type.googleapis.com/tensorflow.CoordinationServiceError='']
=== Source Location Trace: ===
external/xla+/xla/pjrt/distributed/coordination/coordination_service_error_util.cc:64

*** Check failure stack trace: ***
    @     0x7efdba0f81b4  absl::lts_20260526::log_internal::LogMessage::SendToLog()
    @     0x7efdba0f8136  absl::lts_20260526::log_internal::LogMessage::Flush()
    @     0x7efdba158b9e  std::_Function_handler<>::_M_invoke()
    @     0x7efdb6eb5995  std::_Function_handler<>::_M_invoke()
    @     0x7efdb6ed08c4  xla::CoordinationServiceAgent::SetError()
Fatal Python error: Aborted

Thread 0x00007efce920b6c0 (most recent call first):
  File "/tmp/v312/lib/python3.12/site-packages/orbax/checkpoint/_src/multihost/multihost.py", line 309 in _fn
  File "/tmp/v312/lib/python3.12/site-packages/orbax/checkpoint/_src/futures/synchronization.py", line 105 in <lambda>
"""

SURVIVOR_OF_0 = r"""[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1
[1] step 200 1796162318.3
[1] step 400 1796162321.5
W1201 21:58:49.165528   27223 preemption_sync_manager.cc:147] Failed to retrieve preemption notice from coordination service: UNAVAILABLE: Stream removed (Socket closed)
Additional GRPC error information from remote target coordination_service while calling /xla.coordination.CoordinationService/GetKeyValue:
:UNAVAILABLE:Stream removed (Socket closed)
=== Source Location Trace: === 
external/xla+/xla/tsl/distributed_runtime/rpc/grpc_util.h:89
. This is only expected if one of the tasks is unhealthy. Check the logs for the actual root cause.
E1201 21:58:49.165582   27223 preemption_sync_manager.cc:159] Failed to cancel preemption barrier: FAILED_PRECONDITION: Tried to cancel non-existent barrier PREEMPTION_SYNC_BARRIER. [type.googleapis.com/tensorflow.CoordinationServiceError='']
=== Source Location Trace: === 
external/xla+/xla/util.h:302

E1201 21:58:49.165628   27223 coordination_service_agent.cc:288] Polled an error from coordination service (this can be an error from this or another task).
F1201 21:58:49.165638   27223 client.h:86] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. Disable Python buffering, i.e. `python -u`, to be sure to see all the previous output. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was preempted/died/restarted unexpectedly or this task is experiencing network issues. Check earlier logs from 1) this task, 2) the leader (usually slice 0 task 0), and 3) cluster scheduler to debug further.
Additional GRPC error information from remote target coordination_service while calling /xla.coordination.CoordinationService/PollForError:
:UNAVAILABLE:Stream removed (Socket closed)
=== Source Location Trace: === 
external/xla+/xla/pjrt/distributed/coordination/coordination_service_error_util.cc:64

[1] EXC 1796162329.2 JaxRuntimeError: UNKNOWN: Gloo all-reduce failed: [external/xla++third_party_ext+gloo/gloo/transport/tcp/pair.cc:538] Read error [127.0.0.1]:49325: Connection reset by peer
*** Check failure stack trace: ***
    @     0x7f4fceaf81b4  absl::lts_20260526::log_internal::LogMessage::SendToLog()
    @     0x7f4fceaf8136  absl::lts_20260526::log_internal::LogMessage::Flush()
    @     0x7f4fceb58b9e  std::_Function_handler<>::_M_invoke()
    @     0x7f4fcb8b5995  std::_Function_handler<>::_M_invoke()
    @     0x7f4fcb8d08c4  xla::CoordinationServiceAgent::SetError()
    @     0x7f4fcb8db19b  std::_Function_handler<>::_M_invoke()
"""


def _relay(text, hold=True, whole=False):
  """What the supervisor shows of `text` (fed line by line, or in one piece) and its relay."""
  relay = peers.Relay(hold=hold)
  pieces = [text] if whole else [line + '\n' for line in text.splitlines()]
  shown = b''.join(relay.feed(piece.encode(), now=0.0) for piece in pieces) + relay.close()
  return shown.decode(), relay


@pytest.mark.parametrize('text, dead', [(SURVIVOR_OF_1, [1]), (SURVIVOR_OF_0, [0])])
def test_the_dead_peer_abort_is_held_back_and_read_for_who_died(text, dead):
  lines = text.splitlines()
  first_native = next(i for i, line in enumerate(lines) if re.match(r'[IWEF]\d{4} ', line))
  for whole in (False, True):
    shown, relay = _relay(text, whole=whole)
    assert shown.splitlines() == lines[:first_native]  # the training lines only
    assert peers.dead_processes(relay.report.decode()) == dead
  shown, relay = _relay(text, hold=False)  # --verbosity: everything, and still the report
  assert shown.splitlines() == lines and peers.dead_processes(relay.report.decode()) == dead


def test_native_lines_that_end_in_no_abort_are_shown_in_order_once_quiet():
  native = (b'E0000 00:00:1796161021.469672   10626 common_lib.cc:906] INVALID_ARGUMENT: Error: '
            b'unexpected worker hostname\n')
  relay = peers.Relay(hold=True)
  assert relay.feed(b'Process 0 of 2\n', 0.0) == b'Process 0 of 2\n'
  assert relay.feed(native + b'=== Source Location Trace: ===\n', 1.0) == b''
  assert relay.feed(b'Training ...\n', 1.5) == b''  # behind the held lines, to keep the order
  assert relay.tick(1.0 + peers.QUIET_SECONDS / 2) == b''
  assert relay.tick(1.0 + peers.QUIET_SECONDS) == (
      native + b'=== Source Location Trace: ===\nTraining ...\n')
  assert relay.feed(b'Downloading 10%\r', 5.0) == b'Downloading 10%\r'  # a partial line: at once
  assert relay.report is None and relay.close() == b''


@pytest.mark.parametrize('message, lost', [
    ('INTERNAL: Gloo AllReduce failed: [gloo/transport/tcp/pair.cc:534] Connection closed by peer', True),
    ('DEADLINE_EXCEEDED: Barrier timed out. Id: save_step_8', True),
    ('UNAVAILABLE: failed to connect to all addresses', True),
    ('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.2GiB', False),
    ('a disk that fills: [Errno 28] No space left on device', False),
])
def test_which_errors_wait_for_the_dead_peer_line(message, lost):
  """Where the survivor was when its peer died decides the error it sees first; each such error
  waits for the coordination service's verdict, other errors are raised at once."""
  assert peers.lost_peer(RuntimeError(message)) is lost


def test_the_line_names_the_dead_process_the_step_and_the_checkpoint(tmp_path):
  progress = {'workdir': str(tmp_path), 'process': 0, 'processes': 2, 'step': 13}
  assert peers.dead_peer_line(SURVIVOR_OF_1, progress, 12) == (
      'main: error: process 1 of 2 stopped answering at step 13; rerun the same command on every '
      f'process to resume from the last complete checkpoint, step 12 ({tmp_path}/checkpoints/12).')
  assert peers.dead_peer_line(SURVIVOR_OF_0, {'workdir': str(tmp_path)}, None) == (
      'main: error: process 0 stopped answering before this process finished a step; no checkpoint '
      'is complete, so rerunning the same command on every process starts over.')


def _collect(proc, into):
  for line in proc.stdout:
    into.append((time.time(), line.rstrip('\n')))


@pytest.mark.slow
@pytest.mark.parametrize('victim', [1, 0])  # 0 also runs the coordination service
def test_the_survivor_of_a_killed_process_stops_in_one_line_and_keeps_the_checkpoints(tmp_path,
                                                                                    victim):
  run = tmp_path / 'run'
  # A multi-process run needs its data prepared first, by one process (the error says so).
  helpers.run('prepare_data', '--dataset=hvt_digits', f'--data_dir={os.environ["TFDS_DATA_DIR"]}',
              check=True)
  port = helpers.free_port()
  # A save every 2 steps: one is usually under way at the kill. A run longer than the test.
  procs = [helpers.run_main(run, '--config.num_epochs=50', '--config.checkpoint_every_steps=2',
                            '--heartbeat_timeout=20', f'--coordinator_address=127.0.0.1:{port}',
                            '--num_processes=2', f'--process_id={i}', wait=False, check=False)
           for i in range(2)]
  survivor, printed = procs[1 - victim], []
  readers = [threading.Thread(target=_collect, args=(p, out), daemon=True)
             for p, out in ((survivor, printed), (procs[victim], []))]
  try:
    for reader in readers:
      reader.start()
    deadline = time.time() + 600
    while not (run / checkpoint.CHECKPOINTS_DIR / '4').is_dir():  # renamed into place when complete
      assert all(p.poll() is None for p in procs) and time.time() < deadline, printed[-20:]
      time.sleep(0.2)
    saved = checkpoint.manager(str(run), read_only=True).latest_step()
    killed_at = time.time()
    procs[victim].kill()  # SIGKILL, as a preempted host: no chance to say anything
    survivor.wait(timeout=120)
    readers[0].join(timeout=30)
  finally:
    for p in procs:
      p.kill()
      p.wait()
  after = [line for t, line in printed
           if t >= killed_at and not re.match(r'step \d+/|eval at step', line)]
  latest = checkpoint.manager(str(run), read_only=True).latest_step()
  assert survivor.returncode == 1 and len(after) == 1, after
  where = re.escape(str(run / checkpoint.CHECKPOINTS_DIR / str(latest)))
  found = re.fullmatch(
      rf'main: error: process {victim} of 2 stopped answering at step (\d+); rerun the same command '
      rf'on every process to resume from the last complete checkpoint, step {latest} \({where}\)\.',
      after[0])
  assert found and int(found[1]) >= latest >= saved >= 4, after
  shown = '\n'.join(line for _, line in printed)
  assert not any(text in shown for text in ('Traceback', 'Fatal Python', 'Check failure', ' @ '))
  _, params = loading.load(str(run), step=latest)  # what the rerun resumes from loads
  assert params
