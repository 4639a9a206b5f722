"""``moda study``: run a study's arms x seeds as ``moda fit`` processes, then write its report.

A run whose folder holds ``result.json`` is finished and skipped; a run with a ``last.ckpt`` but no
result resumes from it; the rest start fresh. So a study interrupted anywhere (or moved to another
machine with its run folders, which hold small files besides the checkpoints) continues with the
same command. Runs go ``runs_per_gpu`` at a time on each GPU (``CUDA_VISIBLE_DEVICES``), or that
many at a time on a CPU-only machine.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

from moda_lightning.study.archive import archive_failed_log, archive_run
from moda_lightning.study.report import write_report
from moda_lightning.study.results import RESULT_FILE, RunResult, latest_step, summarize
from moda_lightning.cli import resolved_fit_config
from moda_lightning.study.spec import Run, StudySpec, load_study, plan_runs


def run_state(run: Run) -> str:
    """``"done"``, ``"resume"`` (a checkpoint to continue from) or ``"new"``."""
    if (run.dir / RESULT_FILE).is_file():
        return "done"
    return "resume" if (run.dir / "checkpoints" / "last.ckpt").is_file() else "new"


def fit_command(run: Run) -> list[str]:
    """The ``moda fit`` command line of a run, resuming from its last checkpoint if it has one."""
    cmd = [sys.executable, "-m", "moda_lightning.cli", "fit", *run.args]
    if run_state(run) == "resume":
        cmd.append(f"--ckpt_path={run.dir / 'checkpoints' / 'last.ckpt'}")
    return cmd


def _slots(spec: StudySpec) -> list[str | None]:
    """One entry per run that may go at once: the ``CUDA_VISIBLE_DEVICES`` value of the GPU it gets,
    or None on a CPU-only machine."""
    gpus = visible_gpus(spec.gpus)
    if not gpus:
        return [None] * spec.runs_per_gpu
    return [g for g in gpus for _ in range(spec.runs_per_gpu)]


def visible_gpus(requested: int | None) -> list[str]:
    """The GPUs this process may use, as each run's ``CUDA_VISIBLE_DEVICES`` must name them: the
    entries of this process's own ``CUDA_VISIBLE_DEVICES`` when it is set (a study started on GPUs
    2 and 3 runs on them, not on 0 and 1), else the indices; the first ``requested`` of them.

    Raises:
        ValueError: If ``requested`` is more than are visible, before any run starts.
    """
    import torch

    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g.strip() for g in listed.split(",")][:count] if listed else [str(g) for g in range(count)]
    if requested is None:
        return gpus
    if requested > len(gpus):
        raise ValueError(
            f"study: the study file asks for gpus: {requested}, but {len(gpus)} GPU(s) are visible here"
            + (f" (CUDA_VISIBLE_DEVICES={listed})" if listed is not None else "")
            + f"; set gpus to at most {len(gpus)} or leave it out to use every visible GPU"
        )
    return gpus[:requested]


def mps_daemon_running() -> bool:
    """Whether a CUDA MPS control daemon is up: its control pipe sits in ``CUDA_MPS_PIPE_DIRECTORY``
    (default ``/tmp/nvidia-mps``), where every CUDA process looks for it when it starts."""
    return (Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")) / "control").exists()


def sharing_hint(slots: list[str | None], n_runs: int) -> str | None:
    """One line for runs about to share a GPU without MPS, whose kernels then take turns on it."""
    shares = n_runs > 1 and len(slots) > len(set(slots)) and None not in slots
    if not shares or mps_daemon_running():
        return None
    return (
        "runs will share a GPU, and no CUDA MPS daemon is running, so their kernels take turns on it; "
        "start one first (nvidia-cuda-mps-control -d) for them to run at once: two Table 6 runs on one "
        "H200 finished 1.39x as fast as one after another under MPS, about 1.13x without (docs/quality.md)"
    )


def _log(message: str) -> None:
    print(f"[moda study {time.strftime('%H:%M:%S')}] {message}", flush=True)


def execute(
    spec: StudySpec, runs: list[Run], progress_every_s: float = 60.0, max_runs: int | None = None, arms: list[str] | None = None
) -> list[str]:
    """Run the unfinished runs (at most ``max_runs`` of them, of ``arms`` only if given); return the
    names of runs that failed (their fit.log says why)."""
    todo = [r for r in runs if run_state(r) != "done" and (arms is None or r.arm in arms)][:max_runs]
    if not todo:
        return []
    free = _slots(spec)  # first: a study file asking for GPUs that are not here fails before any work
    gpu_index = {gpu: i for i, gpu in enumerate(dict.fromkeys(s for s in free if s is not None))}
    if gpu_index and (problem := memory_problem(spec, runs, todo, min(map(_gpu_memory_gib, gpu_index.values())))) is not None:
        raise ValueError(problem)
    # Tokenizer and token cache are built once here, not raced by parallel runs.
    _prepare_data(todo[0])
    if (hint := sharing_hint(free, len(todo))) is not None:
        _log(hint)
    running: dict[str, tuple[Run, subprocess.Popen, str | None, float]] = {}
    failed: list[str] = []
    done_count, t_start = sum(run_state(r) == "done" for r in runs), time.time()
    total = done_count + len(todo)  # what this call will have finished
    last_progress = last_sample = time.time()
    started: list[str] = []
    queue = list(todo)
    while queue or running:
        while queue and free:
            run, slot = queue.pop(0), free.pop(0)
            run.dir.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ)
            if slot is not None:
                env["CUDA_VISIBLE_DEVICES"] = slot
            verb = "resuming" if run_state(run) == "resume" else "starting"
            log = open(run.dir / "fit.log", "a")
            proc = subprocess.Popen(fit_command(run), stdout=log, stderr=subprocess.STDOUT, env=env)
            log.close()
            running[run.name] = (run, proc, slot, time.time())
            started.append(run.name)
            _record_device(run.dir, gpu_index.get(slot))
            _log(f"{verb} {run.name}" + (f" on GPU {slot}" if slot is not None else "") + f" ({run.max_steps} steps)")
        if started:
            _record_gpu_sharing(running, started)
            started = []
        time.sleep(1.0)
        if time.time() - last_sample >= SHARING_SAMPLE_S:
            last_sample = time.time()
            _record_gpu_sharing(running)
        for name, (run, proc, slot, t0) in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            sharing = _sharing_now(running)[name]
            del running[name]
            free.append(slot)
            try:
                if code != 0:
                    raise ValueError(f"exit status {code}")
                summarize(
                    run.dir,
                    run.arm,
                    run.seed,
                    run.tokens_per_step,
                    run.max_steps,
                    run.eval_every_steps,
                    _recorded_gpu_sharing(run.dir),
                    _recorded_device(run.dir),
                ).save(run.dir)
                done_count += 1
                _log(f"finished {name} in {time.time() - t0:.0f} s ({done_count}/{total} done)")
            except ValueError as err:
                failed.append(name)
                _log(f"FAILED {name}: {err}; see {run.dir / 'fit.log'}" + _memory_hint(run.dir, sharing, spec))
        if running and time.time() - last_progress >= progress_every_s:
            last_progress = time.time()
            parts = [f"{n} step {latest_step(r.dir)}/{r.max_steps}" for n, (r, *_ignored) in running.items()]
            _log(f"{done_count}/{total} done, {time.time() - t_start:.0f} s; running: " + ", ".join(parts))
    return failed


GPU_SHARING_FILE = "gpu_sharing"
SHARING_SAMPLE_S = 10.0  # how often each running run's sharing is sampled


def _recorded_gpu_sharing(run_dir: Path) -> int | None:
    """How many runs shared the run's GPU while it trained: the upper median of its samples. A median,
    not the most ever seen: a run that started beside runs which failed within seconds trained
    alone, and its tokens/s must be compared with other lone runs'. The upper one, so a run shared
    for half its time counts as shared."""
    path = run_dir / GPU_SHARING_FILE
    samples = sorted(int(n) for n in path.read_text().split()) if path.is_file() else []
    return samples[len(samples) // 2] if samples else None


def _sharing_now(running: dict[str, tuple[Run, subprocess.Popen, str | None, float]]) -> dict[str, int]:
    """Each running run's count of runs on its GPU, itself included (on a CPU-only machine, slot
    None, the runs share the CPU alike)."""
    per_slot = collections.Counter(slot for _, _, slot, _ in running.values())
    return {name: per_slot[slot] for name, (_, _, slot, _) in running.items()}


def _record_gpu_sharing(
    running: dict[str, tuple[Run, subprocess.Popen, str | None, float]], names: list[str] | None = None
) -> None:
    """Add a sample of the sharing now to the record of each running run (of ``names`` only, if given:
    the runs just started). The record is a file in the run folder, so a run resumed by a later
    call adds to its earlier pieces' samples."""
    for name, count in _sharing_now(running).items():
        if names is None or name in names:
            with open(running[name][0].dir / GPU_SHARING_FILE, "a") as f:
                f.write(f"{count}\n")


