"""Sends the anonymous signals of naming_jobs with sender None, as a task runner
that only knows the class or its module would."""

from __future__ import annotations

from tests.apps import naming_jobs
from tests.apps.naming_jobs import Job


def finish_job() -> None:
    Job.finished.send(None)


def finish_batch() -> None:
    naming_jobs.Batch.done.send(None)
