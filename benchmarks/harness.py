"""Benchmark harness shared by every suite in ``benchmarks/``: GPU-time measurement inside pytest-benchmark.

A suite test looks like::

    pytestmark = harness.requires_device()

    def test_op(benchmark, provider):
        harness.require_provider(provider)            # skips with a reason when the backend is missing
        fn = ...                                        # zero-argument callable: one call of the op
        harness.bench(benchmark, fn, case="op fwd [16,4096,1152] bf16", provider=provider, bytes=...)

How the timing works
--------------------
* pytest-benchmark calls its timer once before and once after each round (``iterations`` calls of ``fn``)
  and records ``(end - start) / iterations``. We hand it :data:`DEVICE_TIMER`, whose every call records a
  CUDA event on the current stream, synchronizes it and returns the device time elapsed since a reference
  event, in seconds; the difference of two calls is therefore the GPU time between them.
* The timer is handed over through the public ``@pytest.mark.benchmark(timer=...)`` marker, which
  ``conftest.py`` adds to every benchmark item at collection; :func:`bench` also sets the fixture's
  ``_timer`` attribute (private, present in pytest-benchmark 3.x to 5.x) when it is there, and then checks
  that the timer really was called for every round. If it was not (a future pytest-benchmark that takes the
  timer elsewhere), the harness times the same rounds itself and reports those numbers, flagged in
  ``extra_info["timing_source"]``.
* Before timing: the call is checked against the eager result (optional), warmed up (this is where
  ``torch.compile`` compiles and Triton autotunes, and where the GPU clocks ramp up), then one call is
  timed to choose ``iterations`` so that one round is about ``--bench-round-ms`` (default 2 ms) of GPU
  work, and ``rounds`` to fill ``--bench-time`` seconds (clamped to [min_rounds, max_rounds]). The
  reported number is the median over rounds of the per-call time.
* L2: the same inputs are reused by every iteration, so inputs that fit in L2 (50 MB on H100, 60 MB on
  H200) would be served from cache and flatter the kernel. The suites use working sets of >= 100 MB per
  call, which streams from HBM; :func:`bench` flags any case whose ``bytes`` is under 3x the L2 size
  (``extra_info["l2_warning"]``).

Results are registered in a session-wide registry; for every case, every result gets
``speedup_vs_<provider> = other median / this median`` for each other provider measured in the same run
(updated as results arrive, and once more at session end, before pytest-benchmark writes its JSON).

CPU smoke mode: ``OPENVID_BENCH_CPU_SMOKE=1`` runs the providers that work on the CPU with the suites'
small shapes and a synchronized ``perf_counter`` timer, to exercise the harness on a machine without a GPU.
Its numbers mean nothing and are labelled as such.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOKE_ENV = "OPENVID_BENCH_CPU_SMOKE"

# Providers in the order tables list them. Suites may use others (register_provider).
PROVIDER_ORDER = ["ours-cuda", "ours-triton", "eager", "compile", "cudnn", "flash-attn", "xformers"]
# Baselines: providers whose speedup columns the tables show (ours-* are what is being measured).
BASELINE_ORDER = ["eager", "compile", "cudnn", "flash-attn", "xformers"]


# ---------------------------------------------------------------------------------------------------------
# Device selection (nothing here touches the GPU at import)
# ---------------------------------------------------------------------------------------------------------

def smoke_mode() -> bool:
    """True when the suites run on the CPU with small shapes to exercise the harness (not a measurement)."""
    return os.environ.get(SMOKE_ENV, "0") not in ("", "0")


def device() -> torch.device:
    return torch.device("cpu") if smoke_mode() else torch.device("cuda")


def device_available() -> bool:
    return smoke_mode() or torch.cuda.is_available()


def requires_device():
    """Module-level mark for suites: skip everything without CUDA (unless in CPU smoke mode)."""
    return pytest.mark.skipif(
        not device_available(), reason=f"needs a CUDA GPU (or {SMOKE_ENV}=1 to smoke-test the harness on CPU)"
    )


def pick_shapes(full: list, smoke: list) -> list:
    """The suite's real shapes on the GPU, its small ones in CPU smoke mode."""
    return smoke if smoke_mode() else full