MEMORY_MARGIN_GIB = 1.0  # per run, for what its process holds outside PyTorch's allocator (CUDA context, workspaces)


def _gpu_memory_gib(index: int) -> float:
    import torch

    return torch.cuda.get_device_properties(index).total_memory / 2**30


def memory_problem(spec: StudySpec, runs: list[Run], todo: list[Run], gpu_gib: float) -> str | None:
    """One line when the runs about to share a GPU would not fit its memory, judged by the most memory
    each arm's finished runs recorded (plus :data:`MEMORY_MARGIN_GIB` each); None when they fit or
    nothing is known. Checked before any run starts: otherwise a run that does not fit fails minutes
    into the study, after the data was prepared, and the others have already started."""
    peaks: dict[str, float] = {}
    for run in runs:
        if run_state(run) == "done" and (peak := RunResult.load(run.dir).peak_memory_gib) is not None:
            peaks[run.arm] = max(peaks.get(run.arm, 0.0), peak)
    need = sorted((peaks[r.arm] + MEMORY_MARGIN_GIB for r in todo if r.arm in peaks), reverse=True)
    together = min(spec.runs_per_gpu, len(todo))
    if together < 2 or sum(need[:together]) <= gpu_gib:
        return None
    fits = 1
    while fits < together and sum(need[: fits + 1]) <= gpu_gib:
        fits += 1
    known = ", ".join(f"{arm} {peak:.1f} GiB" for arm, peak in sorted(peaks.items()))
    return (
        f"study: {together} runs at once would need about {sum(need[:together]):.0f} GiB of GPU memory, and this GPU "
        f"has {gpu_gib:.0f} GiB (the most each arm's finished runs reserved: {known}; plus {MEMORY_MARGIN_GIB:.0f} GiB a "
        f"run); run {fits} at a time with --runs-per-gpu {fits}"
    )


