"""Fault injection on both training scripts, in subprocesses on CPU: kill -9 and re-run, SIGTERM,
a truncated checkpoint, an unwritable output folder, broken images, a diverging loss, and a process
of a 2-process run that dies. Each test names the property it proves."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import re
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {  # tiny models, batch 8, fp32: each step takes milliseconds
    'dilemma': ['--method', 'mocov3', '--model', 'vit_micro/4', '--proj-hidden', '32', '--proj-dim', '16'],
    'co_byol': ['--width', '0.0625', '--proj-hidden', '32', '--proj-dim', '16'],
}
COMMON = ['--epochs', '1000', '--batch-size', '8', '--workers', '0', '--dtype', 'fp32', '--device', 'cpu', '--log-every', '1',
          '--eval-every', '1000']


def command(script, out, folder, *extra):
    return [sys.executable, os.path.join(ROOT, f'{script}.py'), *SCRIPTS[script], *COMMON, '--data', 'folder',
            '--data-path', folder, '--out-dir', str(out), *extra]


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, **kw)


def logged_steps(out):
    path = os.path.join(out, 'log.jsonl')
    if not os.path.exists(path):
        return []
    return [json.loads(line)['step'] for line in open(path) if line.endswith('\n') and '"loss"' in line]


def wait_for_step(proc, out, step, timeout=120):
    t0 = time.time()
    while max(logged_steps(out), default=0) < step:
        assert proc.poll() is None, f'the run ended before step {step}: {proc.stderr.read()[-2000:]}'
        assert time.time() - t0 < timeout
        time.sleep(0.02)


def ckpt(out, name='ckpt.pt'):
    return torch.load(os.path.join(out, name), weights_only=False)


@pytest.fixture(scope='module')
def folder(image_folder):
    return image_folder


@pytest.mark.parametrize('script', SCRIPTS)
def test_kill_9_and_rerun_ends_identical_to_an_uninterrupted_run(script, folder, tmp_path):
    extra = ['--max-steps', '40', '--ckpt-every', '3']
    whole = run(command(script, tmp_path / 'whole', folder, *extra))
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / 'killed'
    proc = subprocess.Popen(command(script, out, folder, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    wait_for_step(proc, out, 7)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert ckpt(out)['step'] < 40  # it really was interrupted
    again = run(command(script, out, folder, *extra))
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = ckpt(tmp_path / 'whole'), ckpt(out)
    assert a['step'] == b['step'] == 40
    for k, v in a['model'].items():
        assert torch.equal(v, b['model'][k]), k
    assert logged_steps(out) == list(range(1, 41))  # the log, too, has every step once


@pytest.mark.parametrize('script, sig', [('dilemma', 'SIGTERM'), ('co_byol', 'SIGTERM'), ('dilemma', 'SIGINT')])
def test_sigterm_writes_a_checkpoint_and_exits_75_and_the_rerun_continues(script, sig, folder, tmp_path):
    out = tmp_path / 'run'
    cmd = command(script, out, folder, '--max-steps', '100000', '--ckpt-every', '100000', '--workers', '2')
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    wait_for_step(proc, out, 3)
    os.killpg(proc.pid, getattr(signal, sig))  # as a scheduler (or Ctrl-C) does: the whole process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    stopped = ckpt(out)['step']
    assert stopped >= 3 and f'{sig} at step {stopped}' in err
    assert max(logged_steps(out)) == stopped
    again = run(command(script, out, folder, '--max-steps', str(stopped + 2)))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f'resuming at step {stopped}' in again.stdout
    assert ckpt(out)['step'] == stopped + 2 and logged_steps(out)[-2:] == [stopped + 1, stopped + 2]


@pytest.mark.parametrize('script', SCRIPTS)
def test_truncated_checkpoint_is_reported_and_the_previous_one_used(script, folder, tmp_path):
    out = tmp_path / 'run'
    first = run(command(script, out, folder, '--max-steps', '4', '--ckpt-every', '2'))
    assert first.returncode == 0, first.stderr[-2000:]
    assert 'starting at step 0' in first.stdout and 'resuming' not in first.stdout  # a fresh run says so
    assert ckpt(out)['step'] == 4 and ckpt(out, 'ckpt_prev.pt')['step'] == 2  # the previous one is kept
    path = out / 'ckpt.pt'
    with open(path, 'r+b') as f:
        f.truncate(path.stat().st_size // 2)
    again = run(command(script, out, folder, '--max-steps', '6', '--ckpt-every', '2'))
    assert again.returncode == 0, again.stderr[-2000:]
    assert 'ckpt.pt is unreadable' in again.stderr and 'resuming at step 2' in again.stdout
    assert ckpt(out)['step'] == 6 and os.path.exists(out / 'ckpt.pt.corrupt')
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]


def test_no_readable_checkpoint_is_one_line_and_exit_2(folder, tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'ckpt.pt').write_bytes(b'not a checkpoint')
    res = run(command('dilemma', out, folder, '--max-steps', '2'))
    assert res.returncode == 2 and 'no readable checkpoint' in res.stderr.splitlines()[-1]


@pytest.mark.parametrize('script', SCRIPTS)
def test_failed_checkpoint_write_is_exit_4_and_the_previous_checkpoint_survives(script, folder, tmp_path):
    out = tmp_path / 'run'
    assert run(command(script, out, folder, '--max-steps', '2')).returncode == 0
    before = (out / 'ckpt.pt').read_bytes()
    (out / 'ckpt.pt.tmp').mkdir()  # the temporary file cannot be created: as on a full or broken disk
    res = run(command(script, out, folder, '--max-steps', '4'))
    assert res.returncode == 4, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith(f'{script}.py: error: cannot write checkpoint')
    assert (out / 'ckpt.pt').read_bytes() == before and ckpt(out)['step'] == 2


def read_only(folder):
    """A command prefix under which `folder` is read-only: chmod for an ordinary user; for root (who writes
    anywhere) a read-only bind mount in a private mount namespace, where the system allows one."""
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return []
    prefix = ['unshare', '-m', 'sh', '-c', f'mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && exec "$@"', 'sh']
    probe = subprocess.run([*prefix, 'touch', str(folder / 'probe')], capture_output=True, text=True)
    if 'Read-only file system' not in probe.stderr:
        pytest.skip(f'running as root and no read-only bind mount is possible here: {probe.stderr.strip()}')
    return prefix


def test_read_only_output_folder_is_a_clear_error_at_start(tmp_path):
    out = tmp_path / 'ro'
    out.mkdir()
    prefix = read_only(out)
    for script in SCRIPTS:
        for target in (out, out / 'sub'):  # the folder itself, or one to be created inside it
            res = run([*prefix, sys.executable, os.path.join(ROOT, f'{script}.py'), '--out-dir', str(target), '--max-steps', '1'])
            assert res.returncode == 4, res.stderr[-2000:]
            assert res.stderr.count('\n') == 1 and f'cannot write to --out-dir {target}' in res.stderr, res.stderr


@pytest.fixture
def broken_folder(folder, tmp_path):
    root = tmp_path / 'data'
    shutil.copytree(folder, root)
    (root / 'train' / 'circle' / 'empty.jpg').write_bytes(b'')
    (root / 'train' / 'square' / 'garbage.jpg').write_bytes(os.urandom(300))
    return str(root)


@pytest.mark.parametrize('script', SCRIPTS)
def test_unreadable_images_name_the_file_or_are_skipped_and_counted(script, broken_folder, tmp_path):
    res = run(command(script, tmp_path / 'strict', broken_folder, '--max-steps', '12'))
    assert res.returncode == 2
    error = res.stderr.strip().splitlines()[-1]  # after the progress bar of the steps done before
    assert error.startswith(f'{script}.py: error: cannot read image') and ('empty.jpg' in error or 'garbage.jpg' in error)
    out = tmp_path / 'skip'
    res = run(command(script, out, broken_folder, '--max-steps', '12', '--skip-bad-images'))
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'warning: skipping' in res.stderr and 'empty.jpg' in res.stderr and 'garbage.jpg' in res.stderr
    log = [json.loads(line) for line in open(out / 'log.jsonl') if '"loss"' in line]
    assert [r['step'] for r in log] == list(range(1, 13))  # the epochs kept their length
    assert log[-1]['skipped_images'] >= 2  # 12 steps of 8 cover each of the ~36 training files at least twice


@pytest.mark.parametrize('script', SCRIPTS)
def test_a_diverging_loss_stops_with_its_step_and_term_and_keeps_the_last_good_checkpoint(script, folder, tmp_path):
    out = tmp_path / 'run'
    assert run(command(script, out, folder, '--max-steps', '2')).returncode == 0
    state = ckpt(out)
    state['args']['lr'] = 1e30  # the same run, from here on with an lr that diverges (a run resumes only itself)
    torch.save(state, out / 'ckpt.pt')
    before = (out / 'ckpt.pt').read_bytes()
    res = run(command(script, out, folder, '--max-steps', '30', '--lr', '1e30'))
    assert res.returncode == 3, res.stderr[-2000:]
    line = res.stderr.strip().splitlines()[-1]
    assert re.search(r'non-finite loss in steps (\d+)-(\d+)', line) and (' is nan' in line or ' is inf' in line), line
    first, last = map(int, re.search(r'in steps (\d+)-(\d+)', line).groups())
    assert 3 <= first <= last <= 30  # the range holds the steps after the last good checkpoint (step 2)
    assert ('method_loss' in line or 'detect_loss' in line) if script == 'dilemma' else ('global_loss' in line or 'local_loss' in line)
    assert f'(step 2) is the last good checkpoint' in line
    assert (out / 'ckpt.pt').read_bytes() == before


@pytest.mark.parametrize('script', SCRIPTS)
def test_when_one_process_dies_the_other_exits_with_an_error_instead_of_hanging(script, folder, tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, os.path.join(ROOT, 'tests', 'fail_on_rank1.py'), script, *command(script, tmp_path / 'run', folder,
           '--max-steps', '20', '--dist-timeout', '1')[2:]]
    procs = []
    for rank in range(2):
        env = {**os.environ, 'RANK': str(rank), 'LOCAL_RANK': str(rank), 'WORLD_SIZE': '2',
               'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port)}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT))
    t0 = time.time()
    errs = [p.communicate(timeout=150)[1] for p in procs]
    assert time.time() - t0 < 150
    assert procs[1].returncode != 0 and 'injected failure on rank 1' in errs[1]
    assert procs[0].returncode != 0, errs[0][-2000:]


def test_sigterm_to_torchrun_reaches_the_worker_which_checkpoints_before_torchrun_exits(folder, tmp_path):
    """Under torchrun the scheduler's SIGTERM goes to torchrun, which forwards it to the workers and
    kills them 30 s later; a step plus a checkpoint well inside that leaves a checkpoint to resume from.
    torchrun exits with its own non-zero status, not the worker's 75."""
    out = tmp_path / 'run'
    cmd = command('dilemma', out, folder, '--max-steps', '100000', '--ckpt-every', '100000')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1', *cmd[1:]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGTERM)  # to torchrun only, as a scheduler signals the job's main process
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    stopped = ckpt(out)['step']
    assert stopped >= 3 and f'SIGTERM at step {stopped}' in err
    again = run(command('dilemma', out, folder, '--max-steps', str(stopped + 1)))
    assert again.returncode == 0 and f'resuming at step {stopped}' in again.stdout, again.stderr[-2000:]