def _sync() -> None:
    if device().type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------
# Timer
# ---------------------------------------------------------------------------------------------------------

class DeviceTimer:
    """A pytest-benchmark timer whose differences are GPU time (seconds).

    Each call records a CUDA event on the current stream, waits for it, and adds the time elapsed since
    the previous call's event to a float64 running total, which it returns. So ``timer() - timer()`` over a
    round is exactly ``start_event.elapsed_time(end_event)`` of that round: device time from the round's
    first launch point to the completion of its last kernel. (Chaining events, rather than measuring every
    call against one reference event recorded once, keeps full precision: ``cudaEventElapsedTime`` returns
    float32 milliseconds, whose resolution against a reference minutes old would be tens of microseconds.)

    Without CUDA (CPU smoke mode) it is a synchronized ``time.perf_counter``.
    """

    def __init__(self) -> None:
        self._events: list | None = None
        self._prev = None
        self._total = 0.0
        self.calls = 0
        self.capture: list[float] | None = None

    @property
    def __name__(self) -> str:  # pytest-benchmark writes the timer's name into the JSON options
        return "cuda_event_timer" if self._use_events() else "synchronized_perf_counter"

    @staticmethod
    def _use_events() -> bool:
        return not smoke_mode() and torch.cuda.is_available()

    def __call__(self) -> float:
        if self._use_events():
            if self._events is None:
                self._events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            # Ping-pong between two events: the one recorded now is never the one we measure from.
            ev = self._events[self.calls % 2]
            ev.record()
            ev.synchronize()
            if self._prev is not None:
                self._total += self._prev.elapsed_time(ev) / 1e3
            self._prev = ev
            value = self._total
        else:
            _sync()
            value = time.perf_counter()
        self.calls += 1
        if self.capture is not None:
            self.capture.append(value)
        return value

    def reset(self) -> None:
        """Forget the previous event (e.g. one recorded on another device or before a long pause)."""
        self._prev = None
        self._events = None


DEVICE_TIMER = DeviceTimer()


def time_calls(fn: Callable[[], Any], calls: int) -> float:
    """Device seconds for ``calls`` back-to-back calls of ``fn`` (one timer pair around all of them)."""
    start = DEVICE_TIMER()
    for _ in range(calls):
        fn()
    return DEVICE_TIMER() - start


# ---------------------------------------------------------------------------------------------------------
# Options (conftest registers them; defaults also come from the environment so they work without it)
# ---------------------------------------------------------------------------------------------------------

_config = None

_OPTIONS = {
    # name: (environment variable, default, type, help)
    "bench_time": ("OPENVID_BENCH_TIME", 0.5, float, "seconds of timed rounds per benchmark"),
    "bench_round_ms": ("OPENVID_BENCH_ROUND_MS", 2.0, float, "target GPU time of one round (iterations per round are chosen to reach it), ms"),
    "bench_min_rounds": ("OPENVID_BENCH_MIN_ROUNDS", 20, int, "fewest rounds per benchmark"),
    "bench_max_rounds": ("OPENVID_BENCH_MAX_ROUNDS", 1000, int, "most rounds per benchmark"),
    "bench_warmup_s": ("OPENVID_BENCH_WARMUP_S", 0.25, float, "seconds of warm-up calls after the first (compiling) call"),
    "bench_no_check": ("OPENVID_BENCH_NO_CHECK", False, bool, "skip the loose correctness check against eager before timing"),
    "bench_no_graph": ("OPENVID_BENCH_NO_GRAPH", False, bool, "launch every call from Python instead of replaying a CUDA graph (adds host launch overhead to the numbers)"),
}


