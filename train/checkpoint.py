"""Checkpoints for the trainer: the array state and the data iterator's state, saved together with orbax.

Layout under `directory` (orbax's own, one folder per committed step):
  <step>/state/...                 the array pytree (OCDBT + zarr; every host writes its own shards)
  <step>/data/metadata             the data iterator's state as JSON
  <step>.orbax-checkpoint-tmp      a save in flight, or one killed mid-write: never listed as a step
  corrupt-<step>[-<k>]             a step that failed to restore, set aside by restore_latest, kept for inspection

Orbax writes each step into the temporary folder and renames it only after every file and the
`commit_success.txt` marker are written, so a process killed at any point leaves only committed steps visible.
(On gs:// paths orbax writes in place instead, and a step counts only once its `commit_success.txt` exists.)
A stale temporary folder is removed by orbax when that step is saved again.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
import zlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from jax.experimental import multihost_utils

_ORBAX_DIR = os.path.dirname(ocp.__file__)
# How long after a failed restore its echoes (see _install_noise_filters) are still swallowed.
_ECHO_WINDOW_S = 60.0
_quiet_until = 0.0


class CheckpointMismatchError(ValueError):
  """The checkpoint is readable but does not fit the requested state (other model, other config)."""


class Checkpointer:
  """Saves and restores (step, array state, data iterator state) under one directory, keeping the newest `keep`.

  Saves are asynchronous by default: `save` returns once the arrays are copied off the devices (so the trainer
  may donate their buffers right away) and the files are written in the background. Every process of a
  multi-host job must make the same calls.
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               processes: list[int] | None = None):
    """`processes`: the processes that own the state's devices (default: all); a subset, such as one host
    running a packed sweep run on its own devices, saves and restores without waiting for the others."""
    if keep < 1:
      raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
    everyone = list(range(jax.process_count()))
    self._processes = sorted(processes) if processes else everyone
    subset = self._processes != everyone
    path = str(directory)
    self.directory = epath.Path(path if "://" in path else os.path.abspath(path))
    _install_noise_filters()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
        # Left off: it would delete a save that another job is writing into this directory right now, and the
        # leftover of a killed save is removed anyway when the resumed run saves that step again.
        cleanup_tmp_directories=False,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=self._processes[0], active_processes=set(self._processes) if subset else None,
            barrier_sync_key_prefix=f"scalezoo-{zlib.crc32(path.encode()):08x}" if subset else None),
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._closed = False

  def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
    """Starts saving `state` (a pytree of jax.Arrays, possibly sharded) and `data_state` (JSON) as `step`.

    Returns without waiting for the write unless async saving is off. Returns False and writes nothing when
    `step` is already saved, or (unless `force`) when it is not newer than the latest saved step.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    # A snapshot taken now: the iterator keeps moving while the background write runs.
    try:
      data_copy = json.loads(json.dumps(data_state))
    except (TypeError, ValueError) as e:
      raise TypeError(f"data_state for step {step} is not JSON-serialisable: {e}") from e
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_copy))
    return bool(self._manager.save(step, args=args, force=force))

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """Restores the newest checkpoint that reads cleanly, as (step, state, data_state); None if there is none.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with `.sharding` set: restored arrays get exactly
    those shardings and dtypes (dtypes are cast if the saved ones differ). A step that fails to read (missing
    or truncated files, unreadable metadata) is reported in one line on stderr, moved to `corrupt-<step>` and
    the next older one is tried. Raises CheckpointMismatchError when a readable checkpoint has other leaves or
    shapes than `abstract_state`: that is a config problem, and the checkpoint is left where it is.
    """
    _install_noise_filters()  # again: a test harness or another library may have swapped the hooks since
    self._manager.wait_until_finished()
    self._manager.reload()
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, data_state = self._restore_step(step, abstract_state)
      except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise anything from bare Exception up
        if isinstance(e, CheckpointMismatchError) or _blames_environment(e):
          raise  # the files may well be fine: never set a checkpoint aside for these
        self._set_aside(step, e)
        continue
      return step, state, data_state
    return None

  def latest_step(self) -> int | None:
    """The newest step saved or being saved, or None."""
    return self._manager.latest_step()

  def wait(self) -> None:
    """Blocks until every pending async save is committed (raises what a background write raised)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases orbax's threads and resources. Safe to call twice."""
    if not self._closed:
      self._closed = True
      self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    global _quiet_until
    previous, _quiet_until = _quiet_until, float("inf")
    try:
      try:
        _check_compatible(self._step_dir(step), abstract_state)
      except CheckpointMismatchError:
        raise
      except Exception as e:
        e.add_note("reading the array metadata")
        raise
      args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
      restored = self._manager.restore(step, args=args)
    except BaseException:
      # Let the abandoned reads die now, while their echoes are still swallowed.
      gc.collect()
      _quiet_until = time.monotonic() + _ECHO_WINDOW_S
      raise
    _quiet_until = previous
    return restored["state"], restored["data"]

  def _set_aside(self, step: int, error: BaseException) -> None:
    source = self._step_dir(step)
    target = self.directory / f"corrupt-{step}"
    suffix = 1
    while target.exists():
      target = self.directory / f"corrupt-{step}-{suffix}"
      suffix += 1
    outcome = f"moved it to {target.name}"
    # One process renames; the rest wait for it, so that every process sees the same steps afterwards.
    if jax.process_index() == self._processes[0]:
      try:
        source.rename(target)
      except OSError as e:
        outcome = f"could not move it aside ({type(e).__name__}: {e})"
    if len(self._processes) > 1:
      multihost_utils.sync_global_devices(f"scalezoo checkpoint set aside {step} {target.name}")
    print(f"warning: checkpoint step {step} in {self.directory} does not restore ({_reason(error)}); "
          f"{outcome}; trying an older one", file=sys.stderr, flush=True)
    self._manager.reload()


