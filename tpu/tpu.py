#!/usr/bin/env python3
"""Run scalezoo on Cloud TPU pod slices: create, set up, launch, babysit and delete a queued resource.

    python tpu/tpu.py create  --name sz --zone us-east5-a --accelerator-type v5p-64 --spot
    python tpu/tpu.py setup   --name sz --zone us-east5-a --bucket my-bucket
    python tpu/tpu.py launch  --name sz --zone us-east5-a train --config dense:1B --workdir /mnt/gcs/my-bucket/run
    python tpu/tpu.py babysit --name sz --zone us-east5-a --accelerator-type v5p-64 --spot sweep --config ...
    python tpu/tpu.py status  --name sz --zone us-east5-a
    python tpu/tpu.py delete  --name sz --zone us-east5-a

Every subcommand first builds its gcloud commands; `--dry-run` prints them (shell-quoted, one per line) instead
of running them. One queued resource holds `--slices` TPU VMs ("nodes"): `NAME` for one slice, `NAME-0` ..
`NAME-<N-1>` for several. Each node has several workers (hosts); every worker runs the same scalezoo command,
which finds the other workers (and slices) from the TPU VM's environment. On each worker the job lives in
`~/scalezoo/`: `venv/`, the wheel, `job.log` (its output), `job.pid` (its process group) and `exit_code`.

scalezoo writes its run files with plain file I/O, so the workdir is a filesystem path that every worker shares:
the bucket BUCKET mounted with Cloud Storage FUSE at `/mnt/gcs/BUCKET` on every worker (`setup --bucket BUCKET`;
`launch` and `babysit` mount it again where it is missing), and `--workdir /mnt/gcs/BUCKET/...`.

Standard library only, so it runs on any workstation with the Google Cloud CLI. Bad input or a failed command
prints one line `tpu: error: ...` and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the scalezoo repository (= package) root
WHEEL_DIR = os.path.join(ROOT, "build", "tpu-wheel")
JOB_DIR = "~/scalezoo"  # on every worker
ACCELERATOR = re.compile(r"^(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)$")
# Default TPU VM image per generation (override with --runtime-version).
RUNTIME = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
           "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
BAD_STATES = ("PREEMPTED", "SUSPENDED", "FAILED")  # the slice is gone: delete and re-create
MAX_FAILED_CYCLES = 10  # babysitter: consecutive cycles whose gcloud calls failed before it gives up
MOUNT_ROOT = "/mnt/gcs"  # bucket BUCKET is mounted at MOUNT_ROOT/BUCKET on every worker
BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")  # Cloud Storage's rule for bucket names
# Orbax commits a checkpoint step by renaming its temporary folder. Cloud Storage FUSE renames a folder of a
# flat bucket (copy + delete of each object) only up to this many objects; a hierarchical-namespace bucket
# renames folders natively and ignores the limit.
RENAME_DIR_LIMIT = 1_000_000


class TpuError(Exception):
  """Bad input or a failed command: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------- commands


def gcloud(args, *words: str, flags: tuple[str, ...] = ()) -> list[str]:
  """`gcloud WORDS --zone=Z [--project=P] FLAGS`."""
  return ["gcloud", *words, f"--zone={args.zone}", *([f"--project={args.project}"] if args.project else []), *flags]


def nodes(args) -> list[str]:
  """TPU VM names of the queued resource: one per slice (gcloud names multi-slice nodes PREFIX-0, PREFIX-1, ...)."""
  return [args.name] if args.slices == 1 else [f"{args.name}-{i}" for i in range(args.slices)]


def ssh(args, node: str, command: str, worker: str = "all") -> list[str]:
  """Runs the shell `command` on a node's workers (all of them at once by default)."""
  return gcloud(args, "compute", "tpus", "tpu-vm", "ssh", node, flags=(f"--worker={worker}", "--command", command))


