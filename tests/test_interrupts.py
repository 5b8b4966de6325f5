"""Interrupts and one writer per output: Ctrl-C and SIGTERM end every command with one line and exit
130/143, keep a loadable checkpoint to --resume from and leave no DataLoader worker behind; a second writer
on a busy output is refused with one line naming the first, a dead writer's lock is taken over."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from image_folders import make_shapes

import vggkit
from vggkit.cli import main
from vggkit.utils.lock import LOCK_NAME, Holder, OutputBusyError, OutputLock, deferred_interrupts
from vggkit.weights.checkpoint import read_training_state
from vggkit.weights.factory import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.num_classes=3", "model.width=0.0625", "data.crop=32", "data.scale=36", "data.val_scale=36",
        "optim.batch_size=8", "schedule.epochs=500", "run.precision='fp32'", "run.device='cpu'",
        "run.checkpoint_every=2"]  # 3 steps an epoch, far more epochs than the test waits for


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    from test_train import write_split

    root = tmp_path_factory.mktemp("imagenet")
    write_split(root / "train", 8, seed=1)
    write_split(root / "val", 3, seed=2)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 2-class vgg11 checkpoint at width 1/16 and a class-folder set of 32 px shapes."""
    root = tmp_path_factory.mktemp("tiny")
    model = vggkit.create_model("vgg11", num_classes=2, width=1 / 16)
    model.class_names = ["circle", "square"]
    save_checkpoint(model, root / "model.pth")
    make_shapes(root / "shapes", per_class=3, size=32)
    return root


def train_command(data: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vggkit.cli", "train", "--recipe", "A", "--data", str(data), "--output",
            str(output), *[arg for item in TINY for arg in ("--set", item)], *extra]


def start(command: list[str], **options) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            **options)


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"exited {process.returncode} first: {process.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def process_table() -> dict[int, tuple[int, str, int]]:
    """pid -> (parent pid, state, start time) of every process, from /proc (no psutil)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry)] = (int(fields[1]), fields[0], int(fields[19]))
    return table


def descendants(pid: int) -> dict[int, int]:
    """pid -> start time of every process below ``pid`` (DataLoader workers, their pin/forkserver helpers)."""
    table, found, todo = process_table(), {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, _, started) in table.items():
            if ppid == parent and child not in found:
                found[child] = started
                todo.append(child)
    return found


def still_running(processes: dict[int, int], timeout: float = 15) -> list[int]:
    """Those of ``processes`` alive (not zombies, same start time) after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        table = process_table()
        alive = [pid for pid, started in processes.items()
                 if pid in table and table[pid][1] != "Z" and table[pid][2] == started]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def assert_interrupted(done: subprocess.Popen, stderr: str, code: int, start: str) -> str:
    """Exit ``code``, no traceback, and one last stderr line beginning with ``start`` after nothing but the
    run's own output (its announce line, epoch lines and progress bars). Returns that line."""
    assert done.returncode == code, (done.returncode, stderr[-3000:])
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1].startswith(start), lines[-3:]
    progress = ("vggkit train: A, S = ", "epoch ")
    assert all(line.startswith(progress) for line in lines[:-1]), [l for l in lines[:-1] if not l.startswith(progress)]
    return lines[-1]


# --------------------------------------------------------------------------- the real CLI, really signalled


