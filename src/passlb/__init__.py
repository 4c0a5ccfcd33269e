"""passlb: a passthrough Layer-4 network load balancer."""

__version__ = "0.1.0"