def create_cmds(args) -> list[list[str]]:
  """The queued-resource request: one node (`--node-id`) or `--slices` nodes (`--node-count`/`--node-prefix`)."""
  if not args.accelerator_type:
    raise TpuError("--accelerator-type is required to create the slice, e.g. v5p-64 or v5litepod-256")
  m = ACCELERATOR.match(args.accelerator_type)
  if not m:
    raise TpuError(f"--accelerator-type {args.accelerator_type!r}: write GENERATION-SIZE with GENERATION one of "
                   f"{', '.join(RUNTIME)}, e.g. v5p-64 or v5litepod-256")
  # --best-effort exists only in the alpha track of gcloud.
  track = ["alpha"] if args.best_effort else []
  nodes_flags = ([f"--node-id={args.name}"] if args.slices == 1
                 else [f"--node-count={args.slices}", f"--node-prefix={args.name}"])
  capacity = [f"--{c}" for c in ("spot", "best-effort", "reserved") if getattr(args, c.replace("-", "_"))]
  return [gcloud(args, *track, "compute", "tpus", "queued-resources", "create", args.name,
                 flags=(f"--accelerator-type={args.accelerator_type}",
                        f"--runtime-version={args.runtime_version or RUNTIME[m.group(1)]}", *nodes_flags, *capacity))]


def delete_cmds(args) -> list[list[str]]:
  """Deletes the queued resource and its nodes (waits until they are gone)."""
  return [gcloud(args, "compute", "tpus", "queued-resources", "delete", args.name, flags=("--force", "--quiet"))]


def describe_cmd(args) -> list[str]:
  """Prints the queued resource's state: WAITING_FOR_RESOURCES, ACTIVE, SUSPENDED, FAILED, ..."""
  return gcloud(args, "compute", "tpus", "queued-resources", "describe", args.name,
                flags=("--format=value(state.state)",))


def wheel_name() -> str:
  """The file `pip wheel` writes for this checkout (pure Python, so the tag is fixed)."""
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  return f"{project['name']}-{project['version']}-py3-none-any.whl"


def check_bucket(bucket: str, what: str = "--bucket") -> str:
  """`bucket`, if it is a valid bucket name (which needs no shell quoting)."""
  if not BUCKET.match(bucket):
    raise TpuError(f"{what} {bucket!r}: not a bucket name (3 to 222 lower-case letters, digits, '-', '_' and '.'), "
                   "e.g. my-project-scalezoo, not a gs:// path")
  return bucket


def mount_script(bucket: str) -> str:
  """Shell, idempotent: install Cloud Storage FUSE if missing, then mount `bucket` at /mnt/gcs/BUCKET unless it is
  mounted already. A dead mount (its gcsfuse process gone) is unmounted first. Fails if the bucket cannot be
  mounted, so that nothing writes into the empty mount point instead."""
  d = f"{MOUNT_ROOT}/{check_bucket(bucket)}"
  key = "/usr/share/keyrings/cloud.google.asc"
  install = (f"curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee {key} >/dev/null && "
             f'echo "deb [signed-by={key}] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" '
             "| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && sudo apt-get update -qq && "
             "sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcsfuse")
  mount = (f"sudo umount -l {d} 2>/dev/null; sudo mkdir -p {d} && sudo chown \"$(id -u):$(id -g)\" {d} && "
           f"gcsfuse --implicit-dirs --rename-dir-limit={RENAME_DIR_LIMIT} {bucket} {d}")
  return f"{{ command -v gcsfuse >/dev/null || {{ {install}; }}; }} && {{ mountpoint -q {d} || {{ {mount}; }}; }}"


