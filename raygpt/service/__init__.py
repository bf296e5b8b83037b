"""The team tuning service: sweeps submitted by a team, queued under per-user quotas, with
one database of every sweep and trial and a web page over it.

- `db`: the database's schema (users, tokens, sweeps, trials) and `connect(url)`: SQLite
  in a file by default, PostgreSQL through psycopg 3.
- `index`: sweep folders into the database (`ingest`, `rebuild` of a whole storage root)
  and the trials back out by filter (`query_trials`).
- `auth`: users, their quotas and their API tokens (only a token's sha256 is kept).
- `admission`: which queued sweep starts next, within its owner's quota.
- `pages`: the web page over the database.
"""
