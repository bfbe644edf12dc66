"""The benchmarks `make bench` and `make soak` run, each as a module: `python -m bench.control`."""
