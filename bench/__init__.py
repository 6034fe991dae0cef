"""Benchmarks of the engine, printed beside the raw database ceiling measured in the same run.

- ``python -m bench.ceilings [--db mysql]``: what the driver and database can do with no accountd
  code in the way (the ceilings).
- ``python -m bench.engine [--db mysql] [--accounts 100000]``: the real daemon against the same
  database: load, memory per account, heartbeat ingest over HTTP, mass heartbeat loss and
  staleness latency, each beside its ceiling.

Results and the commands that produced them are recorded in ``docs/benchmarks.md``.
"""
