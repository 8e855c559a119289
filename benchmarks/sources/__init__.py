"""Where the benchmarks' real inputs come from: English text, synthesized speech, rendered text images."""
