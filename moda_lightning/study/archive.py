"""Copy a study's finished runs as the small record that lets the study continue anywhere.

A finished run is its ``result.json`` plus what it was made from and how it went: ``config.yaml``,
``hparams.yaml``, ``fit.log`` and its TensorBoard events. Checkpoints are left behind (hundreds of
MB each, and a finished run is never resumed). The events keep every scalar and text entry, but of
each image and histogram tag only the last entry: a depth-statistics run logs three figures per
probe, which would make its event file a hundred times larger than its scalars. A study pointed at
the archive (``--out``) sees these runs as done, and its report reads them.

A run that failed leaves only its ``fit.log`` there, which says why: the study sees that run as
not started, and running it again appends to the same log.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from moda_lightning.study.results import RESULT_FILE

SMALL_FILES = ("config.yaml", "hparams.yaml", "fit.log", RESULT_FILE)


def _heavy_kind(value) -> str | None:
    """``"image"`` or ``"histo"`` for a summary value of that kind, None for scalars, text and the rest."""
    for kind in ("image", "histo"):
        if value.HasField(kind):
            return kind
    return None


def compact_events(source: Path, dest: Path) -> None:
    """Write ``source``'s events to ``dest`` with only the last entry of each image and histogram tag."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    # The raw loader, not EventFileLoader: that one rewrites old-style values into tensors.
    events = [Event.FromString(record) for record in RawEventFileLoader(str(source)).Load()]
    last_step: dict[str, int] = {}
    for event in events:
        for value in event.summary.value:
            if _heavy_kind(value):
                last_step[value.tag] = event.step
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        writer = RecordWriter(out)
        for event in events:
            if event.HasField("summary"):
                kept = [v for v in event.summary.value if not _heavy_kind(v) or last_step[v.tag] == event.step]
                if not kept:
                    continue
                del event.summary.value[:]
                event.summary.value.extend(kept)
            writer.write(event.SerializeToString())
        writer.flush()


def archive_run(run_dir: Path, dest: Path) -> None:
    """Copy one finished run's small record (module docstring) from ``run_dir`` to ``dest``."""
    if not (run_dir / RESULT_FILE).is_file():
        raise ValueError(f"study: {run_dir} has no {RESULT_FILE}; only finished runs are archived")
    dest.mkdir(parents=True, exist_ok=True)
    for name in SMALL_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, dest / name)
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        compact_events(events, dest / events.name)


def archive_failed_log(run_dir: Path, dest: Path) -> None:
    """Copy a failed run's ``fit.log`` (what it printed before it stopped) to ``dest``."""
    if (run_dir / "fit.log").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run_dir / "fit.log", dest / "fit.log")
