"""Trainer scaling on the GPUs of one host (issue #12): FSDP2 data parallelism and sequence parallelism.

    python benchmarks/multi_gpu_scaling.py --gpus 1 2 4 8 --sp 1 2 4 8 --out scaling/

Part 1, FSDP2: ``train/run.py --config STDiT-16x256x256`` (batch 8 per GPU, activation checkpointing, bf16) from a
cache of random latents on N GPUs: median step time after the warm-up, tokens/s per GPU, scaling efficiency
against one GPU, rank 0's peak memory, and the loss at a few steps (the runs see different global batches, so the
curves agree in trend, not value).

Part 2, sequence parallelism: ``--config STDiT-16x1024x1024`` (batch 1, 65,536 tokens per sample) with its
frames split over sp GPUs (``--sp-size``): step time and peak memory per GPU.

Every run is ``torchrun --standalone --nproc_per_node N train/run.py ...`` with NCCL's NVLink multicast off
(``NCCL_NVLS_ENABLE=0``). Writes ``scaling.json`` and ``scaling.md`` (the tables) under ``--out``.
``--device cpu`` with small ``--set`` overrides and ``--latent-shape`` runs the same plumbing on gloo ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from latent_cache_throughput import Placeholders, RandomT5, RandomVAE  # noqa: E402

LOSS_STEPS = (1, 5, 10, 20, 30)


def write_cache(directory: Path, samples: int, latent_shape) -> Path:
    from openvid_models.data.latent_cache import build_latent_cache  # noqa: PLC0415

    if not (directory / "manifest.json").is_file():
        build_latent_cache(Placeholders(samples), RandomVAE(latent_shape), RandomT5(), directory, batch_size=8,
                           shard_size=64, progress=False)
    return directory


def run_trainer(nproc: int, config: str, cache: Path, outdir: Path, steps: int, device: str, sets: list[str],
                timeout: float) -> dict:
    """One training run; returns the per-step log of rank 0 (losses.jsonl) or the error."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / "train" / "run.py"), "--config", config, "--outdir", str(outdir), "--max-steps", str(steps),
               "--device", device, "--no-progress"]
    for item in ["data=latent-cache", f"latent_cache={cache}", "init_from=none", f"ckpt_every={10**6}",
                 "num_workers=2", *sets]:
        command += ["--set", item]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", OMP_NUM_THREADS="1")
    log = outdir / "losses.jsonl"
    # Its own process group, so that a run past its time is ended with all of torchrun's workers.
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # the steps logged so far still tell the step time
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        entries = [json.loads(line) for line in log.read_text().splitlines() if line] if log.is_file() else []
        return {"log": entries, "timed_out": True} if entries else {"error": f"timed out after {timeout} s"}
    if process.returncode != 0 or not log.is_file():
        # The workers' exception, not torchrun's report that follows it.
        errors = [line for line in (stderr or stdout).splitlines() if re.search(r"\w(Error|Exception): ", line)]
        return {"error": errors[0] if errors else (stderr or stdout)[-1500:]}
    return {"log": [json.loads(line) for line in log.read_text().splitlines() if line]}


def summarise(log: list[dict], warmup: int) -> dict:
    timed = [entry for entry in log if entry["step"] > warmup] or log
    step_s = statistics.median(entry["step_s"] for entry in timed)
    return dict(step_s=step_s, tokens_per_s=statistics.median(entry["tokens_per_s"] for entry in timed),
                peak_gb=max(entry["peak_gb"] for entry in log),
                losses={entry["step"]: round(entry["loss"], 4) for entry in log if entry["step"] in LOSS_STEPS})


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8], help="world sizes of part 1")
    parser.add_argument("--sp", type=int, nargs="+", default=[1, 2, 4, 8], help="sp sizes of part 2 (0: skip)")
    parser.add_argument("--steps", type=int, default=30, help="steps of a part-1 run")
    parser.add_argument("--sp-steps", type=int, default=8, help="steps of a part-2 run")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the medians")
    parser.add_argument("--latent-shape", type=int, nargs=4, default=[4, 16, 32, 32], help="part 1 latents")
    parser.add_argument("--sp-latent-shape", type=int, nargs=4, default=[4, 16, 128, 128], help="part 2 latents")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="trainer override (repeatable)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--out", default="scaling")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    available = os.cpu_count() if args.device == "cpu" else _gpu_count()
    skipped = [n for n in sorted(set(args.gpus + args.sp)) if n > available]
    report: dict = {"available": available, "not_run": skipped, "fsdp": {}, "sp": {}, "versions": _versions()}

    cache = write_cache(out / "cache_256", 8 * max(args.gpus) * 2, args.latent_shape)
    for n in sorted(n for n in set(args.gpus) if n <= available):
        run = run_trainer(n, "STDiT-16x256x256", cache, out / f"fsdp_{n}", args.steps, args.device,
                          ["batch_size=8", *args.sets], args.timeout)
        report["fsdp"][n] = summarise(run["log"], args.warmup) if "log" in run else run
        print(f"fsdp {n}: {report['fsdp'][n]}", file=sys.stderr)
    base = report["fsdp"].get(1, {}).get("tokens_per_s")
    for n, row in report["fsdp"].items():
        if base and "tokens_per_s" in row:
            row["tokens_per_s_per_gpu"] = row["tokens_per_s"] / n
            row["efficiency"] = row["tokens_per_s"] / (n * base)

    sp_sizes = sorted(n for n in set(args.sp) if 0 < n <= available)
    if sp_sizes:
        cache = write_cache(out / "cache_1024", 8, args.sp_latent_shape)
        for sp in sp_sizes:
            run = run_trainer(sp, "STDiT-16x1024x1024", cache, out / f"sp_{sp}", args.sp_steps, args.device,
                              ["batch_size=1", f"sp_size={sp}", *args.sets], args.timeout)
            report["sp"][sp] = summarise(run["log"], min(args.warmup, args.sp_steps // 2)) if "log" in run else run
            print(f"sp {sp}: {report['sp'][sp]}", file=sys.stderr)

    (out / "scaling.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "scaling.md").write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [f"Versions: {report['versions']}. Not run (more ranks than this host has): {report['not_run'] or 'none'}.",
             "", "| ranks | step s | tokens/s | tokens/s per rank | efficiency | peak GB (rank 0) | loss at steps "
             f"{', '.join(map(str, LOSS_STEPS))} |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for n, row in report["fsdp"].items():
        if "error" in row:
            lines.append(f"| {n} | failed: {row['error'][-200:]!r} | | | | | |")
            continue
        losses = ", ".join(str(row["losses"].get(s, "-")) for s in LOSS_STEPS)
        lines.append(f"| {n} | {row['step_s']:.3f} | {row['tokens_per_s']:.0f} | {row.get('tokens_per_s_per_gpu', 0):.0f} "
                     f"| {row.get('efficiency', 0):.2f} | {row['peak_gb']:.1f} | {losses} |")
    if report["sp"]:
        lines += ["", "| sp | step s | tokens/s | peak GB per rank |", "| --- | --- | --- | --- |"]
        for sp, row in report["sp"].items():
            if "error" in row:
                lines.append(f"| {sp} | failed: {row['error'][-200:]!r} | | |")
            else:
                lines.append(f"| {sp} | {row['step_s']:.3f} | {row['tokens_per_s']:.0f} | {row['peak_gb']:.1f} |")
    return "\n".join(lines) + "\n"


def _gpu_count() -> int:
    import torch  # noqa: PLC0415

    return torch.cuda.device_count()


def _versions() -> str:
    import torch  # noqa: PLC0415

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}"


if __name__ == "__main__":
    main()
