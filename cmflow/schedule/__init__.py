"""Schedules: cron (with a time zone) and data triggers, fired exactly once by an idempotent ``tick(now)``.

Modules, each importing only those before it: :mod:`cmflow.schedule.cron` (cron maths: fire instants in a
time zone, DST), :mod:`cmflow.schedule.store` (the schedule model, its stored state and markers, data-trigger
digests), :mod:`cmflow.schedule.tick` (claiming due fires and submitting them; the dry run) and
:mod:`cmflow.schedule.kuberay` (a RayCronJob rendered from ``cluster/kuberay/raycronjob.yaml.tmpl``).

Layout under the storage root::

    schedules/<id>/schedule.json            the schedule: spec snapshot, cron, time zone, policies, enabled
    schedules/<id>/state.json               cursor, last run, last digest, retries (rebuilt from markers)
    schedules/<id>/ticks/<fire>.json        one create-only marker per cron fire time (UTC, 20260302T020000Z)
    schedules/<id>/triggers/<digest>.json   one create-only marker per dataset-manifest digest (trigger-only)

See :mod:`cmflow.schedule.tick` for exactly-once, catch-up and concurrency, and :mod:`cmflow.schedule.cron`
for daylight-saving time. Every local wall time fires at most once; use ``timezone: UTC`` for strictly
periodic schedules.

A disabled schedule never fires; enabling it again moves its cursor to "now", so times missed while it was
disabled are not caught up. A data trigger fires once per new digest of the dataset manifest it watches
(``trigger.manifest_uri``: a cmflow ``manifest.json`` with a ``digest`` field, read directly, never through a
listing); the digest seen when the schedule was created is the baseline and does not fire. A schedule with
both ``cron`` and ``trigger`` fires at its cron times only when the digest changed since its last run.
Failed submissions are retried on the next ticks (at most ``store.MAX_ATTEMPTS`` tries, same submission id).
"""
