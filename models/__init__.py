"""silomesh.models."""
