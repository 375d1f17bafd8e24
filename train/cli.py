"""`scalezoo` command line: train, sweep, fit, plot, bench, seqbench, parbench, generate, quickstart.

Bad input (a config key, a value, a missing file, a mesh that does not fit) prints one line
`scalezoo: error: ...` and exits with code 2 before anything is written or compiled.
"""

from __future__ import annotations

import argparse
import os
import sys

from scalezoo.configs import ConfigError  # light: ml_collections only, no JAX


def _split_overrides(extra: list[str]) -> dict[str, str]:
  """`--config.model.width=256` or `--config.model.width 256` -> {"model.width": "256"}."""
  out, i = {}, 0
  while i < len(extra):
    arg = extra[i]
    if not arg.startswith("--config."):
      raise SystemExit(_usage_error(f"unrecognised argument {arg!r}; overrides look like --config.model.width=256"))
    key, eq, value = arg[len("--config."):].partition("=")
    if not eq:
      if i + 1 >= len(extra):
        raise SystemExit(_usage_error(f"{arg} needs a value: {arg}=VALUE"))
      i, value = i + 1, extra[i + 1]
    out[key] = value
    i += 1
  return out


def _usage_error(msg: str) -> int:
  print(f"scalezoo: error: {msg}", file=sys.stderr)
  return 2


def check_workdir(workdir: str) -> None:
  """Run files are appended and replaced in place, which object stores cannot do: refuse URLs up front."""
  if workdir and "://" in workdir:
    raise ConfigError(f"--workdir {workdir}: scalezoo writes run files with plain file I/O; mount the bucket "
                      f"(gcsfuse, see tpu/README.md) and pass the mount path, e.g. /mnt/gcs/BUCKET/run")


def load_config(spec: str, overrides: dict[str, str]):
  """The config named by `spec` with command-line overrides applied."""
  from scalezoo.configs import apply_overrides, load
  return apply_overrides(load(spec), overrides)


def cmd_train(args, overrides) -> int:
  from scalezoo.train.trainer import STATUS_EXIT, train
  cfg = load_config(args.config, overrides)
  summary = train(cfg, args.workdir, quiet=args.quiet)
  if jax_process_index() == 0:
    from scalezoo.train.plots import plot_loss_curve
    png = plot_loss_curve(args.workdir)
    _print_summary(args.workdir, summary)
    print(f"loss curve: {png}")
  return STATUS_EXIT[summary["status"]]


def cmd_bench(args, overrides) -> int:
  from scalezoo.train.bench import bench
  cfg = load_config(args.config, overrides)
  rows = bench(cfg, args.meshes, steps=args.steps, preset=args.preset, batch_auto=args.batch == "auto",
               max_batch=args.max_batch, memory_limit=args.memory_limit, workdir=args.workdir)
  return 0 if any(r["status"] == "ok" for r in rows) else 1


