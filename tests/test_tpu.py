"""tpu/tpu.py, the TPU pod-slice runner: the exact gcloud commands each subcommand builds (read from `--dry-run`),
one-line errors with exit code 2, the babysitter's decisions and loop (with gcloud faked), and the remote
launch/probe/mount shell scripts run for real in a local bash against a fake `scalezoo`, `sudo` and `gcsfuse`.
No network, no gcloud."""

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tpu", "tpu.py")
_spec = importlib.util.spec_from_file_location("scalezoo_tpu_script", SCRIPT)
tpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tpu)

Z = "--zone=us-east5-a"
COMMON = ["--name", "sz", "--zone", "us-east5-a"]
WHEEL = "scalezoo-0.1.0-py3-none-any.whl"
JOB = "train --config dense:1B --workdir /mnt/gcs/bkt/run --config.mesh.fsdp=-1"
PREPARE = ('mkdir -p ~/scalezoo && { python3.11 -c "import ensurepip" 2>/dev/null || { sudo apt-get update -qq && '
           "sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq python3.11 "
           "python3.11-venv; }; } && python3.11 -m venv ~/scalezoo/venv")
INSTALL = (f'~/scalezoo/venv/bin/pip install -q -U pip && ~/scalezoo/venv/bin/pip install -q "jax[tpu]" '
           f"~/scalezoo/{WHEEL} && ~/scalezoo/venv/bin/pip install -q --no-deps --force-reinstall ~/scalezoo/{WHEEL}")
# Install Cloud Storage FUSE if missing, mount the bucket `bkt` unless mounted (idempotent; fails if it cannot mount).
MOUNT = ("{ command -v gcsfuse >/dev/null || { curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | "
         "sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && echo \"deb [signed-by=/usr/share/keyrings/"
         "cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main\" | sudo tee "
         "/etc/apt/sources.list.d/gcsfuse.list >/dev/null && sudo apt-get update -qq && sudo DEBIAN_FRONTEND="
         "noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcsfuse; }; } && "
         "{ mountpoint -q /mnt/gcs/bkt || { sudo umount -l /mnt/gcs/bkt 2>/dev/null; sudo mkdir -p /mnt/gcs/bkt && "
         "sudo chown \"$(id -u):$(id -g)\" /mnt/gcs/bkt && "
         "gcsfuse --implicit-dirs --rename-dir-limit=1000000 bkt /mnt/gcs/bkt; }; }")
ALIVE = '[ -f job.pid ] && ps -o stat= -s "$(cat job.pid)" 2>/dev/null | grep -qv "^Z"'
PROBE = (f'cd ~/scalezoo 2>/dev/null && [ -x venv/bin/scalezoo ] && s=stopped || s=not-set-up; [ "$s" = stopped ] '
         f'&& {ALIVE} && s=running; echo "scalezoo-job $(hostname) $s $(cat exit_code 2>/dev/null || echo -)"')


def ssh(node: str, script: str, worker: str = "all") -> str:
  return f"gcloud compute tpus tpu-vm ssh {node} {Z} --worker={worker} --command {shlex.quote(script)}"


def launch_script(job: str, mount: str = MOUNT) -> str:
  """The remote launch script for the scalezoo arguments `job` (already shell-quoted), after `mount` (the bucket's
  mount script for a workdir in /mnt/gcs/bkt, "" for any other)."""
  cmd = f"venv/bin/scalezoo {job}"
  return ((f"{mount} && " if mount else "") + 'cd ~/scalezoo && { '
          f'if {ALIVE}; then kill -TERM -- "-$(cat job.pid)"; for i in $(seq 120); do {ALIVE} || break; sleep 1; '
          'done; kill -KILL -- "-$(cat job.pid)" 2>/dev/null; fi; rm -f exit_code; '
          f'echo "=== launch $(date -u +%FT%TZ):" {shlex.quote(cmd)} >> job.log; '
          f"setsid nohup sh -c {shlex.quote(f'PYTHONUNBUFFERED=1 {cmd}; echo $? > exit_code')} >> job.log 2>&1 "
          "< /dev/null & echo $! > job.pid; }")


