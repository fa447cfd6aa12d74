"""Several gateways as one, through the Redis they share (issue #17, docs/adr/0009-cluster-coalescing.md)."""