def _int_list(flag: str, text: str, example: str) -> list[int]:
  """A comma-separated list of integers from a flag, or one ConfigError line naming it."""
  try:
    return [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ConfigError(f"{flag} {text!r}: give comma-separated integers, e.g. {example}") from None


def cmd_seqbench(args, overrides) -> int:
  from scalezoo.train.seqbench import seqbench
  lengths = _int_list("--seq_lens", args.seq_lens, "1024,2048,4096")
  cfgs = [(spec, load_config(spec, overrides)) for spec in args.config]
  rows = seqbench(cfgs, lengths, batch=args.batch, steps=args.steps, decode_tokens=args.decode_tokens,
                  workdir=args.workdir)
  return 0 if any(r["status"] == "ok" for r in rows) else 1


def cmd_parbench(args, overrides) -> int:
  from scalezoo.train.parbench import parbench, read_k
  k = read_k(args.fit, args.k)
  batches = _int_list("--batches", args.batches, "1,8,32")
  rows = parbench(load_config(args.config, overrides), k=k, batches=batches, prompt_len=args.prompt_len,
                  tokens=args.tokens, scale=args.scale, workdir=args.workdir)
  return 0 if any(r["status"] == "ok" for r in rows) else 1


def cmd_generate(args, overrides) -> int:
  from scalezoo.train.generate import generate_text
  if overrides:
    raise ConfigError("generate takes no --config overrides: the run's config.json defines the model")
  text = generate_text(args.workdir, args.prompt, num_tokens=args.tokens, temperature=args.temperature,
                       top_k=args.top_k, seed=args.seed)
  print(args.prompt + text)
  return 0


def cmd_sweep(args, overrides) -> int:
  from scalezoo.train.sweep import load_sweep, sweep
  from scalezoo.train.report import write_report
  rows = sweep(load_sweep(args.config, overrides), args.workdir, quiet=args.quiet)
  failed = [r["name"] for r in rows if r["status"] != "completed"]
  print(f"{len(rows) - len(failed)}/{len(rows)} runs completed; results: {os.path.join(args.workdir, 'results.csv')}")
  if failed:
    print(f"not completed: {', '.join(failed)} (errors in results.csv)")
  if len(failed) < len(rows) and jax_process_index() == 0:
    for name, path in write_report(args.workdir).items():
      print(f"{name}: {path}")
  if any(r["status"] == "preempted" for r in rows):
    print("pre-empted: rerun the same command to resume")
    return 143
  return 0 if not failed else 1


def jax_process_index() -> int:
  import jax
  return jax.process_index()


def cmd_fit(args, overrides) -> int:
  import json
  from scalezoo.train import laws
  if args.bootstrap and args.law not in ("chinchilla", "parscale"):
    raise ConfigError(f"--bootstrap: only the chinchilla and parscale fits have bootstrap intervals, not {args.law}")
  kw = {"bootstrap": args.bootstrap} if args.bootstrap else {}
  result = laws.fit_csv(args.csv, args.law, **kw) if args.csv else _fit_sweep_dir(args.workdir, args.law, kw)
  if args.json:
    print(json.dumps(result, indent=2))
    return 0
  ci = result.get("ci") or {}
  for k, v in result.items():
    if k != "ci":
      print(f"{k:>12}: {v}" + (f"  (95% interval {ci[k][0]:.6g} to {ci[k][1]:.6g})" if k in ci else ""))
  if args.law == "parscale":
    gains = laws.parscale_multiplier(result, [2, 4, 8])
    print(f"{'k ln P + 1':>12}: " + ", ".join(f"P={p}: {g:.3f}" for p, g in zip((2, 4, 8), gains))
          + "  (the single-stream parameters that match P streams, as a multiple of N)")
  return 0


def _fit_sweep_dir(workdir: str, law: str, kw: dict) -> dict:
  """`law` fitted to the eval losses of a sweep's completed runs.

  N is the total parameter count for the Chinchilla and over-training laws, the non-embedding count (prefixes
  and aggregator included) for ParScale, whose paper fits that; P is each run's streams (1 for other families).
  """
  from scalezoo.train import laws
  from scalezoo.train.report import read_results
  if law == "downstream":
    raise ConfigError(f"--workdir {workdir}: a sweep records no downstream error rates; fit --law downstream with "
                      f"--csv FILE (columns loss,error)")
  try:
    rows = read_results(workdir)
  except FileNotFoundError:
    raise ConfigError(f"--workdir {workdir}: no results.csv; pass a sweep directory or --csv FILE") from None
  if not rows:
    raise ConfigError(f"--workdir {workdir}: results.csv has no completed runs to fit")
  n_key = "non_embedding_params" if law == "parscale" else "params"
  table = [dict(params=r[n_key], tokens=r["tokens"], streams=r["streams"], loss=r["eval_loss"]) for r in rows]
  return laws.fit_table(["params", "tokens", "streams", "loss"], table, law, source=f"--workdir {workdir}",
                        labels=[f"run {r['name']}" for r in rows], **kw)


def cmd_plot(args, overrides) -> int:
  from scalezoo.train.report import write_report
  if args.coord_check:
    return _coord_check(args, overrides)
  if not os.path.exists(os.path.join(args.workdir, "results.csv")):
    raise ConfigError(f"--workdir {args.workdir}: no results.csv; pass a sweep directory")
  for name, path in write_report(args.workdir).items():
    print(f"{name}: {path}")
  return 0


def cmd_quickstart(args, overrides) -> int:
  from scalezoo.train.report import write_report
  from scalezoo.train.sweep import load_sweep, sweep
  rows = sweep(load_sweep("dense_quick", overrides), args.workdir, quiet=args.quiet)
  done = [r for r in rows if r["status"] == "completed"]
  print(f"{len(done)}/{len(rows)} runs completed: {os.path.join(args.workdir, 'results.csv')}")
  if not done:
    return 1
  written = write_report(args.workdir)
  fit = written.get("fit")
  if fit:
    import json
    with open(fit) as f:
      p = json.load(f)
    print(f"Chinchilla fit: E={p['E']:.3f} A={p['A']:.4g} B={p['B']:.4g} alpha={p['alpha']:.3f} "
          f"beta={p['beta']:.3f}")
  for name, path in written.items():
    print(f"{name}: {path}")
  return 0 if len(done) == len(rows) else 1


def _coord_check(args, overrides) -> int:
  import json
  from scalezoo.train.coord_check import coord_check, plot_coord_check
  cfg = load_config(args.coord_check, overrides)
  try:
    widths = [int(w) for w in args.widths.split(",")]
  except ValueError:
    raise ConfigError(f"--widths {args.widths!r}: write comma-separated integers like 64,128,256") from None
  os.makedirs(args.workdir, exist_ok=True)
  result = coord_check(cfg, widths, args.steps)
  tag = "mup" if cfg.train.mup else "sp"
  with open(os.path.join(args.workdir, f"coord_check_{tag}.json"), "w") as f:
    json.dump({str(k): v for k, v in result.items()}, f, indent=2)
  png = os.path.join(args.workdir, f"coord_check_{tag}.png")
  plot_coord_check(result, png, title=f"coordinate check ({tag}, {args.steps} steps)")
  print(f"coord check: {png}")
  return 0


def _print_summary(workdir: str, s: dict) -> None:
  print(f"{s['status']}: {s['steps']} steps, {s['params'] / 1e6:.2f}M params, {s['tokens'] / 1e6:.2f}M tokens, "
        f"loss {s['loss']:.4f}, eval loss {s['eval_loss']:.4f} ({s['eval_bpb']:.3f} bits/byte), "
        f"{s['tokens_per_s']:.0f} tokens/s, MFU {s['mfu']:.1%}, {s['wall_s']:.0f}s")
  print(f"summary: {os.path.join(workdir, 'summary.json')}")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="scalezoo", description="Architecture zoo for scaling studies.")
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train one model", epilog="Override any key with --config.KEY=VALUE.")
  t.add_argument("--config", required=True, help="NAME[:ARG] (e.g. dense:tiny) or FILE.py[:ARG]")
  t.add_argument("--workdir", required=True, help="run directory (resumes if it holds checkpoints)")
  t.add_argument("--quiet", action="store_true", help="no progress bar")
  _add_multiprocess_flags(t)
  t.set_defaults(fn=cmd_train)
  s = sub.add_parser("sweep", help="run every run of a sweep config (resumable) and write results.csv",
                     epilog="Override sweep keys with --config.KEY=VALUE, e.g. --config.fixed.train.lr=1e-3.")
  s.add_argument("--config", required=True, help="a sweep in configs/sweeps (e.g. dense_quick) or FILE.py[:ARG]")
  s.add_argument("--workdir", required=True, help="sweep directory: runs/<name>/, results.csv")
  s.add_argument("--quiet", action="store_true")
  _add_multiprocess_flags(s)
  s.set_defaults(fn=cmd_sweep)
  f = sub.add_parser("fit", help="fit a scaling law to a sweep's results or a CSV")
  src = f.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="sweep directory (fits eval loss of completed runs; parscale: N = "
                                     "non-embedding parameters, P = streams)")
  src.add_argument("--csv", help="CSV with columns params,tokens,loss (+streams for parscale, error for downstream)")
  f.add_argument("--law", required=True, choices=["chinchilla", "overtrain", "parscale", "downstream"])
  f.add_argument("--bootstrap", type=int, default=0,
                 help="bootstrap resamples for 95%% intervals of the constants (chinchilla, parscale)")
  f.add_argument("--json", action="store_true", help="print the result as JSON")
  f.set_defaults(fn=cmd_fit)
  pl = sub.add_parser("plot", help="plots, fit.json and report.md of a sweep directory")
  pl.add_argument("--workdir", required=True)
  pl.add_argument("--coord-check", default="", metavar="CONFIG",
                  help="instead: muP coordinate check of CONFIG across --widths (use --config.train.mup=true)")
  pl.add_argument("--widths", default="64,128,256")
  pl.add_argument("--steps", type=int, default=5)
  pl.set_defaults(fn=cmd_plot)
  b = sub.add_parser("bench", help="parallelism sweep: step time, tokens/s, MFU and memory of one config per mesh",
                     epilog="Exit code 0 if any mesh ran, 1 if none did, 2 for bad arguments.")
  b.add_argument("--config", required=True)
  b.add_argument("--meshes", default="auto",
                 help='"auto" (every factorisation of the devices over the --preset axes) or "data=2,fsdp=4;fsdp=8"')
  b.add_argument("--preset", default="", help="axes for auto: dp, fsdp, fsdp_tp or ep (default: the config's "
                                              "mesh.preset, else data,fsdp,tensor, plus expert for MoE models)")
  b.add_argument("--steps", type=int, default=10, help="timed steps per mesh (after 2 warm-up steps)")
  b.add_argument("--batch", choices=("config", "auto"), default="config",
                 help="auto: per mesh, the largest power-of-two per-device batch whose compiled memory fits")
  b.add_argument("--max-batch", "--max_batch", dest="max_batch", type=int, default=1024,
                 help="per-device cap for --batch auto")
  b.add_argument("--memory_limit", "--memory-limit", dest="memory_limit", type=float, default=0.0, metavar="GIB",
                 help="per-device memory limit in GiB (default: the device's own limit where it reports one)")
  b.add_argument("--workdir", default="", help="if set, writes bench.csv and bench.json there")
  _add_multiprocess_flags(b)
  b.set_defaults(fn=cmd_bench)
  sb = sub.add_parser("seqbench", help="training tokens/s and decode ms/token vs sequence length, configs side by "
                                       "side", epilog="--config.KEY=VALUE overrides apply to every config.")
  sb.add_argument("--config", action="append", required=True,
                  help="repeat for each config; the first is the reference of the ratios")
  sb.add_argument("--seq_lens", "--seq-lens", dest="seq_lens", default="1024,2048,4096,8192,16384")
  sb.add_argument("--batch", type=int, default=1, help="sequences per training step and per decode step")
  sb.add_argument("--steps", type=int, default=3, help="timed training steps (after 2 warm-up steps)")
  sb.add_argument("--decode_tokens", "--decode-tokens", dest="decode_tokens", type=int, default=32,
                  help="timed one-token decode steps after the prefill")
  sb.add_argument("--workdir", default="", help="if set, writes seqbench.csv and seqbench.json there")
  sb.set_defaults(fn=cmd_seqbench)
  pb = sub.add_parser("parbench", help="ParScale vs the dense model of equal loss: decode memory and ms/token "
                                       "increases over the base", epilog="--config.KEY=VALUE overrides apply to the "
                                       "ParScale config, before its base and dense models are derived from it.")
  pb.add_argument("--config", required=True, help="a ParScale config, e.g. parscale:dense:quickstart,streams=4")
  pb.add_argument("--fit", default="", help="fit.json of a ParScale sweep (law parscale), or the sweep directory")
  pb.add_argument("--k", default="", help="the law's k instead of --fit (0.39: the paper's Stack-V2-Python fit)")
  pb.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes (sequences decoded together)")
  pb.add_argument("--prompt_len", "--prompt-len", dest="prompt_len", type=int, default=64,
                  help="prompt tokens prefilled before the timed steps")
  pb.add_argument("--tokens", type=int, default=32, help="timed one-token decode steps per model and batch")
  pb.add_argument("--scale", choices=("width", "depth"), default="width",
                  help="how the dense model grows to the equal-loss size: width (heads, ffn_width) or depth")
  pb.add_argument("--workdir", default="", help="if set, writes parbench.csv and parbench.json there")
  pb.set_defaults(fn=cmd_parbench)
  g = sub.add_parser("generate", help="continue a prompt with a trained run (KV cache / recurrent state decoding)")
  g.add_argument("--workdir", required=True, help="a run directory written by scalezoo train")
  g.add_argument("--prompt", default="", help="text to continue (byte tokens)")
  g.add_argument("--tokens", type=int, default=128, help="how many tokens to generate")
  g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy")
  g.add_argument("--top_k", "--top-k", dest="top_k", type=int, default=0, help="sample among the k likeliest (0: all)")
  g.add_argument("--seed", type=int, default=0)
  g.set_defaults(fn=cmd_generate)
  q = sub.add_parser("quickstart", help="the README's main job on the embedded stdlib data")
  q.add_argument("--workdir", required=True)
  q.add_argument("--quiet", action="store_true")
  q.set_defaults(fn=cmd_quickstart)
  return p


def _add_multiprocess_flags(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("multi-process (TPU pods and SLURM/MPI jobs are detected without these)")
  g.add_argument("--coordinator", default="", metavar="HOST:PORT", help="process 0's address, on every process")
  g.add_argument("--num_processes", type=int, default=0, help="number of processes in the job")
  g.add_argument("--process_id", type=int, default=-1, help="this process's index, 0 .. num_processes-1")


def main(argv: list[str] | None = None) -> int:
  from scalezoo.train.checkpoint import CheckpointMismatchError
  args, extra = build_parser().parse_known_args(argv)
  try:
    overrides = _split_overrides(extra)
    check_workdir(getattr(args, "workdir", "") or "")
    if hasattr(args, "coordinator"):
      from scalezoo.train.distributed import initialize
      initialize(args.coordinator, args.num_processes, args.process_id)
    return args.fn(args, overrides)
  except ConfigError as e:
    return _usage_error(str(e))
  except CheckpointMismatchError as e:
    return _usage_error(f"{e}; train this config in a new --workdir")
  except FileNotFoundError as e:
    return _usage_error(f"{e.strerror}: {e.filename}")


if __name__ == "__main__":
  sys.exit(main())