def test_ctrl_c_on_train_keeps_a_checkpoint_to_resume_and_no_worker(imagenet, tmp_path, capsys):
    output = tmp_path / "run"
    # Its own session, signalled as a group: what a terminal's Ctrl-C does (the workers get SIGINT too).
    run = start(train_command(imagenet, output, "--workers", "2"), start_new_session=True)
    wait_for(lambda: (output / "last.pt").is_file(), run)
    workers = descendants(run.pid)
    assert len(workers) >= 2, workers  # persistent DataLoader workers are up
    os.killpg(run.pid, signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    line = assert_interrupted(run, stderr, 130, "vggkit train: interrupted at epoch ")
    assert f"; last checkpoint {output / 'last.pt'} (epoch " in line and line.endswith("; continue with --resume")
    assert not still_running(workers)
    assert not (output / LOCK_NAME).exists() and not list(output.glob(".*.tmp*"))
    state = read_training_state(output / "last.pt")
    epoch, step = state["epoch"], state["step"]
    assert f"(epoch {epoch + 1} step {step})" in line
    # --resume continues from it (and, a normal run, leaves no lock either; no stale lock was taken over).
    capsys.readouterr()
    assert main(["train", "--resume", "--data", str(imagenet), "--output", str(output), "--stop-after-steps", "1",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"resuming at epoch {epoch + 1}, step {step}" in err and "warning" not in err, err
    assert read_training_state(output / "last.pt")["global_step"] == state["global_step"] + 1
    assert not (output / LOCK_NAME).exists()


def test_two_trains_on_one_output_one_refused_then_sigterm_ends_the_other(imagenet, tmp_path):
    output = tmp_path / "run"
    racers = [start(train_command(imagenet, output, "--workers", "1", "--no-progress")) for _ in range(2)]
    deadline = time.monotonic() + 120
    while all(r.poll() is None for r in racers):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    loser = next(r for r in racers if r.poll() is not None)
    winner = racers[1 - racers.index(loser)]
    _, refused = loser.communicate()
    assert loser.returncode == 2, refused[-3000:]
    assert refused.count("\n") == 1 and "Traceback" not in refused, refused  # refused before any work
    assert refused.startswith(f"vggkit train: error: The output folder {output} is in use by process {winner.pid} "
                              f"on this machine (`python") and "-m vggkit.cli train --recipe A" in refused, refused

    wait_for(lambda: (output / "last.pt").is_file(), winner)
    workers = descendants(winner.pid)
    assert workers
    winner.send_signal(signal.SIGTERM)  # the process only, as `kill PID` or a scheduler's first warning
    _, stderr = winner.communicate(timeout=120)
    assert_interrupted(winner, stderr, 143, "vggkit train: interrupted at epoch ")
    assert not still_running(workers), "DataLoader workers outlived their parent"
    assert not (output / LOCK_NAME).exists()
    read_training_state(output / "last.pt")


# --------------------------------------------------------------------------- every other command, in-process


def interrupt_on_call(monkeypatch, module, name: str, number: int, after: int = 0) -> None:
    """Replace ``module.name`` by a function that sends this process signal ``number`` on its call ``after``+1
    and then runs the original, as a real Ctrl-C or SIGTERM arriving during the work would."""
    original, calls = getattr(module, name), []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == after + 1:
            signal.raise_signal(number)  # handled before it returns (main()'s handler), unless held back
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupting)


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_extract_evaluate_predict_bench_end_with_one_line(tiny, tmp_path, capsys, monkeypatch, number):
    import vggkit.bench.cpu as bench
    import vggkit.evaluation.evaluate as evaluate
    import vggkit.evaluation.predict as predict
    import vggkit.features.extract as extract

    code = 128 + number
    features, csv, report = tmp_path / "features.npz", tmp_path / "predictions.csv", tmp_path / "bench.json"
    cases = [
        (extract, "load_image", 1, ["extract", str(tiny / "shapes"), "--model", str(tiny / "model.pth"), "--layer",
                                    "pool5", "--scales", "32", "--batch-size", "1", "-o", str(features)],
         f"interrupted; partial features not kept ({features} not written)"),
        (evaluate, "load_image", 1, ["evaluate", "--model", str(tiny / "model.pth"), "--data", str(tiny / "shapes"),
                                     "--protocol", "center", "--batch-size", "1", "--workers", "0", "--csv", str(csv)],
         f"interrupted; the predictions so far are kept in {csv}.partial"),
        (predict, "load_image", 1, ["predict", str(tiny / "model.pth"), str(tiny / "shapes")],
         "interrupted; nothing written"),
        (bench.MatmulPeaks, "measure", 0, ["bench", "--quick", "--device", "cpu", "--json", str(report)],
         "interrupted; nothing written"),
    ]
    for module, name, after, argv, expected in cases:
        with monkeypatch.context() as patch:
            interrupt_on_call(patch, module, name, number, after)
            assert main(argv) == code, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip().splitlines()[-1] == f"vggkit {argv[0]}: {expected}", err
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # main() put the handlers back
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not features.exists() and not report.exists() and not csv.exists()
    assert not list(tmp_path.glob(f".*{LOCK_NAME}"))
    rows = Path(f"{csv}.partial").read_text().splitlines()
    assert rows[0].startswith("path,protocol") and len(rows) == 2  # the image done before the interrupt


def test_an_interrupt_python_would_swallow_is_raised_again(tiny, capsys, monkeypatch):
    # A Ctrl-C handled inside a fork hook or a __del__ is "Exception ignored" and lost (the probe's DataLoader
    # start); main() raises it again a moment later, so the command still ends as interrupted.
    import vggkit.evaluation.predict as predict

    class Swallows:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # handled here, where an exception cannot propagate

    load_image = predict.load_image

    def interrupted_in_del(source):
        Swallows()
        time.sleep(20)  # the interrupt, raised again, ends this wait
        return load_image(source)

    monkeypatch.setattr(predict, "load_image", interrupted_in_del)
    started = time.monotonic()
    assert main(["predict", str(tiny / "model.pth"), str(tiny / "shapes")]) == 130
    err = capsys.readouterr().err
    assert time.monotonic() - started < 15 and "Exception ignored" not in err and "Traceback" not in err, err
    assert err.splitlines()[-1] == "vggkit predict: interrupted; nothing written", err


def test_a_workers_resource_sharer_losing_an_interrupted_batch_shows_nothing():
    # The interrupted main process drops a batch half-received; the worker's fd-sharing thread then reports
    # BrokenPipeError through sys.excepthook: a traceback from a forked worker, which inherits main()'s hooks.
    import multiprocessing

    from vggkit.cli import _Interrupts

    shown, interrupts = [], _Interrupts()
    interrupts.saved["sys"] = lambda kind, error, tb: shown.append(kind)
    sharer = os.path.join(os.path.dirname(multiprocessing.__file__), "resource_sharer.py")
    namespace = {}
    exec(compile("def serve():\n    raise BrokenPipeError(32, 'Broken pipe')\n", sharer, "exec"), namespace)
    for fails in (namespace["serve"], lambda: 1 / 0):
        try:
            fails()
        except Exception as error:  # as resource_sharer's _serve does: sys.excepthook(*sys.exc_info())
            interrupts.on_error(type(error), error, error.__traceback__)
    assert shown == [ZeroDivisionError]  # any other error is shown; after an interrupt none is
    interrupts.received = signal.SIGTERM
    interrupts.on_error(ZeroDivisionError, ZeroDivisionError(), None)
    assert shown == [ZeroDivisionError]


# --------------------------------------------------------------------------- one writer per output


def test_a_busy_output_is_refused_with_one_line_naming_its_holder(tiny, imagenet, tmp_path, capsys):
    run, features = tmp_path / "run", tmp_path / "features.npz"
    commands = [
        (OutputLock(run), ["train", "--recipe", "A", "--data", str(imagenet), "--output", str(run)]),
        (OutputLock(run), ["finetune", str(tiny / "shapes"), "--model", "vgg11", "--weights", "none", "--strategy",
                           "full", "--optimizer", "adamw", "--backbone-lr-scale", "1", "--output", str(run)]),
        (OutputLock.for_file(features), ["extract", str(tiny / "shapes"), "-o", str(features)]),
    ]
    for lock, argv in commands:
        with lock:
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "Traceback" not in err, err
            assert f" is in use by process {os.getpid()} on this machine (`" in err and "pytest" in err, err
            assert f"kill {os.getpid()}" in err and ("--output" in err or "-o" in err), err
            assert lock.path.is_file()
        assert not lock.path.exists()
    assert not (run / "last.pt").exists() and not features.exists()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(folder: Path, **fields) -> Path:
    holder = {"pid": dead_pid(), "host": socket.gethostname(), "boot": "", "process_start": None,
              "started": "2024-01-01T00:00:00", "command": "vggkit train --output run", **fields}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps(holder))
    return folder / LOCK_NAME


def test_a_dead_writers_lock_is_taken_over_with_one_warning(tmp_path):
    me = Holder.this_process()
    for name, fields in [("dead pid", {}),
                         ("pid reused", {"pid": os.getpid(), "process_start": me.process_start + 1}),
                         ("rebooted", {"pid": os.getpid(), "boot": "another boot"})]:
        folder = tmp_path / name.replace(" ", "_")
        write_lock(folder, **fields)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with OutputLock(folder) as lock:
                assert Holder.parse(lock.path.read_bytes()) == lock.holder and lock.holder.pid == os.getpid()
        assert len(caught) == 1 and "Took over" in str(caught[0].message), (name, caught)
        assert "vggkit train --output run" in str(caught[0].message) and "no longer running" in str(caught[0].message)
        assert not lock.path.exists()
    # A lock of another machine cannot be checked: refused, with what to do if its process is gone.
    write_lock(tmp_path / "remote", host="elsewhere", pid=1)
    with pytest.raises(OutputBusyError, match=r"in use by process 1 on elsewhere .*if it is gone, delete .*"):
        OutputLock(tmp_path / "remote").acquire()
    # An empty lock (its writer killed between creating and filling it) counts once it is not fresh.
    empty = tmp_path / "empty" / LOCK_NAME
    empty.parent.mkdir()
    empty.write_bytes(b"")
    os.utime(empty, (time.time() - 60, time.time() - 60))
    with pytest.warns(UserWarning, match="died while creating it"):
        OutputLock(empty.parent).acquire().release()


def _take_and_report(folder: Path, start, release, results) -> None:
    """A process taking the lock when all are ready: ("held", its pid), kept until all have tried, or
    ("busy", the holder's pid). Judging a holder takes 0.2 s here: every taker sees the stale lock at once."""
    running = Holder.running
    Holder.running = lambda holder: time.sleep(0.2) or running(holder)  # this forked process only
    start.wait()
    try:
        lock = OutputLock(folder).acquire()
    except OutputBusyError as error:
        results.put(("busy", error.holder.pid))
        release.wait()
    else:
        results.put(("held", os.getpid()))
        release.wait()
        lock.release()


def test_one_taker_of_a_stale_lock_among_many(tmp_path):
    import multiprocessing

    write_lock(tmp_path)
    context = multiprocessing.get_context("fork")  # cheap here: this process has its modules loaded
    start, release, results = context.Barrier(6), context.Barrier(6), context.Queue()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the taker's "Took over" warning is another test's
        takers = [context.Process(target=_take_and_report, args=(tmp_path, start, release, results))
                  for _ in range(6)]
        for taker in takers:
            taker.start()
        outcomes = [results.get(timeout=60) for _ in takers]
        for taker in takers:
            taker.join(timeout=60)
    held = [pid for outcome, pid in outcomes if outcome == "held"]
    assert len(held) == 1 and outcomes.count(("busy", held[0])) == 5, outcomes  # the rest name the taker
    assert not (tmp_path / LOCK_NAME).exists()


def test_rank_other_than_0_takes_no_lock(tmp_path):
    with OutputLock(tmp_path / "run", enabled=False) as lock:
        assert not lock.path.exists()
        OutputLock(tmp_path / "run").acquire().release()  # rank 0's own lock is free to take


# --------------------------------------------------------------------------- outputs that land together


def test_an_interrupt_during_a_held_block_arrives_after_it():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            signal.raise_signal(signal.SIGINT)
            done.append("the rest of the block ran")
    assert done == ["the rest of the block ran"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def finetune_argv(tiny: Path, output: Path) -> list[str]:
    return ["finetune", str(tiny / "shapes"), "--model", "vgg11", "--weights", "none", "--width", "0.0625",
            "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--no-progress",
            "--output", str(output)]


FINETUNE_OUTPUTS = ("model.pth", "training_curves.png", "confusion_matrix.png")


def snapshot(output: Path) -> dict[str, tuple[int, bytes]]:
    """mtime and bytes of each of finetune's outputs."""
    return {name: ((output / name).stat().st_mtime_ns, (output / name).read_bytes()) for name in FINETUNE_OUTPUTS}


@pytest.mark.filterwarnings("ignore:Random weights")
def test_an_interrupted_finetune_leaves_its_previous_outputs_or_all_new_ones(tiny, tmp_path, capsys, monkeypatch):
    import vggkit.finetuning.finetune as finetune_module

    output = tmp_path / "out"
    output.mkdir()
    for name in FINETUNE_OUTPUTS:  # a previous run's outputs
        (output / name).write_bytes(b"previous " + name.encode())
    previous = snapshot(output)
    # Interrupted while training: model.pth and both plots are the previous run's, untouched.
    with monkeypatch.context() as patch:
        interrupt_on_call(patch, finetune_module, "_train_and_validate", signal.SIGINT)
        assert main(finetune_argv(tiny, output)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1] == (
        f"vggkit finetune: interrupted; nothing written (the outputs in {output} are as they were)"), err
    assert snapshot(output) == previous
    # Interrupted after model.pth, before its plots (the probe's case): the plots are written all the same.
    with monkeypatch.context() as patch:
        interrupt_on_call(patch, finetune_module, "save_plots", signal.SIGTERM)
        assert main(finetune_argv(tiny, output)) == 143
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1] == (
        f"vggkit finetune: interrupted after writing {output / 'model.pth'} and its plots"), err
    assert all(snapshot(output)[name][1] != previous[name][1] for name in FINETUNE_OUTPUTS)
    assert vggkit.load(output / "model.pth").class_names == ["circle", "square"]
    assert sorted(p.name for p in output.iterdir()) == sorted(FINETUNE_OUTPUTS)  # no lock, no temp file left


def test_a_worker_forked_before_its_own_handlers_ignores_the_groups_signal(monkeypatch):
    """A Ctrl-C that reaches a DataLoader worker between fork and torch's handlers: the parent stops the
    command; the child must not raise (multiprocessing would print a traceback from its start)."""
    import signal as signals

    from vggkit.cli import _Interrupts

    hooks = _Interrupts()
    monkeypatch.setattr("os.getpid", lambda: hooks.pid + 1)  # as seen from a forked child
    assert hooks.on_signal(signals.SIGINT, None) is None and hooks.received is None
    monkeypatch.undo()
    with pytest.raises(KeyboardInterrupt):
        hooks.on_signal(signals.SIGINT, None)
    assert hooks.received == signals.SIGINT
