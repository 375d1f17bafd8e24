"""End-to-end resume: a killed, pre-empted or corrupted run, restarted with the same command, ends bitwise equal
to an uninterrupted run.

Every run goes through the real command line (`python -m scalezoo.train.cli train ...`) in a subprocess on one
host CPU device. The subprocesses share a persistent XLA compilation cache (a fresh temporary folder), so only the
first run pays for compiling; a cached executable is the same program, so numbers do not depend on it.
Runs are not `--quiet`: the trainer's "resuming <workdir> from step <k>" line on stderr is how a test knows that
the restart really restored a checkpoint, rather than silently starting over (which would match too).

Interrupted runs are stopped at a point described by what is on disk (a committed checkpoint folder, the newest
step in metrics.jsonl), never by a sleep, and the expected resume step is read back from disk after the stop.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

import numpy as np
import pytest

N_STEPS, EVERY = 16, 4  # checkpoints at 4, 8, 12 and the final one at 16
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a save in flight (checkpoint.py's layout note)
RUN_TIMEOUT_S = 420  # one subprocess, compile included, on a loaded 2-core machine
POLL_S = 0.003

FLAGS = [
    "--config", "dense:tiny", "--config.data.source=tokens",
    f"--config.train.steps={N_STEPS}", f"--config.checkpoint.every={EVERY}", "--config.checkpoint.keep=3",
    "--config.train.batch_size=8", "--config.train.seq_len=32", "--config.train.log_every=1",
    "--config.train.compute_dtype=float32",
]


# ----------------------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> str:
  """~100k byte tokens of real text (some stdlib modules' source), so the loss falls and a run fed the wrong
  batches after a resume shows; a small file keeps each subprocess from scanning the whole stdlib."""
  text = b"".join(pathlib.Path(m.__file__).read_bytes() for m in (json.decoder, json.encoder, shutil, subprocess))
  path = tmp_path_factory.mktemp("data") / "tokens.npy"
  np.save(path, np.frombuffer(text[:100_000], np.uint8).astype(np.uint16))
  return str(path)


@pytest.fixture(scope="module")
def cli(tmp_path_factory, token_file) -> dict:
  """How every run is started: the environment (one CPU device, a compilation cache shared by this module's
  runs) and the command-line flags after `--workdir`."""
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=1"),
             JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONUNBUFFERED="1",
             JAX_DISABLE_MOST_OPTIMIZATIONS="true")
  return dict(env=env, flags=[*FLAGS, f"--config.data.path={token_file}"])


class Run:
  """One `scalezoo train` subprocess with stdout/stderr in files next to the workdir."""

  def __init__(self, workdir, cli):
    self.workdir = str(workdir)
    base = f"{self.workdir}.{time.monotonic_ns()}"
    self.out_path, self.err_path = base + ".stdout", base + ".stderr"
    cmd = [sys.executable, "-m", "scalezoo.train.cli", "train", "--workdir", self.workdir, *cli["flags"]]
    with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
      self.proc = subprocess.Popen(cmd, env=cli["env"], stdout=out, stderr=err, cwd=os.path.dirname(self.workdir))

  @property
  def stderr(self) -> str:
    with open(self.err_path) as f:
      return f.read()

  def wait(self) -> int:
    try:
      return self.proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      pytest.fail(f"scalezoo train did not finish in {RUN_TIMEOUT_S}s; stderr:\n{self.stderr[-3000:]}")


def metrics_rows(workdir) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  rows = []
  try:
    with open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          pass  # a line being written right now
  except FileNotFoundError:
    pass
  return rows


def committed_steps(workdir) -> set[int]:
  """Step folders orbax has committed (it renames `<step>.orbax-checkpoint-tmp` to `<step>` last)."""
  try:
    names = os.listdir(os.path.join(workdir, "checkpoints"))
  except FileNotFoundError:
    return set()
  return {int(n) for n in names if n.isdigit()}


def run_to_end(workdir, cli) -> tuple[int, str]:
  run = Run(workdir, cli)
  return run.wait(), run.stderr


def run_and_signal(workdir, cli, sig: int, ready: Callable[[int, set[int]], bool]) -> tuple[int, str]:
  """Starts a run and sends `sig` as soon as `ready(newest_step, committed_steps)` holds.

  `newest_step` counts only steps logged by this process: rows of an earlier, killed process are still in
  metrics.jsonl until the restart truncates it, so only steps above their maximum are taken as new.
  """
  stale = max((r["step"] for r in metrics_rows(workdir)), default=0)
  run = Run(workdir, cli)
  deadline = time.monotonic() + RUN_TIMEOUT_S
  while True:
    if run.proc.poll() is not None:
      pytest.fail(f"the run exited (rc {run.proc.returncode}) before the signal point; the interruption tests need "
                  f"it still running; stderr:\n{run.stderr[-3000:]}")
    if time.monotonic() > deadline:
      run.proc.kill()
      run.proc.wait()
      pytest.fail(f"the run never reached the signal point in {RUN_TIMEOUT_S}s; stderr:\n{run.stderr[-3000:]}")
    newest = max((r["step"] for r in metrics_rows(workdir) if r["step"] > stale), default=0)
    if ready(newest, committed_steps(workdir)):
      os.kill(run.proc.pid, sig)
      break
    time.sleep(POLL_S)
  return run.wait(), run.stderr


def assert_matches_reference(workdir, reference, *, through: int = N_STEPS):
  """metrics.jsonl holds steps 1..through exactly once each, with losses and grad norms bitwise equal."""
  rows = metrics_rows(workdir)
  steps = [r["step"] for r in rows]
  assert steps == list(range(1, through + 1)), f"steps in metrics.jsonl: {steps}"
  for row in rows:
    want = reference["rows"][row["step"]]
    for key in ("loss", "grad_norm"):
      got = row[key]
      assert isinstance(got, float) and got.hex() == want[key].hex(), (
          f"step {row['step']} {key}: {got!r} ({got.hex()}) != reference {want[key]!r} ({want[key].hex()})")


def assert_completed_like_reference(workdir, reference, rc: int, stderr: str):
  assert rc == 0, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  assert_matches_reference(workdir, reference)
  summary = read_summary(workdir)
  assert summary["status"] == "completed" and summary["steps"] == N_STEPS
  # The final evaluation reads the final parameters: equal eval losses mean equal end states.
  assert summary["eval_loss"].hex() == reference["summary"]["eval_loss"].hex()
  assert summary["loss"].hex() == reference["summary"]["loss"].hex()


def read_summary(workdir) -> dict:
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def assert_resumed_from(stderr: str, workdir, step: int):
  line = f"resuming {workdir} from step {step}"
  assert line in stderr, f"expected {line!r} on stderr; got:\n{stderr[-3000:]}"


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def reference(cli, tmp_path_factory):
  """The uninterrupted run: {"rows": {step: row}, "summary": summary.json}."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  rc, stderr = run_to_end(workdir, cli)
  assert rc == 0, stderr[-3000:]
  rows = metrics_rows(workdir)
  assert [r["step"] for r in rows] == list(range(1, N_STEPS + 1)), stderr[-3000:]
  assert "resuming" not in stderr
  return dict(rows={r["step"]: r for r in rows}, summary=read_summary(workdir))


@pytest.fixture(scope="module")
def preempted(cli, tmp_path_factory):
  """A run sent SIGTERM once it has logged step 5 (so the save of step 4 has begun): (workdir, rc, stderr).

  It stops a step or two later, usually between checkpoint steps, so its forced final save is a second
  committed checkpoint after 4. Tests copy the workdir before changing it, so the fixture serves several.
  """
  workdir = tmp_path_factory.mktemp("preempted") / "run"
  rc, stderr = run_and_signal(workdir, cli, signal.SIGTERM, lambda newest, done: newest >= 5)
  return workdir, rc, stderr


def copy_run(source, tmp_path):
  target = tmp_path / "run"
  shutil.copytree(source, target)
  return target


def preempted_step(preempted) -> int:
  workdir, rc, stderr = preempted
  assert rc == 143, f"SIGTERM should end the run with exit code 143, got {rc}; stderr:\n{stderr[-3000:]}"
  return read_summary(workdir)["steps"]


# ----------------------------------------------------------------------------------------------- tests

# ~15 s; SIGTERM, corrupt and partial checkpoints below resume through the same CLI path: `pytest -m slow`.
@pytest.mark.slow
def test_sigkill_twice_then_resume_matches_reference(cli, reference, tmp_path):
  """Killed right after checkpoint 4 commits, resumed, killed again mid-interval (step >= 10 logged, checkpoint 8
  committed), resumed to the end: every logged loss is bitwise the reference's and steps are exactly 1..N."""
  workdir = tmp_path / "run"

  # Kill 1: right after the first checkpoint is committed.
  rc, stderr = run_and_signal(workdir, cli, signal.SIGKILL, lambda newest, done: 4 in done)
  assert rc == -signal.SIGKILL, stderr[-3000:]
  assert not os.path.exists(workdir / "summary.json")
  first = max(committed_steps(workdir))
  assert 4 <= first < N_STEPS

  # Kill 2: mid-interval, after the restart has logged step 10 or later with checkpoint 8 committed.
  rc, stderr = run_and_signal(workdir, cli, signal.SIGKILL, lambda newest, done: newest >= 10 and 8 in done)
  assert rc == -signal.SIGKILL, stderr[-3000:]
  assert_resumed_from(stderr, workdir, first)
  second = max(committed_steps(workdir))
  assert 8 <= second < N_STEPS

  rc, stderr = run_to_end(workdir, cli)
  assert_resumed_from(stderr, workdir, second)
  assert_completed_like_reference(workdir, reference, rc, stderr)


def test_sigterm_checkpoints_and_resume_matches_reference(cli, reference, preempted, tmp_path):
  """SIGTERM mid-run: exit code 143, a checkpoint at the step it stopped at, summary status "preempted", metrics
  up to that step; the same command then resumes from that step and ends bitwise equal to the reference."""
  source, _, stderr = preempted
  step = preempted_step(preempted)
  assert 6 <= step < N_STEPS
  assert read_summary(source)["status"] == "preempted"
  assert step in committed_steps(source), os.listdir(source / "checkpoints")
  assert f"pre-empted at step {step}" in stderr
  assert "Traceback" not in stderr
  assert_matches_reference(source, reference, through=step)

  workdir = copy_run(source, tmp_path)
  rc, stderr = run_to_end(workdir, cli)
  assert_resumed_from(stderr, workdir, step)
  assert_completed_like_reference(workdir, reference, rc, stderr)


def test_corrupt_latest_checkpoint_falls_back_to_previous(cli, reference, preempted, tmp_path):
  """The newest checkpoint's array data truncated: the restart warns naming the step, moves it to corrupt-<step>,
  resumes from the previous checkpoint and still ends bitwise equal to the reference."""
  step = preempted_step(preempted)
  workdir = copy_run(preempted[0], tmp_path)
  steps = sorted(committed_steps(workdir))
  assert len(steps) >= 2 and steps[-1] == step, steps
  previous = steps[-2]

  # Orbax stores arrays in an OCDBT database: chunk data in state/ocdbt.process_<i>/d/*. Cut every file in half.
  data_dir = workdir / "checkpoints" / str(step) / "state" / "ocdbt.process_0" / "d"
  data_files = sorted(p for p in data_dir.iterdir() if p.is_file())
  assert data_files, f"no array data files under {data_dir}"
  for path in data_files:
    with open(path, "r+b") as f:
      f.truncate(path.stat().st_size // 2)
  cut_sizes = {p.name: p.stat().st_size for p in data_files}

  rc, stderr = run_to_end(workdir, cli)
  warnings = [line for line in stderr.splitlines() if line.startswith("warning: checkpoint")]
  assert len(warnings) == 1 and f"step {step} " in warnings[0] and f"corrupt-{step}" in warnings[0], stderr[-3000:]
  assert_resumed_from(stderr, workdir, previous)
  assert_completed_like_reference(workdir, reference, rc, stderr)
  set_aside = workdir / "checkpoints" / f"corrupt-{step}"
  assert set_aside.is_dir() and (set_aside / "state").is_dir()
  kept = {p.name: p.stat().st_size for p in (set_aside / "state" / "ocdbt.process_0" / "d").iterdir()}
  assert kept == cut_sizes, "the set-aside folder should be kept as it was"


def test_partial_checkpoint_is_ignored(cli, reference, preempted, tmp_path):
  """Left-over `<step>.orbax-checkpoint-tmp` folders of later steps (a save killed mid-write) are not steps: the
  restart resumes from the last committed checkpoint, saves the next checkpoint step over the stale folder, and
  ends bitwise equal to the reference."""
  step = preempted_step(preempted)
  workdir = copy_run(preempted[0], tmp_path)
  ckpt_dir = workdir / "checkpoints"
  resaved = (step // EVERY + 1) * EVERY  # the next checkpoint step the resumed run writes (<= N_STEPS)
  never = N_STEPS + EVERY  # a step this run never reaches: its leftover must just be ignored
  for later in (resaved, never):
    # What a killed async save leaves: a copy of a real step without any commit marker and with a cut data file.
    partial = ckpt_dir / f"{later}{TMP_SUFFIX}"
    shutil.copytree(ckpt_dir / str(step), partial)
    for marker in partial.rglob("commit_success.txt"):
      marker.unlink()
    data = max((p for p in (partial / "state" / "ocdbt.process_0" / "d").iterdir()), key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
      f.truncate(data.stat().st_size // 3)

  rc, stderr = run_to_end(workdir, cli)
  assert_resumed_from(stderr, workdir, step)
  assert "warning: checkpoint" not in stderr, stderr[-3000:]
  assert_completed_like_reference(workdir, reference, rc, stderr)
  names = set(os.listdir(ckpt_dir))
  assert str(resaved) in names and f"{resaved}{TMP_SUFFIX}" not in names, sorted(names)
  assert (ckpt_dir / str(resaved) / "commit_success.txt").is_file()
  assert str(N_STEPS) in names
  assert not any(n.startswith("corrupt-") for n in names), sorted(names)
