"""A training that is told to stop (scheduler warning, preemption, Ctrl-C) saves and stops at a safe point.

nnU-Net writes ``checkpoint_latest.pth`` every ``save_every`` (50) epochs, so a job killed in epoch 49
starts again from epoch 0. Under ``sweep`` every training gets, on the trainer *instance*:

- **a stop flag**: SIGUSR1/SIGUSR2 (SLURM's ``--signal`` warning before the time limit; submitit uses
  USR2), SIGTERM (preemption, ``scancel``, ``scontrol requeue``) and SIGINT (Ctrl-C) only set a flag;
  the handler never saves, since a signal can arrive in the middle of an optimizer step;
- **safe points**: after each training iteration and after each epoch, a set flag saves
  ``checkpoint_latest.pth`` and raises :class:`StopRequested`. Saved after iteration ``j`` of epoch
  ``k``, the checkpoint holds the weights reached and restarts epoch ``k`` (nnU-Net's ``--c`` restarts
  epochs; the ``j`` iterations stay in the weights, their time is spent again), so a stopped job
  loses at most one epoch's time, however long ago the last periodic checkpoint was. Before the
  first iteration (nothing to keep) and after training (``checkpoint_final.pth`` is on disk) the
  handler stops at once;
- **atomic checkpoint writes**: every checkpoint (latest, best, final; a method's extra entries
  included) is written to a temporary file in the same folder and moved into place, so a kill in the
  middle of a write never leaves a broken checkpoint;
- ``save_every`` from ``--save-every`` (the cadence that still matters for a hard kill, e.g. SIGKILL
  or a node failure).

Why hooks on the instance rather than a subclass: nnU-Net takes the results folder
(``TRAINER__PLANS__CONFIGURATION``) and the checkpoint's ``trainer_name`` from the class's name, and
prediction finds the class again by that name; a same-named wrapper subclass would be a second class
under one name (pickling by name returns the original, ``isinstance`` and ``__module__`` differ). The
instance keeps its class exactly as nnU-Net resolved it; only this process's trainer is changed.
The trainer is reached through the one function nnU-Net's ``run_training`` builds it with
(:func:`hooks_on_new_trainers`), so the training itself is nnU-Net's own entry point, unchanged.

Data-augmentation workers forked from the training process inherit the handler: there a warning or
Ctrl-C is ignored (the training process decides when to stop) and SIGTERM keeps its default
(the process ends), which is also how nnU-Net and ``multiprocessing`` shut workers down.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from nnunet_selfreg.nnunet_folders import LATEST_CHECKPOINT

__all__ = [
    "STOP_SIGNALS",
    "WARNING_SIGNALS",
    "StopControl",
    "StopRequested",
    "hooks_on_new_trainers",
    "install_trainer_hooks",
]

#: the scheduler's warning before a time limit (SLURM ``--signal``; submitit sends USR2)
WARNING_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
#: preemption, ``scancel``, ``scontrol requeue`` (SIGTERM) and Ctrl-C (SIGINT)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(BaseException):  # noqa: N818  (like KeyboardInterrupt: a trainer's `except Exception` lets it pass)
    """Raised at a safe point after a stop signal, once whatever was worth keeping is saved."""


class StopControl:
    """The stop flag, the phase of the training, and the handlers that set the flag."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.phase = "setup"  # setup -> training -> finished (final checkpoint written)
        self.in_step = False  # inside train_step or on_epoch_end: no checkpoint from an exception there
        self.trainer = None
        self.previous: dict[int, object] = {}
        self._owner = os.getpid()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def warning(self) -> bool:
        """The stop came from the scheduler's warning (the job should be requeued)."""
        return self.signum in WARNING_SIGNALS

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "no signal"

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._owner:  # a forked data-augmentation worker
            if signum == signal.SIGTERM:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
            return
        if self.signum is None or signum in STOP_SIGNALS:  # a stop outranks an earlier warning
            self.signum = signum
        if self.phase != "training":
            raise StopRequested(self.signal_name)

    @contextmanager
    def installed(self) -> Iterator[StopControl]:
        """The flag-setting handlers for the duration of the block (the previous ones restored after)."""
        for sig in (*WARNING_SIGNALS, *STOP_SIGNALS):
            self.previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)


def _atomic(save: Callable[[str], None]) -> Callable[[str], None]:
    """``save(filename)`` writing to a temporary file beside ``filename``, moved into place when complete."""

    def save_checkpoint(filename: str) -> None:
        final = Path(filename)
        tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
        try:
            save(str(tmp))
            if tmp.exists():  # nothing is written on DDP ranks > 0 or with --disable_checkpointing
                os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()

    return save_checkpoint


