"""Peers: the same produce-then-consume-and-ack workload against other brokers and ours.

Every system gets one client process that keeps one batch of 100 in flight: a pipeline of
100 commands, a window of 100 unconfirmed publishes, or one call carrying 100 elements.
"""
