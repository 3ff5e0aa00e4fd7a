"""A sweep's progress on the driver: the Tune callback that prints it and refreshes the parent run's
grouped table as trials finish.

Tune pickles a run's callbacks once, in ``tuner.pkl`` when the sweep's ``Tuner`` is built, and
``Tuner.restore`` unpickles them from there: the restored callback holds what the sweep was started
with. The class lives at module level so that it is pickled by reference (a resumed sweep runs this
file's code, not a copy frozen at its start), and it takes the resuming process's parent run and
display while :func:`restoring_as` is active. Only the sweep driver imports this module (it imports
Ray Tune); trial processes never do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ray.tune import Callback

from orchestrator.sweep_tracking import ParentRun, log_grouped

# Trial states Tune does not leave: with those a trial counts as done, also for a callback restored
# in another process that never saw it end.
ENDED, COMPLETED = ("TERMINATED", "ERROR"), ("TERMINATED",)

# While a sweep is being restored in this process: (the parent run it now logs to, or None without
# tracking; whether it draws a live table). None at any other time.
_restoring: tuple[ParentRun | None, bool] | None = None


@contextlib.contextmanager
def restoring_as(parent: ParentRun | None, live: bool) -> Iterator[None]:
    """Callbacks unpickled inside the block (``Tuner.restore``) log to ``parent`` and draw the
    display ``live`` asks for, instead of the ones of the process that started the sweep: an
    embedded server gets a new port on every start, so the pickled URI is dead, and each refresh
    would wait out the MLflow client's retries (minutes)."""
    global _restoring
    previous, _restoring = _restoring, (parent, live)
    try:
        yield
    finally:
        _restoring = previous


class SweepProgress(Callback):
    """Live progress: trials done / running and the best objective so far, one line per event;
    with ``live`` (a terminal, without ``--verbose``) one table redrawn in place instead: each
    trial's name (its swept values), status, tasks done / total, latest avg acc and gen acc,
    elapsed and estimated remaining time. With a parent run, its grouped table and plots are
    refreshed as each trial finishes, over every finished trial (those finished before a resume
    included). The live display is created on first use and never pickled."""

    def __init__(
        self,
        total: int,
        metric: str,
        mode: str,
        parent: ParentRun | None = None,
        tasks_per_trial: int = 0,
        live: bool = False,
    ) -> None:
        self.total, self.metric, self.mode, self.tasks_per_trial = total, metric, mode, tasks_per_trial
        self.parent, self.live = parent, live
        self.ended: set[str] = set()
        self.completed: set[str] = set()
        self._display = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_display": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if _restoring is not None:
            resumed, self.live = _restoring
            self.parent = resumed if self.parent is not None else None

    def on_experiment_end(self, trials, **info):
        if self._display is not None:
            self._display.stop()
            self._display = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("step", 0) == 0 and result.get("tasks_done", 0) > 0:  # a task just ended
            total = len(trial.config.get("trial", {}).get("tasks") or []) or self.tasks_per_trial
            scores = ", ".join(
                f"{name} {result[key]:.3f}"
                for key, name in (("avg_acc", "avg acc"), ("gen_acc", "gen acc"))
                if isinstance(result.get(key), float)
            )
            self._print(trials, f"{trial}: task {result['tasks_done']}/{total} done ({scores})")

    def on_trial_complete(self, iteration, trials, trial, **info):
        from orchestrator.sweep import trial_row

        self.ended.add(trial.trial_id)
        self.completed.add(trial.trial_id)
        self._print(trials)
        if self.parent is not None:
            finished = [trial_row(t) | {"status": "TERMINATED"} for t in self._finished(trials)]
            try:  # a refresh only: the final table is logged when the sweep finishes
                log_grouped(self.parent, finished, final=False)
            except Exception as error:  # an unreachable server must not stop the sweep
                print(f"[sweep] grouped table not refreshed on the parent run: {type(error).__name__}: {error}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)
        self._print(trials)

    def _finished(self, trials: list[Any]) -> list[Any]:
        """Trials that completed: seen to here, or restored as completed."""
        return [t for t in trials if t.trial_id in self.completed or t.status in COMPLETED]

    def _best(self, trials: list[Any]) -> tuple[float, str] | None:
        """The best objective among finished trials and its trial. Only finished trials compete:
        an early stage's average over fewer tasks is not comparable."""
        values = [((t.last_result or {}).get(self.metric), str(t)) for t in self._finished(trials)]
        scored = [(value, name) for value, name in values if value is not None]
        if not scored:
            return None
        return max(scored) if self.mode == "max" else min(scored)

    def _print(self, trials, event: str = "") -> None:
        """``event``: what just happened, said on the line (without a live table, where the
        table's rows would say it)."""
        from rich.console import Console

        from orchestrator.sweep import live_table

        ended = self.ended | {t.trial_id for t in trials if t.status in ENDED}
        running = sum(t.status == "RUNNING" and t.trial_id not in ended for t in trials)
        best = self._best(trials)
        best_text = f"{self.metric} {best[0]:.3f} (trial {best[1]})" if best else "— (no trial finished yet)"
        line = f"[bold]\\[sweep][/] trials done {len(ended)}/{self.total}, running {running}, best so far: {best_text}"
        if not self.live:
            from rich.markup import escape

            if event:
                line = line.replace("trials done", f"{escape(event)}; trials done", 1)
            Console(soft_wrap=True, highlight=False).print(line)
            return
        if self._display is None:
            from rich.live import Live

            self._display = Live(auto_refresh=False, console=Console())
            self._display.start()
        self._display.update(live_table(trials, self.tasks_per_trial, line), refresh=True)
