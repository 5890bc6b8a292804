"""mome's benchmarks: one ``bench_<op>.py`` per op family, run with pytest-benchmark or ``python -m mome bench``."""
