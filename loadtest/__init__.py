"""Benchmark harness for feedsvc: load generators and the raw ceilings of the machine."""
