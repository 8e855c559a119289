"""Calibration: the data-aware machinery that lossy passes share, reached through `ctx.calibration` (context).

The samples and their one split into calibration and held-out parts (context), running a model on them and
reading its intermediate tensors (observe), the statistics of what layers read, computed once per model and
sample set (statistics), refitting layers to the outputs a model computed before a change (recovery), and
measuring what replacing one weight costs at the outputs (probes). The pipeline builds the `Calibration` and
passes import these modules; this package imports neither at run time.
"""
