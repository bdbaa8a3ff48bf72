"""Multi-process runs on one machine: 2 JAX processes × 2 CPU devices, joined by the explicit-coordinator
launch (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) on a free port, run a tiny Fig. 2
sweep through the script's own main and are compared with 1 process × 4 devices: the same rows, files
from process 0 only, disjoint recorded shards of every batch, exact resume after both processes die
after a checkpoint, and a dead or silent process ends the other with one line.

Each process runs DRIVER: the script's main under run_cli as `__main__` does, with RunOptions fields
that have no flag (record_batches, ckpt_dir cadence) and test-only faults set from a JSON argument.
"""

import collections
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import common

ROOT = Path(__file__).resolve().parents[1]
NAME = "fig2_gp_relu_gelu"

DRIVER = """
import dataclasses, json, os, signal, sys
import common, tools, fig2_gp_relu_gelu as fig
extra = json.loads(sys.argv[1])
tools.PEER_TIMEOUT_S = extra.pop("peer_timeout_s", tools.PEER_TIMEOUT_S)
common.ASK_EVERY = extra.pop("ask_every", common.ASK_EVERY)
die = extra.pop("die_after_save", None)
resolve = common.resolve
common.resolve = lambda *a, **k: (lambda b, o: (b, dataclasses.replace(o, **extra)))(*resolve(*a, **k))
if die is not None:  # a kill right after the collective save of step `die`, on every process
    save = common._checkpoint
    def checkpoint(run):
        save(run)
        if run.step == die:
            os.kill(os.getpid(), signal.SIGKILL)
    common._checkpoint = checkpoint
def agree():  # the save decision where the processes' clocks disagree (test_save_decision_...)
    import jax, numpy as np
    i, n = jax.process_index(), jax.process_count()
    ask = lambda step, due: (n == 1 or step % 100 == 0) and common._agree(
        common.save_due(step, 400.0 if due else 1.0, 300.0, n))
    print("agree", json.dumps([n, ask(100, i == 1), ask(200, i == 0), ask(300, True), ask(7, True),
                               common._broadcast(np.array([i, 1 - i], np.int32)).tolist()]), flush=True)
check = extra.pop("agree", False)
common.run_cli(lambda: (check and agree(), fig.main(sys.argv[2:])))
"""

# A tiny sweep: 2 ρ values, 1 seed, 4 steps per epoch of 64 images (32 per process, 16 per device).
TINY = ["--model", "mlp16", "--train-subset", "256", "--test-subset", "500", "--batch-size", "64", "--epochs", "2",
        "--seeds", "1", "--rhos", "0", "0.1", "--activations", "relu", "--out", "out"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Job:
    """`procs` processes of DRIVER with 4 / procs CPU devices each, process i in folder <root>/p<i>
    (so a file process 1 writes is seen), logs in <root>/log<i>."""

    def __init__(self, root: Path, argv, procs: int, cache: Path, **opts):
        port = free_port()
        flags = [l for l in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in l]
        env = os.environ | {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags),
                            "JAX_NUM_CPU_DEVICES": str(4 // procs)}
        self.root, self.procs, self.started = root, [], time.monotonic()
        for i in range(procs):
            cwd = root / f"p{i}"
            cwd.mkdir(parents=True, exist_ok=True)
            launch = {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": str(procs),
                      "JAX_PROCESS_ID": str(i)} if procs > 1 else {}
            with open(root / f"log{i}", "w") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-c", DRIVER, json.dumps(opts), *argv, "--compile-cache", str(cache)],
                    cwd=cwd, env=env | launch, stdout=log, stderr=subprocess.STDOUT))

    def wait(self, timeout=240.0) -> list[int]:
        try:
            return [p.wait(max(1.0, timeout - (time.monotonic() - self.started))) for p in self.procs]
        finally:
            self.kill()

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def log(self, i) -> str:
        return (self.root / f"log{i}").read_text()

    def rows(self) -> list[dict]:
        with open(self.root / "p0" / "out" / f"{NAME}.csv", newline="") as f:
            return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One compile cache for the module's jobs: a rerun compiles nothing."""
    return tmp_path_factory.mktemp("jax-cache")


def _same_rows(a: list[dict], b: list[dict]):
    key = lambda r: r["rho"]  # noqa: E731
    assert sorted(map(key, a)) == sorted(map(key, b)) and len(a) == 2
    for r, s in zip(sorted(a, key=key), sorted(b, key=key)):
        for c in ("test_accuracy", "train_accuracy", "steps", "diverged"):
            assert r[c] == s[c], (c, r, s)
        # Losses: means of float32 losses whose all-reduce runs in another order (gloo across processes,
        # XLA within one): equal to float32 rounding over a few dozen steps.
        for c in ("test_loss", "train_loss"):
            assert float(r[c]) == pytest.approx(float(s[c]), rel=1e-5), (c, r, s)