def add_options(parser) -> None:
    group = parser.getgroup("openvid-bench", "openvid-kernels benchmark harness")
    for name, (env, default, typ, help_) in _OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            group.addoption(flag, action="store_true", default=None, help=f"{help_} (env {env})")
        else:
            group.addoption(flag, type=typ, default=None, help=f"{help_} (env {env}; default {default})")


def configure(config) -> None:
    global _config
    _config = config


def option(name: str):
    env, default, typ, _ = _OPTIONS[name]
    value = _config.getoption(name, default=None) if _config is not None else None
    if value is None and os.environ.get(env):
        raw = os.environ[env]
        value = raw not in ("0", "", "false", "False") if typ is bool else typ(raw)
    return default if value is None else value


# ---------------------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------------------

def _import_error(module: str) -> str | None:
    try:
        __import__(module)
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"{module} not importable ({type(exc).__name__}: {exc})".splitlines()[0]
    return None


def openvid():
    """``import openvid_kernels``, lazily; skips the test (with the reason) when it does not import."""
    try:
        import openvid_kernels  # noqa: PLC0415
    except Exception as exc:
        pytest.skip(f"openvid_kernels does not import: {type(exc).__name__}: {exc}".splitlines()[0])
    return openvid_kernels


def openvid_attr(name: str, *submodules: str):
    """``openvid_kernels.<name>``, else the first ``openvid_kernels.<submodule>.<name>``; skips when missing."""
    ok = openvid()
    if hasattr(ok, name):
        return getattr(ok, name)
    for sub in submodules:
        try:
            mod = __import__(f"openvid_kernels.{sub}", fromlist=[name])
        except Exception as exc:
            pytest.skip(f"openvid_kernels.{sub} does not import: {type(exc).__name__}: {exc}".splitlines()[0])
        if hasattr(mod, name):
            return getattr(mod, name)
    pytest.skip(f"openvid_kernels has no {name} yet")


def cuda_extension_built() -> bool | None:
    """Whether openvid_kernels' compiled extension is there; None when the package does not import."""
    try:
        import openvid_kernels  # noqa: PLC0415
    except Exception:
        return None
    probe = getattr(openvid_kernels, "cuda_extension_available", None)
    if probe is None:
        try:
            from openvid_kernels.backends import cuda_extension_available as probe  # noqa: PLC0415
        except Exception:
            return None
    try:
        return bool(probe())
    except Exception:
        return None


def _probe_eager() -> str | None:
    return None if device_available() else "needs CUDA"


def _probe_compile() -> str | None:
    if not hasattr(torch, "compile"):
        return "torch.compile missing"
    if device().type == "cuda":
        return _import_error("triton")  # inductor's GPU code is Triton
    return None


def _probe_ours_cuda() -> str | None:
    if device().type != "cuda":
        return "our CUDA extension needs CUDA tensors"
    built = cuda_extension_built()
    if built is None:
        return _import_error("openvid_kernels") or "openvid_kernels has no cuda_extension_available()"
    return None if built else "our CUDA extension (openvid_kernels._C) is not built"


def _probe_ours_triton() -> str | None:
    if smoke_mode() and os.environ.get("TRITON_INTERPRET") == "1":
        return _import_error("openvid_kernels")  # smoke test of the provider path in Triton's interpreter
    if device().type != "cuda":
        return "our Triton kernels need CUDA tensors (the interpreter is not for timing)"
    return _import_error("triton") or _import_error("openvid_kernels")


def _probe_cudnn() -> str | None:
    if device().type != "cuda":
        return "cuDNN needs CUDA"
    return None if torch.backends.cudnn.is_available() else "cuDNN not available to torch"


PROVIDER_PROBES: dict[str, Callable[[], str | None]] = {
    "eager": _probe_eager,
    "compile": _probe_compile,
    "ours-cuda": _probe_ours_cuda,
    "ours-triton": _probe_ours_triton,
    "cudnn": _probe_cudnn,
    "flash-attn": lambda: _import_error("flash_attn") if device().type == "cuda" else "flash-attn needs CUDA",
    "xformers": lambda: _import_error("xformers.ops") if device().type == "cuda" else "xformers needs CUDA",
}


