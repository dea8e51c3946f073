"""Tools around the product, not part of it: mock engines that speak the real ZMQ wire, the
live demo, the routing bench and the benchmark report writer (`kv-sim`)."""
