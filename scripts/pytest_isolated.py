#!/usr/bin/env python3
"""Run pytest so that a test that faults the GPU, crashes the process or hangs costs only
itself: the first run of the CUDA kernels on a GPU (scripts/gpu_check.sh).

Without this, one CUDA kernel that faults (illegal address) leaves the process's CUDA
context unusable, and every later CUDA test fails with the same error; one that hangs
blocks until the outside time limit, and the tests after it never run.

Usage::

    python scripts/pytest_isolated.py [--test-timeout S] [--junitxml PATH] [--summary PATH]
                                      [--max-rounds N] [--journal PATH] -- PYTEST_ARGS...

It runs ``python -m pytest -p pytest_isolated PYTEST_ARGS`` in rounds. The plugin (this
module, loaded by pytest) writes a journal line when each test starts and ends, ends the
process after a test that lost the CUDA context (exit status 75), and arms a watchdog per
test (``--test-timeout``, default 300 s; 0: none) that writes the stuck test's traceback to
``<journal>.hang.txt`` and ends the process. After a round that did not finish, the next
round deselects every test the journal has seen end and goes on; a test that started and
never ended is recorded as ``crashed`` or ``hung`` (it ran for the whole timeout). Every
round uses the same ``VOS_TEST_SEED`` (the one given, else a fresh one), so the random
inputs of a test are those of an uninterrupted run. ``--junitxml PATH`` gives round k
``PATH`` with ``-rk`` before the suffix (round 1: ``PATH`` itself).

At the end it prints (and writes to ``--summary``) a markdown summary: counts per outcome
and every test that did not pass or skip, with why. Exit status: 0 if every round ended
normally and no test failed, errored, crashed, hung or lost the context; 1 otherwise; 130
when interrupted.
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

JOURNAL_ENV = "VOS_PYTEST_JOURNAL"
TIMEOUT_ENV = "VOS_PYTEST_TEST_TIMEOUT"
_BAD = ("failed", "error", "crashed", "hung", "lost-context", "interrupted")
_ORDER = ("passed", "skipped", "xfailed", "xpassed", *_BAD)


# ------------------------------------------------------------------ the pytest plugin
def _journal_write(path: str, *fields: str) -> None:
    # one short line per event, flushed at once: the process may end the next moment
    with open(path, "a") as f:
        f.write("\t".join(x.replace("\t", " ").replace("\n", " ") for x in fields) + "\n")


def _read_journal(path: str | os.PathLike) -> tuple[dict[str, float], dict[str, tuple[str, str]]]:
    """(start time per test that has no end yet, (outcome, detail) per ended test)."""
    started: dict[str, float] = {}
    ended: dict[str, tuple[str, str]] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return started, ended
    for line in lines:
        kind, _, rest = line.partition("\t")
        nodeid, _, detail = rest.partition("\t")
        if kind == "start":
            started[nodeid] = float(detail or 0)
        elif kind == "end":
            started.pop(nodeid, None)
            outcome, _, why = detail.partition("\t")
            ended[nodeid] = (outcome, why)
        elif kind == "lost":  # written after the test's "end"
            ended[nodeid] = ("lost-context", detail)
    return started, ended


if os.environ.get(JOURNAL_ENV):
    import pytest

    _outcomes: dict[str, str] = {}

    def pytest_collection_modifyitems(session, config, items):
        _, ended = _read_journal(os.environ[JOURNAL_ENV])
        if not ended:
            return
        done = [it for it in items if it.nodeid in ended]
        if done:
            items[:] = [it for it in items if it.nodeid not in ended]
            config.hook.pytest_deselected(items=done)

    def pytest_runtest_logreport(report):
        if report.skipped:
            now = "xfailed" if hasattr(report, "wasxfail") else "skipped"
        elif report.failed:
            now = "failed" if report.when == "call" else "error"
        elif report.when == "call":
            now = "xpassed" if hasattr(report, "wasxfail") else "passed"
        else:
            return
        before = _outcomes.get(report.nodeid)
        if before is None or _ORDER.index(now) > _ORDER.index(before):
            _outcomes[report.nodeid] = now

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        # imported here, not at load: vos_kernels must come after conftest.py (TRITON_INTERPRET)
        from vos_kernels import _device_guard as guard

        journal = os.environ[JOURNAL_ENV]
        seconds = float(os.environ.get(TIMEOUT_ENV) or 0)
        _journal_write(journal, "start", item.nodeid, f"{time.time():.3f}")
        # the watchdog's file holds only the running test's header (and its stacks if it hangs)
        with open(journal + ".watchdog.txt", "w") as hang:
            hang.write(f"== {item.nodeid}: still running after {seconds:g} s; the stacks:\n")
            hang.flush()
            with guard.watchdog(seconds, hang):
                yield
        _journal_write(journal, "end", item.nodeid, _outcomes.get(item.nodeid, "passed"))
        lost = guard.cuda_context_lost()
        if lost:
            _journal_write(journal, "lost", item.nodeid, lost)
            pytest.exit(f"the CUDA context is lost after {item.nodeid} ({lost}); "
                        "scripts/pytest_isolated.py goes on in a fresh process", returncode=guard.CONTEXT_LOST_EXIT)


# ------------------------------------------------------------------------- the runner
def _round_path(path: str, k: int) -> str:
    if k == 1:
        return path
    stem, dot, suffix = path.rpartition(".")
    return f"{stem}-r{k}.{suffix}" if dot and "/" not in suffix else f"{path}-r{k}"


def summarize(ended: dict[str, tuple[str, str]], rounds: list[str], finished: bool) -> tuple[str, bool]:
    """The markdown summary, and whether the last round ended normally (``finished``) and
    every test passed or skipped."""
    counts: dict[str, int] = {}
    for outcome, _ in ended.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    bad = sorted((nodeid, o, why) for nodeid, (o, why) in ended.items() if o in _BAD)
    lines = ["# pytest, isolated rounds", "",
             "Outcomes: " + (", ".join(f"{counts[o]} {o}" for o in _ORDER if o in counts) or "no test ran") + ".",
             "", "Rounds: " + "; ".join(rounds) + "."]
    if bad:
        lines += ["", "| test | outcome | detail |", "| --- | --- | --- |"]
        lines += [f"| `{n}` | {o} | {why.replace('|', '/')} |" for n, o, why in bad]
    ok = finished and not bad
    return "\n".join(lines) + "\n", ok


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, pytest_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="scripts/pytest_isolated.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--test-timeout", type=float, default=300.0,
                   help="seconds one test may run before it is recorded as hung and its process ended (0: no limit)")
    p.add_argument("--junitxml", metavar="PATH", help="JUnit XML of round 1; round k writes PATH-rk")
    p.add_argument("--summary", metavar="PATH", help="also write the markdown summary here")
    p.add_argument("--max-rounds", type=int, default=50, help="at most this many pytest processes (default 50)")
    p.add_argument("--journal", metavar="PATH", help="journal file (default: a fresh file in /tmp)")
    args = p.parse_args(argv)

    journal = args.journal or f"/tmp/pytest_isolated.{os.getpid()}.{int(time.time())}.journal"
    for f in (journal, journal + ".hang.txt", journal + ".watchdog.txt"):
        Path(f).unlink(missing_ok=True)
    env = dict(os.environ)
    env[JOURNAL_ENV] = journal
    env[TIMEOUT_ENV] = str(args.test_timeout)
    env.setdefault("VOS_TEST_SEED", str(random.randrange(2**31)))
    here = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    print(f"pytest_isolated: VOS_TEST_SEED={env['VOS_TEST_SEED']}, per-test limit {args.test_timeout:g} s, "
          f"journal {journal}", flush=True)

    rounds: list[str] = []
    interrupted = finished = False
    ended: dict[str, tuple[str, str]] = {}
    for k in range(1, args.max_rounds + 1):
        cmd = [sys.executable, "-m", "pytest", "-p", "pytest_isolated", *pytest_args]
        if args.junitxml:
            cmd.append(f"--junitxml={_round_path(args.junitxml, k)}")
        ended_before = ended
        print(f"\n== pytest_isolated round {k}: {len(ended_before)} test(s) done before it", flush=True)
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            interrupted = True
            try:
                rc = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        t1 = time.time()
        unended, ended = _read_journal(journal)
        for nodeid, t_start in unended.items():
            hung = args.test_timeout > 0 and t1 - t_start >= args.test_timeout - 1
            outcome = "hung" if hung and not interrupted else ("interrupted" if interrupted else "crashed")
            why = (f"still running after {args.test_timeout:g} s (stacks in {journal}.hang.txt)" if outcome == "hung"
                   else "the pytest process ended " + (f"by signal {-rc}" if rc < 0 else f"with status {rc}")
                   + " inside this test")
            _journal_write(journal, "end", nodeid, outcome, why)
            ended[nodeid] = (outcome, why)
            print(f"pytest_isolated: {nodeid}: {outcome}: {why}", flush=True)
        dump = Path(journal + ".watchdog.txt")
        text = dump.read_text() if unended and dump.exists() else ""
        if len(text.splitlines()) > 1:  # more than the header: the watchdog's stacks
            with open(journal + ".hang.txt", "a") as f:
                f.write(text + "\n")
            print(text, flush=True)
        progress = len(ended) - len(ended_before)
        if interrupted:
            rounds.append(f"{k}: interrupted")
            break
        if rc == 5 and not progress:
            rounds.append(f"{k}: nothing left")
            finished = True
            break
        if rc in (0, 1) and not any(ended[n][0] in ("crashed", "hung") for n in set(ended) - set(ended_before)):
            rounds.append(f"{k}: finished ({progress} test(s), {t1 - t0:.0f} s)")
            finished = True
            break
        if rc == 75:
            rounds.append(f"{k}: CUDA context lost, {progress} test(s)")
        elif rc in (2, 3, 4) and not progress:
            rounds.append(f"{k}: pytest exit {rc} (usage, collection or internal error; see above)")
            break
        else:
            rounds.append(f"{k}: process ended with status {rc}, {progress} test(s)")
        if not progress:
            rounds.append("no progress: stopped")
            break
    else:
        rounds.append(f"stopped after --max-rounds {args.max_rounds}")

    Path(journal + ".watchdog.txt").unlink(missing_ok=True)
    text, ok = summarize(ended, rounds, finished)
    print("\n" + text, flush=True)
    if args.summary:
        Path(args.summary).write_text(text)
    if interrupted:
        return 130
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
