"""The training window of a daily run: which days of raw logs one run ingests.

A recurring run leaves ``run_date`` empty; the window then ends the day before the run's
*scheduled* time (KFP's ``{{$.pipeline_job_schedule_time_utc}}``), so a run that starts late, or
is retried, still trains on the same days.
"""

from __future__ import annotations

import datetime as dt


def _parse_schedule_time(schedule_time: str) -> dt.datetime | None:
    """The scheduled time as UTC, or None when unset (empty, or a placeholder left unresolved)."""
    text = (schedule_time or "").strip()
    if not text or text.startswith("{{"):  # kfp.local and one-off runs leave the placeholder as is
        return None
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"schedule_time {schedule_time!r} is not an RFC 3339 timestamp") from None
    return parsed.astimezone(dt.timezone.utc) if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def training_window(run_date: str, window_days: int, schedule_time: str = "",
                    now: dt.datetime | None = None) -> tuple[dt.date, dt.date]:
    """(first day, last day) of the training window, both inclusive.

    The last day is ``run_date`` (YYYY-MM-DD) when given; otherwise the day before the scheduled
    time, or before ``now`` (UTC) when there is no scheduled time (a manual run).
    """
    if window_days < 1:
        raise ValueError(f"window_days must be >= 1, got {window_days}")
    if run_date:
        try:
            end = dt.date.fromisoformat(run_date)
        except ValueError:
            raise ValueError(f"run_date {run_date!r} is not a YYYY-MM-DD date") from None
    else:
        moment = _parse_schedule_time(schedule_time) or now or dt.datetime.now(dt.timezone.utc)
        end = moment.date() - dt.timedelta(days=1)
    return end - dt.timedelta(days=window_days - 1), end
