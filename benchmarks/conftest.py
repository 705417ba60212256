"""pytest wiring of the benchmark harness (see harness.py for how timing works).

* registers the ``--bench-*`` options;
* gives every benchmark item the device timer through ``@pytest.mark.benchmark(timer=...)``;
* at session end, before pytest-benchmark writes its JSON, brings every result's ``speedup_vs_<provider>``
  up to date; adds GPU, versions, extension state and git commit to the JSON's ``machine_info``; lists the
  skipped providers in the JSON; prints a compact table of the results.

Nothing here touches the GPU at import or collection: suites collect and skip on a CPU-only machine.
"""

from __future__ import annotations

import os
import sys

import pytest

# Make `import harness` work from the suites under any --import-mode (importlib mode leaves sys.path alone).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def pytest_addoption(parser):
    harness.add_options(parser)


def pytest_configure(config):
    harness.configure(config)


def _in_bench_dir(item) -> bool:
    path = str(getattr(item, "path", None) or getattr(item, "fspath", ""))
    return os.path.abspath(path).startswith(_BENCH_DIR + os.sep)


def pytest_collection_modifyitems(config, items):
    """Every benchmark item here times with the device timer (public pytest-benchmark marker API).

    pytest-benchmark reads only the closest ``benchmark`` marker, so a suite's own marker (e.g. with a
    group) is merged with the timer rather than shadowing it.
    """
    for item in items:
        if "benchmark" not in getattr(item, "fixturenames", ()) or not _in_bench_dir(item):
            continue
        existing = item.get_closest_marker("benchmark")
        kwargs = dict(existing.kwargs) if existing else {}
        if "timer" not in kwargs:
            kwargs["timer"] = harness.DEVICE_TIMER
            item.add_marker(pytest.mark.benchmark(**kwargs), append=False)


# pytest-benchmark writes its JSON from a *hookwrapper* of pytest_sessionfinish, before its `yield`, so a
# plain (even tryfirst) implementation would run after the JSON is written. Ours is a hookwrapper too, and
# tryfirst makes it the outer one: its code before `yield` runs before pytest-benchmark's.
@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    harness.REGISTRY.update_speedups()
    yield


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["openvid"] = harness.environment_info()


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    # Speedups are already in each benchmark's extra_info (the same dict objects); record what was skipped
    # and how, so a report can say which providers are missing and why.
    output_json["openvid"] = {
        "skipped": list(harness.REGISTRY.skipped),
        "warnings": list(harness.REGISTRY.warnings),
        "smoke_mode": harness.smoke_mode(),
    }


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = harness.summary_lines()
    if not lines:
        return
    terminalreporter.write_sep("=", "openvid benchmark summary (GPU time, median per call)")
    for line in lines:
        terminalreporter.write_line(line)
