"""silomesh.simnet."""