def save_resumable_checkpoint(trainer) -> int:
    """``checkpoint_latest.pth`` that ``--c`` resumes at the epoch in progress; returns that epoch.

    Between iterations of epoch ``k`` (``current_epoch == k``) it restarts epoch ``k``; after
    ``on_epoch_end`` (which counted ``current_epoch`` up to ``k + 1``) it starts epoch ``k + 1``. nnU-Net
    stores ``current_epoch + 1``, hence the same decrement its own ``on_train_end`` makes. Logged
    values of the unfinished epoch are left out, so the resumed run logs that epoch once.
    """
    resume_epoch = int(trainer.current_epoch)
    logged = trainer.logger.get_checkpoint()
    unfinished = {key: values[resume_epoch:] for key, values in logged.items() if isinstance(values, list)}
    for key in unfinished:
        del logged[key][resume_epoch:]
    trainer.current_epoch -= 1
    try:
        trainer.save_checkpoint(os.path.join(trainer.output_folder, LATEST_CHECKPOINT))
    finally:
        trainer.current_epoch += 1
        for key, values in unfinished.items():
            logged[key].extend(values)
    return resume_epoch


def _say(trainer, message: str) -> None:
    trainer.print_to_log_file(f"nnunet-selfreg sweep: {message}", also_print_to_console=True)


def _stop_dataloaders(trainer) -> None:
    """Shut the data-augmentation workers down as nnU-Net's ``on_train_end`` does (abort event, join)."""
    for loader in (getattr(trainer, "dataloader_train", None), getattr(trainer, "dataloader_val", None)):
        finish = getattr(loader, "_finish", None)
        if finish is not None:
            try:
                finish()
            except Exception:  # workers already gone: nothing left to shut down
                pass


def _save_for_resume(control: StopControl, where: str) -> None:
    """Save the resumable checkpoint and say so in nnU-Net's training log."""
    epoch = save_resumable_checkpoint(control.trainer)
    _say(
        control.trainer,
        f"{control.signal_name} received; {LATEST_CHECKPOINT} saved {where}: the next run continues in epoch {epoch}",
    )


def stop_at_safe_point(control: StopControl, where: str) -> None:
    """Save the resumable checkpoint, stop the data workers, raise StopRequested."""
    _save_for_resume(control, where)
    _stop_dataloaders(control.trainer)
    raise StopRequested(control.signal_name)


def install_trainer_hooks(
    trainer, control: StopControl, save_every: int | None, on_resume: Callable[[int], None] | None = None
) -> None:
    """Give ``trainer`` (an nnUNetTrainer instance) the safe points, atomic checkpoints and cadence."""
    control.trainer = trainer
    if save_every is not None:
        trainer.save_every = int(save_every)
    class_save, class_load = trainer.save_checkpoint, trainer.load_checkpoint
    class_step, class_epoch_start = trainer.train_step, trainer.on_train_epoch_start
    class_epoch_end, class_train_end = trainer.on_epoch_end, trainer.on_train_end
    done = {"iterations": 0}

    def load_checkpoint(filename_or_checkpoint) -> None:
        class_load(filename_or_checkpoint)
        _say(trainer, f"continuing from the checkpoint at epoch {trainer.current_epoch}")
        if on_resume is not None:
            on_resume(int(trainer.current_epoch))

    def on_train_epoch_start() -> None:
        done["iterations"] = 0
        class_epoch_start()

    def train_step(batch: dict) -> dict:
        control.phase = "training"
        control.in_step = True
        out = class_step(batch)
        control.in_step = False
        done["iterations"] += 1
        if control.requested:
            n = trainer.num_iterations_per_epoch
            stop_at_safe_point(control, f"in epoch {trainer.current_epoch} after iteration {done['iterations']} of {n}")
        return out

    def on_epoch_end() -> None:
        control.in_step = True
        class_epoch_end()
        control.in_step = False
        if control.requested and trainer.current_epoch < trainer.num_epochs:
            stop_at_safe_point(control, f"after epoch {trainer.current_epoch - 1}")

    def on_train_end() -> None:
        class_train_end()
        control.phase = "finished"  # checkpoint_final.pth is written: --c only repeats the final validation
        if control.requested:
            raise StopRequested(control.signal_name)

    trainer.save_checkpoint = _atomic(class_save)
    trainer.load_checkpoint = load_checkpoint
    trainer.on_train_epoch_start = on_train_epoch_start
    trainer.train_step = train_step
    trainer.on_epoch_end = on_epoch_end
    trainer.on_train_end = on_train_end


def save_after_failure(control: StopControl) -> bool:
    """After a stop signal, a training that failed between iterations (its data workers ended by SIGTERM)
    is saved as at a safe point; False if it failed inside a step or outside training."""
    if not (control.requested and control.phase == "training" and not control.in_step and control.trainer):
        return False
    _save_for_resume(control, "between iterations")
    return True


@contextmanager
def hooks_on_new_trainers(install: Callable[[object], None]) -> Iterator[None]:
    """Every trainer nnU-Net's ``run_training`` builds in this block gets ``install(trainer)``."""
    from nnunetv2.run import run_training as nnunet_run_training

    build = nnunet_run_training.get_trainer_from_args

    def get_trainer_from_args(*args, **kwargs):
        trainer = build(*args, **kwargs)
        install(trainer)
        return trainer

    nnunet_run_training.get_trainer_from_args = get_trainer_from_args
    try:
        yield
    finally:
        nnunet_run_training.get_trainer_from_args = build
