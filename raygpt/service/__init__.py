"""The team tuning service: sweeps submitted by a team, queued under per-user quotas, with
one database of every sweep and trial and a web page over it.

- `db`: the database's schema (users, tokens, sweeps, trials) and `connect(url)`: SQLite
  in a file by default, PostgreSQL through psycopg 3.
- `index`: sweep folders into the database (`ingest`, `rebuild` of a whole storage root)
  and the trials back out by filter (`query_trials`).
- `auth`: users, their quotas and their API tokens (only a token's sha256 is kept).
- `admission`: which queued sweep starts next, within its owner's quota.
- `pages`: the web page over the database.
- `jobs`: a sweep as a Ray job (its own driver, `python -m raygpt.sweep`): submit,
  state, logs, stop.
- `queue`: one pass of the queue: running sweeps reconciled from Ray, queued ones
  admitted as jobs or given their reason.
- `deployment`: the Ray Serve replica that serves the app and runs the queue, and
  `start`, `stop`, `status`.
"""
