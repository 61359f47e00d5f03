"""Peers: the same produce-then-consume-and-ack workload against other brokers and ours.

Every system gets one client process that keeps the same number of messages in flight
(100, and 400 for a deeper run): a pipeline of that many commands, a window of that many
unconfirmed publishes or unacked deliveries, or calls of 100 elements, that many / 100 at a
time.
"""
