"""Calibration: the data-aware machinery that lossy passes share.

Running a model on sample inputs and reading its intermediate tensors (observe), refitting layers to the outputs
a model computed before a change (recovery), and measuring what replacing one weight costs at the outputs
(probes). Passes import this package; it imports nothing from passes at run time.
"""
