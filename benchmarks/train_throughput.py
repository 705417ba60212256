"""Training throughput and memory of the release configs on one GPU (issue #9), from caches of random latents.

    python benchmarks/train_throughput.py --out train_throughput/ [--cases NAME ...] [--steps 20]

Each case is one ``train/run.py`` run (FSDP2 on one rank, bf16 parameters, fp32 master weights, AdamW, EMA,
clipping) launched as :mod:`multi_gpu_scaling` launches them; it reports the median step time after the
warm-up, tokens/s, peak memory and the model-FLOP utilisation against ``--peak-tflops`` (755: the bf16 matmul
ceiling measured on an H100 in ``../shared/reference/anchors.md``). Model FLOPs count the forward and backward
(3x the forward: 36 C^2 per token in linears plus 4 C (S + T + L) in attention, per block, video and MVDiT's
text tokens alike); the recomputed forward of activation checkpointing is not counted, as MFU is defined.
Writes ``train_throughput.json`` and ``train_throughput.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from multi_gpu_scaling import _versions, run_trainer, summarise, write_cache  # noqa: E402

TEXT_TOKENS = 120
HIDDEN, DEPTH = 1152, 28


@dataclass(frozen=True)
class Case:
    config: str  # a name in train.config.TRAIN_CONFIGS
    batch_size: int
    sets: tuple[str, ...] = field(default=())  # further --set overrides

    @property
    def side(self) -> int:  # latent side: 16x256x256 -> 32
        return int(self.config.split("x")[-1]) // 8


CASES = {
    "stdit256-b8-ckpt": Case("STDiT-16x256x256", 8),
    "stdit256-b8": Case("STDiT-16x256x256", 8, ("grad_checkpointing=false",)),
    "stdit512-b8-ckpt": Case("STDiT-16x512x512", 8),
    "mvdit512-b4-ckpt": Case("MVDiT-16x512x512", 4),
}


def model_flops_per_sample(case: Case) -> float:
    """Forward + backward model FLOPs of one sample (patch 1 x 2 x 2, 16 latent frames)."""
    frames, spatial = 16, (case.side // 2) ** 2
    tokens = frames * spatial + (frames * TEXT_TOKENS if case.config.startswith("MVDiT") else 0)
    per_token = 36 * HIDDEN**2 + 4 * HIDDEN * (spatial + frames + TEXT_TOKENS)
    return 3 * DEPTH * tokens * per_token


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=20, help="steps per run (512 px runs: half)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the medians (512 px runs: 3)")
    parser.add_argument("--peak-tflops", type=float, default=755.0)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    parser.add_argument("--out", default="train_throughput")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="trainer override (repeatable)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: the plumbing, toy sizes")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"versions": _versions(), "peak_tflops": args.peak_tflops, "cases": {}}
    for name in args.cases:
        case = CASES[name]
        large = case.side > 32
        steps = args.steps // 2 if large else args.steps
        # One epoch per run: a new epoch starts new loader workers, which would stall a timed step.
        samples = max(CASES[n].batch_size for n in args.cases if CASES[n].side == case.side) * (steps + 1)
        cache = write_cache(out / f"cache_{case.side}_{samples}", samples, [4, 16, case.side, case.side])
        run = run_trainer(1, case.config, cache, out / name, steps, args.device,
                          [f"batch_size={case.batch_size}", *case.sets, *args.sets], args.timeout)
        row = summarise(run["log"], min(3 if large else args.warmup, steps - 1)) if "log" in run else run
        if "step_s" in row:
            row["mfu"] = model_flops_per_sample(case) * case.batch_size / row["step_s"] / (args.peak_tflops * 1e12)
        report["cases"][name] = dict(row, config=case.config, batch_size=case.batch_size, sets=list(case.sets))
        print(f"{name}: {report['cases'][name]}", file=sys.stderr, flush=True)
        (out / "train_throughput.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "train_throughput.md").write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [f"{report['versions']}; MFU against {report['peak_tflops']:.0f} TFLOP/s.", "",
             "| case | config | batch | overrides | step s | tokens/s | MFU | peak GB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in report["cases"].items():
        head = f"| {name} | {row['config']} | {row['batch_size']} | {' '.join(row['sets']) or '-'} |"
        if "error" in row:
            lines.append(f"{head} failed: {row['error'][-300:]!r} | | | |")
        else:
            lines.append(f"{head} {row['step_s']:.3f} | {row['tokens_per_s']:.0f} | {row['mfu']:.1%} | "
                         f"{row['peak_gb']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