def register_provider(name: str, probe: Callable[[], str | None], *, baseline: bool = True) -> None:
    """Add a provider: ``probe()`` returns None when usable, else the reason to skip.

    Baselines get a ``vs <name>`` speedup column in the tables (``report.py`` shows every non-``ours-*``
    provider that appears, this only fixes the order).
    """
    PROVIDER_PROBES[name] = probe
    if name not in PROVIDER_ORDER:
        PROVIDER_ORDER.append(name)
    if baseline and name not in BASELINE_ORDER:
        BASELINE_ORDER.append(name)


def require_provider(provider: str, *, case: str | None = None) -> None:
    """Skip the calling test (recording why) when the provider's backend is not usable here."""
    probe = PROVIDER_PROBES.get(provider)
    reason = f"unknown provider {provider!r}" if probe is None else probe()
    if reason:
        REGISTRY.skipped.append({"case": case, "provider": provider, "reason": reason})
        pytest.skip(f"{provider}: {reason}")


def compile_fn(fn: Callable, **kwargs) -> Callable:
    """``torch.compile(fn)`` with default settings, from a clean dynamo cache.

    The reset keeps an earlier test's shapes from turning on automatic dynamic shapes for this one (a user
    with one shape gets a static-shape graph). Donated buffers are turned off so a compiled graph's
    backward can run again with ``retain_graph=True``; they only reuse saved-tensor memory, not time.
    """
    torch._dynamo.reset()
    try:
        import torch._functorch.config as functorch_config  # noqa: PLC0415
        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
    except Exception:
        pass
    return torch.compile(fn, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Baselines shared by the attention suites
# ---------------------------------------------------------------------------------------------------------

# Back-ends of torch's scaled_dot_product_attention that take a boolean mask (FlashAttention takes none).
MASKED_SDPA_BACKENDS = ("cudnn", "efficient")


def masked_sdpa(q, k, v, key_mask, backend: str):
    """torch SDPA on ``[B, S, H, D]`` tensors with a boolean key mask ``[B, Sk]`` (True: attend) on one
    back-end ("cudnn", "efficient" or "math"): masked attention as users run it today. ``[B, Sq, H, D]``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    which = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "math": SDPBackend.MATH}[backend]
    with sdpa_kernel(which):
        out = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=key_mask[:, None, None, :])
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------
# Correctness sanity check (loose: catches garbage, not last-bit differences; tests/ does the real check)
# ---------------------------------------------------------------------------------------------------------

def check_close(actual, expected, what: str = "output") -> None:
    """Fail unless ``actual`` matches ``expected`` to within low-precision noise, statistically.

    Mean absolute error must be under 2% of the mean magnitude, and the worst element within 10% of the
    largest magnitude: bf16 rounding of differently ordered math stays far inside that, while a wrong row,
    a missing term or unwritten memory does not.
    """
    if option("bench_no_check"):
        return
    if isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected), f"{what}: {len(actual)} outputs, expected {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            check_close(a, e, f"{what}[{i}]")
        return
    if expected is None:
        assert actual is None, f"{what}: expected None"
        return
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    a, e = actual.detach().float(), expected.detach().float()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a - e).abs()
    mag = e.abs()
    mean_err, mean_mag = err.mean().item(), mag.mean().item()
    max_err, max_mag = err.max().item(), mag.max().item()
    assert mean_err <= 0.02 * mean_mag + 1e-6, f"{what}: mean |error| {mean_err:.4g} vs mean |value| {mean_mag:.4g}"
    assert max_err <= 0.1 * max_mag + 1e-6, f"{what}: max |error| {max_err:.4g} vs max |value| {max_mag:.4g}"


# ---------------------------------------------------------------------------------------------------------
# Registry of results and speedups
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Result:
    suite: str
    case: str
    provider: str
    median_s: float
    extra_info: dict = field(repr=False)


@dataclass
class Registry:
    results: list[Result] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, result: Result) -> None:
        self.results.append(result)
        self.update_speedups()

    def update_speedups(self) -> None:
        """For each case: ``speedup_vs_<p> = median(p) / median(this)`` for every other provider p."""
        by_case: dict[tuple[str, str], dict[str, Result]] = {}
        for r in self.results:
            by_case.setdefault((r.suite, r.case), {})[r.provider] = r
        for group in by_case.values():
            for r in group.values():
                for key in [k for k in r.extra_info if k.startswith("speedup_vs_")]:
                    del r.extra_info[key]
                for other in group.values():
                    if other is not r and r.median_s > 0:
                        r.extra_info[f"speedup_vs_{other.provider}"] = round(other.median_s / r.median_s, 4)

    def cases(self) -> list[tuple[str, str]]:
        seen: dict[tuple[str, str], None] = {}
        for r in self.results:
            seen.setdefault((r.suite, r.case), None)
        return list(seen)


REGISTRY = Registry()


def _provider_rank(provider: str) -> int:
    return PROVIDER_ORDER.index(provider) if provider in PROVIDER_ORDER else len(PROVIDER_ORDER)


def summary_lines() -> list[str]:
    """A compact plain-text table of this session's results, for the terminal."""
    if not REGISTRY.results:
        return []
    header = ("case", "provider", "median us", "TB/s", "TFLOP/s", "speedups")
    rows = []
    for suite, case in REGISTRY.cases():
        group = sorted((r for r in REGISTRY.results if (r.suite, r.case) == (suite, case)),
                       key=lambda r: _provider_rank(r.provider))
        for r in group:
            info = r.extra_info
            speedups = [
                f"{other.provider} {r.extra_info.get('speedup_vs_' + other.provider, float('nan')):.2f}x"
                for other in group if other is not r and not other.provider.startswith("ours-")
            ]
            rows.append((
                case, r.provider, f"{info['median_us']:.1f}",
                f"{info['tb_per_s']:.3f}" if info.get("tb_per_s") is not None else "-",
                f"{info['tflop_per_s']:.1f}" if info.get("tflop_per_s") is not None else "-",
                ", ".join(speedups) if speedups else "-",
            ))
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    fmt = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()  # noqa: E731
    lines = [fmt(header), fmt(tuple("-" * w for w in widths))] + [fmt(row) for row in rows]
    if smoke_mode():
        lines.insert(0, "CPU SMOKE MODE: these numbers exercise the harness and measure nothing.")
    for s in REGISTRY.skipped:
        lines.append(f"skipped: {s['provider']}" + (f" [{s['case']}]" if s.get("case") else "") + f": {s['reason']}")
    lines.extend(f"warning: {w}" for w in REGISTRY.warnings)
    return lines


# ---------------------------------------------------------------------------------------------------------
# The measurement
# ---------------------------------------------------------------------------------------------------------

def _suite_of(benchmark) -> str:
    fullname = getattr(benchmark, "fullname", "") or ""
    stem = Path(fullname.split("::")[0]).stem
    return stem[len("test_"):] if stem.startswith("test_") else (stem or "misc")


def _l2_bytes() -> int | None:
    if device().type != "cuda":
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(props, "L2_cache_size", None)


def _graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn``'s one call captured in a CUDA graph (after a warm call on the capture stream); returns replay."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def bench(
    benchmark,
    fn: Callable[[], Any],
    *,
    case: str,
    provider: str,
    bytes: int | None = None,  # noqa: A002  (the natural name for the argument)
    flops: int | None = None,
    suite: str | None = None,
    **extra: Any,
) -> Any:
    """Time ``fn()`` (one call of the op, no arguments) in GPU time through pytest-benchmark.

    Warms up, picks iterations per round and rounds, runs ``benchmark.pedantic`` with the device timer,
    fills ``benchmark.extra_info`` (case, provider, median_us, tb_per_s / tflop_per_s, speedups as other
    providers of the case finish) and registers the result. ``extra`` goes into ``extra_info`` as is
    (e.g. ``shape=..., dtype=...``). Returns the last result of ``fn``.
    """
    suite = suite or _suite_of(benchmark)
    timer = DEVICE_TIMER
    timer.reset()
    benchmark.group = case  # pytest-benchmark's own table groups by this
    info = benchmark.extra_info
    info.update(suite=suite, case=case, provider=provider, device=str(device()), **extra)
    if bytes is not None:
        info["bytes"] = int(bytes)
    if flops is not None:
        info["flops"] = int(flops)

    if getattr(benchmark, "disabled", False):  # --benchmark-disable: run once, as a test
        out = fn()
        _sync()
        return out

    # Warm-up: the first call compiles / autotunes; then warmup_s of calls for clocks and caches.
    out = fn()
    _sync()
    deadline = time.perf_counter() + option("bench_warmup_s")
    calls = 1
    while calls < 3 or time.perf_counter() < deadline:
        fn()
        calls += 1
    _sync()

    # Kernel time, not host time: replay one call captured in a CUDA graph, the same way for every provider.
    # Launched from Python, small ops are bound by per-call host overhead (dispatch, allocation, Triton's
    # launcher), which would hide the kernels' speed; --bench-no-graph measures that instead.
    info["launch"] = "python"
    if device().type == "cuda" and not option("bench_no_graph"):
        # Two tries: the first capture of an autograd backward in a process was once seen invalidated.
        for attempt in (1, 2):
            try:
                fn = _graphed(fn)
                info["launch"] = "cuda-graph replay"
                break
            except Exception as exc:  # e.g. an op that synchronizes: time it launched from Python
                torch.cuda.synchronize()
                if attempt == 2:
                    REGISTRY.warnings.append(f"{case} / {provider}: CUDA graph capture failed twice ({type(exc).__name__}: {str(exc).splitlines()[0]}); launched from Python")

    # Calibrate: time a few calls, pick iterations per round and rounds.
    probe_calls = 3
    per_call = max(time_calls(fn, probe_calls) / probe_calls, 1e-7)
    iterations = max(1, math.ceil(option("bench_round_ms") * 1e-3 / per_call))
    round_s = iterations * per_call
    rounds = math.ceil(option("bench_time") / round_s)
    rounds = int(min(max(rounds, option("bench_min_rounds")), option("bench_max_rounds")))

    # Hand pytest-benchmark our timer: the marker added by conftest already did (public route); the
    # private attribute covers a test run without our conftest hook. Then check it was really used.
    if hasattr(benchmark, "_timer") and benchmark._timer is not timer:
        benchmark._timer = timer
    warmup_rounds = 1
    timer.capture = []
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection mid-round would leave the GPU idle and count as device time
    try:
        result = benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=warmup_rounds)
        _sync()
    finally:
        if gc_was_enabled:
            gc.enable()
        captured, timer.capture = timer.capture, None

    expected_calls = 2 * (rounds + warmup_rounds)
    own = [(b - a) / iterations for a, b in zip(captured[0::2], captured[1::2])][warmup_rounds:]
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if len(captured) == expected_calls and stats is not None:
        median_s = float(stats.median)
        timing_source = f"pytest-benchmark ({timer.__name__})"
        if own and not math.isclose(median_s, statistics.median(own), rel_tol=1e-6, abs_tol=1e-12):
            REGISTRY.warnings.append(f"{case} / {provider}: pytest-benchmark median differs from the harness's")
    else:
        # pytest-benchmark did not use our timer (or keeps no stats where we look): its numbers are host
        # time. Time the same rounds here and report those instead.
        own = []
        for _ in range(rounds):
            own.append(time_calls(fn, iterations) / iterations)
        median_s = statistics.median(own)
        timing_source = f"harness fallback ({timer.__name__}); pytest-benchmark's stats are NOT device time"
        REGISTRY.warnings.append(f"{case} / {provider}: timer not injected into pytest-benchmark; used {timing_source}")

    info.update(
        median_us=round(median_s * 1e6, 3),
        iterations=iterations,
        rounds=rounds,
        timing_source=timing_source,
    )
    if own:
        q = statistics.quantiles(own, n=4) if len(own) >= 2 else [own[0]] * 3
        info["iqr_us"] = round((q[2] - q[0]) * 1e6, 3)
    info["tb_per_s"] = round(bytes / median_s / 1e12, 4) if bytes else None
    info["tflop_per_s"] = round(flops / median_s / 1e12, 3) if flops else None
    l2 = _l2_bytes()
    if bytes and l2 and bytes < 3 * l2:
        info["l2_warning"] = f"working set {bytes / 1e6:.0f} MB < 3x L2 ({l2 / 1e6:.0f} MB): may be cache-resident"
    if smoke_mode():
        info["smoke"] = True
    REGISTRY.add(Result(suite=suite, case=case, provider=provider, median_s=median_s, extra_info=info))
    return result if result is not None else out