def setup_cmds(args) -> list[list[str]]:
  """Builds the wheel here, then on every worker of every node: a Python venv with jax[tpu] and the wheel, and
  with `--bucket`, Cloud Storage FUSE and the bucket mounted at /mnt/gcs/BUCKET."""
  py, wheel = args.python, wheel_name()
  # Ubuntu's TPU images ship Python 3.10; scalezoo needs >= 3.11, so install it (and its venv module) if missing.
  # The lock timeout waits out the unattended upgrades a fresh VM runs at boot.
  prepare = (f"mkdir -p {JOB_DIR} && {{ {py} -c \"import ensurepip\" 2>/dev/null || {{ sudo apt-get update -qq && "
             f"sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq {py} "
             f"{py}-venv; }}; }} && {py} -m venv {JOB_DIR}/venv")
  pip = f"{JOB_DIR}/venv/bin/pip install -q"
  # The second install replaces scalezoo even when the version did not change, so a re-run ships new code.
  install = (f"{pip} -U pip && {pip} \"jax[tpu]\" {JOB_DIR}/{wheel} && "
             f"{pip} --no-deps --force-reinstall {JOB_DIR}/{wheel}")
  cmds = [[sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", WHEEL_DIR, ROOT]]
  for node in nodes(args):
    cmds += [ssh(args, node, prepare),
             gcloud(args, "compute", "tpus", "tpu-vm", "scp", os.path.join(WHEEL_DIR, wheel), f"{node}:scalezoo/",
                    flags=("--worker=all",)),
             ssh(args, node, install)]
    if args.bucket:
      cmds.append(ssh(args, node, mount_script(args.bucket)))
  return cmds


def job_args(args) -> list[str]:
  """The scalezoo command line to run, with `--config.mesh.dcn_data=<slices>` (sweeps:
  `--config.fixed.mesh.dcn_data`) added on several slices unless the user set such a dcn key themselves."""
  job = list(args.job)
  if job and job[0] == "--":
    job = job[1:]
  if not job or job[0] not in ("train", "sweep", "bench"):
    raise TpuError(f"give the scalezoo command after the flags: train|sweep|bench ARGS..., got {shlex.join(job)!r}")
  d = workdir(job, required=False)
  if "://" in d:
    bucket, _, rest = d.partition("://")[2].partition("/") if d.startswith("gs://") else ("BUCKET", "", "...")
    raise TpuError(f"--workdir {d}: scalezoo needs a filesystem path; run setup with --bucket {bucket} and use "
                   f"{MOUNT_ROOT}/{bucket}/{rest.rstrip('/') or '...'}")
  mounted_bucket(d)  # checks the bucket's name
  # A sweep passes run-config keys through `fixed` (bench and train take them directly).
  key = "--config.fixed.mesh.dcn_" if job[0] == "sweep" else "--config.mesh.dcn_"
  if args.slices > 1 and not any(a.startswith(key) for a in job):
    job.append(f"{key}data={args.slices}")
  return job


# Shell test: is the job's session (setsid: session = process group = job.pid) alive? Zombies do not count,
# so a job whose reaper is slow is not "running".
ALIVE = '[ -f job.pid ] && ps -o stat= -s "$(cat job.pid)" 2>/dev/null | grep -qv "^Z"'


def stop_job_script() -> str:
  """Shell: stop this worker's job if it still runs (SIGTERM: scalezoo checkpoints and exits), SIGKILL after
  120 s (a process stuck in a collective whose peers died never reaches its SIGTERM check)."""
  return (f'if {ALIVE}; then kill -TERM -- "-$(cat job.pid)"; '
          f"for i in $(seq 120); do {ALIVE} || break; sleep 1; done; "
          f'kill -KILL -- "-$(cat job.pid)" 2>/dev/null; fi')


def launch_cmds(args) -> list[list[str]]:
  """On every worker of every node: replace any running job by `scalezoo ARGS` in the background.

  `setsid` gives the job its own process group (job.pid), so a later launch or a stop reaches all its
  processes; `nohup` and the redirections detach it, so ssh returns at once; `exit_code` records how it ended.
  """
  job = job_args(args)
  bucket = mounted_bucket(workdir(job, required=False))
  # A workdir in a bucket: mount it first where it is missing (a re-created or rebooted VM); no mount, no job.
  mount = f"{mount_script(bucket)} && " if bucket else ""
  job = shlex.join(["venv/bin/scalezoo", *job])
  run = shlex.quote(f"PYTHONUNBUFFERED=1 {job}; echo $? > exit_code")
  script = (f"{mount}cd {JOB_DIR} && {{ {stop_job_script()}; rm -f exit_code; "
            f'echo "=== launch $(date -u +%FT%TZ):" {shlex.quote(job)} >> job.log; '
            f"setsid nohup sh -c {run} >> job.log 2>&1 < /dev/null & echo $! > job.pid; }}")
  return [ssh(args, node, script) for node in nodes(args)]


def probe_cmds(args, tail: int = 0) -> list[list[str]]:
  """On every worker: one line `scalezoo-job HOST running|stopped|not-set-up EXIT_CODE|-` (+ its log's tail)."""
  script = (f'cd {JOB_DIR} 2>/dev/null && [ -x venv/bin/scalezoo ] && s=stopped || s=not-set-up; '
            f'[ "$s" = stopped ] && {ALIVE} && s=running; '
            f'echo "scalezoo-job $(hostname) $s $(cat exit_code 2>/dev/null || echo -)"')
  if tail:
    script += f"; tail -n {tail} job.log 2>/dev/null || true"
  return [ssh(args, node, script) for node in nodes(args)]


def workdir(job: list[str], required: bool = True) -> str:
  """The `--workdir` of a scalezoo command line ("" if it has none and none is `required`)."""
  for i, a in enumerate(job):
    if a == "--workdir" and i + 1 < len(job):
      return job[i + 1]
    if a.startswith("--workdir="):
      return a.split("=", 1)[1]
  if required:
    raise TpuError(f"the scalezoo command needs --workdir (a path every worker and slice shares: "
                   f"{MOUNT_ROOT}/BUCKET/..., with the bucket mounted by setup --bucket BUCKET)")
  return ""


def mounted_bucket(path: str) -> str:
  """The bucket whose mount holds `path` (/mnt/gcs/BUCKET/...), "" for a path outside /mnt/gcs."""
  p = posixpath.normpath(path) if path.startswith("/") else ""
  if p != MOUNT_ROOT and not p.startswith(MOUNT_ROOT + "/"):
    return ""
  bucket = p[len(MOUNT_ROOT) + 1:].split("/")[0]
  if not bucket:
    raise TpuError(f"--workdir {path}: name the bucket, {MOUNT_ROOT}/BUCKET/...")
  return check_bucket(bucket, f"--workdir {path}: bucket")


def finished_cmd(args, job: list[str]) -> list[str]:
  """Reads the run's result: `summary.json` for a train run, lists `results.csv` for a sweep. A workdir in a
  mounted bucket is read from the bucket here; any other is read on worker 0 (its relative paths under
  ~/scalezoo, where the job runs)."""
  d = workdir(job)
  file = "summary.json" if job[0] == "train" else "results.csv"
  read = "cat" if job[0] == "train" else "ls"
  bucket = mounted_bucket(d)
  if bucket:
    rest = posixpath.normpath(d)[len(f"{MOUNT_ROOT}/{bucket}"):]
    return ["gcloud", "storage", read, f"gs://{bucket}{rest}/{file}"]
  return ssh(args, nodes(args)[0], f"cd {JOB_DIR} && {read} {shlex.quote(d.rstrip('/') + '/' + file)}", worker="0")


# --------------------------------------------------------------------------------------------- babysitter


def decide(state: str, running: bool, finished: bool) -> str:
  """The babysitter's next action from the queued resource's state, whether the job runs on every worker and
  whether the run is finished: done | create | recreate | launch | wait."""
  if finished:
    return "done"
  if not state:  # no such queued resource (never created, or deleted)
    return "create"
  if state in BAD_STATES:
    return "recreate"
  if state == "ACTIVE":
    return "wait" if running else "launch"
  return "wait"  # ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, CREATING, SUSPENDING, DELETING: in progress


def parse_probe(output: str) -> list[tuple[str, str]]:
  """(status, exit code) of each worker from the probe lines in `output`."""
  return [(w[2], w[3]) for w in (line.split() for line in output.splitlines())
          if len(w) == 4 and w[0] == "scalezoo-job"]


def summary_status(text: str | None) -> str:
  """The "status" of a summary.json's text ("" if there is none)."""
  try:
    return str(json.loads(text or "").get("status", ""))
  except (ValueError, AttributeError):
    return ""


def is_finished(kind: str, result: str | None, workers: list[tuple[str, str]]) -> bool:
  """A train run is finished when its summary.json says "status": "completed". A sweep is finished when
  results.csv exists and the launched `scalezoo sweep` exited 0 on every worker (it exits 0 only once every run
  completed; a pre-empted or failed sweep exits otherwise and is relaunched, skipping its finished runs).
  `result`: the output of finished_cmd, None if it failed (no such file)."""
  if result is None:
    return False
  if kind == "train":
    return summary_status(result) == "completed"
  return bool(workers) and all(code == "0" for _, code in workers)


def _capture(cmd: list[str], check: bool = False) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, capture_output=True, text=True, check=check)


def query_state(args) -> str:
  """The queued resource's state, "" if it does not exist."""
  p = _capture(describe_cmd(args))
  if p.returncode:
    if "NOT_FOUND" in p.stderr or "not found" in p.stderr.lower():
      return ""
    raise subprocess.CalledProcessError(p.returncode, describe_cmd(args), p.stdout, p.stderr)
  return p.stdout.strip()


def babysit_job(args) -> list[str]:
  """The babysat scalezoo command line, checked before anything runs: train or sweep, a workdir, a slice.
  A workdir in a mounted bucket sets `--bucket` (given or not), so every setup mounts it."""
  job = job_args(args)
  if job[0] not in ("train", "sweep"):
    raise TpuError("babysit runs `train` or `sweep` (their workdir tells when the run is finished)")
  bucket = mounted_bucket(workdir(job))
  if args.bucket:
    check_bucket(args.bucket)
  if bucket and args.bucket and bucket != args.bucket:
    raise TpuError(f"--workdir {workdir(job)} is in bucket {bucket}, not in --bucket {args.bucket}")
  args.bucket = args.bucket or bucket
  create_cmds(args)  # checks --accelerator-type
  return job


def babysit(args, log=print) -> int:
  """Loops until the run is finished: (re)creates the slice when it is missing or lost, sets up and relaunches
  the job when the slice is ACTIVE and the job does not run on every worker. Returns the exit code."""
  job = babysit_job(args)
  in_bucket = bool(mounted_bucket(workdir(job)))
  launches, failed_cycles = 0, 0
  while True:
    try:
      state = query_state(args)
      # A worker that does not answer fails the cycle (retried) rather than count as stopped: relaunching
      # would restart the workers that still run.
      workers = parse_probe("".join(_capture(c, check=True).stdout for c in probe_cmds(args))) \
          if state == "ACTIVE" else []
      # A workdir outside a bucket is read on worker 0, which answers only while the slice is ACTIVE.
      r = _capture(finished_cmd(args, job)) if in_bucket or state == "ACTIVE" else None
      result = r.stdout if r and r.returncode == 0 else None
      if job[0] == "train" and summary_status(result) == "nonfinite":
        raise TpuError(f"{workdir(job)}/summary.json says status nonfinite (the run diverged); not relaunching")
      running = bool(workers) and all(s == "running" for s, _ in workers)
      action = decide(state, running, is_finished(job[0], result, workers))
      log(f"[{time.strftime('%H:%M:%S')}] state={state or 'none'} workers={[s for s, _ in workers]} -> {action}")
      if action == "done":
        if args.delete_when_done:
          run_all(delete_cmds(args), log)
        return 0
      if action in ("create", "recreate"):
        run_all((delete_cmds(args) if action == "recreate" else []) + create_cmds(args), log)
      elif action == "launch":
        if launches > args.max_restarts:
          raise TpuError(f"the job stopped {launches} times; --max-restarts {args.max_restarts} reached "
                         f"(see `tpu.py status --tail 50`)")
        setup = not workers or any(s == "not-set-up" for s, _ in workers)
        run_all((setup_cmds(args) if setup else []) + launch_cmds(args), log)
        launches += 1
      failed_cycles = 0
    except subprocess.CalledProcessError as e:  # gcloud hiccups and slices lost mid-command: try again
      failed_cycles += 1
      log(f"tpu: warning: {shlex.join(e.cmd)} failed (exit {e.returncode}); retrying")
      if failed_cycles >= MAX_FAILED_CYCLES:
        raise TpuError(f"{MAX_FAILED_CYCLES} babysitter cycles in a row failed; last: {shlex.join(e.cmd)}") from None
    time.sleep(args.poll_seconds)


def babysit_cycle(args) -> list[str]:
  """One babysitter cycle, as the lines `--dry-run` prints: the queries, then the two relaunch paths."""
  job = babysit_job(args)
  q = shlex.join
  where = "in the bucket" if mounted_bucket(workdir(job)) else "on worker 0, if ACTIVE"
  return (["# every --poll-seconds: the queued resource's state", q(describe_cmd(args)),
           "# if ACTIVE: the job's status on every worker", *map(q, probe_cmds(args)),
           f"# finished? read {where} (train: summary.json says completed; sweep: results.csv exists and the "
           "job exited 0)",
           q(finished_cmd(args, job)),
           f"# if {', '.join(BAD_STATES)}: delete and re-create (missing: create)",
           *map(q, delete_cmds(args) + create_cmds(args)),
           "# once ACTIVE and the job does not run on every worker: set up (if needed) and relaunch",
           *map(q, setup_cmds(args) + launch_cmds(args))])


# ---------------------------------------------------------------------------------------------------- CLI


def run_all(cmds: list[list[str]], log=print) -> None:
  """Runs the commands in turn, stopping at the first that fails (CalledProcessError)."""
  for cmd in cmds:
    log(f"+ {shlex.join(cmd)}")
    subprocess.run(cmd, check=True)


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, not argparse's usage block
    raise TpuError(message)


def build_parser() -> argparse.ArgumentParser:
  common = _Parser(add_help=False)
  common.add_argument("--name", required=True, help="queued resource name (and node name / node prefix)")
  common.add_argument("--zone", required=True, help="e.g. us-east5-a")
  common.add_argument("--project", default="", help="default: gcloud's configured project")
  common.add_argument("--slices", type=int, default=1, help="number of slices (nodes) of the queued resource")
  common.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
  slice_flags = _Parser(add_help=False)
  slice_flags.add_argument("--accelerator-type", default="", help="e.g. v5p-64, v5litepod-256, v6e-16")
  slice_flags.add_argument("--runtime-version", default="", help="TPU VM image; default per generation")
  prov = slice_flags.add_mutually_exclusive_group()
  prov.add_argument("--spot", action="store_true", help="spot capacity (pre-emptible, cheaper)")
  prov.add_argument("--best-effort", action="store_true", help="best-effort capacity (gcloud alpha)")
  prov.add_argument("--reserved", action="store_true", help="use the project's reservation")
  setup_flags = _Parser(add_help=False)
  setup_flags.add_argument("--python", default="python3.11", help="Python (>= 3.11) for the workers' venv")
  setup_flags.add_argument("--bucket", default="", help="Cloud Storage bucket to mount at /mnt/gcs/BUCKET on every "
                           "worker (gcsfuse), for --workdir /mnt/gcs/BUCKET/...")
  job = _Parser(add_help=False)
  job.add_argument("job", nargs=argparse.REMAINDER, help="scalezoo train|sweep|bench ARGS...")

  p = _Parser(prog="tpu", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  sub.add_parser("create", parents=[common, slice_flags], help="request the slice(s) as a queued resource")
  sub.add_parser("setup", parents=[common, setup_flags], help="install scalezoo on every worker")
  sub.add_parser("launch", parents=[common, job], help="start `scalezoo ARGS` on every worker in the background")
  b = sub.add_parser("babysit", parents=[common, slice_flags, setup_flags, job],
                     help="keep the job running through pre-emptions until its run is finished")
  b.add_argument("--poll-seconds", type=float, default=120)
  b.add_argument("--max-restarts", type=int, default=20, help="give up after this many relaunches")
  b.add_argument("--delete-when-done", action="store_true", help="delete the queued resource once finished")
  s = sub.add_parser("status", parents=[common], help="queued resource state, each worker's job and log tail")
  s.add_argument("--tail", type=int, default=5, help="log lines per worker")
  sub.add_parser("delete", parents=[common], help="delete the queued resource and its nodes")
  return p


def main(argv: list[str] | None = None) -> int:
  try:
    args = build_parser().parse_args(argv)
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,50}[a-z0-9])?", args.name):
      raise TpuError(f"--name {args.name!r}: lower-case letters, digits and '-', starting with a letter")
    if args.slices < 1:
      raise TpuError(f"--slices {args.slices}: must be at least 1")
    if args.command == "babysit" and (args.poll_seconds <= 0 or args.max_restarts < 0):
      raise TpuError("--poll-seconds must be > 0 and --max-restarts >= 0")
    if args.command == "babysit":
      if args.dry_run:
        print("\n".join(babysit_cycle(args)))
        return 0
      babysit_job(args)
      _need_gcloud()
      return babysit(args, log=lambda m: print(m, flush=True))
    build = {"create": create_cmds, "setup": setup_cmds, "launch": launch_cmds, "delete": delete_cmds,
             "status": lambda a: [describe_cmd(a), *probe_cmds(a, a.tail)]}[args.command]
    cmds = build(args)
    if args.dry_run:
      print("\n".join(shlex.join(c) for c in cmds))
      return 0
    _need_gcloud()
    if args.command == "status":  # the workers answer only while the slice is ACTIVE
      state = query_state(args)
      print(f"{args.name}: {state or 'no such queued resource'}", flush=True)
      run_all(cmds[1:] if state == "ACTIVE" else [], log=lambda m: None)
      return 0
    run_all(cmds)
    return 0
  except TpuError as e:
    print(f"tpu: error: {e}", file=sys.stderr)
    return 2
  except subprocess.CalledProcessError as e:
    print(f"tpu: error: command failed with exit code {e.returncode}: {shlex.join(e.cmd)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("tpu: error: interrupted", file=sys.stderr)
    return 2


def _need_gcloud() -> None:
  if not shutil.which("gcloud"):
    raise TpuError("gcloud not found on PATH; install the Google Cloud CLI (https://cloud.google.com/sdk)")


if __name__ == "__main__":
  sys.exit(main())
