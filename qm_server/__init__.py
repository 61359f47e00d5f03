"""queue manager server: durable work queues and string maps over gRPC."""