OUT_OF_MEMORY = ("CUDA out of memory", "OutOfMemoryError", "CUBLAS_STATUS_ALLOC_FAILED")


def _memory_hint(run_dir: Path, sharing: int, spec: StudySpec) -> str:
    """The failure line's advice when a run's log ends in a GPU out-of-memory error: runs that fit
    one GPU's memory together, or fewer per GPU."""
    log = run_dir / "fit.log"
    if not log.is_file():
        return ""
    with open(log, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 64_000))  # the error is at the end of a possibly long log
        tail = f.read().decode(errors="replace")
    if not any(marker in tail for marker in OUT_OF_MEMORY):
        return ""
    if sharing > 1:
        return (
            f"; it ran out of GPU memory while {sharing} runs shared its GPU: run fewer at once "
            f"(`--runs-per-gpu {sharing - 1}`, or runs_per_gpu in {spec.path}) and run the same command again"
        )
    return "; it ran out of GPU memory alone on its GPU: lower --data.batch_size and raise --trainer.accumulate_grad_batches as much (the same tokens per step)"


DEVICE_FILE = "device"


def _device_names(run_dir: Path) -> list[str]:
    path = run_dir / DEVICE_FILE
    return path.read_text().splitlines() if path.is_file() else []


def _recorded_device(run_dir: Path) -> str | None:
    return ", ".join(n for n in _device_names(run_dir) if n) or None


def _record_device(run_dir: Path, gpu_index: int | None) -> None:
    """Add the GPU model a run (or a resumed piece of it) trains on to the run folder's record;
    ``gpu_index`` is that GPU's index in this process."""
    import torch

    if gpu_index is None or not torch.cuda.is_available():
        return
    name = torch.cuda.get_device_name(gpu_index)
    if name not in _device_names(run_dir):
        with open(run_dir / DEVICE_FILE, "a") as f:
            f.write(name + "\n")


def _prepare_data(run: Run) -> None:
    """Train or load the tokenizer and build the token cache, in this process, with the runs' data flags."""
    from moda_lightning.data import TextDataModule

    data = resolved_fit_config(list(run.args))["data"]
    if isinstance(data, dict) and "class_path" in data:  # a user's data module subclass
        module, _, name = data["class_path"].rpartition(".")
        cls, data = getattr(importlib.import_module(module), name), data.get("init_args", {})
    else:
        cls = TextDataModule
    _log("preparing the tokenizer and token cache shared by all runs")
    cls(**data).prepare_data()