def _batches(folder: Path) -> dict:
    """{(run, process): {step: [example digests]}} from RunOptions.record_batches files."""
    out = {}
    for f in folder.glob("*.txt"):
        run, proc = f.stem.split(".")
        out[run, int(proc)] = {int(l.split()[0]): l.split()[1:] for l in f.read_text().splitlines()}
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """The TINY sweep run by 2 processes × 2 devices and by 1 process × 4 devices, at once."""
    root = tmp_path_factory.mktemp("reference")
    two = Job(root / "two", TINY, 2, cache, record_batches=str(root / "rec2"), agree=True)
    one = Job(root / "one", TINY, 1, cache, record_batches=str(root / "rec1"))
    assert two.wait() == [0, 0], two.log(0)[-3000:] + two.log(1)[-3000:]
    assert one.wait() == [0], one.log(0)[-3000:]
    return root, two, one


@pytest.mark.slow
def test_two_processes_equal_one(reference):
    """2 processes × 2 devices against 1 × 4: the same rows (test accuracy to the last digit); process 0
    alone writes CSV, PNG, verdicts and config; each process loaded a disjoint half of every global
    batch, as recorded by each process."""
    root, two, one = reference
    files = {f"{NAME}.{x}" for x in ("csv", "png", "verdict.csv", "config.json")}
    assert {p.name for p in (root / "two" / "p0" / "out").iterdir()} == files
    assert list((root / "two" / "p1").rglob("*")) == []  # process 1 wrote nothing, not even a folder
    assert json.loads((root / "two" / "p0" / "out" / f"{NAME}.config.json").read_text())["calls"][0]["devices"] == 4

    shards, whole = _batches(root / "rec2"), _batches(root / "rec1")
    runs = {r for r, _ in whole}
    assert len(runs) == 2 and set(shards) == {(r, p) for r in runs for p in (0, 1)}
    for run in runs:
        assert sorted(whole[run, 0]) == list(range(8))
        for step, batch in whole[run, 0].items():
            a, b = (collections.Counter(shards[run, p][step]) for p in (0, 1))
            assert sum(a.values()) == sum(b.values()) == 32 and not a & b, (run, step)
            assert a + b == collections.Counter(batch), (run, step)
    _same_rows(two.rows(), one.rows())


@pytest.mark.slow
def test_killed_after_a_checkpoint_the_rerun_is_exact(tmp_path, cache, reference):
    """Both processes die right after Orbax's collective save at step 4 of the first run (the save
    decision is process 0's, broadcast every ASK_EVERY steps: 4 here); the same command resumes there
    and ends with the rows of the uninterrupted 2-process run, to the last digit."""
    ckpt = str(tmp_path / "ckpt")
    argv = TINY + ["--ckpt-dir", ckpt]
    killed = Job(tmp_path, argv, 2, cache, ckpt_every_s=0.0, ask_every=4, die_after_save=4)
    # Each kills itself after the save returns; the one that is slower may first see its peer gone
    # and stop with our one line (exit 1). The checkpoint is whole either way: the rerun checks it.
    codes = killed.wait()
    assert -signal.SIGKILL in codes and set(codes) <= {-signal.SIGKILL, 1}, (
        codes, killed.log(0)[-3000:] + killed.log(1)[-3000:])
    assert not (tmp_path / "p0" / "out" / f"{NAME}.csv").exists()
    (saved,) = Path(ckpt).iterdir()
    assert [p.name for p in saved.iterdir() if p.name.isdigit()] == ["4"]
    again = Job(tmp_path, argv, 2, cache, ckpt_every_s=1e9, ask_every=4, record_batches=str(tmp_path / "rec"))
    assert again.wait() == [0, 0], again.log(0)[-3000:] + again.log(1)[-3000:]
    assert "2 of 2 runs to do" in again.log(0)
    first = {int(f.read_text().split()[0]) for f in (tmp_path / "rec").glob(f"{saved.name}.*.txt")}
    assert first == {4}  # both processes resumed the killed run at its checkpoint
    key = lambda r: r["rho"]  # noqa: E731
    for got, want in zip(sorted(again.rows(), key=key), sorted(reference[1].rows(), key=key), strict=True):
        for c in ("test_accuracy", "train_accuracy", "test_loss", "train_loss", "steps"):
            assert got[c] == want[c], (c, got, want)


