"""Benchmark harness for the queue manager (run it through ``scripts/bench``).

The harness compares our server with a no-op gRPC server (the floor) built from the same
grpcio, so that every figure can be read as a ratio that stays meaningful on a small,
shared machine where absolute numbers are noisy.
"""
