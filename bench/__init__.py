"""The project's benchmarks, one module per question, sharing one way to build models and engines
(:mod:`bench.engines`, on :func:`engine.create_engine`), one cache key for their exports
(:func:`dagan.helpers.cache_key`) and one report writer (:mod:`bench.report`: median, p99, fps, the
machine, the load before and after, the date; JSON + markdown):

- :mod:`bench.model` — ``dagan bench``: per-frame latency and throughput of every backend here;
- :mod:`bench.server` — ``python -m bench.server``: streams per machine through a real server;
- :mod:`bench.browser` — ``python -m bench.browser``: the web page in Chromium against a real server,
  a real face video as its webcam: the avatar's fps as the page shows it;
- :mod:`bench.gil` — ``python -m bench.gil``: which media libraries release the GIL;
- :mod:`bench.gpu` — ``python -m bench.gpu`` (run by scripts/gpu_check.sh): the PyTorch variants on a GPU.

Every setting is a flag (``--help``); the only ``DAGAN_*`` variables involved are the server's own,
passed by the server sweep to the server it starts. Default data paths come from :mod:`bench.paths`.
docs/benchmarks.md has the figures and the commands that produced them.
"""
