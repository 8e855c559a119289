"""A plugin for the time-limit tests: a pass that sleeps in Python (or spins) before it changes nothing."""

import time
from dataclasses import dataclass

from onnxforge.pipeline import Pass, PassResult, register_pass


@register_pass("test-sleep")
class Sleep(Pass):
    """Sleep `seconds` (interruptible), then spin `spin` seconds in a Python loop that swallows every
    exception, as a careless pass might."""

    lossless = True

    @dataclass
    class Options:
        seconds: float = 60.0
        spin: float = 0.0

    def run(self, model, ctx):
        time.sleep(self.options.seconds)
        end = time.monotonic() + self.options.spin
        while time.monotonic() < end:
            try:
                time.sleep(0.01)
            except Exception:
                pass
        return PassResult(changed=False)
