"""silomesh.simnet: many real peers on 127.0.0.1, topologies, faults, reports (docs/SIMNET.md)."""