@pytest.mark.slow
def test_a_dead_or_silent_process_ends_the_other_with_one_line(tmp_path, cache):
    """SIGKILL one process mid-run (process 1 in one job; process 0, which hosts the coordinator, in
    another), or SIGSTOP process 1 (a host gone silent: its connections stay open and no collective
    fails): the other exits non-zero within 2 minutes, its last output one line naming what happened (a
    failed collective, or the watchdog's dead or silent peer), no traceback. Process 0 killed: process 1
    races JAX's client, which may abort (its own F-line and a C++ stack trace) as the coordinator's socket
    closes; whichever comes first, no Python traceback."""
    argv = [("250" if f == "--epochs" else a) for f, a in zip([""] + TINY, TINY)]  # 1000 steps
    cases = {("kill", 1): signal.SIGKILL, ("kill", 0): signal.SIGKILL, ("stop", 1): signal.SIGSTOP}
    jobs = {case: Job(tmp_path / f"{case[0]}{case[1]}", argv, 2, cache,
                      record_batches=str(tmp_path / f"rec{case[0]}{case[1]}"), peer_timeout_s=10.0) for case in cases}
    try:
        for (how, victim), job in jobs.items():
            rec = tmp_path / f"rec{how}{victim}"
            while not any(len(f.read_text().splitlines()) > 3 for f in rec.glob("*.txt")):
                assert all(p.poll() is None for p in job.procs) and time.monotonic() - job.started < 240, job.log(0)
                time.sleep(0.5)
            job.procs[victim].send_signal(cases[how, victim])
            job.killed = time.monotonic()
        for (how, victim), job in jobs.items():
            survivor = job.procs[1 - victim]
            rc = survivor.wait(timeout=max(1.0, 120 - (time.monotonic() - job.killed)))
            took = time.monotonic() - job.killed
            out = job.log(1 - victim)
            last = out.strip().splitlines()[-1]
            assert rc not in (0, None) and took < 120, (rc, took)
            assert "Traceback" not in out, out[-3000:]
            want = ("JAX process 1 of 2 stopped \\(no sign of life" if how == "stop" else
                    "another process probably died|JAX process 1 of 2 stopped|lost the JAX coordinator")
            ours = re.match(rf"error: process {1 - victim}: .*({want})", last)
            if victim == 1 or "Terminating process because the JAX distributed service" not in out:
                assert ours and "Check failure" not in out, out[-3000:]
            print(f"process {1 - victim} ended {took:.0f} s after process {victim} got {cases[how, victim].name} "
                  f"(rc {rc}): {last if ours else 'JAX abort'}")
    finally:
        for job in jobs.values():
            for p in job.procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGCONT)
            job.kill()


@pytest.mark.slow
def test_save_decision_is_the_same_on_every_process(reference):
    """Two processes whose clocks disagree on whether a checkpoint is due both follow process 0; steps
    that are not multiples of 100 never ask. (Run by the reference job before its sweep.)"""
    _, two, _ = reference
    got = [json.loads(next(l for l in two.log(i).splitlines() if l.startswith("agree "))[6:]) for i in (0, 1)]
    assert got == [[2, False, True, True, False, [0, 1]]] * 2


@pytest.mark.parametrize("env,flag", [
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID: unset"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     "JAX_COORDINATOR_ADDRESS='localhost'"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two'"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     r"JAX_PROCESS_ID='2': expected an integer in 0\.\.1"),
])
def test_bad_launch_variables_are_one_line(env, flag, monkeypatch, capsys):
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        common.run_cli(lambda: pytest.fail("main ran"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and re.match(f"error: {flag}", err), err


def test_the_watchdog_reports_a_closed_connection_at_its_next_beat(monkeypatch):
    """A peer whose connection closes (a killed process: the kernel closes its sockets) is reported at the
    watchdog's next beat, not left to the silence timeout, and the beat reads a live peer's bytes as a sign
    of life. No JAX: the watchdog's loop on a socket pair."""
    import threading

    import tools

    monkeypatch.setattr(tools, "PEER_BEAT_S", 0.05)
    mine, theirs = socket.socketpair()
    dog = object.__new__(tools.Watchdog)
    dog.me, dog.n, dog.peers, dog.stop = 0, 2, {mine: 1}, threading.Event()
    dead = []
    dog._dead = lambda p, why: dead.append((p, why))
    thread = threading.Thread(target=dog._loop, daemon=True)
    thread.start()
    theirs.sendall(b"...")
    time.sleep(0.3)
    assert not dead and thread.is_alive()
    theirs.shutdown(socket.SHUT_WR)  # end of stream, as a process's exit sends it (a close with unread beats would reset)
    thread.join(timeout=5)
    assert not thread.is_alive() and dead == [(1, "its connection closed")]
