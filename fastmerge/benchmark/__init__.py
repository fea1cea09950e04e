"""``fastmerge bench``: kernel and end-to-end benchmarking on the user's own hardware.

- ``bytes``: the physical-minimum byte rule per method (what a merge must move);
- ``timing``: timers (CPU ``perf_counter`` on pre-faulted buffers; CUDA events after an L2 flush) and
  median / spread statistics;
- ``roofline``: the copy bandwidth measured in the same run, GB/s and % of copy;
- ``kernels``: the case matrix (method x backend x shape x T x dtype) of ``fastmerge bench kernels``;
- ``merge``: ``fastmerge bench merge CONFIG``, a whole merge against its read-once/write-once floor;
- ``compare``: ratios between two JSON documents, regressions beyond the measured spread;
- ``report``: the table, the JSON document and its schema, the roofline chart;
- ``machine``: what the numbers were measured on.

Front-door level (docs/architecture.md): it may import the engine, the API and the backends; nothing
below imports it. The repository's ``bench/`` suite uses the same byte rule, copy floor and merge floor.
"""
