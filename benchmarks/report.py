#!/usr/bin/env python3
"""Turn a pytest-benchmark JSON (``pytest benchmarks --benchmark-json=bench.json``) into markdown tables.

    python benchmarks/report.py bench.json > table.md
    python benchmarks/report.py bench.json --commit abc1234      # where the run's checkout had no git

Prints an environment table (device, torch / triton / CUDA / cuDNN versions, CUDA extension, commit,
date), then one table per suite with a row per (case, provider): median GPU time per call, TB/s,
TFLOP/s, and the speedup over each baseline provider (eager, compile, and any non-``ours-*`` provider the
suite measured). Providers that were skipped are listed under their suite with the reason.

Needs only the standard library (no torch), so it runs anywhere. Reads what the harness put in
``extra_info`` (case, provider, median_us, tb_per_s, tflop_per_s, speedup_vs_*); benchmarks without it
fall back to pytest-benchmark's own median and group/name.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

PROVIDER_ORDER = ["ours-cuda", "ours-triton", "eager", "compile", "cudnn", "flash-attn", "xformers"]
BASELINE_ORDER = ["eager", "compile", "cudnn", "flash-attn", "xformers"]


def _rank(order: list[str], name: str) -> tuple[int, str]:
    return (order.index(name), name) if name in order else (len(order), name)


def _fmt(value, spec: str, missing: str = "—") -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return missing
    return format(value, spec)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]], align: list[str]) -> list[str]:
    sep = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _suite_of(bench: dict) -> str:
    info = bench.get("extra_info") or {}
    if info.get("suite"):
        return info["suite"]
    stem = Path((bench.get("fullname") or "").split("::")[0]).stem
    return stem[len("test_"):] if stem.startswith("test_") else (stem or "misc")


def load_rows(data: dict) -> list[dict]:
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info") or {}
        stats = bench.get("stats") or {}
        median_us = info.get("median_us")
        if median_us is None and stats.get("median") is not None:
            median_us = stats["median"] * 1e6
        rows.append({
            "suite": _suite_of(bench),
            "case": info.get("case") or bench.get("group") or bench.get("name"),
            "provider": info.get("provider") or bench.get("param") or bench.get("name"),
            "median_us": median_us,
            "iqr_us": info.get("iqr_us"),
            "tb_per_s": info.get("tb_per_s"),
            "tflop_per_s": info.get("tflop_per_s"),
            "speedups": {k[len("speedup_vs_"):]: v for k, v in info.items() if k.startswith("speedup_vs_")},
            "notes": [n for n in (info.get("l2_warning"),
                                  info.get("timing_source") if "fallback" in str(info.get("timing_source", "")) else None) if n],
        })
    # Speedups from the medians themselves where the JSON lacks them (e.g. a run without the harness).
    by_case: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by_case.setdefault((r["suite"], r["case"]), []).append(r)
    for group in by_case.values():
        for r in group:
            for other in group:
                if other is not r and other["provider"] not in r["speedups"] and r["median_us"] and other["median_us"]:
                    r["speedups"][other["provider"]] = other["median_us"] / r["median_us"]
    return rows


def cudnn_version(v) -> str:
    """torch.backends.cudnn.version()'s integer as x.y.z (9.x: 91300 -> 9.13.0; 8.x: 8902 -> 8.9.2)."""
    if not isinstance(v, int) or v <= 0:
        return str(v) if v else "—"
    major, rest = (v // 10000, v % 10000) if v >= 10000 else (v // 1000, v % 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def environment_lines(data: dict, commit_override: str | None) -> list[str]:
    mi = data.get("machine_info") or {}
    env = mi.get("openvid") or {}
    ci = data.get("commit_info") or {}
    if env.get("gpu"):
        device = env["gpu"]
        extras = [f"{env['sm_count']} SMs" if env.get("sm_count") else None,
                  f"sm_{env['compute_capability'].replace('.', '')}" if env.get("compute_capability") else None,
                  f"{env['gpu_memory_gib']} GiB" if env.get("gpu_memory_gib") else None,
                  f"L2 {env['l2_cache_mb']} MB" if env.get("l2_cache_mb") else None,
                  f"driver {env['driver']}" if env.get("driver") else None]
        extras = [e for e in extras if e]
        if extras:
            device += " (" + ", ".join(extras) + ")"
    else:
        device = env.get("bench_device") or mi.get("processor") or mi.get("machine") or "unknown"
    commit = commit_override or env.get("git_commit")
    if not commit or commit == "unknown":
        commit = ci.get("id") if ci.get("id") not in (None, "unknown", "unversioned") else "unknown"
    dirty = env.get("git_dirty") if env.get("git_commit") not in (None, "unknown") else ci.get("dirty")
    if commit != "unknown" and dirty and not commit_override:
        commit += " (dirty)"
    if env.get("source_hash"):
        commit += f", sources {env['source_hash']}"
    ext = env.get("cuda_extension_built")
    ext_text = {True: "built", False: "not built", None: "unknown (openvid_kernels did not import)"}.get(ext, str(ext))
    rows = [
        ["Device", device],
        ["torch", env.get("torch") or "?"],
        ["CUDA (torch build)", env.get("cuda") or "—"],
        ["cuDNN", cudnn_version(env.get("cudnn"))],
        ["Triton", env.get("triton") or "—"],
        ["Python", env.get("python") or mi.get("python_version") or "?"],
        ["openvid_kernels CUDA extension", ext_text],
        ["Commit", commit],
        ["Date (UTC)", (data.get("datetime") or "?").replace("T", " ")[:19]],
        ["pytest-benchmark", env.get("pytest_benchmark") or data.get("version") or "?"],
    ]
    return _table(["Environment", ""], rows, ["l", "l"])


def suite_lines(suite: str, rows: list[dict], skipped: list[dict], all_speedups: bool) -> list[str]:
    case_order: dict[str, int] = {}
    for r in rows:
        case_order.setdefault(r["case"], len(case_order))
    # A provider gets a speedup column only where some other row of the suite was compared with it.
    providers = {p for r in rows for p in r["speedups"]}
    if all_speedups:
        columns = sorted(providers, key=lambda p: _rank(PROVIDER_ORDER, p))
    else:
        columns = sorted((p for p in providers if not p.startswith("ours-")), key=lambda p: _rank(BASELINE_ORDER, p))
    show_tb = any(r["tb_per_s"] is not None for r in rows)
    show_tf = any(r["tflop_per_s"] is not None for r in rows)

    header = ["case", "provider", "median us", "IQR us"]
    align = ["l", "l", "r", "r"]
    if show_tb:
        header.append("TB/s"); align.append("r")  # noqa: E702
    if show_tf:
        header.append("TFLOP/s"); align.append("r")  # noqa: E702
    header += [f"vs {p}" for p in columns]
    align += ["r"] * len(columns)

    body = []
    notes = []
    ordered = sorted(rows, key=lambda r: (case_order[r["case"]], _rank(PROVIDER_ORDER, r["provider"])))
    prev_case = None
    for r in ordered:
        row = [r["case"] if r["case"] != prev_case else "", r["provider"],
               _fmt(r["median_us"], ".1f"), _fmt(r["iqr_us"], ".1f")]
        prev_case = r["case"]
        if show_tb:
            row.append(_fmt(r["tb_per_s"], ".2f"))
        if show_tf:
            row.append(_fmt(r["tflop_per_s"], ".1f"))
        for p in columns:
            row.append("—" if p == r["provider"] else _fmt(r["speedups"].get(p), ".2f", "—") + ("x" if p in r["speedups"] else ""))
        body.append(row)
        notes += [f"{r['case']} / {r['provider']}: {n}" for n in r["notes"]]

    lines = [f"### {suite}", ""] + _table(header, body, align)
    reasons: dict[tuple[str, str], list[str]] = {}
    for s in skipped:
        if s.get("case") in case_order or (s.get("case") is None and s.get("suite") == suite):
            reasons.setdefault((s["provider"], s["reason"]), []).append(s.get("case"))
    if reasons or notes:
        lines.append("")
    for (provider, reason), cases in sorted(reasons.items()):
        lines.append(f"- not measured: `{provider}` ({reason})"
                     + ("" if len(cases) == len(case_order) else f" in {len(cases)} of {len(case_order)} cases"))
    lines += [f"- note: {n}" for n in notes]
    return lines


def render(data: dict, commit: str | None = None, title: str | None = None, all_speedups: bool = False) -> str:
    rows = load_rows(data)
    extra = data.get("openvid") or {}
    skipped = extra.get("skipped") or []
    smoke = extra.get("smoke_mode") or any((b.get("extra_info") or {}).get("smoke") for b in data.get("benchmarks", []))
    lines = []
    if title:
        lines += [f"## {title}", ""]
    if smoke:
        lines += ["> **CPU smoke run: these numbers exercise the harness and measure nothing.**", ""]
    lines += environment_lines(data, commit) + [""]
    launches = sorted({b.get("extra_info", {}).get("launch", "python") for b in data.get("benchmarks", [])})
    lines += ["Median GPU time per call (CUDA events, warmed up, many rounds of >= ~1 ms; calls launched by "
              f"{' / '.join(launches) or 'python'}); TB/s = bytes of the big tensors read + written / median; "
              "`vs X` = median of X / median of the row (higher is faster).", ""]
    suites: dict[str, list[dict]] = {}
    for r in rows:
        suites.setdefault(r["suite"], []).append(r)
    if not suites:
        lines.append("_No benchmark results in this file._")
    for suite, suite_rows in suites.items():
        lines += suite_lines(suite, suite_rows, skipped, all_speedups) + [""]
    for w in extra.get("warnings") or []:
        lines.append(f"- warning: {w}")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--commit", help="commit to print (overrides what the JSON recorded)")
    parser.add_argument("--title", help="a '## title' line above the tables")
    parser.add_argument("--all-speedups", action="store_true", help="speedup columns for every provider, ours too")
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.json.read_text())
    except FileNotFoundError:
        print(f"report.py: {args.json} does not exist (no benchmark ran, or all were skipped?)", file=sys.stderr)
        return 2
    except (OSError, json.JSONDecodeError) as exc:
        print(f"report.py: cannot read {args.json}: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render(data, commit=args.commit, title=args.title, all_speedups=args.all_speedups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