def setup_lines(nodes: list[str], mount: str = "") -> list[str]:
  lines = [shlex.join([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", f"{ROOT}/build/tpu-wheel", ROOT])]
  for n in nodes:
    lines += [ssh(n, PREPARE),
              f"gcloud compute tpus tpu-vm scp {ROOT}/build/tpu-wheel/{WHEEL} {n}:scalezoo/ {Z} --worker=all",
              ssh(n, INSTALL), *([ssh(n, mount)] if mount else [])]
  return lines


def dry(capsys, command: str, *argv: str) -> list[str]:
  """The lines `tpu.py COMMAND --dry-run ARGV` prints."""
  assert tpu.main([command, "--dry-run", *COMMON, *argv]) == 0
  out = capsys.readouterr()
  assert out.err == ""
  return out.out.splitlines()


def test_create_one_slice_and_multislice(capsys):
  assert dry(capsys, "create", "--accelerator-type", "v5p-64", "--spot") == [
      f"gcloud compute tpus queued-resources create sz {Z} --accelerator-type=v5p-64 "
      "--runtime-version=v2-alpha-tpuv5 --node-id=sz --spot"]
  assert dry(capsys, "create", "--accelerator-type", "v5litepod-256", "--slices", "4", "--project", "p1") == [
      f"gcloud compute tpus queued-resources create sz {Z} --project=p1 --accelerator-type=v5litepod-256 "
      "--runtime-version=v2-alpha-tpuv5-lite --node-count=4 --node-prefix=sz"]
  # --best-effort is an alpha flag; --runtime-version overrides the per-generation image.
  assert dry(capsys, "create", "--accelerator-type", "v4-32", "--best-effort", "--runtime-version", "img") == [
      f"gcloud alpha compute tpus queued-resources create sz {Z} --accelerator-type=v4-32 --runtime-version=img "
      "--node-id=sz --best-effort"]


def test_setup_builds_a_wheel_and_installs_it_on_every_worker_of_every_node(capsys):
  assert tpu.wheel_name() == WHEEL
  assert dry(capsys, "setup") == setup_lines(["sz"])
  assert dry(capsys, "setup", "--slices", "2") == setup_lines(["sz-0", "sz-1"])
  assert dry(capsys, "setup", "--python", "python3.12")[1] == ssh("sz", PREPARE.replace("3.11", "3.12"))
  # --bucket: then install Cloud Storage FUSE and mount the bucket on every worker of every node.
  assert dry(capsys, "setup", "--bucket", "bkt") == setup_lines(["sz"], MOUNT)
  assert dry(capsys, "setup", "--bucket", "my.bucket_2", "--slices", "2") == setup_lines(
      ["sz-0", "sz-1"], MOUNT.replace("bkt", "my.bucket_2"))


def test_launch_runs_the_same_nohup_command_on_every_worker(capsys):
  # A workdir in /mnt/gcs/bkt: the bucket is mounted (where it is missing) before the job starts.
  assert dry(capsys, "launch", *JOB.split()) == [ssh("sz", launch_script(JOB))]
  # A leading `--` is accepted, and arguments with spaces or quotes survive both levels of quoting.
  assert dry(capsys, "launch", "--", "sweep", "--config", "dense_quick", "--workdir=/mnt/gcs/bkt/my sweep") == [
      ssh("sz", launch_script("sweep --config dense_quick '--workdir=/mnt/gcs/bkt/my sweep'"))]
  # No workdir, or one outside /mnt/gcs: nothing to mount.
  assert dry(capsys, "launch", "bench", "--config", "dense:1B", "--steps", "10") == [
      ssh("sz", launch_script("bench --config dense:1B --steps 10", mount=""))]
  assert dry(capsys, "launch", "train", "--workdir", "/mnt/nfs/run") == [
      ssh("sz", launch_script("train --workdir /mnt/nfs/run", mount=""))]


def test_multislice_launch_adds_dcn_data_unless_a_dcn_key_is_given(capsys):
  want = launch_script(JOB + " --config.mesh.dcn_data=2")
  assert dry(capsys, "launch", "--slices", "2", *JOB.split()) == [ssh("sz-0", want), ssh("sz-1", want)]
  user = JOB + " --config.mesh.dcn_fsdp=2"
  assert dry(capsys, "launch", "--slices", "2", *user.split()) == [ssh(f"sz-{i}", launch_script(user)) for i in (0, 1)]
  assert "dcn_" not in dry(capsys, "launch", *JOB.split())[0]
  # A sweep takes run-config keys under `fixed`.
  sweep = "sweep --config dense_quick --workdir /mnt/gcs/bkt/sweep"
  assert dry(capsys, "launch", "--slices", "2", *sweep.split())[0] == ssh(
      "sz-0", launch_script(sweep + " --config.fixed.mesh.dcn_data=2"))


def test_status_and_delete(capsys):
  assert dry(capsys, "status", "--tail", "20") == [
      f"gcloud compute tpus queued-resources describe sz {Z} '--format=value(state.state)'",
      ssh("sz", PROBE + "; tail -n 20 job.log 2>/dev/null || true")]
  assert dry(capsys, "delete") == [f"gcloud compute tpus queued-resources delete sz {Z} --force --quiet"]


def test_babysit_dry_run_prints_one_cycle(capsys):
  lines = dry(capsys, "babysit", "--accelerator-type", "v6e-16", "--spot", "--slices", "2", *JOB.split())
  job = JOB + " --config.mesh.dcn_data=2"
  # The workdir /mnt/gcs/bkt/run is read from the bucket as gs://bkt/run; setup (on a re-created slice too)
  # mounts bkt, as --bucket bkt would.
  want = [f"gcloud compute tpus queued-resources describe sz {Z} '--format=value(state.state)'",
          ssh("sz-0", PROBE), ssh("sz-1", PROBE),
          "gcloud storage cat gs://bkt/run/summary.json",
          f"gcloud compute tpus queued-resources delete sz {Z} --force --quiet",
          f"gcloud compute tpus queued-resources create sz {Z} --accelerator-type=v6e-16 "
          "--runtime-version=v2-alpha-tpuv6e --node-count=2 --node-prefix=sz --spot",
          *setup_lines(["sz-0", "sz-1"], MOUNT),
          ssh("sz-0", launch_script(job)), ssh("sz-1", launch_script(job))]
  assert [ln for ln in lines if not ln.startswith("#")] == want
  assert lines[0].startswith("#") and len([ln for ln in lines if ln.startswith("#")]) == 5
  with_flag = dry(capsys, "babysit", "--accelerator-type", "v6e-16", "--spot", "--slices", "2", "--bucket", "bkt",
                  *JOB.split())
  assert [ln for ln in with_flag if not ln.startswith("#")] == want
  # A sweep's finish is read from results.csv; the mount path maps to gs://BUCKET/PATH, normalised.
  for workdir, url in [("--workdir=/mnt/gcs/bkt/s/", "gs://bkt/s/results.csv"),
                       ("--workdir=/mnt/gcs/bkt//a/../s", "gs://bkt/s/results.csv"),
                       ("--workdir=/mnt/gcs/bkt", "gs://bkt/results.csv")]:
    sweep = dry(capsys, "babysit", "--accelerator-type", "v4-8", "sweep", "--config", "dense_quick", workdir)
    assert f"gcloud storage ls {url}" in sweep, workdir
  # A workdir outside /mnt/gcs is read on worker 0 (relative to ~/scalezoo); nothing is mounted.
  local = dry(capsys, "babysit", "--accelerator-type", "v4-8", "train", "--config", "dense:M", "--workdir", "runs/m")
  assert ssh("sz", "cd ~/scalezoo && cat runs/m/summary.json", worker="0") in local
  assert not any("gcsfuse" in ln or "gcloud storage" in ln for ln in local)
  nfs = dry(capsys, "babysit", "--accelerator-type", "v4-8", "sweep", "--config", "q", "--workdir", "/mnt/nfs/my s")
  assert ssh("sz", "cd ~/scalezoo && ls '/mnt/nfs/my s/results.csv'", worker="0") in nfs
  # --bucket with a workdir elsewhere: setup still mounts that bucket (for data, say).
  other = dry(capsys, "babysit", "--accelerator-type", "v4-8", "--bucket", "bkt", "train", "--workdir", "runs/m")
  assert ssh("sz", MOUNT) in other and ssh("sz", "cd ~/scalezoo && cat runs/m/summary.json", worker="0") in other


GS_ERROR = ("tpu: error: --workdir gs://bkt/run: scalezoo needs a filesystem path; run setup with --bucket bkt and use "
            "/mnt/gcs/bkt/run\n")


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: command"),
    (["bogus", *COMMON], "argument command: invalid choice: 'bogus'"),
    (["create", "--zone", "z", "--accelerator-type", "v4-8"], "the following arguments are required: --name"),
    (["create", *COMMON, "--accelerator-type", "v9-8"], "--accelerator-type 'v9-8': write GENERATION-SIZE"),
    (["create", *COMMON], "--accelerator-type is required"),
    (["create", *COMMON, "--accelerator-type", "v4-8", "--slices", "0"], "--slices 0: must be at least 1"),
    (["create", *COMMON, "--accelerator-type", "v4-8", "--spot", "--reserved"], "not allowed with argument"),
    (["create", "--name", "My_TPU", "--zone", "z", "--accelerator-type", "v4-8"], "--name 'My_TPU'"),
    (["launch", *COMMON], "give the scalezoo command after the flags"),
    (["launch", *COMMON, "fit", "--law", "chinchilla"], "got 'fit --law chinchilla'"),
    (["babysit", *COMMON, "--accelerator-type", "v4-8", "bench", "--config", "x"], "babysit runs `train` or `sweep`"),
    (["babysit", *COMMON, "--accelerator-type", "v4-8", "train", "--config", "x"], "needs --workdir"),
    (["babysit", *COMMON, "--accelerator-type", "v4-8", "--max-restarts", "-1", *JOB.split()], "--max-restarts"),
    # scalezoo writes run files with plain file I/O: a gs:// workdir is refused before anything runs.
    (["launch", *COMMON, "train", "--workdir", "gs://bkt/run"], GS_ERROR),
    (["babysit", *COMMON, "--accelerator-type", "v4-8", "sweep", "--workdir=gs://bkt/run"], GS_ERROR),
    (["launch", *COMMON, "bench", "--workdir", "gs://bkt"], "and use /mnt/gcs/bkt/...\n"),
    (["launch", *COMMON, "bench", "--workdir", "s3://x/y"],
     "--workdir s3://x/y: scalezoo needs a filesystem path; run setup with --bucket BUCKET and use "
     "/mnt/gcs/BUCKET/...\n"),
    (["launch", *COMMON, "train", "--workdir", "/mnt/gcs/"], "--workdir /mnt/gcs/: name the bucket"),
    (["launch", *COMMON, "train", "--workdir", "/mnt/gcs/My_Bucket/r"], "--workdir /mnt/gcs/My_Bucket/r: bucket "
                                                                         "'My_Bucket': not a bucket name"),
    (["setup", *COMMON, "--bucket", "gs://bkt"], "--bucket 'gs://bkt': not a bucket name"),
    (["setup", *COMMON, "--bucket", "bkt;rm -rf ~"], "not a bucket name"),
    (["babysit", *COMMON, "--accelerator-type", "v4-8", "--bucket", "other", *JOB.split()],
     "--workdir /mnt/gcs/bkt/run is in bucket bkt, not in --bucket other"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, monkeypatch, argv, message):
  monkeypatch.setattr(tpu.subprocess, "run", _no_subprocess)
  for dry_run in ([], ["--dry-run"]) if argv and argv[0] != "bogus" else ([],):
    assert tpu.main(argv[:1] + dry_run + argv[1:]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1, out.err
    assert out.err.startswith("tpu: error: ") and message in out.err, out.err


def test_missing_gcloud_is_an_error_before_anything_runs(capsys, monkeypatch, tmp_path):
  monkeypatch.setenv("PATH", str(tmp_path))
  monkeypatch.setattr(tpu.subprocess, "run", _no_subprocess)
  for argv in (["delete"], ["launch", *JOB.split()], ["babysit", "--accelerator-type", "v4-8", *JOB.split()]):
    assert tpu.main([argv[0], *COMMON, *argv[1:]]) == 2
    assert capsys.readouterr().err == ("tpu: error: gcloud not found on PATH; install the Google Cloud CLI "
                                       "(https://cloud.google.com/sdk)\n")


def test_a_failing_command_stops_with_one_line(capsys, monkeypatch):
  monkeypatch.setattr(tpu, "_need_gcloud", lambda: None)
  calls = []

  def run(cmd, check=False, **kw):
    calls.append(cmd)
    raise subprocess.CalledProcessError(1, cmd)
  monkeypatch.setattr(tpu.subprocess, "run", run)
  assert tpu.main(["create", *COMMON, "--accelerator-type", "v4-8"]) == 2
  err = capsys.readouterr().err
  assert len(calls) == 1 and err == f"tpu: error: command failed with exit code 1: {shlex.join(calls[0])}\n"


def test_script_runs_standalone_on_the_standard_library():
  # -I -S: no site-packages, so the script cannot depend on jax or anything else installed.
  p = subprocess.run([sys.executable, "-I", "-S", SCRIPT, "delete", "--dry-run", *COMMON], capture_output=True,
                     text=True, timeout=60)
  assert (p.returncode, p.stdout, p.stderr) == (0, f"gcloud compute tpus queued-resources delete sz {Z} "
                                                   "--force --quiet\n", "")
  p = subprocess.run([sys.executable, "-I", "-S", SCRIPT, "create", "--dry-run"], capture_output=True, text=True)
  assert (p.returncode, p.stdout) == (2, "") and p.stderr.startswith("tpu: error: the following arguments are")


# ------------------------------------------------------------------------------------------------ babysitter


@pytest.mark.parametrize("state, running, finished, action", [
    ("ACTIVE", True, True, "done"),
    ("PREEMPTED", False, True, "done"),
    ("", False, True, "done"),
    ("", False, False, "create"),
    ("ACTIVE", False, False, "launch"),
    ("ACTIVE", True, False, "wait"),
    ("PREEMPTED", False, False, "recreate"),
    ("SUSPENDED", False, False, "recreate"),
    ("FAILED", False, False, "recreate"),
    ("WAITING_FOR_RESOURCES", False, False, "wait"),
    ("ACCEPTED", False, False, "wait"),
    ("PROVISIONING", False, False, "wait"),
    ("CREATING", False, False, "wait"),
    ("SUSPENDING", False, False, "wait"),
    ("DELETING", False, False, "wait"),
])
def test_decide(state, running, finished, action):
  assert tpu.decide(state, running, finished) == action


def test_finished_rules():
  assert tpu.parse_probe("noise\nscalezoo-job w0 running -\nscalezoo-job w1 stopped 143\n") == [
      ("running", "-"), ("stopped", "143")]
  assert tpu.is_finished("train", '{"steps": 10, "status": "completed"}', [])
  assert not tpu.is_finished("train", '{"status": "preempted"}', [])
  assert not tpu.is_finished("train", "not json", [])
  assert not tpu.is_finished("train", None, [])
  assert tpu.is_finished("sweep", "gs://b/s/results.csv\n", [("stopped", "0"), ("stopped", "0")])
  assert not tpu.is_finished("sweep", "gs://b/s/results.csv\n", [("stopped", "0"), ("stopped", "143")])
  assert not tpu.is_finished("sweep", "gs://b/s/results.csv\n", [])  # slice gone: exit codes unknown
  assert not tpu.is_finished("sweep", None, [("stopped", "0")])  # exited 0 but no results.csv


class FakeCloud:
  """Plays gcloud for the babysitter: the queued resource's state and each worker's job follow a script of
  states, one per cycle; every command is recorded."""

  def __init__(self, states, jobs, summaries):
    self.states, self.jobs, self.summaries, self.cycle, self.ran, self.reads = states, jobs, summaries, -1, [], []

  def run(self, cmd, capture_output=False, text=False, check=False):
    words = " ".join(cmd)
    if "describe" in cmd:
      self.cycle += 1
      state = self.states[self.cycle]
      if state is None:
        return self._done(cmd, 1, "", "ERROR: (gcloud) NOT_FOUND: queued resource sz\n", check)
      return self._done(cmd, 0, state + "\n")
    if "scalezoo-job" in words:
      return self._done(cmd, 0, "".join(f"scalezoo-job w{i} {s}\n" for i, s in enumerate(self.jobs[self.cycle])))
    if cmd[:3] == ["gcloud", "storage", "cat"] or "summary.json" in words and "ssh" in cmd:
      self.reads.append((self.cycle, cmd))
      summary = self.summaries[self.cycle]
      return self._done(cmd, 0, summary) if summary else self._done(cmd, 1, "", "no such object", check)
    self.ran.append(cmd)  # create, delete, setup, launch: run with check=True, output not captured
    return self._done(cmd, 0)

  def _done(self, cmd, rc, out="", err="", check=False):
    if rc and check:
      raise subprocess.CalledProcessError(rc, cmd, out, err)
    return subprocess.CompletedProcess(cmd, rc, out, err)


def _babysit(monkeypatch, fake, *extra, job=JOB):
  monkeypatch.setattr(tpu.subprocess, "run", fake.run)
  monkeypatch.setattr(tpu.time, "sleep", lambda s: None)
  args = tpu.build_parser().parse_args(["babysit", *COMMON, "--accelerator-type", "v4-16", "--spot", *extra,
                                        *job.split()])
  log = []
  try:
    return tpu.babysit(args, log=log.append), log
  except tpu.TpuError as e:
    return str(e), log


def test_babysitter_creates_sets_up_relaunches_after_preemption_and_stops_when_completed(monkeypatch):
  S = '{"status": "completed"}'
  fake = FakeCloud(
      states=[None, "WAITING_FOR_RESOURCES", "ACTIVE", "ACTIVE", "ACTIVE", "SUSPENDED", "ACTIVE", "ACTIVE"],
      jobs=[[], [], ["not-set-up -", "not-set-up -"], ["running -", "running -"], ["running -", "stopped 143"],
            [], ["not-set-up -", "not-set-up -"], ["stopped 0", "stopped 0"]],
      summaries=["", "", "", "", "", "", "", S])
  rc, log = _babysit(monkeypatch, fake)
  actions = [line.split(" -> ")[1] for line in log if " -> " in line]
  assert (rc, actions) == (0, ["create", "wait", "launch", "wait", "launch", "recreate", "launch", "done"])
  create = f"gcloud compute tpus queued-resources create sz {Z} --accelerator-type=v4-16 " \
           "--runtime-version=tpu-ubuntu2204-base --node-id=sz --spot"
  delete = f"gcloud compute tpus queued-resources delete sz {Z} --force --quiet"
  launch = ssh("sz", launch_script(JOB))
  # Setup (with the bucket's mount) only where the workers had no venv; a job that died on one worker is
  # relaunched on all without it; every launch mounts the bucket where it is missing.
  assert [shlex.join(c) for c in fake.ran] == [create, *setup_lines(["sz"], MOUNT), launch, launch, delete, create,
                                               *setup_lines(["sz"], MOUNT), launch]
  # The bucket is read from here in every cycle, whatever the slice's state.
  assert [(i, shlex.join(c)) for i, c in fake.reads] == [(i, "gcloud storage cat gs://bkt/run/summary.json")
                                                         for i in range(8)]


def test_babysitter_reads_a_workdir_outside_the_bucket_on_worker_0_while_active(monkeypatch):
  S = '{"status": "completed"}'
  fake = FakeCloud(states=[None, "PROVISIONING", "ACTIVE", "ACTIVE"], jobs=[[], [], ["not-set-up -"], ["stopped 0"]],
                   summaries=[S, S, "", S])
  rc, log = _babysit(monkeypatch, fake, job="train --config dense:M --workdir runs/m")
  actions = [line.split(" -> ")[1] for line in log if " -> " in line]
  assert (rc, actions) == (0, ["create", "wait", "launch", "done"])
  check = ssh("sz", "cd ~/scalezoo && cat runs/m/summary.json", worker="0")
  assert [(i, shlex.join(c)) for i, c in fake.reads] == [(2, check), (3, check)]
  assert not any("gcsfuse" in " ".join(c) for c in fake.ran)


def test_babysitter_gives_up_after_max_restarts_and_on_divergence(monkeypatch):
  n = 10
  fake = FakeCloud(states=["ACTIVE"] * n, jobs=[["stopped 1"]] * n, summaries=[""] * n)
  msg, log = _babysit(monkeypatch, fake, "--max-restarts", "2")
  assert msg.startswith("the job stopped 3 times; --max-restarts 2 reached")
  assert sum("scalezoo train" in " ".join(c) for c in fake.ran) == 3  # the first launch and 2 restarts
  fake = FakeCloud(states=["ACTIVE"], jobs=[["stopped 1"]], summaries=['{"status": "nonfinite"}'])
  msg, log = _babysit(monkeypatch, fake)
  assert "status nonfinite (the run diverged); not relaunching" in msg and fake.ran == []


def test_babysitter_retries_failed_queries_then_gives_up(monkeypatch):
  fake = FakeCloud(states=["ACTIVE"] * 20, jobs=[["running -"]] * 20, summaries=[""] * 20)

  def flaky(cmd, **kw):  # every probe fails: the cycle is retried, never counted as a stopped job
    if "scalezoo-job" in " ".join(cmd):
      raise subprocess.CalledProcessError(255, cmd)
    return FakeCloud.run(fake, cmd, **kw)
  monkeypatch.setattr(fake, "run", flaky)
  msg, log = _babysit(monkeypatch, fake)
  assert msg.startswith(f"{tpu.MAX_FAILED_CYCLES} babysitter cycles in a row failed") and fake.ran == []
  assert sum("warning" in line for line in log) == tpu.MAX_FAILED_CYCLES


# ------------------------------------------------------------------------ the remote scripts, run locally


def _remote(cmd: list[str]) -> str:
  return cmd[cmd.index("--command") + 1]


def _bash(script: str, home) -> str:
  p = subprocess.run(["bash", "-c", script], env=dict(os.environ, HOME=str(home)), capture_output=True, text=True,
                     timeout=60)
  assert p.returncode == 0, p.stderr
  return p.stdout


def _wait_for(fn, want, timeout=20.0):
  t0 = time.time()
  while (got := fn()) != want and time.time() - t0 < timeout:
    time.sleep(0.05)
  assert got == want


@pytest.mark.skipif(not (shutil.which("setsid") and shutil.which("ps")), reason="needs setsid and ps")
def test_launch_and_probe_scripts_on_a_worker(tmp_path):
  """The launch script starts the job detached with its exit code recorded; a second launch stops the running
  job with SIGTERM first; the probe reports not-set-up / running / stopped + exit code."""
  args = tpu.build_parser().parse_args(["launch", *COMMON, "train", "--config", "dense:1B", "--workdir", "it's"])
  launch, probe = _remote(tpu.launch_cmds(args)[0]), _remote(tpu.probe_cmds(args)[0])
  status = lambda: _bash(probe, tmp_path).split()[2:]  # noqa: E731
  assert status() == ["not-set-up", "-"]
  job = tmp_path / "scalezoo"
  (job / "venv" / "bin").mkdir(parents=True)
  fake = job / "venv" / "bin" / "scalezoo"
  # A fake scalezoo: logs its arguments, runs until the file `release` appears, exits 143 on SIGTERM.
  fake.write_text("#!/bin/sh\ntrap 'echo got TERM; exit 143' TERM\necho \"args: $*\"\n"
                  "while [ ! -f release ]; do sleep 0.05; done\nexit 0\n")
  fake.chmod(0o755)
  assert status() == ["stopped", "-"]
  _bash(launch, tmp_path)  # returns at once: the job runs detached
  _wait_for(status, ["running", "-"])
  _bash(launch, tmp_path)  # replaces the running job
  _wait_for(lambda: (job / "job.log").read_text().count("args: train --config dense:1B --workdir it's"), 2)
  assert "got TERM" in (job / "job.log").read_text()
  assert status() == ["running", "-"]
  (job / "release").touch()
  _wait_for(status, ["stopped", "0"])
  assert (job / "job.log").read_text().count("=== launch ") == 2


def _no_subprocess(cmd, *a, **kw):
  raise AssertionError(f"no command may run here: {cmd}")


def _fake_bin(tmp_path, gcsfuse_installed: bool, mount_fails: bool = False):
  """Fakes for the mount script's commands, each logging its call to calls.log: sudo (runs nothing as root; its
  `tee` logs what it would write; `apt-get install ... gcsfuse` installs the fake gcsfuse), curl, lsb_release,
  mountpoint (true once the fake gcsfuse has mounted) and gcsfuse."""
  bin_, log = tmp_path / "bin", tmp_path / "calls.log"
  bin_.mkdir()
  gcsfuse = f"#!/bin/sh\necho \"gcsfuse $*\" >> {log}\n" + (
      "exit 1\n" if mount_fails else f"touch {tmp_path}/mounted\n")
  scripts = {
      "sudo": (f"#!/bin/sh\necho \"sudo $*\" >> {log}\n"
               f"case \"$*\" in *tee*) echo \"  stdin: $(cat)\" >> {log};; esac\n"
               f"case \"$*\" in *'install -y -qq gcsfuse'*) cp {bin_}/.gcsfuse {bin_}/gcsfuse;; esac\n"
               "case \"$*\" in umount*) exit 32;; esac\n"),
      "curl": f"#!/bin/sh\necho \"curl $*\" >> {log}\necho KEY\n",
      "lsb_release": "#!/bin/sh\necho jammy\n",
      "mountpoint": f"#!/bin/sh\n[ -f {tmp_path}/mounted ]\n",
      ".gcsfuse": gcsfuse,
  }
  if gcsfuse_installed:
    scripts["gcsfuse"] = gcsfuse
  for name, text in scripts.items():
    (bin_ / name).write_text(text)
    (bin_ / name).chmod(0o755)
  return bin_, log


def _bash_with(script: str, home, bin_) -> subprocess.CompletedProcess:
  env = dict(os.environ, HOME=str(home), PATH=f"{bin_}:{os.environ['PATH']}")
  return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)


def test_mount_script_installs_gcsfuse_once_and_mounts_once(tmp_path):
  bin_, log = _fake_bin(tmp_path, gcsfuse_installed=False)
  script = tpu.mount_script("bkt")
  assert script == MOUNT
  assert _bash_with(script, tmp_path, bin_).returncode == 0
  d, ids = "/mnt/gcs/bkt", f"{os.getuid()}:{os.getgid()}"
  lines = log.read_text().splitlines()
  # curl and tee run at once (a pipe): their three log lines may interleave in any order.
  assert sorted(lines[:3]) == sorted(["curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg",
                                      "sudo tee /usr/share/keyrings/cloud.google.asc", "  stdin: KEY"])
  assert lines[3:] == [
      "sudo tee /etc/apt/sources.list.d/gcsfuse.list",
      "  stdin: deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt "
      "gcsfuse-jammy main",
      "sudo apt-get update -qq",
      "sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcsfuse",
      f"sudo umount -l {d}", f"sudo mkdir -p {d}", f"sudo chown {ids} {d}",
      f"gcsfuse --implicit-dirs --rename-dir-limit=1000000 bkt {d}"]
  # Again: installed and mounted, so nothing runs.
  log.write_text("")
  assert _bash_with(script, tmp_path, bin_).returncode == 0 and log.read_text() == ""
  # Installed but not mounted (a rebooted VM, or a dead gcsfuse): only the mount runs.
  (tmp_path / "mounted").unlink()
  assert _bash_with(script, tmp_path, bin_).returncode == 0
  assert log.read_text().splitlines() == [f"sudo umount -l {d}", f"sudo mkdir -p {d}", f"sudo chown {ids} {d}",
                                          f"gcsfuse --implicit-dirs --rename-dir-limit=1000000 bkt {d}"]


def test_launch_starts_no_job_when_the_bucket_cannot_be_mounted(tmp_path):
  bin_, log = _fake_bin(tmp_path, gcsfuse_installed=True, mount_fails=True)
  (tmp_path / "scalezoo").mkdir()
  args = tpu.build_parser().parse_args(["launch", *COMMON, *JOB.split()])
  p = _bash_with(_remote(tpu.launch_cmds(args)[0]), tmp_path, bin_)
  assert p.returncode != 0 and "gcsfuse --implicit-dirs" in log.read_text()
  assert os.listdir(tmp_path / "scalezoo") == []  # no job.log, no job.pid: nothing was started