def _check_compatible(step_dir: epath.Path, abstract_state: Any) -> None:
  """Raises CheckpointMismatchError if the saved tree's leaves or shapes differ from `abstract_state`.

  Done before reading any array so that a changed config reads as a mismatch, not as corruption (orbax reports
  both as plain exceptions). Reading the metadata itself may fail; that is corruption and propagates as is.
  """
  handler = ocp.StandardCheckpointHandler()
  try:
    metadata = handler.metadata(step_dir / "state")
  finally:
    handler.close()
  # Orbax's own flattening on both sides, so tuples saved as lists and dropped None leaves compare equal.
  saved = ocp.tree.to_flat_dict(getattr(metadata, "tree", metadata))
  wanted = ocp.tree.to_flat_dict(abstract_state)
  problems = [f"missing from checkpoint: {'/'.join(map(str, k))}" for k in sorted(wanted.keys() - saved.keys())]
  problems += [f"not in state: {'/'.join(map(str, k))}" for k in sorted(saved.keys() - wanted.keys())]
  for key in sorted(wanted.keys() & saved.keys()):
    shape_saved, shape_wanted = getattr(saved[key], "shape", None), _stored_shape(wanted[key])
    if shape_saved is not None and shape_wanted is not None and tuple(shape_saved) != tuple(shape_wanted):
      problems.append(f"{'/'.join(map(str, key))}: saved shape {tuple(shape_saved)}, wanted {tuple(shape_wanted)}")
  if problems:
    more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
    raise CheckpointMismatchError(f"checkpoint {step_dir} does not match the state to restore: "
                                  f"{'; '.join(problems[:5])}{more}")


# Status codes (TensorStore's, in its error messages) that blame the machine or the network, not the files.
_ENVIRONMENT_CODES = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAUTHENTICATED", "UNAVAILABLE",
                      "DEADLINE_EXCEEDED", "CANCELLED")


def _blames_environment(error: BaseException | None) -> bool:
  """True for out-of-memory, permission and transient I/O failures anywhere in the exception chain."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, (MemoryError, PermissionError, TimeoutError, ConnectionError)):
      return True
    if any(f"{code}:" in str(error) for code in _ENVIRONMENT_CODES):
      return True
    error = error.__cause__ or error.__context__
  return False


def _stored_shape(leaf: Any) -> tuple[int, ...] | None:
  """The shape orbax stores for `leaf`: typed PRNG keys are stored as their key data (one more dim)."""
  dtype = getattr(leaf, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, dtype)).shape
  return getattr(leaf, "shape", None)


def _reason(error: BaseException) -> str:
  """One short line for the warning: the innermost cause, which names the file (orbax's wrapper dumps a spec)."""
  where = "".join(f"{note}: " for note in getattr(error, "__notes__", ()))
  while error.__cause__ is not None:
    error = error.__cause__
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  text = text.split(" [tensorstore_spec=")[0]
  if len(text) > 240:
    text = text[:237] + "..."
  return f"{where}{type(error).__name__}: {text}" if text else f"{where}{type(error).__name__}"


def _is_restore_echo(error: BaseException | None) -> bool:
  if isinstance(error, RuntimeError) and "Event loop is closed" in str(error):
    return True
  # An abandoned shard read's TensorStore error: its traceback may hold no orbax frame (seen when the future is
  # collected late, on a loaded machine), but its message always carries the TensorStore spec.
  if error is not None and "tensorstore_spec=" in str(error):
    return True
  tb = error.__traceback__ if error is not None else None
  while tb is not None:
    if tb.tb_frame.f_code.co_filename.startswith(_ORBAX_DIR):
      return True
    tb = tb.tb_next
  return False


class _DropOrbaxInfo(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not record.pathname.startswith(_ORBAX_DIR)


class _DropRestoreEchoes(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not (time.monotonic() < _quiet_until and _is_restore_echo(error))


def _install_noise_filters() -> None:
  """Keeps orbax's warnings but drops its INFO chatter and the echoes of a failed restore.

  When one shard read fails, orbax abandons the others and closes its event loop; each abandoned read then
  reports again ("Task exception was never retrieved", "Event loop is closed", a TensorStore spec dump per
  shard) through asyncio's logger and sys.unraisablehook. Those echoes are dropped for a few seconds after a
  failed restore so that the one warning line from restore_latest is what the user sees.
  """
  absl_logger = absl_logging.get_absl_logger()
  if not any(isinstance(f, _DropOrbaxInfo) for f in absl_logger.filters):
    absl_logger.addFilter(_DropOrbaxInfo())
  asyncio_logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _DropRestoreEchoes) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_DropRestoreEchoes())
  current = sys.unraisablehook
  if getattr(current, "_scalezoo_echo_filter", False):
    return

  def hook(unraisable) -> None:
    if time.monotonic() < _quiet_until and _is_restore_echo(unraisable.exc_value):
      return
    current(unraisable)

  hook._scalezoo_echo_filter = True
  sys.unraisablehook = hook