# ---------------------------------------------------------------------------------------------------------
# Environment, for the JSON's machine_info and the report
# ---------------------------------------------------------------------------------------------------------

def _run(cmd: list[str]) -> str | None:
    try:
        res = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
    except Exception:
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def source_hash() -> str:
    """A short hash of the kernel sources, to tell builds apart where the checkout has no git history."""
    h = hashlib.sha256()
    roots = [REPO_ROOT / "openvid_kernels", REPO_ROOT / "csrc"]
    files = [p for r in roots if r.exists() for p in r.rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.suffix in {".py", ".cu", ".cuh", ".cpp", ".h", ".hpp"}]
    files += [p for p in (REPO_ROOT / "setup.py", REPO_ROOT / "pyproject.toml") if p.is_file()]
    for p in sorted(files):
        h.update(str(p.relative_to(REPO_ROOT)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def git_info() -> dict:
    commit = os.environ.get("OPENVID_GIT_COMMIT") or _run(["git", "rev-parse", "--verify", "-q", "HEAD"])
    dirty = None
    if commit and not os.environ.get("OPENVID_GIT_COMMIT"):
        status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
        dirty = bool(status) if status is not None else None
    return {"commit": commit or "unknown", "dirty": dirty}


def environment_info() -> dict:
    """GPU, software versions, extension state and source revision. Safe to call without a GPU."""
    info: dict[str, Any] = {
        "bench_device": "cpu (smoke mode: not a measurement)" if smoke_mode() else "cuda",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None,
        "triton": None,
    }
    try:
        import triton  # noqa: PLC0415
        info["triton"] = triton.__version__
    except Exception:
        pass
    try:
        import pytest_benchmark  # noqa: PLC0415
        info["pytest_benchmark"] = getattr(pytest_benchmark, "__version__", None)
    except Exception:
        pass
    try:
        if torch.backends.cudnn.is_available():
            info["cudnn"] = torch.backends.cudnn.version()
    except Exception:
        pass
    if torch.cuda.is_available():
        try:
            idx = torch.cuda.current_device()
            props = torch.cuda.get_device_properties(idx)
            info.update(
                gpu=props.name,
                sm_count=props.multi_processor_count,
                compute_capability=f"{props.major}.{props.minor}",
                gpu_memory_gib=round(props.total_memory / 2**30, 1),
                l2_cache_mb=round(getattr(props, "L2_cache_size", 0) / 1e6, 1) or None,
            )
        except Exception as exc:
            info["gpu_error"] = f"{type(exc).__name__}: {exc}"
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        if driver:
            info["driver"] = driver.splitlines()[0]
    info["cuda_extension_built"] = cuda_extension_built()
    info.update({f"git_{k}": v for k, v in git_info().items()})
    try:
        info["source_hash"] = source_hash()
    except Exception:
        info["source_hash"] = None
    return info


def format_exception(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()