def collect(runs: list[Run]) -> tuple[list[RunResult], list[str]]:
    """Results of the finished runs and the names of the others."""
    results, missing = [], []
    for run in runs:
        if run_state(run) == "done":
            results.append(RunResult.load(run.dir))
        else:
            missing.append(run.name)
    return results, missing


def main(argv: list[str] | None = None) -> int:
    """``moda study --config STUDY.yaml [--out DIR] [--dry-run] [--report-only] [fit flags...]``."""
    parser = argparse.ArgumentParser(
        prog="moda study",
        description="Run a study's arms x seeds as `moda fit` runs, skip finished ones, resume interrupted ones, "
        "and write study.md and study.png. Extra arguments are added to every run's `moda fit` flags.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="the study file (YAML), e.g. studies/table6_24l.yaml")
    parser.add_argument("--out", help="folder of the runs and the report (default: runs/studies/<name>)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their commands; start nothing")
    parser.add_argument("--report-only", action="store_true", help="write the report from the finished runs; start nothing")
    parser.add_argument("--max-runs", type=int, help="start at most this many of the unfinished runs (e.g. what fits a time slot)")
    parser.add_argument(
        "--arms",
        help="start only runs of these arms, comma-separated (e.g. the paper's key pair first); the report covers "
        "every finished run",
    )
    parser.add_argument(
        "--runs-per-gpu",
        type=int,
        metavar="N",
        help="runs going at once on each GPU, instead of the study file's runs_per_gpu (e.g. fewer on a GPU with less memory)",
    )
    parser.add_argument(
        "--archive",
        metavar="DIR",
        help="afterwards, copy the finished runs' small record (no checkpoints, last figure of each kind) and the "
        "report to DIR; `--out DIR` continues the study from there on any machine",
    )
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if not a.startswith("--") or a.startswith("--config")]
    if bad:
        parser.error(f"unrecognized arguments {bad}; extra arguments must be `moda fit` flags such as --data.files=...")
    if args.runs_per_gpu is not None and args.runs_per_gpu < 1:
        parser.error(f"--runs-per-gpu must be at least 1, not {args.runs_per_gpu}")
    spec = load_study(args.config)
    if extra:
        spec = dataclasses.replace(spec, args=(*spec.args, *extra))
    if args.runs_per_gpu is not None:
        spec = dataclasses.replace(spec, runs_per_gpu=args.runs_per_gpu)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    unknown = sorted(set(arms or ()) - {a.name for a in spec.arms})
    if unknown:
        parser.error(f"--arms names {unknown}, which {spec.path} does not define; its arms: {[a.name for a in spec.arms]}")
    out_dir = Path(args.out or Path("runs") / "studies" / spec.name)
    runs = plan_runs(spec, out_dir)
    if args.dry_run:
        for run in runs:
            state = run_state(run)
            print(f"{run.name:40s} {state:7s} {run.max_steps} steps x {run.tokens_per_step:,} tokens")
            if state != "done":
                print("    moda " + " ".join(fit_command(run)[3:]))
        return 0
    if args.report_only and not any(run_state(run) == "done" for run in runs):
        print(f"moda study: --report-only found no finished run of {spec.path} under {out_dir}; pass --out with "
              "the folder the study wrote (default runs/studies/<name>), or run the study first", file=sys.stderr)  # fmt: skip
        return 2
    failed = [] if args.report_only else execute(spec, runs, max_runs=args.max_runs, arms=arms)
    results, missing = collect(runs)
    if results:
        md, png = write_report(spec, results, missing, out_dir)
        _log(f"wrote {md} and {png}")
    if args.archive:
        archive_dir = Path(args.archive)
        for run in runs:
            if run_state(run) == "done":
                archive_run(run.dir, archive_dir / run.dir.relative_to(out_dir))
            elif run.name in failed:
                archive_failed_log(run.dir, archive_dir / run.dir.relative_to(out_dir))
        if results:
            md, png = write_report(spec, results, missing, archive_dir)
        failed_logs = f", the logs of {len(failed)} failed run(s)" if failed else ""
        _log(f"archived {len(results)} finished run(s){failed_logs}" + (" and the report" if results else "") + f" to {archive_dir}")
    if failed:
        _log(f"{len(failed)} run(s) failed: {', '.join(failed)}; fix the cause and run the same command again")
        return 1
    return 0
